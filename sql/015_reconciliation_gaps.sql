-- Reconciliation keeps apart what it has read and what it has compared, and remembers a gap in
-- what Stripe still lists, so that no window is left behind by a run that failed half-way and
-- no run says "the ledger matches" while something is known to be missing.

-- the balance transactions created before this instant have been compared with the ledger
ALTER TABLE reconciliation_checkpoint ADD COLUMN compared_through bigint
    CHECK (compared_through >= 0);
UPDATE reconciliation_checkpoint SET compared_through = events_through;

-- events from gap_from up to gap_to were no longer listed by Stripe (kept 30 days) when a run
-- came to read them: only `donations import --since` (at or before gap_from) can bring them in
ALTER TABLE reconciliation_checkpoint ADD COLUMN gap_from bigint;
ALTER TABLE reconciliation_checkpoint ADD COLUMN gap_to bigint;
ALTER TABLE reconciliation_checkpoint
    ADD CHECK ((gap_from IS NULL) = (gap_to IS NULL) AND gap_from <= gap_to);

-- stored events not applied, at the end of the run: failed, or in an API version whose shape
-- the service does not read (needs_attention)
ALTER TABLE reconciliation_runs ADD COLUMN events_unapplied integer NOT NULL DEFAULT 0
    CHECK (events_unapplied >= 0);
