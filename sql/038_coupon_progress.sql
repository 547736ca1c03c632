-- A coupon's snapshots rank by the coupon they show (its `created`: one made again under the same
-- id is the one the id names now), and within one coupon its deletion below anything else known
-- of it (events.snapshot_version): the deletion's event never carries the `currency_options` a
-- look-up brings, and deleting a coupon leaves the discounts already given as they were. The
-- coupons stored before are put on that scale (a deletion's event has type rank 2).
UPDATE stripe_objects
   SET progress = 2 * CASE WHEN (data ->> 'created') ~ '^[0-9]{1,18}$'
                                AND jsonb_typeof(data -> 'created') = 'number'
                           THEN (data ->> 'created')::bigint ELSE 0 END
                  + CASE WHEN type_rank = 2 OR data ->> 'deleted' = 'true' THEN 0 ELSE 1 END
 WHERE object = 'coupon';
