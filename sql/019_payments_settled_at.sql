-- When a payment entered the Stripe balance: its balance transaction's `created`. Finance's
-- reports count a payment then, as Stripe's balance and payout reports do; a Bacs or SEPA debit
-- settles days after its charge was created, so dating it by the charge put it in the month
-- before the money arrived and changed a month already closed once it succeeded. Until the
-- balance transaction is fetched (seconds, for a card) the payment is dated by its creation.
ALTER TABLE payments ADD COLUMN settled_at timestamptz;

UPDATE payments p SET settled_at = b.created_at
  FROM balance_transactions b
 WHERE b.id = p.balance_transaction;

CREATE INDEX payments_booked_at ON payments ((coalesce(settled_at, created_at)))
 WHERE status = 'succeeded';
