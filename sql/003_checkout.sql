-- Checkout for the site's forms: idempotent requests, founding-seat holds, rate-limit windows.
--
-- Stripe is the system of record for the sessions themselves; what lives here is what must be
-- decided before Stripe is asked (may this caller start a checkout now, is a founding seat free)
-- and what lets a retried request get the same answer.

-- One row per Idempotency-Key the site sent (kept 24 hours, as Stripe keeps its own).
--   pending: a request with this key is being served (or its process died: taken over when stale)
--   done:    `response` is the answer every later request with the same key and body gets
--   failed:  Stripe did not create a session; the same key and body may try again (`attempts`)
CREATE TABLE checkout_requests (
    idempotency_key  text PRIMARY KEY CHECK (idempotency_key ~ '^[\x21-\x7e]{1,200}$'),
    request_hash     bytea       NOT NULL CHECK (length(request_hash) = 32),
    state            text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'done', 'failed')),
    attempts         integer     NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    checkout_session text        CHECK (checkout_session LIKE 'cs\_%'),
    response         jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    claimed_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'done') = (response IS NOT NULL AND checkout_session IS NOT NULL))
);
CREATE INDEX checkout_requests_created_at ON checkout_requests (created_at);

-- A founding seat held for a subscription checkout from before Stripe is asked until its session
-- completes (the seat is then taken by the subscription) or expires. Whether a hold is live is
-- read from the session's snapshot in stripe_objects (status open, complete or expired, kept by
-- the webhook), else from `expires_at`: the session's own expiry plus a grace for a late webhook.
-- Holds are only ever taken under the advisory lock 'donations:founding_seats' (donations/seats.py).
CREATE TABLE founding_holds (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    checkout_session text        UNIQUE CHECK (checkout_session LIKE 'cs\_%'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
CREATE INDEX founding_holds_expires_at ON founding_holds (expires_at);

-- The founding subscriptions are counted under that lock on every founding checkout.
CREATE INDEX subscriptions_founding ON subscriptions (id) WHERE founding;

-- Fixed-window counters of checkout attempts, per client network and overall, shared by every
-- replica (one upsert per attempt); windows older than the current one are deleted periodically.
CREATE TABLE rate_limit_hits (
    bucket        text        NOT NULL CHECK (length(bucket) BETWEEN 1 AND 100),
    window_start  timestamptz NOT NULL,
    hits          integer     NOT NULL CHECK (hits > 0),
    PRIMARY KEY (bucket, window_start)
);
CREATE INDEX rate_limit_hits_window_start ON rate_limit_hits (window_start);
