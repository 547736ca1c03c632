-- At most a few founding seats held at once per client network (checkout's rate-limit bucket:
-- an IPv4 address or an IPv6 /64), so that checkouts started and never paid cannot take the
-- offer away from everyone else: hoarding the seats then needs as many networks as seats. A
-- client over its share gets the full price, as when no seat is free. Holds made before this
-- migration, and by callers that name no client, count for nobody.
ALTER TABLE founding_holds ADD COLUMN client text;
CREATE INDEX founding_holds_client ON founding_holds (client, expires_at) WHERE client IS NOT NULL;

-- As founding_seat_hold(seats, until) (sql/007, kept for replicas not yet updated), and the
-- client's own open holds (session open or not yet known, not lapsed) must be under `per_client`,
-- and Stripe must not have said the coupon is used up (sql/020): `closed` says so.
CREATE FUNCTION founding_seat_hold(seats bigint, until timestamptz, holder text,
                                   per_client bigint, coupon text)
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
    inserted AS (
        INSERT INTO founding_holds (expires_at, client)
        SELECT until, holder FROM counts, mine
         WHERE counts.taken + counts.held < seats AND NOT counts.closed
           AND (holder IS NULL OR mine.held < per_client)
        RETURNING id)
    SELECT (SELECT id FROM inserted), counts.taken, counts.closed FROM counts;
END
$$;
