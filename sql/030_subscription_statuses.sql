-- Each subscription's status as each of its snapshots told it, one row per snapshot: the facts
-- the finance summary reads to decide which subscriptions were live at a past window's end
-- (donations/reports.py ACTIVE_AT_END). The ledger's `subscriptions` keeps only the latest state,
-- so a subscriber live all November whose December renewal failed (`unpaid`) or who paused
-- dropped out of November's monthly recurring when November was asked again: a closed month
-- changed. A row is a fact of one event (its `created` time, the snapshot's status), so the rows
-- are the same whatever order and however often the events come (ON CONFLICT DO NOTHING).
-- `rank` and `type_rank` are the snapshot's own (donations/events.py snapshot_version): within
-- one second they order the rows as the snapshots are ordered. They are the event's, so the key
-- is one row per (subscription, event) all the same; in this order it is also the index the
-- summary reads backwards, one look-up per subscription (the latest row before a window's end).
CREATE TABLE subscription_statuses (
    subscription_id text NOT NULL,
    at timestamptz NOT NULL,
    event_id text NOT NULL,
    rank smallint NOT NULL,
    type_rank smallint NOT NULL,
    status text NOT NULL,
    PRIMARY KEY (subscription_id, at, rank, type_rank, event_id)
);

-- From the subscription events already applied (through stripe_events_status_type); the rank as
-- donations/events.py _STAGE gives it, the type rank as snapshot_version does.
INSERT INTO subscription_statuses (subscription_id, at, event_id, rank, type_rank, status)
SELECT e.payload::jsonb -> 'data' -> 'object' ->> 'id', e.created, e.id,
       CASE e.payload::jsonb -> 'data' -> 'object' ->> 'status'
            WHEN 'incomplete' THEN 0
            WHEN 'incomplete_expired' THEN 2 WHEN 'canceled' THEN 2
            WHEN 'trialing' THEN 1 WHEN 'active' THEN 1 WHEN 'past_due' THEN 1
            WHEN 'unpaid' THEN 1 WHEN 'paused' THEN 1
            ELSE 0 END,
       CASE WHEN e.type LIKE '%.created' THEN 0 WHEN e.type LIKE '%.deleted' THEN 2 ELSE 1 END,
       e.payload::jsonb -> 'data' -> 'object' ->> 'status'
  FROM stripe_events e
 WHERE e.status = 'processed'
   AND e.type IN ('customer.subscription.created', 'customer.subscription.updated',
                  'customer.subscription.deleted', 'customer.subscription.paused',
                  'customer.subscription.resumed')
   AND e.payload::jsonb -> 'data' -> 'object' ->> 'id' IS NOT NULL
   AND e.payload::jsonb -> 'data' -> 'object' ->> 'status' IS NOT NULL
ON CONFLICT DO NOTHING;
