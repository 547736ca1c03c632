"""Typed keys for what the application holds: settings, pool, Stripe client, metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import stripe
from aiohttp import web

from donations.db import Migration
from donations.ledger import FoundingOffer
from donations.metrics import Metrics
from donations.seats import FoundingSeats
from donations.settings import Settings

if TYPE_CHECKING:
    from donations.batcher import Batcher
    from donations.totals_api import TotalsCache

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
# for what a reader waits on (checkout, the portal); STRIPE_BACKGROUND for the workers
STRIPE: web.AppKey[stripe.StripeClient | None] = web.AppKey("stripe")
STRIPE_BACKGROUND: web.AppKey[stripe.StripeClient | None] = web.AppKey("stripe_background")
METRICS = web.AppKey("metrics", Metrics)
OFFER = web.AppKey("founding_offer", FoundingOffer)
SEATS = web.AppKey("founding_seats", FoundingSeats)
MIGRATIONS = web.AppKey("migrations", list[Migration])
# the public totals held in memory; named, not imported, as totals_api imports this module
TOTALS: web.AppKey[TotalsCache] = web.AppKey("totals")
# the webhooks' group commit (see donations/batcher.py)
BATCHER: web.AppKey[Batcher] = web.AppKey("batcher")
