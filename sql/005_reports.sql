-- Payouts tied to the balance transactions that make them up, and the queue that fetches them.
--
-- Stripe's payout webhooks say how much arrived; which charges, refunds, dispute movements and
-- fees make up that amount is only known by listing GET /v1/balance_transactions?payout=…,
-- done by the payout worker (donations/payouts.py), never on the webhook's path.

-- The transactions Stripe listed for a payout (the payout's own, type 'payout', included).
CREATE TABLE payout_balance_transactions (
    payout               text NOT NULL,
    balance_transaction  text NOT NULL,
    PRIMARY KEY (payout, balance_transaction)
);
CREATE INDEX payout_balance_transactions_bt ON payout_balance_transactions (balance_transaction);

-- One row per paid or failed payout: whether its transactions have been fetched for the status
-- it has now (a payout that fails after being paid is fetched again), with backoff on errors.
CREATE TABLE payout_fetches (
    payout           text PRIMARY KEY,
    payout_status    text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    fetched_at       timestamptz,
    queued_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payout_fetches_due ON payout_fetches (next_attempt_at) WHERE fetched_at IS NULL;

-- The reports select by movement time; refunds had no index on it.
CREATE INDEX refunds_created_at ON refunds (created_at);
CREATE INDEX disputes_created_at ON disputes (created_at);
CREATE INDEX payouts_arrival_date ON payouts (arrival_date);
