-- A founding subscription whose first payment was never made (`incomplete_expired`: 3-D Secure
-- abandoned, a declined card; terminal, nothing paid) was never one of the first supporters, and
-- took a founding seat for good: enough abandoned checkouts closed the offer early. The ledger
-- now derives `founding` false for it (donations/ledger.py derive_subscription); the rows already
-- kept are brought in line here (the totals trigger gives their seats back), and a held session
-- that completed with such a subscription no longer counts as a seat taken either.
UPDATE subscriptions SET founding = false WHERE founding AND status = 'incomplete_expired';

CREATE OR REPLACE VIEW founding_seat_counts AS
WITH taken AS (
    SELECT id FROM subscriptions WHERE founding
    UNION
    SELECT o.subscription_id
      FROM founding_holds h JOIN stripe_objects o ON o.id = h.checkout_session
     WHERE o.object = 'checkout.session' AND o.data->>'status' = 'complete'
       AND o.subscription_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM subscriptions s
                        WHERE s.id = o.subscription_id AND s.status = 'incomplete_expired')
), held AS (
    SELECT h.id
      FROM founding_holds h LEFT JOIN stripe_objects o ON o.id = h.checkout_session
     WHERE h.expires_at > now() AND (o.id IS NULL OR o.data->>'status' = 'open')
)
SELECT (SELECT count(*) FROM taken) AS taken, (SELECT count(*) FROM held) AS held;
