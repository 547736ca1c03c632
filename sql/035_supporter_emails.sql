-- A supporter known only by an e-mail is told apart by it with its ASCII letters folded to lower
-- case, the same on every server: lower() followed the database's locale (under C it folded only
-- ASCII letters, under a UTF-8 locale every letter), so one server counted `ÉVA@…` and `éva@…`
-- as one supporter and another as two, and Python's str.lower (`donations totals verify`, which
-- recomputes the totals) differed from both on a few letters (`İ`, a final `Σ`), so verify
-- reported differences that were not there. COLLATE "C" makes lower() fold A-Z only, whatever
-- the locale; donations/totals.py folds the same way. Then, if any e-mail folds differently
-- now, every kept total is rebuilt (as sql/016 did).
CREATE OR REPLACE FUNCTION totals_payment_figures(p payments)
RETURNS TABLE (scope text, currency text, settlement_currency text, raised bigint,
               settled bigint, contributions bigint, supporter text)
LANGUAGE sql STABLE AS $$
    -- counts: not wholly refunded, nor wholly lost in a dispute (one still open counts; its
    -- amount is held out of `raised` meanwhile)
    WITH f AS (SELECT greatest(0, p.amount - p.amount_refunded - p.amount_disputed) AS net,
                      p.amount - p.amount_refunded > 0
                      AND NOT (p.dispute_lost
                               AND p.amount_disputed >= p.amount - p.amount_refunded) AS counts)
    SELECT s.scope, p.currency, coalesce(p.settlement_currency, ''), f.net,
           CASE WHEN p.settlement_amount IS NULL OR p.amount = 0 THEN 0
                ELSE totals_muldiv(p.settlement_amount, f.net, p.amount) END,
           f.counts::int::bigint,
           -- a person: the Stripe customer, else the e-mail, else (neither known) the payment
           CASE WHEN f.counts THEN coalesce(p.customer, 'email:' || lower(p.email COLLATE "C"),
                                            'payment:' || p.payment_key) END
      FROM f, (SELECT '*' UNION ALL SELECT totals_campaign_scope(p.campaign, p.created_at)) AS s(scope)
     WHERE p.status = 'succeeded'
$$;

CREATE OR REPLACE FUNCTION totals_payment_side(p payments) RETURNS totals_payment_side
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    side totals_payment_side;
BEGIN
    IF p.status IS DISTINCT FROM 'succeeded' THEN
        RETURN side;
    END IF;
    side.currency := p.currency;
    side.settlement := coalesce(p.settlement_currency, '');
    side.raised := greatest(0, p.amount - p.amount_refunded - p.amount_disputed);
    side.settled := 0;
    IF p.settlement_amount IS NOT NULL AND p.amount <> 0 THEN
        side.settled := totals_muldiv(p.settlement_amount, side.raised, p.amount);
    END IF;
    side.counts := 0;
    -- counts: not wholly refunded, nor wholly lost in a dispute
    IF p.amount - p.amount_refunded > 0
       AND NOT (p.dispute_lost AND p.amount_disputed >= p.amount - p.amount_refunded) THEN
        side.counts := 1;
        -- a person: the Stripe customer, else the e-mail, else (neither known) the payment
        side.person := coalesce(p.customer, 'email:' || lower(p.email COLLATE "C"),
                                'payment:' || p.payment_key);
    END IF;
    RETURN side;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM payments
                WHERE customer IS NULL AND lower(email) <> lower(email COLLATE "C")) THEN
        PERFORM totals_rebuild(scope)
           FROM (SELECT '*' AS scope UNION ALL SELECT slug FROM campaigns) s;
    END IF;
END
$$;
