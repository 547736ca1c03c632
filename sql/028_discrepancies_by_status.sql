-- GET /v1/reconciliation/discrepancies?status=open|resolved pages through either in the order
-- of their ids. A run can leave 25,000 of either (missing_in_ledger before an import, repaired
-- fees): in the primary key a page of one would read past all of the other first.
CREATE INDEX reconciliation_discrepancies_open
    ON reconciliation_discrepancies (id) WHERE resolved_at IS NULL;
CREATE INDEX reconciliation_discrepancies_resolved
    ON reconciliation_discrepancies (id) WHERE resolved_at IS NOT NULL;
