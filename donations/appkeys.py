"""Typed keys for what the application holds: settings, pool, Stripe client, metrics."""

from __future__ import annotations

import asyncpg
import stripe
from aiohttp import web

from donations.db import Migration
from donations.ledger import FoundingOffer
from donations.metrics import Metrics
from donations.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
STRIPE: web.AppKey[stripe.StripeClient | None] = web.AppKey("stripe")
METRICS = web.AppKey("metrics", Metrics)
OFFER = web.AppKey("founding_offer", FoundingOffer)
MIGRATIONS = web.AppKey("migrations", list[Migration])
