-- An inquiry (warning_needs_response, warning_under_review, warning_closed) that the bank
-- escalates becomes a chargeback on the same dispute object. Its chargeback snapshots used to rank
-- with or below the inquiry's (donations/events.py _STAGE), so the escalation could be kept out
-- and the money Stripe withdrew never shown as held. Stored dispute snapshots take the new ranks
-- here; `donations events reapply --type 'charge.dispute.%'` offers the stored dispute events
-- again, so that a chargeback snapshot kept out before now wins.
UPDATE stripe_objects
   SET rank = CASE data->>'status'
                  WHEN 'warning_needs_response' THEN 0
                  WHEN 'warning_under_review' THEN 1
                  WHEN 'warning_closed' THEN 2
                  WHEN 'needs_response' THEN 3
                  WHEN 'under_review' THEN 4
                  WHEN 'won' THEN 5
                  WHEN 'lost' THEN 5
                  WHEN 'prevented' THEN 5
                  ELSE 0
              END
 WHERE object = 'dispute';
