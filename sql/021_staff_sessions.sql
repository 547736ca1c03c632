-- The staff page's sign-in: a session of its own, not the token. The cookie carries a random
-- session id (only its SHA-256 is kept), tied to the token that signed in, ending at
-- `expires_at` whatever the browser does, at sign-out (the row is deleted), and as soon as its
-- token is revoked. A copy of the cookie is then worth nothing after sign-out, and is never the
-- token itself (which also opens the API).
CREATE TABLE staff_sessions (
    session_hash bytea       PRIMARY KEY CHECK (length(session_hash) = 32),
    token_id     bigint      NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL CHECK (expires_at > created_at)
);
CREATE INDEX staff_sessions_expires_at ON staff_sessions (expires_at);
