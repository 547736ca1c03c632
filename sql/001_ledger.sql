-- The event store, the latest snapshot of each Stripe object, and the ledger derived from them.
--
-- Why snapshots: Stripe sends whole objects, at least once and in no promised order. We keep, per
-- object, the one snapshot that ranks highest by (progress, event created, event type, event id), a
-- total order that does not depend on arrival. The ledger tables below are pure functions of those
-- snapshots (donations/ledger.py), so any permutation of the same events gives the same ledger.

CREATE TABLE stripe_events (
    id            text PRIMARY KEY CHECK (id LIKE 'evt\_%'),
    type          text        NOT NULL,
    api_version   text,
    livemode      boolean     NOT NULL,
    created       timestamptz NOT NULL,
    payload       json        NOT NULL,  -- json, not jsonb: the body exactly as Stripe sent it
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    status        text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'processed', 'ignored', 'failed', 'needs_attention')),
    attempts      integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error    text,
    source        text        NOT NULL DEFAULT 'webhook' CHECK (source IN ('webhook', 'reconcile', 'import'))
);
CREATE INDEX stripe_events_unfinished ON stripe_events (received_at)
    WHERE status IN ('pending', 'failed', 'needs_attention');
CREATE INDEX stripe_events_created ON stripe_events (created);

CREATE TABLE stripe_objects (
    id              text PRIMARY KEY,
    object          text   NOT NULL,
    -- the version key: the highest one wins (see donations/events.py: snapshot_version)
    rank            integer NOT NULL,
    progress        bigint  NOT NULL,
    event_created   bigint  NOT NULL,
    type_rank       integer NOT NULL,
    event_id        text    NOT NULL,
    -- links, derived from the snapshot, that say which ledger rows it feeds
    payment_key     text,
    invoice_id      text,
    subscription_id text,
    data            jsonb   NOT NULL
);
CREATE INDEX stripe_objects_payment_key ON stripe_objects (payment_key) WHERE payment_key IS NOT NULL;
CREATE INDEX stripe_objects_invoice_id ON stripe_objects (invoice_id) WHERE invoice_id IS NOT NULL;
CREATE INDEX stripe_objects_subscription_id ON stripe_objects (subscription_id)
    WHERE subscription_id IS NOT NULL;

-- One row per payment, keyed by its payment intent (else its charge; else, for an invoice paid
-- before we learn its payment, the invoice). A contribution is a row with status 'succeeded'.
CREATE TABLE payments (
    payment_key       text PRIMARY KEY,
    kind              text   NOT NULL CHECK (kind IN ('one_off', 'recurring')),
    status            text   NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'canceled')),
    currency          text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    amount            bigint NOT NULL CHECK (amount >= 0),
    amount_refunded   bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    amount_disputed   bigint NOT NULL DEFAULT 0 CHECK (amount_disputed >= 0),
    dispute_lost      boolean NOT NULL DEFAULT false,
    payment_intent    text,
    charge            text,
    invoice           text,
    subscription      text,
    checkout_session  text,
    customer          text,
    email             text,
    campaign          text,
    metadata          jsonb  NOT NULL DEFAULT '{}',
    balance_transaction text,
    fee               bigint CHECK (fee >= 0),
    net               bigint,
    settlement_currency text CHECK (settlement_currency ~ '^[a-z]{3}$'),
    settlement_amount bigint,
    created_at        timestamptz NOT NULL,
    CHECK (amount_refunded <= amount),
    CHECK (amount_disputed <= amount)
);
CREATE INDEX payments_created_at ON payments (created_at);
CREATE INDEX payments_charge ON payments (charge) WHERE charge IS NOT NULL;
CREATE INDEX payments_subscription ON payments (subscription) WHERE subscription IS NOT NULL;
CREATE INDEX payments_balance_transaction ON payments (balance_transaction)
    WHERE balance_transaction IS NOT NULL;

CREATE TABLE refunds (
    id                  text PRIMARY KEY,
    payment_key         text,
    charge              text,
    payment_intent      text,
    status              text   NOT NULL
        CHECK (status IN ('pending', 'requires_action', 'succeeded', 'failed', 'canceled')),
    amount              bigint NOT NULL CHECK (amount >= 0),
    currency            text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    reason              text,
    balance_transaction text,
    created_at          timestamptz NOT NULL
);
CREATE INDEX refunds_payment_key ON refunds (payment_key);

CREATE TABLE disputes (
    id              text PRIMARY KEY,
    payment_key     text,
    charge          text,
    payment_intent  text,
    status          text   NOT NULL,
    reason          text,
    amount          bigint NOT NULL CHECK (amount >= 0),
    currency        text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    -- what the dispute holds back from us now: its amount while funds are withdrawn or lost
    amount_held     bigint NOT NULL CHECK (amount_held >= 0),
    created_at      timestamptz NOT NULL
);
CREATE INDEX disputes_payment_key ON disputes (payment_key);

CREATE TABLE subscriptions (
    id                    text PRIMARY KEY,
    customer              text,
    status                text    NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired',
        'trialing', 'active', 'past_due', 'canceled', 'unpaid', 'paused')),
    currency              text    NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    amount                bigint  NOT NULL CHECK (amount >= 0),
    interval              text    NOT NULL CHECK (interval IN ('day', 'week', 'month', 'year')),
    interval_count        integer NOT NULL CHECK (interval_count > 0),
    discounts             text[]  NOT NULL DEFAULT '{}',
    percent_off           numeric(7, 4) CHECK (percent_off BETWEEN 0 AND 100),
    amount_off            bigint  CHECK (amount_off >= 0),
    founding              boolean NOT NULL DEFAULT false,
    cancel_at_period_end  boolean NOT NULL DEFAULT false,
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    canceled_at           timestamptz,
    ended_at              timestamptz,
    campaign              text,
    metadata              jsonb   NOT NULL DEFAULT '{}',
    created_at            timestamptz NOT NULL
);
CREATE INDEX subscriptions_status ON subscriptions (status);

CREATE TABLE customers (
    id          text PRIMARY KEY,
    email       text,
    name        text,
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL
);

CREATE TABLE payouts (
    id                   text PRIMARY KEY,
    status               text   NOT NULL,
    amount               bigint NOT NULL,
    currency             text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    arrival_date         timestamptz,
    automatic            boolean,
    balance_transaction  text,
    failure_code         text,
    created_at           timestamptz NOT NULL
);

-- Balance transactions fetched from Stripe (fees, net, settlement), and the queue of those to fetch.
CREATE TABLE balance_transactions (
    id            text PRIMARY KEY CHECK (id LIKE 'txn\_%'),
    type          text   NOT NULL,
    source        text,
    amount        bigint NOT NULL,
    currency      text   NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    fee           bigint NOT NULL,
    net           bigint NOT NULL,
    exchange_rate numeric,
    status        text,
    reporting_category text,
    payout        text,
    available_on  timestamptz,
    created_at    timestamptz NOT NULL,
    fetched_at    timestamptz NOT NULL DEFAULT now(),
    data          jsonb  NOT NULL
);
CREATE INDEX balance_transactions_source ON balance_transactions (source);

CREATE TABLE balance_transaction_fetches (
    id               text PRIMARY KEY CHECK (id LIKE 'txn\_%'),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    queued_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX balance_transaction_fetches_due ON balance_transaction_fetches (next_attempt_at);
