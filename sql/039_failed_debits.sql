-- Every bank debit (Bacs, SEPA) of a payment that Stripe booked when it was submitted and reversed
-- when the bank refused it, by its charge: a payment intent tried again (an invoice's retries)
-- can have several, each with its booking (the fee Stripe keeps with it) and reversal, each in
-- the contributions report and joined to its payment in the payouts report. The payment's own
-- booked_/failure_balance_transaction (sql/032) name one of them.
CREATE TABLE failed_debits (
    charge                      text PRIMARY KEY CHECK (charge <> ''),
    payment_key                 text NOT NULL,
    booked_balance_transaction  text NOT NULL,
    failure_balance_transaction text
);
CREATE INDEX failed_debits_payment ON failed_debits (payment_key);

-- those of the payments already in the ledger, from the charges kept (as ledger.derive_payment
-- takes them: a failed charge with a balance transaction)
INSERT INTO failed_debits (charge, payment_key, booked_balance_transaction,
                           failure_balance_transaction)
SELECT o.id, p.payment_key, f.booked, f.failure
  FROM stripe_objects o
  JOIN payments p ON p.payment_key = o.payment_key
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
ON CONFLICT (charge) DO NOTHING;
