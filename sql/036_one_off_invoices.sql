-- A payment of an invoice that no subscription generated (a one-off invoice sent from the
-- Dashboard, a Payment Link's receipt: its `parent` null) is a one-off gift, not recurring
-- support: ledger.derive_payment now says so from the subscription alone. The payments derived
-- before are put right (sql/025's count trigger moves their contributions between the kinds).
UPDATE payments SET kind = 'one_off' WHERE kind = 'recurring' AND subscription IS NULL;
