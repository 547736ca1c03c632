-- Stripe lists a payout's transactions in full only once it has finished reconciling it
-- (reconciliation_status 'completed'; 'not_applicable' for a manual payout). The payout worker
-- waits for that (payout.reconciliation_completed) instead of listing a part of them for good.
ALTER TABLE payouts ADD COLUMN reconciliation_status text;
UPDATE payouts p SET reconciliation_status = o.data ->> 'reconciliation_status'
  FROM stripe_objects o WHERE o.id = p.id;
-- the queue's record of the state each payout was fetched for, in the form enqueue now writes
UPDATE payout_fetches f SET payout_status = f.payout_status || ':' || coalesce(p.reconciliation_status, '')
  FROM payouts p WHERE p.id = f.payout;
-- payout.reconciliation_completed events stored before this migration were not understood and
-- kept as ignored: what they said is taken from them here
UPDATE payouts p SET reconciliation_status = 'completed'
  FROM stripe_events e
 WHERE e.type = 'payout.reconciliation_completed'
   AND (e.payload::jsonb) -> 'data' -> 'object' ->> 'id' = p.id;
