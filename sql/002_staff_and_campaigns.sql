-- Staff access tokens (only a hash is kept) and the campaigns that contributions can be given to.

CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    token_hash    bytea       NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    scopes        text[]      NOT NULL
        CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['admin', 'reports:read', 'portal']),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
-- a name names one live token; a revoked token's name may be given to a new one
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE campaigns (
    slug          text PRIMARY KEY CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    title         text        NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    goal_amount   bigint      CHECK (goal_amount > 0),
    goal_currency text        CHECK (goal_currency ~ '^[a-z]{3}$'),
    starts_at     timestamptz,
    ends_at       timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((goal_amount IS NULL) = (goal_currency IS NULL)),
    CHECK (ends_at IS NULL OR starts_at IS NULL OR ends_at > starts_at)
);
