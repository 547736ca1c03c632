-- sql/037's indexes served look-ups of a payment by its failed try's booking or reversal; those
-- now go by the try's charge in failed_debits (sql/039), so they are dropped.
DROP INDEX IF EXISTS payments_booked_balance_transaction;
DROP INDEX IF EXISTS payments_failure_balance_transaction;
