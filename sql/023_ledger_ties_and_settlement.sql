-- Three things the ledger must not leave to chance.
--
-- 1. A charge captured in the same second it was authorised: its `charge.succeeded`
--    (captured false) and `charge.captured` snapshots tied on stage, progress and time, and the
--    event ids decided. Capture is progress now, as refunds and an attached balance transaction
--    are (donations/events.py: 4 × refunded + 2 × captured + attached); the stored charges take
--    the new figure, so that old and new snapshots compare on one scale.
UPDATE stripe_objects
   SET progress = 4 * coalesce((data->>'amount_refunded')::bigint, 0)
                + CASE WHEN data->>'captured' = 'false' THEN 0 ELSE 2 END
                + CASE WHEN coalesce(data->>'balance_transaction', '') = '' THEN 0 ELSE 1 END
 WHERE object = 'charge';

-- 2. The last tie-break is the event id, compared as the reference derivation compares it (by
--    code point): in the database's own collation (en_US, say) `evt_…B` and `evt_…a` would sort
--    the other way, and the kept snapshot would depend on how the server was installed.
ALTER TABLE stripe_objects ALTER COLUMN event_id TYPE text COLLATE "C";

-- 3. A payment's settlement taken from its balance transaction whenever that is stored, however
--    the row was written: by a derivation that read the cluster just before the fee worker,
--    the payout worker or a reconciliation stored the balance transaction (the fee was then lost
--    for good: nothing queued it again), or by a replica still running the code before 019,
--    which knows nothing of settled_at.
CREATE FUNCTION payments_fill_settlement() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    b balance_transactions%ROWTYPE;
BEGIN
    SELECT * INTO b FROM balance_transactions WHERE id = NEW.balance_transaction;
    IF FOUND THEN
        NEW.fee := coalesce(NEW.fee, b.fee);
        NEW.net := coalesce(NEW.net, b.net);
        NEW.settlement_currency := coalesce(NEW.settlement_currency, b.currency);
        NEW.settlement_amount := coalesce(NEW.settlement_amount, b.amount);
        NEW.settled_at := coalesce(NEW.settled_at, b.created_at);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER payments_fill_settlement BEFORE INSERT OR UPDATE ON payments
    FOR EACH ROW WHEN (NEW.balance_transaction IS NOT NULL
                       AND (NEW.fee IS NULL OR NEW.settled_at IS NULL))
    EXECUTE FUNCTION payments_fill_settlement();

-- rows written between 019 and now by a replica that did not know settled_at
UPDATE payments p SET settled_at = b.created_at
  FROM balance_transactions b
 WHERE b.id = p.balance_transaction AND p.settled_at IS NULL;
