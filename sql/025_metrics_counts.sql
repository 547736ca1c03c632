-- The counts /metrics shows on every scrape (every 15 s, by every replica), kept by triggers
-- instead of counted from the tables each time.
--
-- Counted per scrape, they cost a scan of the two largest tables: at 3,000,000 stored events and
-- 1,000,000 payments, 530 ms for the events by type and status (an index-only scan of
-- stripe_events_status_type, sql/011) and 320 ms for the contributions by currency and kind (a
-- scan of payments), about 0.85 s of a core per scrape, growing with the ledger. Here each
-- statement that writes stripe_events or payments adds one row of differences per (type,
-- status) or (currency, kind) it changed (insert-only, as totals_deltas: concurrent writers
-- never wait for each other); the totals' compaction task moves them into the counts
-- (donations/store.py: compact_counts); a scrape sums the few rows left, whatever the size of
-- the tables.
--
-- TRUNCATE fires no trigger: truncate these with the tables they count.

CREATE TABLE stored_event_counts (
    type    text   NOT NULL,
    status  text   NOT NULL,
    n       bigint NOT NULL,
    PRIMARY KEY (type, status)
);
CREATE TABLE stored_event_count_deltas (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type    text   NOT NULL,
    status  text   NOT NULL,
    n       bigint NOT NULL
);

-- the succeeded payments (donations_ledger_contributions) and their amount less refunds and
-- disputes (donations_ledger_net_minor_units)
CREATE TABLE ledger_counts (
    currency       text   NOT NULL,
    kind           text   NOT NULL,
    contributions  bigint NOT NULL,
    net            bigint NOT NULL,
    PRIMARY KEY (currency, kind)
);
CREATE TABLE ledger_count_deltas (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    currency       text   NOT NULL,
    kind           text   NOT NULL,
    contributions  bigint NOT NULL,
    net            bigint NOT NULL
);

-- One function per table for its three triggers (a trigger with transition tables names one
-- event); a branch reads only the transition tables its trigger has.
CREATE FUNCTION stored_event_counts_on_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO stored_event_count_deltas (type, status, n)
        SELECT type, status, count(*) FROM new_rows GROUP BY type, status;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO stored_event_count_deltas (type, status, n)
        SELECT type, status, -count(*) FROM old_rows GROUP BY type, status;
    ELSE
        INSERT INTO stored_event_count_deltas (type, status, n)
        SELECT type, status, sum(n)
          FROM (SELECT type, status, 1 AS n FROM new_rows
                UNION ALL
                SELECT type, status, -1 FROM old_rows) AS changed
         GROUP BY type, status
        HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION ledger_counts_on_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ledger_count_deltas (currency, kind, contributions, net)
        SELECT currency, kind, count(*), sum(amount - amount_refunded - amount_disputed)
          FROM new_rows WHERE status = 'succeeded' GROUP BY currency, kind;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO ledger_count_deltas (currency, kind, contributions, net)
        SELECT currency, kind, -count(*), -sum(amount - amount_refunded - amount_disputed)
          FROM old_rows WHERE status = 'succeeded' GROUP BY currency, kind;
    ELSE
        INSERT INTO ledger_count_deltas (currency, kind, contributions, net)
        SELECT currency, kind, sum(n), sum(net)
          FROM (SELECT currency, kind, 1 AS n, amount - amount_refunded - amount_disputed AS net
                  FROM new_rows WHERE status = 'succeeded'
                UNION ALL
                SELECT currency, kind, -1, -(amount - amount_refunded - amount_disputed)
                  FROM old_rows WHERE status = 'succeeded') AS changed
         GROUP BY currency, kind
        HAVING sum(n) <> 0 OR sum(net) <> 0;
    END IF;
    RETURN NULL;
END
$$;

-- Move up to `batch` rows of differences of each into the counts (one replica at a time:
-- donations/store.py compact_counts); how many were moved (0: none left). Differences committed
-- meanwhile are left for the next pass.
CREATE FUNCTION metrics_counts_compact(batch integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    events bigint;
    ledger bigint;
BEGIN
    WITH moved AS (
        DELETE FROM stored_event_count_deltas
         WHERE id IN (SELECT id FROM stored_event_count_deltas ORDER BY id LIMIT batch)
        RETURNING type, status, n
    ), kept AS (
        INSERT INTO stored_event_counts AS c (type, status, n)
        SELECT type, status, sum(n) FROM moved GROUP BY type, status
        ON CONFLICT (type, status) DO UPDATE SET n = c.n + excluded.n
        RETURNING 1
    )
    SELECT count(*) FROM moved INTO events;
    WITH moved AS (
        DELETE FROM ledger_count_deltas
         WHERE id IN (SELECT id FROM ledger_count_deltas ORDER BY id LIMIT batch)
        RETURNING currency, kind, contributions, net
    ), kept AS (
        INSERT INTO ledger_counts AS c (currency, kind, contributions, net)
        SELECT currency, kind, sum(contributions), sum(net) FROM moved GROUP BY currency, kind
        ON CONFLICT (currency, kind) DO UPDATE
           SET contributions = c.contributions + excluded.contributions,
               net = c.net + excluded.net
        RETURNING 1
    )
    SELECT count(*) FROM moved INTO ledger;
    RETURN events + ledger;
END
$$;

-- The tables as they stand (writers wait from here to the end of the migration: a count of
-- each, about a second at 3,000,000 events and 1,000,000 payments).
LOCK TABLE stripe_events, payments IN SHARE ROW EXCLUSIVE MODE;

INSERT INTO stored_event_counts (type, status, n)
SELECT type, status, count(*) FROM stripe_events GROUP BY type, status;
INSERT INTO ledger_counts (currency, kind, contributions, net)
SELECT currency, kind, count(*), sum(amount - amount_refunded - amount_disputed)
  FROM payments WHERE status = 'succeeded' GROUP BY currency, kind;

CREATE TRIGGER stored_event_counts_insert AFTER INSERT ON stripe_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stored_event_counts_on_change();
CREATE TRIGGER stored_event_counts_update AFTER UPDATE ON stripe_events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stored_event_counts_on_change();
CREATE TRIGGER stored_event_counts_delete AFTER DELETE ON stripe_events
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stored_event_counts_on_change();

CREATE TRIGGER ledger_counts_insert AFTER INSERT ON payments
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_counts_on_change();
CREATE TRIGGER ledger_counts_update AFTER UPDATE ON payments
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_counts_on_change();
CREATE TRIGGER ledger_counts_delete AFTER DELETE ON payments
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_counts_on_change();
