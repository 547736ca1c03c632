"""Campaigns: a slug that checkouts name, a title, an optional goal and an optional window."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from donations import auth, db, inputs
from donations.appkeys import POOL, SETTINGS, TOTALS
from donations.errors import Conflict, Unprocessable
from donations.money import Money

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")  # (\Z: `$` would let a final newline by)
MAX_GOAL = 10**12  # minor units, as inputs.money bounds any amount
_FIELDS = frozenset({"slug", "title", "goal", "starts", "ends"})  # of POST /v1/campaigns

routes = web.RouteTableDef()


@dataclass(frozen=True, slots=True)
class Campaign:
    slug: str
    title: str
    goal: Money | None
    starts_at: datetime | None
    ends_at: datetime | None
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "title": self.title,
            "goal": self.goal.as_json() if self.goal else None,
            "starts_at": inputs.rfc3339(self.starts_at),
            "ends_at": inputs.rfc3339(self.ends_at),
            "created_at": inputs.rfc3339(self.created_at),
        }


def _campaign(row: asyncpg.Record) -> Campaign:
    goal = Money(row["goal_amount"], row["goal_currency"]) if row["goal_amount"] else None
    return Campaign(row["slug"], row["title"], goal, row["starts_at"], row["ends_at"],
                    row["created_at"])


def validate(
    slug: str, title: str, goal: int | None, currency: str | None,
    starts_at: datetime | None, ends_at: datetime | None, reporting_currency: str,
) -> None:
    """Refuse, naming the field, what the database would refuse less clearly."""
    if not SLUG.match(slug):
        raise Unprocessable("invalid_slug", "a slug is lower-case letters, digits and hyphens "
                            "(at most 63)", field="slug")
    if not title.strip() or len(title) > 200 or not title.isprintable():
        # control characters would make the public SVG ill-formed XML (and mean nothing)
        raise Unprocessable("invalid_title", "a title is 1 to 200 printable characters",
                            field="title")
    if goal is not None:
        if not 0 < goal <= MAX_GOAL:
            raise Unprocessable("out_of_range", f"goal must be above zero and at most {MAX_GOAL}",
                                field="goal")
        # totals are given in the reporting currency, so a goal in another one could not be
        # compared with them without guessing an exchange rate
        if (currency or reporting_currency) != reporting_currency:
            raise Unprocessable(
                "goal_currency_mismatch",
                f"a goal must be in the reporting currency ({reporting_currency})",
                field="goal.currency")
    if starts_at and ends_at and ends_at <= starts_at:
        raise Unprocessable("invalid_window", "ends must be after starts", field="ends")


async def create(
    conn: asyncpg.Connection, slug: str, title: str, goal: int | None, currency: str | None,
    starts_at: datetime | None, ends_at: datetime | None, reporting_currency: str,
) -> Campaign:
    validate(slug, title, goal, currency, starts_at, ends_at, reporting_currency)
    try:
        row = await conn.fetchrow(
            """
            INSERT INTO campaigns (slug, title, goal_amount, goal_currency, starts_at, ends_at)
            VALUES ($1, $2, $3, $4, $5, $6)
            RETURNING *
            """,
            slug, title.strip(), goal, reporting_currency if goal is not None else None,
            starts_at, ends_at,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict("campaign_exists", f"a campaign {slug!r} exists already",
                       field="slug") from None
    assert row is not None
    return _campaign(row)


async def get(conn: asyncpg.Connection, slug: str) -> Campaign | None:
    row = await conn.fetchrow("SELECT * FROM campaigns WHERE slug = $1", slug)
    return _campaign(row) if row else None


async def list_all(conn: asyncpg.Connection) -> list[Campaign]:
    return [_campaign(r) for r in await conn.fetch("SELECT * FROM campaigns ORDER BY created_at")]


@routes.get("/v1/campaigns")
async def list_campaigns(request: web.Request) -> web.Response:
    await auth.require(request, "admin")
    async with db.connection(request.app[POOL]) as conn:
        campaigns = await list_all(conn)
    return web.json_response({"data": [c.as_json() for c in campaigns]})


@routes.post("/v1/campaigns")
async def create_campaign(request: web.Request) -> web.Response:
    await auth.require(request, "admin")
    body = await inputs.read_json(request)
    inputs.refuse_unknown(body, _FIELDS)
    slug = inputs.text(body, "slug", max_length=63)
    title = inputs.text(body, "title", max_length=200)
    goal_money = inputs.money(body, "goal", required=False)
    goal, currency = goal_money if goal_money else (None, None)
    starts = inputs.timestamp(body["starts"], "starts") if body.get("starts") is not None else None
    ends = inputs.timestamp(body["ends"], "ends") if body.get("ends") is not None else None
    assert slug is not None and title is not None
    async with db.connection(request.app[POOL]) as conn:
        campaign = await create(conn, slug, title, goal, currency, starts, ends,
                                request.app[SETTINGS].reporting_currency)
    if (cache := request.app.get(TOTALS)) is not None:
        cache.clear()  # its totals at once here (other replicas: within the TTL)
    return web.json_response(campaign.as_json(), status=201)
