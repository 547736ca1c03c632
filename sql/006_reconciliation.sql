-- Reconciliation with Stripe: how far its event list has been read, each run, what runs found,
-- and how far an `import` of older history has come.

-- One row. `events_through`: every event Stripe created before this instant (unix seconds) is in
-- stripe_events. A run reads a window newest first; until the window is finished, the window and
-- the last event applied (Stripe's `starting_after` cursor) are kept here after every page, so a
-- run stopped half-way is resumed from that page by the next one, without a gap.
CREATE TABLE reconciliation_checkpoint (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    events_through  bigint CHECK (events_through >= 0),
    pending_start   bigint,
    pending_end     bigint,
    pending_cursor  text CHECK (pending_cursor LIKE 'evt\_%'),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((pending_start IS NULL) = (pending_end IS NULL)),
    CHECK (pending_cursor IS NULL OR pending_start IS NOT NULL),
    CHECK (pending_start <= pending_end)
);

CREATE TABLE reconciliation_runs (
    id                    bigserial PRIMARY KEY,
    trigger               text NOT NULL CHECK (trigger IN ('command', 'schedule')),
    status                text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'succeeded', 'failed')),
    window_start          timestamptz NOT NULL,
    window_end            timestamptz NOT NULL,
    started_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz,
    pages                 integer NOT NULL DEFAULT 0 CHECK (pages >= 0),
    events_listed         integer NOT NULL DEFAULT 0 CHECK (events_listed >= 0),
    events_applied        integer NOT NULL DEFAULT 0 CHECK (events_applied >= 0),
    events_failed         integer NOT NULL DEFAULT 0 CHECK (events_failed >= 0),
    balance_transactions  integer NOT NULL DEFAULT 0 CHECK (balance_transactions >= 0),
    fees_filled           integer NOT NULL DEFAULT 0 CHECK (fees_filled >= 0),
    discrepancies_new     integer NOT NULL DEFAULT 0 CHECK (discrepancies_new >= 0),
    discrepancies_open    integer NOT NULL DEFAULT 0 CHECK (discrepancies_open >= 0),
    error                 text,
    CHECK (window_start <= window_end),
    CHECK ((status = 'running') = (finished_at IS NULL))
);
CREATE INDEX reconciliation_runs_started ON reconciliation_runs (started_at DESC);

-- A difference between a Stripe balance transaction and the ledger. At most one open row per
-- (kind, Stripe object): a run that finds it again only notes that it did (last_run_id). A
-- repaired one (a fee filled in) is closed when found; an open one is closed by the first run
-- that examines the same object and finds it agrees.
CREATE TABLE reconciliation_discrepancies (
    id                   bigserial PRIMARY KEY,
    run_id               bigint NOT NULL REFERENCES reconciliation_runs (id),
    last_run_id          bigint NOT NULL REFERENCES reconciliation_runs (id),
    kind                 text NOT NULL CHECK (kind IN (
        'missing_in_ledger', 'missing_at_stripe', 'amount_mismatch', 'currency_mismatch',
        'status_mismatch', 'fee_mismatch', 'fee_missing')),
    object               text NOT NULL CHECK (object IN ('payment', 'refund', 'dispute')),
    stripe_id            text NOT NULL,  -- the charge, refund or dispute
    balance_transaction  text,
    ledger               jsonb,          -- the ledger's values; NULL when it has no row
    stripe               jsonb,          -- the balance transaction's values; NULL when none
    repaired             boolean NOT NULL DEFAULT false,
    found_at             timestamptz NOT NULL DEFAULT now(),
    resolved_at          timestamptz,
    CHECK (NOT repaired OR resolved_at IS NOT NULL),
    CHECK (ledger IS NOT NULL OR stripe IS NOT NULL)
);
CREATE UNIQUE INDEX reconciliation_discrepancies_one_open
    ON reconciliation_discrepancies (kind, stripe_id) WHERE resolved_at IS NULL;
CREATE INDEX reconciliation_discrepancies_run ON reconciliation_discrepancies (last_run_id);

-- `donations import --since`: per Stripe resource, where the listing (newest first) has got to.
CREATE TABLE import_progress (
    resource     text PRIMARY KEY,
    since        bigint  NOT NULL,
    until        bigint  NOT NULL,
    cursor       text,              -- the last object stored: Stripe's `starting_after`
    imported     integer NOT NULL DEFAULT 0 CHECK (imported >= 0),
    finished_at  timestamptz,
    CHECK (since <= until)
);
