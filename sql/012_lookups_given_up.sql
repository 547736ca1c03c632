-- A look-up at Stripe that keeps being answered "no such object" (404) is set aside instead of
-- being asked again every six hours for ever: `gave_up_at` says when; no worker claims it until
-- `donations lookups retry` (or, for a payout, a new status) puts it back.
ALTER TABLE balance_transaction_fetches ADD COLUMN gave_up_at timestamptz;
ALTER TABLE payout_fetches ADD COLUMN gave_up_at timestamptz;
