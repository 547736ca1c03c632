"""The database fixtures and the service's operational endpoints."""

from __future__ import annotations

import asyncpg

from tests.conftest import Client


async def test_migrations_are_applied(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        names = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
    assert names[0]["name"] == "001_ledger.sql"


async def test_healthz_and_readyz(client: Client) -> None:
    health = await client.get("/healthz")
    assert health.status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json()) == {"status": "ok"}
