-- The discrepancies of a run (those it found first, run_id, or found again, last_run_id) are
-- read a page at a time in the order of their ids: GET /v1/reconciliation/runs embeds the first
-- page of each run, GET /v1/reconciliation/runs/{id}/discrepancies gives the rest. The
-- single-column indexes of sql/006 and sql/026 hold a run's rows in no particular order, so a
-- page of a run of 25,000 (the first run after an import repairs a fee for every payment) read
-- and sorted all 25,000. With the id in the key each page is the next entries of each index;
-- last_run_id's also carries run_id, so that a run's count is read from the indexes alone.
CREATE INDEX reconciliation_discrepancies_first_run_id
    ON reconciliation_discrepancies (run_id, id);
CREATE INDEX reconciliation_discrepancies_last_run_id
    ON reconciliation_discrepancies (last_run_id, id) INCLUDE (run_id);
-- (their prefixes: whatever used them uses these)
DROP INDEX reconciliation_discrepancies_first_run;
DROP INDEX reconciliation_discrepancies_run;

