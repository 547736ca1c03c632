-- A look-up is set aside after Stripe answered "no such object" three times *running*: an outage
-- (5xx, timeouts) before a single 404 no longer counts towards it.
ALTER TABLE balance_transaction_fetches ADD COLUMN not_found_in_a_row integer NOT NULL DEFAULT 0
    CHECK (not_found_in_a_row >= 0);
ALTER TABLE payout_fetches ADD COLUMN not_found_in_a_row integer NOT NULL DEFAULT 0
    CHECK (not_found_in_a_row >= 0);
