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

-- The subscriptions a coupon reaches: those whose discount snapshot names it (an id, or the
-- coupon expanded; `coupon` before `source.coupon`, in versions the ledger no longer pins).
CREATE FUNCTION discount_coupon_id(data jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(data #>> '{source,coupon,id}', data #>> '{source,coupon}',
                    data #>> '{coupon,id}', data #>> '{coupon}');

CREATE INDEX stripe_objects_discount_coupon ON stripe_objects (discount_coupon_id(data))
    WHERE object = 'discount';

-- The discounts already kept name coupons whose terms may not be known: look them all up once
-- (the worker ends at once those it knows: the founding coupon, one whose event has come).
INSERT INTO coupon_lookups (coupon_id)
SELECT DISTINCT discount_coupon_id(data) FROM stripe_objects
 WHERE object = 'discount' AND discount_coupon_id(data) IS NOT NULL
ON CONFLICT DO NOTHING;
