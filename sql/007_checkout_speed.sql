-- Checkout in fewer round trips: a founding seat is held in one statement.
--
-- A hold must be counted after the advisory lock is granted, against every hold committed before:
-- under READ COMMITTED a single statement cannot do that (its snapshot is taken before the lock
-- is), so it was two statements and a transaction (BEGIN, lock, count and insert, COMMIT: four
-- round trips, the lock held across three of them). A VOLATILE function takes a fresh snapshot
-- for each statement inside it, so the count after the lock sees every earlier hold, and the lock
-- is held only from its grant to the caller's commit.

-- Seats taken and held now (the rules are in donations/seats.py): taken by a founding subscription
-- (however it came) or by the subscription of a held session that completed before the
-- subscription's own events arrived; held by a hold whose session is open or not yet known to us,
-- until its `expires_at`.
CREATE VIEW founding_seat_counts AS
WITH taken AS (
    SELECT id FROM subscriptions WHERE founding
    UNION
    SELECT o.subscription_id
      FROM founding_holds h JOIN stripe_objects o ON o.id = h.checkout_session
     WHERE o.object = 'checkout.session' AND o.data->>'status' = 'complete'
       AND o.subscription_id IS NOT NULL
), held AS (
    SELECT h.id
      FROM founding_holds h LEFT JOIN stripe_objects o ON o.id = h.checkout_session
     WHERE h.expires_at > now() AND (o.id IS NULL OR o.data->>'status' = 'open')
)
SELECT (SELECT count(*) FROM taken) AS taken, (SELECT count(*) FROM held) AS held;

-- Hold a seat until `until` if one of `seats` is free, in the caller's transaction (its own when
-- called as a statement of its own): the new hold's id (NULL when none is free) and the seats
-- taken for good. Holds are only taken here, under the lock.
CREATE FUNCTION founding_seat_hold(seats bigint, until timestamptz)
RETURNS TABLE (hold_id bigint, taken bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('donations:founding_seats', 0));
    -- a new statement after the lock: its snapshot sees every hold committed before
    RETURN QUERY
    WITH counts AS (SELECT c.taken, c.held FROM founding_seat_counts c),
    inserted AS (
        INSERT INTO founding_holds (expires_at)
        SELECT until FROM counts WHERE counts.taken + counts.held < seats
        RETURNING id)
    SELECT (SELECT id FROM inserted), counts.taken FROM counts;
END
$$;
