-- Finance can acknowledge a discrepancy it has looked into and explained (a Stripe adjustment
-- the ledger will never have, say): it is resolved with who said so and why, and later runs that
-- find exactly the same difference (same kind, object and both sides' values) do not open it
-- again. A difference that changes is opened again as a new discrepancy.
ALTER TABLE reconciliation_discrepancies
    ADD COLUMN acknowledged_by   text,
    ADD COLUMN acknowledged_note text,
    ADD CONSTRAINT reconciliation_discrepancies_acknowledged_with_note
        CHECK ((acknowledged_by IS NULL) = (acknowledged_note IS NULL)),
    ADD CONSTRAINT reconciliation_discrepancies_acknowledged_is_resolved
        CHECK (acknowledged_by IS NULL OR resolved_at IS NOT NULL);
CREATE INDEX reconciliation_discrepancies_acknowledged
    ON reconciliation_discrepancies (kind, stripe_id) WHERE acknowledged_by IS NOT NULL;
