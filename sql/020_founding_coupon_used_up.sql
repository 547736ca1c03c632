-- A founding coupon that Stripe has said is used up (`coupon_expired`: its max_redemptions
-- reached, counting redemptions the ledger never saw, made in the Dashboard say). The offer is
-- then over whatever our own count says: checkout options and the public totals show no seat
-- left, and checkouts stop asking Stripe for the coupon. Keyed by the coupon, so that a new
-- FOUNDING_COUPON_ID opens the offer again.
CREATE TABLE founding_coupons_used_up (
    coupon_id  text        PRIMARY KEY CHECK (coupon_id <> ''),
    noticed_at timestamptz NOT NULL DEFAULT now()
);
