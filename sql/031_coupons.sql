-- Coupons other than the founding one. The contract's monthly recurring is each live
-- subscription's price after its discounts, but webhooks name a discount's coupon by id only
-- (`source.coupon`), so a subscription discounted in the Dashboard, or with a promotion code,
-- was counted at its full price. A coupon's terms now come from its own events
-- (`coupon.created` / `updated` / `deleted`, kept in stripe_objects like any snapshot) or, when
-- none has come, from Stripe: a subscription whose discount names a coupon not known queues a
-- look-up here, and the coupon worker (donations/coupons.py) fetches the coupon and derives the
-- subscriptions that use it again. Without a Stripe key a look-up waits until the coupon's event
-- comes (or `events reapply`), and the subscription counts at its full price meanwhile.
CREATE TABLE coupon_lookups (
    coupon_id          text PRIMARY KEY,
    queued_at          timestamptz NOT NULL DEFAULT now(),
    attempts           integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    not_found_in_a_row integer     NOT NULL DEFAULT 0 CHECK (not_found_in_a_row >= 0),
    gave_up_at         timestamptz,
    last_error         text
);
CREATE INDEX coupon_lookups_due ON coupon_lookups (next_attempt_at) WHERE gave_up_at IS NULL;

-- The coupon a discount names (an id, or the coupon expanded; `coupon` before `source.coupon`,
-- in versions the ledger no longer pins).
CREATE FUNCTION discount_coupon_id(data jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(data #>> '{source,coupon,id}', data #>> '{source,coupon}',
                    data #>> '{coupon,id}', data #>> '{coupon}');

-- The coupons whose terms each subscription's row was derived with, or waits for (ledger.py
-- SubscriptionRow.coupons): how a coupon's terms, once they come, find the subscriptions to
-- derive again, whether its discounts came as events or expanded in the subscription (an import).
ALTER TABLE subscriptions ADD COLUMN coupons text[] NOT NULL DEFAULT '{}';
CREATE INDEX subscriptions_coupons ON subscriptions USING gin (coupons);

-- The subscriptions derived before: the coupons of the discounts they list, from the discounts'
-- snapshots and from those expanded in the subscription's own (its items' included). The founding
-- coupon among them too (this file cannot know FOUNDING_COUPON_ID): the next derivation of such a
-- subscription leaves it out, and until then it only makes that coupon's look-up reach it.
WITH listed AS (
    SELECT o.id AS subscription_id, d AS discount
      FROM stripe_objects o
     CROSS JOIN LATERAL (
           SELECT jsonb_array_elements(CASE jsonb_typeof(o.data -> 'discounts')
                                       WHEN 'array' THEN o.data -> 'discounts' ELSE '[]' END)
           UNION ALL
           SELECT jsonb_array_elements(CASE jsonb_typeof(i -> 'discounts')
                                       WHEN 'array' THEN i -> 'discounts' ELSE '[]' END)
             FROM jsonb_array_elements(CASE jsonb_typeof(o.data #> '{items,data}')
                                       WHEN 'array' THEN o.data #> '{items,data}' ELSE '[]' END) i
           ) AS t(d)
     WHERE o.object = 'subscription'
), named AS (
    SELECT l.subscription_id, discount_coupon_id(coalesce(kept.data, l.discount)) AS coupon
      FROM listed l
      LEFT JOIN stripe_objects kept
        ON kept.object = 'discount'
       AND kept.id = coalesce(l.discount ->> 'id', l.discount #>> '{}')
)
UPDATE subscriptions s
   SET coupons = c.coupons
  FROM (SELECT subscription_id, array_agg(DISTINCT coupon ORDER BY coupon) AS coupons
          FROM named WHERE coupon IS NOT NULL GROUP BY subscription_id) c
 WHERE s.id = c.subscription_id;

-- Those coupons' terms may not be known: look them all up once (the worker ends at once those it
-- knows: the founding coupon, one whose event has come).
INSERT INTO coupon_lookups (coupon_id)
SELECT DISTINCT unnest(coupons) FROM subscriptions
ON CONFLICT DO NOTHING;
