-- Public totals, kept up to date by triggers in the same transaction that changes the ledger.
--
-- Why triggers: every path that writes `payments` or `subscriptions` (webhooks, the fee worker's
-- UPDATE, reconciliation, imports) then moves the totals with it, in the same transaction, with
-- nothing to remember in the application.
--
-- Why deltas: webhook transactions run concurrently, so a single row per total would be updated by
-- all of them at once (each would wait for, or abort, the others). A trigger only ever INSERTs a
-- row of differences into `totals_deltas` (inserts never conflict); a background compaction (one
-- replica at a time, under an advisory lock) moves them into `totals` in one transaction; a
-- reader sums `totals` and the few deltas not yet compacted in one statement, hence one snapshot.
--
-- Figures are kept per bucket (scope, payment currency, settlement currency): the reporting
-- currency is a setting of the service, not of the database, so it is applied when reading (see
-- donations/totals.py: summarise). Figures without a currency (supporters, founding seats) are in
-- the bucket (scope, '', '').
--
-- Scopes: '*' is everything; a campaign's slug is that campaign (slugs cannot be '*').
--
-- Supporters are a distinct count, which differences cannot carry: `totals_supporters` keeps per
-- scope and supporter how many of their contributions count, and a trigger adds +1/-1 to the
-- scope's supporters only when that number leaves or reaches 0. Only the rows of the same
-- supporter are shared between transactions, as their payments are.
--
-- Campaign windows are read from `campaigns` when a payment changes; creating a campaign, or
-- changing its window, rebuilds that campaign's totals from the ledger. `totals_scopes` holds one
-- row per campaign slug ever named: a ledger change about a campaign takes it FOR SHARE, a
-- campaign change takes it exclusively, so the two never interleave (see totals_lock_scope).

CREATE INDEX payments_campaign ON payments (campaign) WHERE campaign IS NOT NULL;
CREATE INDEX subscriptions_campaign ON subscriptions (campaign) WHERE campaign IS NOT NULL;

CREATE TABLE totals (
    scope                text   NOT NULL,
    currency             text   NOT NULL CHECK (currency = '' OR currency ~ '^[a-z]{3}$'),
    settlement_currency  text   NOT NULL CHECK (settlement_currency = ''
                                                OR settlement_currency ~ '^[a-z]{3}$'),
    -- contributions less refunds and what disputes hold, in `currency`
    raised               bigint NOT NULL DEFAULT 0,
    -- the same in `settlement_currency`, pro rata of the settled amount ('' : not known yet)
    settled              bigint NOT NULL DEFAULT 0,
    contributions        bigint NOT NULL DEFAULT 0,
    supporters           bigint NOT NULL DEFAULT 0,
    active_subscriptions bigint NOT NULL DEFAULT 0,
    -- the yearly value of active subscriptions after discounts, in `currency`
    recurring_annual     bigint NOT NULL DEFAULT 0,
    founding             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, currency, settlement_currency)
);

CREATE TABLE totals_deltas (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope                text   NOT NULL,
    currency             text   NOT NULL,
    settlement_currency  text   NOT NULL,
    raised               bigint NOT NULL DEFAULT 0,
    settled              bigint NOT NULL DEFAULT 0,
    contributions        bigint NOT NULL DEFAULT 0,
    supporters           bigint NOT NULL DEFAULT 0,
    active_subscriptions bigint NOT NULL DEFAULT 0,
    recurring_annual     bigint NOT NULL DEFAULT 0,
    founding             bigint NOT NULL DEFAULT 0
);
CREATE INDEX totals_deltas_scope ON totals_deltas (scope);

CREATE TABLE totals_supporters (
    scope          text    NOT NULL,
    supporter      text    NOT NULL,
    contributions  integer NOT NULL CHECK (contributions >= 0),
    PRIMARY KEY (scope, supporter)
);

CREATE TABLE totals_scopes (
    scope  text PRIMARY KEY,
    rebuilds bigint NOT NULL DEFAULT 0
);

-- --- what one ledger row adds to the totals (pure functions of the row and the campaign) ------

-- The campaign scope a row counts in, if any: its campaign exists and `at` is inside its window
-- (starts inclusive, ends exclusive).
CREATE FUNCTION totals_campaign_scope(campaign text, happened timestamptz) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT c.slug FROM campaigns c
     WHERE c.slug = campaign
       AND (c.starts_at IS NULL OR happened >= c.starts_at)
       AND (c.ends_at IS NULL OR happened < c.ends_at)
$$;

-- Rounded half up: a * b / c for a, b >= 0 and c > 0, exactly (numeric holds the product).
CREATE FUNCTION totals_muldiv(a bigint, b bigint, c bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT div(2::numeric * a * b + c, 2::numeric * c)::bigint
$$;

CREATE FUNCTION totals_payment_figures(p payments)
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
           CASE WHEN f.counts THEN coalesce(p.customer, 'email:' || lower(p.email),
                                            'payment:' || p.payment_key) END
      FROM f, (SELECT '*' UNION ALL SELECT totals_campaign_scope(p.campaign, p.created_at)) AS s(scope)
     WHERE p.status = 'succeeded'
$$;

-- The price of one interval after discounts, rounded half up as Stripe rounds.
CREATE FUNCTION totals_price(amount bigint, percent_off numeric, amount_off bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(0, CASE WHEN percent_off IS NULL THEN amount
                            ELSE totals_muldiv(amount, 1000000 - (percent_off * 10000)::bigint,
                                               1000000) END
                       - coalesce(amount_off, 0))
$$;

-- The yearly value of a price charged every `count` intervals, rounded half up.
CREATE FUNCTION totals_annualised(price bigint, every text, count integer) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT totals_muldiv(price, CASE every WHEN 'day' THEN 365 WHEN 'week' THEN 52
                                           WHEN 'month' THEN 12 ELSE 1 END, count)
$$;

CREATE FUNCTION totals_subscription_figures(s subscriptions)
RETURNS TABLE (scope text, currency text, active_subscriptions bigint, recurring_annual bigint,
               founding bigint)
LANGUAGE sql STABLE AS $$
    SELECT sc.scope, s.currency, 1::bigint,
           totals_annualised(totals_price(s.amount, s.percent_off, s.amount_off), s.interval,
                             s.interval_count), 0::bigint
      FROM (SELECT '*' UNION ALL SELECT totals_campaign_scope(s.campaign, s.created_at)) AS sc(scope)
     WHERE s.status IN ('active', 'trialing', 'past_due')
    UNION ALL
    -- a founding seat is taken for good, whatever becomes of the subscription
    SELECT '*', '', 0, 0, 1 WHERE s.founding
$$;

-- --- keeping them up to date --------------------------------------------------------------------

-- A ledger change about `campaign` runs while no change of that campaign does (which would rebuild
-- its totals from a ledger that cannot see this uncommitted change). The FOR SHARE locks of
-- ledger changes do not block each other. Under REPEATABLE READ or SERIALIZABLE a campaign change
-- committed after this transaction's snapshot makes these statements fail with a serialization
-- error, and the caller's retry sees the campaign.
CREATE FUNCTION totals_lock_scope(campaign text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF campaign IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO totals_scopes (scope) VALUES (campaign) ON CONFLICT (scope) DO NOTHING;
    PERFORM 1 FROM totals_scopes WHERE scope = campaign FOR SHARE;
END
$$;

CREATE FUNCTION totals_count_supporter(target text, person text, change bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    now_counted integer;
BEGIN
    IF change > 0 THEN
        INSERT INTO totals_supporters AS t (scope, supporter, contributions)
        VALUES (target, person, change)
        ON CONFLICT (scope, supporter) DO UPDATE SET contributions = t.contributions + change
        RETURNING contributions INTO now_counted;
    ELSE
        UPDATE totals_supporters SET contributions = contributions + change
         WHERE scope = target AND supporter = person
        RETURNING contributions INTO now_counted;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'totals_supporters has no row (%, %) to take % from', target, person,
                change;
        END IF;
    END IF;
    IF now_counted = 0 THEN
        DELETE FROM totals_supporters WHERE scope = target AND supporter = person;
    END IF;
    -- a supporter appears or disappears only when their count leaves or reaches 0
    IF (now_counted - change <= 0) <> (now_counted <= 0) THEN
        INSERT INTO totals_deltas (scope, currency, settlement_currency, supporters)
        VALUES (target, '', '', CASE WHEN now_counted > 0 THEN 1 ELSE -1 END);
    END IF;
END
$$;

CREATE FUNCTION totals_on_payment() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    person record;
BEGIN
    -- OLD is NULL on INSERT and NEW on DELETE: the figures of a NULL row are no rows
    PERFORM totals_lock_scope(c) FROM (
        SELECT OLD.campaign AS c WHERE TG_OP <> 'INSERT'
        UNION SELECT NEW.campaign WHERE TG_OP <> 'DELETE'
        ORDER BY 1) AS named;

    INSERT INTO totals_deltas (scope, currency, settlement_currency, raised, settled, contributions)
    SELECT f.scope, f.currency, f.settlement_currency, sum(sign * f.raised),
           sum(sign * f.settled), sum(sign * f.contributions)
      FROM (SELECT -1 AS sign, * FROM totals_payment_figures(CASE WHEN TG_OP <> 'INSERT' THEN OLD END)
            UNION ALL
            SELECT 1, * FROM totals_payment_figures(CASE WHEN TG_OP <> 'DELETE' THEN NEW END)
           ) AS f
     GROUP BY 1, 2, 3
    HAVING sum(sign * f.raised) <> 0 OR sum(sign * f.settled) <> 0
        OR sum(sign * f.contributions) <> 0;

    FOR person IN
        SELECT f.scope, f.supporter, sum(sign * f.contributions) AS change
          FROM (SELECT -1 AS sign, *
                  FROM totals_payment_figures(CASE WHEN TG_OP <> 'INSERT' THEN OLD END)
                UNION ALL
                SELECT 1, * FROM totals_payment_figures(CASE WHEN TG_OP <> 'DELETE' THEN NEW END)
               ) AS f
         WHERE f.supporter IS NOT NULL
         GROUP BY 1, 2 HAVING sum(sign * f.contributions) <> 0
         ORDER BY 1, 2  -- the same order in every transaction: no deadlock between two
    LOOP
        PERFORM totals_count_supporter(person.scope, person.supporter, person.change::bigint);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION totals_on_subscription() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM totals_lock_scope(c) FROM (
        SELECT OLD.campaign AS c WHERE TG_OP <> 'INSERT'
        UNION SELECT NEW.campaign WHERE TG_OP <> 'DELETE'
        ORDER BY 1) AS named;
    INSERT INTO totals_deltas (scope, currency, settlement_currency, active_subscriptions,
                               recurring_annual, founding)
    SELECT f.scope, f.currency, '', sum(sign * f.active_subscriptions),
           sum(sign * f.recurring_annual), sum(sign * f.founding)
      FROM (SELECT -1 AS sign, *
              FROM totals_subscription_figures(CASE WHEN TG_OP <> 'INSERT' THEN OLD END)
            UNION ALL
            SELECT 1, * FROM totals_subscription_figures(CASE WHEN TG_OP <> 'DELETE' THEN NEW END)
           ) AS f
     GROUP BY 1, 2
    HAVING sum(sign * f.active_subscriptions) <> 0 OR sum(sign * f.recurring_annual) <> 0
        OR sum(sign * f.founding) <> 0;
    RETURN NULL;
END
$$;

-- Only changes of what the totals read fire the triggers: the upsert of an unchanged row (most
-- webhook events) and the fee worker's fee/net write cost nothing.
CREATE TRIGGER totals_payments_insert_delete AFTER INSERT OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION totals_on_payment();
CREATE TRIGGER totals_payments_update AFTER UPDATE ON payments
    FOR EACH ROW WHEN ((OLD.status, OLD.currency, OLD.amount, OLD.amount_refunded,
                        OLD.amount_disputed, OLD.dispute_lost, OLD.settlement_currency,
                        OLD.settlement_amount,
                        OLD.customer, OLD.email, OLD.campaign, OLD.created_at)
                       IS DISTINCT FROM
                       (NEW.status, NEW.currency, NEW.amount, NEW.amount_refunded,
                        NEW.amount_disputed, NEW.dispute_lost, NEW.settlement_currency,
                        NEW.settlement_amount,
                        NEW.customer, NEW.email, NEW.campaign, NEW.created_at))
    EXECUTE FUNCTION totals_on_payment();
CREATE TRIGGER totals_subscriptions_insert_delete AFTER INSERT OR DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION totals_on_subscription();
CREATE TRIGGER totals_subscriptions_update AFTER UPDATE ON subscriptions
    FOR EACH ROW WHEN ((OLD.status, OLD.currency, OLD.amount, OLD.interval, OLD.interval_count,
                        OLD.percent_off, OLD.amount_off, OLD.founding, OLD.campaign,
                        OLD.created_at)
                       IS DISTINCT FROM
                       (NEW.status, NEW.currency, NEW.amount, NEW.interval, NEW.interval_count,
                        NEW.percent_off, NEW.amount_off, NEW.founding, NEW.campaign,
                        NEW.created_at))
    EXECUTE FUNCTION totals_on_subscription();

-- --- rebuilding a scope from the ledger ---------------------------------------------------------

-- One advisory lock key for compaction: one replica compacts at a time, and a rebuild waits for
-- a compaction in progress (and the reverse) instead of racing it.
CREATE FUNCTION totals_compaction_key() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 7310593858020337012 $$;  -- "totals  " as a bigint

CREATE FUNCTION totals_rebuild(target text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(totals_compaction_key());
    DELETE FROM totals_deltas WHERE scope = target;
    DELETE FROM totals WHERE scope = target;
    DELETE FROM totals_supporters WHERE scope = target;

    INSERT INTO totals_supporters (scope, supporter, contributions)
    SELECT target, f.supporter, sum(f.contributions)
      FROM payments p, totals_payment_figures(p) f
     WHERE (target = '*' OR p.campaign = target) AND p.status = 'succeeded'
       AND f.scope = target AND f.supporter IS NOT NULL
     GROUP BY f.supporter;

    INSERT INTO totals (scope, currency, settlement_currency, raised, settled, contributions,
                        supporters, active_subscriptions, recurring_annual, founding)
    SELECT target, currency, settlement_currency, sum(raised), sum(settled), sum(contributions),
           sum(supporters), sum(active_subscriptions), sum(recurring_annual), sum(founding)
      FROM (
        SELECT f.currency, f.settlement_currency, f.raised, f.settled, f.contributions,
               0 AS supporters, 0 AS active_subscriptions, 0 AS recurring_annual, 0 AS founding
          FROM payments p, totals_payment_figures(p) f
         WHERE (target = '*' OR p.campaign = target) AND p.status = 'succeeded'
           AND f.scope = target
        UNION ALL
        SELECT '', '', 0, 0, 0, count(*), 0, 0, 0 FROM totals_supporters WHERE scope = target
        UNION ALL
        SELECT f.currency, '', 0, 0, 0, 0, f.active_subscriptions, f.recurring_annual, f.founding
          FROM subscriptions s, totals_subscription_figures(s) f
         WHERE (target = '*' OR s.campaign = target) AND f.scope = target
      ) AS figures
     GROUP BY currency, settlement_currency;
END
$$;

-- Creating a campaign, changing its window or deleting it rebuilds its totals. Under READ
-- COMMITTED each statement after the lock sees every ledger change committed before it, which a
-- REPEATABLE READ or SERIALIZABLE snapshot taken before the lock would not: those are refused.
CREATE FUNCTION totals_on_campaign() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'campaigns are changed in READ COMMITTED transactions (their totals are '
                        'rebuilt from the ledger as it is once every ledger change is committed)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    FOR changed IN
        SELECT s FROM (SELECT OLD.slug AS s WHERE TG_OP <> 'INSERT'
                       UNION SELECT NEW.slug WHERE TG_OP <> 'DELETE') AS slugs ORDER BY 1
    LOOP
        -- waits for the ledger changes about this campaign in flight; holds off new ones
        INSERT INTO totals_scopes AS t (scope, rebuilds) VALUES (changed, 1)
        ON CONFLICT (scope) DO UPDATE SET rebuilds = t.rebuilds + 1;
        PERFORM totals_rebuild(changed);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER totals_campaigns_insert_delete AFTER INSERT OR DELETE ON campaigns
    FOR EACH ROW EXECUTE FUNCTION totals_on_campaign();
CREATE TRIGGER totals_campaigns_update AFTER UPDATE ON campaigns
    FOR EACH ROW WHEN ((OLD.slug, OLD.starts_at, OLD.ends_at)
                       IS DISTINCT FROM (NEW.slug, NEW.starts_at, NEW.ends_at))
    EXECUTE FUNCTION totals_on_campaign();

-- The ledger as it stands when this migration runs (writers wait for it: CREATE TRIGGER locks).
LOCK TABLE payments, subscriptions, campaigns IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO totals_scopes (scope) SELECT slug FROM campaigns;
SELECT totals_rebuild(scope) FROM (SELECT '*' AS scope UNION ALL SELECT slug FROM campaigns) s;
