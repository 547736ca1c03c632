"""Posting events to the service the way Stripe does: signed, JSON, one at a time or at once."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from tests.conftest import WEBHOOK_SECRET
from tests.fakestripe.signing import signed_request


async def post_event(
    client: TestClient,  # type: ignore[type-arg]
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
) -> tuple[int, dict[str, Any]]:
    body, headers = signed_request(event, secret, timestamp)
    response = await client.post("/webhooks/stripe", data=body, headers=headers)
    return response.status, await response.json()


async def post_all(client: TestClient, events: list[dict[str, Any]]) -> None:  # type: ignore[type-arg]
    for event in events:
        status, body = await post_event(client, event)
        assert status == 200, (event["type"], body)


async def count(pool: asyncpg.Pool, table: str) -> int:
    async with pool.acquire() as conn:
        value: int = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
    return value
