-- A bank debit (Bacs, SEPA) that Stripe booked in the balance when it was submitted and reversed
-- when the bank refused it has two balance transactions of its charge: the booking (type
-- payment, category charge, with Stripe's fee, which it keeps) and the reversal (type
-- payment_failure_refund, category charge_failure; stripe/_charge.py
-- `failure_balance_transaction`). Both are paid out like any other movement, so the
-- contributions report shows them (a payment row in, a payment_failure row out, each at its own
-- time) and the rows naming a payout add up to it. The payment keeps their ids; its own
-- balance_transaction, fee and net stay those of a charge that took the money (none for a
-- payment that failed), and the public totals, which read succeeded payments only, do not change.
ALTER TABLE payments ADD COLUMN booked_balance_transaction text,
                     ADD COLUMN failure_balance_transaction text;

-- the payments already in the ledger, from the charges kept (as ledger.derive_payment takes
-- them: a failed charge with a balance transaction, the payment's own charge first, else the
-- first by id)
UPDATE payments p
   SET booked_balance_transaction = c.booked, failure_balance_transaction = c.failure
  FROM (SELECT DISTINCT ON (q.payment_key) q.payment_key, f.booked, f.failure
          FROM stripe_objects o
          JOIN payments q ON q.payment_key = o.payment_key
         CROSS JOIN LATERAL (
             SELECT CASE jsonb_typeof(o.data -> 'balance_transaction')
                         WHEN 'string' THEN nullif(o.data ->> 'balance_transaction', '')
                         WHEN 'object' THEN CASE jsonb_typeof(o.data -> 'balance_transaction' -> 'id')
                                                 WHEN 'string' THEN nullif(o.data -> 'balance_transaction' ->> 'id', '')
                                            END
                    END AS booked,
                    CASE jsonb_typeof(o.data -> 'failure_balance_transaction')
                         WHEN 'string' THEN nullif(o.data ->> 'failure_balance_transaction', '')
                         WHEN 'object' THEN CASE jsonb_typeof(o.data -> 'failure_balance_transaction' -> 'id')
                                                 WHEN 'string' THEN nullif(o.data -> 'failure_balance_transaction' ->> 'id', '')
                                            END
                    END AS failure) f
         WHERE o.object = 'charge' AND o.data ->> 'status' = 'failed' AND f.booked IS NOT NULL
         ORDER BY q.payment_key, (o.id = q.charge) IS TRUE DESC, o.id COLLATE "C") c
 WHERE p.payment_key = c.payment_key;

-- the report reads them without a scan of every payment
CREATE INDEX payments_booked_debits ON payments (payment_key)
 WHERE booked_balance_transaction IS NOT NULL;

-- and their fees, for the reports
INSERT INTO balance_transaction_fetches (id)
SELECT DISTINCT t.id
  FROM payments p
 CROSS JOIN LATERAL (VALUES (p.booked_balance_transaction),
                            (p.failure_balance_transaction)) AS t(id)
 WHERE p.booked_balance_transaction IS NOT NULL AND t.id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM balance_transactions b WHERE b.id = t.id)
ON CONFLICT (id) DO NOTHING;
