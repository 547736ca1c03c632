-- A refund the bank sends back (failed) or that is cancelled puts the money back with a balance
-- transaction of its own (type refund_failure). The reports show that as a movement at its own
-- time, so that both payouts tie and a month already closed does not change.
ALTER TABLE refunds ADD COLUMN failure_balance_transaction text;

-- the refunds already in the ledger, from the snapshot each was derived from
UPDATE refunds r
   SET failure_balance_transaction = CASE jsonb_typeof(o.data -> 'failure_balance_transaction')
                                         WHEN 'string' THEN o.data ->> 'failure_balance_transaction'
                                         WHEN 'object' THEN o.data -> 'failure_balance_transaction' ->> 'id'
                                     END
  FROM stripe_objects o
 WHERE o.id = r.id AND r.status IN ('failed', 'canceled');

-- and their fees, for the reports
INSERT INTO balance_transaction_fetches (id)
SELECT failure_balance_transaction FROM refunds
 WHERE failure_balance_transaction IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = failure_balance_transaction)
ON CONFLICT (id) DO NOTHING;
