-- /metrics counts the stored events by type and status on every scrape. Without an index that
-- is a scan of the whole table, payloads and all: measured at 500,000 events, 243 ms and 2 GB
-- read per scrape; with this index, an index-only scan, 19 ms. (Built while writes wait: on a
-- table of millions of events, run this migration when a few seconds' pause is acceptable.)
CREATE INDEX stripe_events_status_type ON stripe_events (status, type);
