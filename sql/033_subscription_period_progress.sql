-- Two snapshots of one subscription stamped in the same second (a renewal, and a coupon added or
-- another change made in that second) tied on stage, progress (always 0 for a subscription) and
-- time, and their event ids decided, which carry no order at Stripe: the row could keep the
-- period before, a month behind Stripe's. A subscription's period only moves forward (a
-- renewal, a trial's end, a new billing anchor), so its start is a subscription's progress now
-- (donations/events.py subscription_period_start: the earliest `current_period_start` of its
-- items, else the subscription's own, else 0; a whole second from 1970 to 9999, anything else
-- not counted). The stored subscriptions take the new figure, so that old and new snapshots
-- compare on one scale. Once the previous release's replicas have stopped (they still rank
-- with 0, so a snapshot they keep out or store meanwhile is ranked afresh),
-- `donations events reapply --type 'customer.subscription.%'` offers the stored subscription
-- events again.
--
-- Reads stripe_objects once; only the subscriptions' rows are written, so events about a
-- subscription wait for the migration's commit and nothing else does.
--
-- A period's start counts as events._second reads it: a JSON number that is a whole second from
-- 0 to 9999-12-31T23:59:59Z (the CASE guards the cast: a fraction, a sign or a string is none).
UPDATE stripe_objects o
   SET progress = r.progress
  FROM (SELECT s.id,
               coalesce(
                   -- the items' earliest start
                   (SELECT min(t.second)
                      FROM jsonb_array_elements(CASE jsonb_typeof(s.data #> '{items,data}')
                                                WHEN 'array' THEN s.data #> '{items,data}'
                                                ELSE '[]' END) AS i
                     CROSS JOIN LATERAL (
                           SELECT CASE WHEN jsonb_typeof(i -> 'current_period_start') = 'number'
                                        AND i ->> 'current_period_start' ~ '^[0-9]{1,12}$'
                                       THEN (i ->> 'current_period_start')::bigint END
                           ) AS t(second)
                     WHERE t.second <= 253402300799),
                   -- else the subscription's own
                   (SELECT t.second
                      FROM (SELECT CASE WHEN jsonb_typeof(s.data -> 'current_period_start') = 'number'
                                         AND s.data ->> 'current_period_start' ~ '^[0-9]{1,12}$'
                                        THEN (s.data ->> 'current_period_start')::bigint END
                           ) AS t(second)
                     WHERE t.second <= 253402300799),
                   0) AS progress
          FROM stripe_objects s
         WHERE s.object = 'subscription') AS r
 WHERE o.id = r.id
   AND o.progress IS DISTINCT FROM r.progress;
