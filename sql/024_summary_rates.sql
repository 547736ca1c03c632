-- The finance summary converts monthly recurring with the exchange rate Stripe applied last to
-- each payment currency. That was read by joining every payment with its balance transaction
-- (a million of each: 0.8 s and 900 MB read per summary, and the staff page shows twelve
-- summaries: 12 s a page). The payments Stripe converted (settled in another currency than they
-- were paid in: those whose balance transaction has an exchange rate), by currency and time of
-- settlement: the latest rate of a currency is then one index look-up, 0.1 ms. (Built while
-- writes to payments wait: about a second at a million payments.)
CREATE INDEX payments_converted ON payments (currency, settled_at, payment_key)
 WHERE settlement_currency <> currency;
