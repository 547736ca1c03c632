-- At most so many founding seats held at once per IPv6 /48 too (a site: what one subscriber or
-- one tunnel broker's customer is given whole), beside the per-/64 cap of sql/022. Without it one
-- /48, which anyone can have for free, is 65,536 networks of its own and could hold every seat
-- with checkouts it never pays. IPv4 clients have no site (an address is already scarce, and
-- readers behind one carrier-grade NAT already share its cap). Holds made before this migration,
-- or by replicas not yet updated, count for no site.
ALTER TABLE founding_holds ADD COLUMN site text;
CREATE INDEX founding_holds_site ON founding_holds (site, expires_at) WHERE site IS NOT NULL;

-- As founding_seat_hold(seats, until, holder, per_client, coupon) (sql/022), and the holder's
-- site's own open holds must be under `per_site`.
CREATE FUNCTION founding_seat_hold(seats bigint, until timestamptz, holder text,
                                   per_client bigint, coupon text, holder_site text,
                                   per_site bigint)
RETURNS TABLE (hold_id bigint, taken bigint, closed boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('donations:founding_seats', 0));
    -- a new statement after the lock: its snapshot sees every hold committed before
    RETURN QUERY
    WITH counts AS (
        SELECT c.taken, c.held,
               EXISTS (SELECT 1 FROM founding_coupons_used_up u WHERE u.coupon_id = coupon)
                   AS closed
          FROM founding_seat_counts c),
    mine AS (
        SELECT count(*) AS held
          FROM founding_holds h LEFT JOIN stripe_objects o ON o.id = h.checkout_session
         WHERE h.client = holder AND h.expires_at > now()
           AND (o.id IS NULL OR o.data->>'status' = 'open')),
    ours AS (
        SELECT count(*) AS held
          FROM founding_holds h LEFT JOIN stripe_objects o ON o.id = h.checkout_session
         WHERE h.site = holder_site AND h.expires_at > now()
           AND (o.id IS NULL OR o.data->>'status' = 'open')),
    inserted AS (
        INSERT INTO founding_holds (expires_at, client, site)
        SELECT until, holder, holder_site FROM counts, mine, ours
         WHERE counts.taken + counts.held < seats AND NOT counts.closed
           AND (holder IS NULL OR mine.held < per_client)
           AND (holder_site IS NULL OR ours.held < per_site)
        RETURNING id)
    SELECT (SELECT id FROM inserted), counts.taken, counts.closed FROM counts;
END
$$;

-- The sql/022 form, still called by replicas not yet updated, is now this one for no site, so
-- that the hold's rules are written once.
CREATE OR REPLACE FUNCTION founding_seat_hold(seats bigint, until timestamptz, holder text,
                                              per_client bigint, coupon text)
RETURNS TABLE (hold_id bigint, taken bigint, closed boolean)
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM founding_seat_hold(seats, until, holder, per_client, coupon, NULL, NULL)
$$;
