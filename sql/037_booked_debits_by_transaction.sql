-- A bank debit's failed try keeps its booking and reversal on its payment (sql/032). The payouts
-- report and reconciliation find that payment from either transaction (one of a payout's, one
-- Stripe listed): looked up by each, the few payments that have them indexed.
CREATE INDEX payments_booked_balance_transaction ON payments (booked_balance_transaction)
 WHERE booked_balance_transaction IS NOT NULL;
CREATE INDEX payments_failure_balance_transaction ON payments (failure_balance_transaction)
 WHERE failure_balance_transaction IS NOT NULL;
