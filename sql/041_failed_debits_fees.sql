-- The bookings and reversals sql/039 listed in failed_debits from the charges kept are queued for
-- the fee worker when not fetched yet (the reports read their fee, net and settlement): the
-- derivation queues those of the rows it writes, and these were written by the migration.
INSERT INTO balance_transaction_fetches (id)
SELECT DISTINCT t.id
  FROM failed_debits f
 CROSS JOIN LATERAL (VALUES (f.booked_balance_transaction),
                            (f.failure_balance_transaction)) AS t(id)
 WHERE t.id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = t.id)
ON CONFLICT (id) DO NOTHING;
