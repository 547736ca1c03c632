"""Staff tokens (hashed, scoped, revocable) and campaigns (admin only), over HTTP and the CLI."""

from __future__ import annotations

import datetime as dt
import json

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from donations import auth, db
from donations.app import create_app
from tests.conftest import Client, make_settings, raw_request
from tests.fakestripe.world import World
from tests.test_cli import _env, _run
from tests.webhook_helpers import post_all


async def _token(pool: asyncpg.Pool, name: str, *scopes: str) -> str:
    async with db.connection(pool) as conn:
        return await auth.create_token(conn, name, list(scopes))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_are_stored_only_as_hashes(pool: asyncpg.Pool) -> None:
    token = await _token(pool, "finance", "reports:read")
    assert token.startswith("dnt_") and len(token) > 40
    stored = await pool.fetchrow("SELECT * FROM api_tokens WHERE name = 'finance'")
    assert stored is not None
    assert token.encode() not in bytes(stored["token_hash"])
    assert bytes(stored["token_hash"]) == auth.token_hash(token)
    assert token not in repr(dict(stored))


async def test_every_auth_case_on_a_staff_endpoint(client: Client, pool: asyncpg.Pool) -> None:
    admin = await _token(pool, "ops", "admin")
    reader = await _token(pool, "finance", "reports:read")
    revoked = await _token(pool, "old", "admin")
    async with db.connection(pool) as conn:
        await auth.revoke_token(conn, "old")

    cases = {
        "no header": ({}, 401),
        "not bearer": ({"Authorization": f"Basic {admin}"}, 401),
        "unknown token": (_bearer("dnt_not-a-real-token"), 401),
        "revoked token": (_bearer(revoked), 401),
        "without the scope": (_bearer(reader), 403),
        "admin": (_bearer(admin), 200),
    }
    for name, (headers, status) in cases.items():
        response = await client.get("/v1/campaigns", headers=headers)
        assert response.status == status, name
        if status != 200:
            body = await response.json()
            assert body["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[status]
            assert admin not in json.dumps(body)
    last_used = await pool.fetchval("SELECT last_used_at FROM api_tokens WHERE name = 'ops'")
    assert last_used is not None


async def test_a_bearer_token_that_is_not_utf8_is_401(client: Client) -> None:
    """`Authorization: Bearer <bytes that are not UTF-8>` is 401 like any unknown token: no
    token of ours holds such bytes."""
    status, body = await raw_request(client, (
        b"GET /v1/reports/summary?from=2026-01-01&to=2026-02-01 HTTP/1.1\r\n"
        b"Host: localhost\r\nAuthorization: Bearer dnt_\xff\xfe\r\nConnection: close\r\n\r\n"))
    assert status == 401, (status, body)
    assert json.loads(body)["error"]["code"] == "unauthorized"


async def test_admin_creates_and_lists_campaigns(client: Client, pool: asyncpg.Pool) -> None:
    headers = _bearer(await _token(pool, "ops", "admin"))
    created = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "winter-2026", "title": "Winter appeal",
        "goal": {"amount": 5_000_000, "currency": "gbp"},
        "starts": "2026-12-01", "ends": "2027-01-01T00:00:00Z",
    })
    assert created.status == 201
    body = await created.json()
    assert body == {
        "slug": "winter-2026", "title": "Winter appeal",
        "goal": {"amount": 5_000_000, "currency": "gbp"},
        "starts_at": "2026-12-01T00:00:00Z", "ends_at": "2027-01-01T00:00:00Z",
        "created_at": body["created_at"],
    }
    listed = await (await client.get("/v1/campaigns", headers=headers)).json()
    assert [c["slug"] for c in listed["data"]] == ["winter-2026"]


async def test_bad_campaigns_are_refused_naming_the_field(
    client: Client, pool: asyncpg.Pool
) -> None:
    headers = _bearer(await _token(pool, "ops", "admin"))
    ok = {"slug": "spring", "title": "Spring"}
    assert (await client.post("/v1/campaigns", headers=headers, json=ok)).status == 201
    cases = [
        (ok, 409, "campaign_exists", "slug"),
        ({"slug": "Bad Slug!", "title": "x"}, 422, "invalid_slug", "slug"),
        ({"slug": "x"}, 400, "missing_field", "title"),
        ({"slug": "usd-goal", "title": "x", "goal": {"amount": 100, "currency": "usd"}},
         422, "goal_currency_mismatch", "goal.currency"),
        ({"slug": "float-goal", "title": "x", "goal": {"amount": 10.5, "currency": "gbp"}},
         400, "invalid_field", "goal.amount"),
        ({"slug": "window", "title": "x", "starts": "2027-01-02", "ends": "2027-01-01"},
         422, "invalid_window", "ends"),
        ({"slug": "when", "title": "x", "starts": "tomorrow"}, 400, "invalid_timestamp", "starts"),
    ]
    for body, status, code, field in cases:
        response = await client.post("/v1/campaigns", headers=headers, json=body)
        error = (await response.json())["error"]
        assert (response.status, error["code"], error.get("field")) == (status, code, field), body
    malformed = await client.post("/v1/campaigns", headers=headers, data=b"{not json")
    assert malformed.status == 400
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 1


async def test_cli_tokens_and_campaigns(pool: asyncpg.Pool, dsn: str) -> None:
    env = _env(DATABASE_URL=dsn)
    code, out, err = await _run("tokens", "create", "--name", "finance", "--scope",
                                "reports:read", env=env)
    assert code == 0, err
    token = out.strip()
    assert token.startswith("dnt_")
    assert "shown only this once" in err
    code, out, _ = await _run("tokens", "list", env=env)
    assert "finance\treports:read" in out
    assert token not in out
    code, _, err = await _run("tokens", "create", "--name", "finance", "--scope", "admin",
                              env=env)
    assert code == 1 and "already named" in err
    assert (await _run("tokens", "revoke", "finance", env=env))[0] == 0
    assert (await _run("tokens", "revoke", "finance", env=env))[0] == 1

    code, out, err = await _run("campaigns", "create", "--slug", "winter", "--title", "Winter",
                                "--goal", "50000", env=env)
    assert code == 0, err
    assert json.loads(out)["goal"] == {"amount": 5_000_000, "currency": "gbp"}
    code, _, err = await _run("campaigns", "create", "--slug", "yen", "--title", "Yen",
                              "--goal", "10.5", "--currency", "jpy", env=env)
    assert code == 1 and "goal" in err
    code, out, _ = await _run("campaigns", "list", env=env)
    assert [json.loads(line)["slug"] for line in out.splitlines()] == ["winter"]


async def test_failed_attempts_are_counted_per_client_behind_a_proxy(
    pool: asyncpg.Pool, dsn: str, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(create_app(make_settings(dsn, proxy_hops=1)))
    admin = await _token(pool, "ops", "admin")
    scanner = {"X-Forwarded-For": "203.0.113.9"}
    for _ in range(20):
        response = await client.get("/v1/campaigns", headers={**scanner, **_bearer("dnt_x")})
        assert response.status == 401
    blocked = await client.get("/v1/campaigns", headers={**scanner, **_bearer("dnt_x")})
    assert blocked.status == 429
    # another reader behind the same balancer is not locked out by the scanner
    staff = await client.get("/v1/campaigns", headers={
        "X-Forwarded-For": "198.51.100.7", **_bearer(admin)})
    assert staff.status == 200


@pytest.mark.parametrize("field", ["starts", "ends"])
async def test_a_window_edge_outside_the_years_1_to_9999_is_a_400(
    client: Client, pool: asyncpg.Pool, field: str
) -> None:
    headers = _bearer(await _token(pool, "ops", "admin"))
    value = "0001-01-01T00:00:00+01:00" if field == "starts" else "9999-12-31T23:30:00-01:00"
    response = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "winter", "title": "Winter appeal", field: value})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["field"] == field


async def test_a_campaign_window_edge_that_is_no_timestamp_is_refused(
    client: Client, pool: asyncpg.Pool
) -> None:
    """`starts` or `ends` given as something that is no timestamp (0, false, "") is 400
    `invalid_timestamp` naming it, never taken as "no window", and nothing is stored."""
    headers = _bearer(await _token(pool, "ops", "admin"))
    for field, value in (("starts", 0), ("starts", ""), ("ends", False), ("ends", [])):
        response = await client.post("/v1/campaigns", headers=headers, json={
            "slug": "winter", "title": "Winter", field: value})
        body = await response.json()
        assert response.status == 400, (field, value, body)
        assert (body["error"]["code"], body["error"]["field"]) == ("invalid_timestamp", field)
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_a_campaign_field_that_is_not_one_is_refused(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A misspelt field (`goal_amount` for `goal`) is 400 `unknown_field` naming it, as at
    checkout and the portal, rather than a campaign made without what the caller meant."""
    headers = _bearer(await _token(pool, "ops", "admin"))
    response = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "winter", "title": "Winter", "goal_amount": 5000000})
    body = await response.json()
    assert response.status == 400, body
    assert (body["error"]["code"], body["error"]["field"]) == ("unknown_field", "goal_amount")
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_a_campaign_at_the_first_or_last_instant_is_refused_and_the_list_still_reads(
    client: Client, pool: asyncpg.Pool
) -> None:
    """0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z are the instants asyncpg stores
    as PostgreSQL's -infinity and infinity (and reads back as no moment): a window edge there
    is 400 `invalid_timestamp` naming it, nothing is stored, and GET /v1/campaigns still
    answers; a moment later (or earlier) is kept as given."""
    headers = _bearer(await _token(pool, "ops", "admin"))
    for field, value in (("starts", "0001-01-01"), ("starts", "0001-01-01T00:00:00Z"),
                         ("ends", "9999-12-31T23:59:59.999999Z")):
        response = await client.post("/v1/campaigns", headers=headers, json={
            "slug": "ancient", "title": "Ancient", field: value})
        body = await response.json()
        assert response.status == 400, (value, body)
        assert (body["error"]["code"], body["error"]["field"]) == ("invalid_timestamp", field)
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0
    kept = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "ancient", "title": "Ancient", "starts": "0001-01-01T00:00:01Z",
        "ends": "9999-12-31T23:59:59Z"})
    assert kept.status == 201, await kept.text()
    listed = await client.get("/v1/campaigns", headers=headers)
    assert listed.status == 200
    [campaign] = (await listed.json())["data"]
    assert (campaign["starts_at"], campaign["ends_at"]) == (
        "0001-01-01T00:00:01Z", "9999-12-31T23:59:59Z")


@pytest.mark.parametrize(("field", "counted"), [("starts", 1), ("ends", 0)])
async def test_a_campaign_window_edge_with_a_fraction_of_a_second_is_the_one_reported(
    client: Client, pool: asyncpg.Pool, field: str, counted: int
) -> None:
    """`starts` or `ends` of `…T10:00:00.5Z` is answered (and listed) as `…T10:00:00Z`, so
    that is the window kept: a contribution made at 10:00:00 (Stripe's times are whole
    seconds) is inside a campaign said to start then (starts inclusive) and outside one said
    to end then (ends exclusive), not the other way round."""
    world = World(seed=404)
    world.one_off(2500, "gbp", email="reader@example.org", campaign="launch")
    await post_all(client, world.events)
    happened = await pool.fetchval("SELECT created_at FROM payments")
    assert happened is not None and happened.microsecond == 0
    second = happened.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    headers = _bearer(await _token(pool, "ops", "admin"))
    made = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "launch", "title": "Launch", field: f"{second}.5Z"})
    body = await made.json()
    assert made.status == 201, body
    assert body[f"{field}_at"] == f"{second}Z"  # the window the API says it has
    stored = await pool.fetchrow("SELECT starts_at, ends_at FROM campaigns")
    assert stored is not None and stored[f"{field}_at"] == happened
    totals = await (await client.get("/v1/campaigns/launch/totals")).json()
    assert totals["contributions"] == counted, totals


async def test_a_title_with_a_control_character_is_refused(
    client: Client, pool: asyncpg.Pool
) -> None:
    # it would make the public SVG ill-formed XML: a broken image on every page embedding it
    headers = _bearer(await _token(pool, "ops", "admin"))
    response = await client.post("/v1/campaigns", headers=headers, json={
        "slug": "winter", "title": "Winter\x0bappeal"})
    assert response.status == 422
    assert (await response.json())["error"]["field"] == "title"


@pytest.mark.parametrize("goal", ["1e20", "99999999999999999999"])
async def test_campaigns_create_with_a_goal_too_large_is_one_line(
    pool: asyncpg.Pool, dsn: str, goal: str
) -> None:
    """`campaigns create --goal` is major units; the HTTP API refuses a goal over 10^12 minor
    units (422 out_of_range) but the command passes any size on, and asyncpg's DataError
    ("value out of int64 range") escapes main: a traceback. It should be one line naming
    --goal and exit 1, as `--goal nan` already is."""
    code, _out, err = await _run("campaigns", "create", "--slug", "huge", "--title", "Huge",
                                "--goal", goal, env=_env(DATABASE_URL=dsn, LOG_LEVEL="warning"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-1500:]
    assert (code, len(lines)) == (1, 1), err[-1500:]
    assert "goal" in lines[0]
    assert await pool.fetchval("SELECT count(*) FROM campaigns") == 0


async def test_campaigns_create_with_a_slug_ending_in_a_newline_is_one_line(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """campaigns.SLUG is `^…$`, and Python's `$` also matches before a final newline, so
    validate() lets "winter\\n" through (campaigns.py:55); PostgreSQL's check constraint, whose
    `$` does not, refuses it, and the CheckViolationError escapes `campaigns create` as a
    traceback (the HTTP API strips the slug first, the command does not). It should be the
    same one line as any other bad slug: `donations: a slug is lower-case letters…`."""
    code, _out, err = await _run("campaigns", "create", "--slug", "winter\n", "--title", "Winter",
                                env=_env(DATABASE_URL=dsn, LOG_LEVEL="warning"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-1500:]
    assert (code, len(lines)) == (1, 1), err[-1500:]
    assert "slug" in lines[0]


async def test_tokens_create_with_the_scope_option_given_twice_keeps_both_scopes(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """CONTRACT, Command line: "`tokens create --name NAME --scope SCOPE…` (prints the token
    once)"; Conventions: "Scopes: `reports:read`, `admin` (implies all)".

    `--scope admin --scope reports:read` is the usual way to give an option several values; the
    command accepts it (exit 0) and says the token was made, but keeps only the last `--scope`:
    the token silently lacks `admin`."""
    env = _env(DATABASE_URL=dsn)
    code, out, err = await _run("tokens", "create", "--name", "ops", "--scope", "admin",
                                "--scope", "reports:read", env=env)
    assert code == 0, err
    code, out, err = await _run("tokens", "list", env=env)
    assert code == 0, err
    row = next(line.split("\t") for line in out.splitlines() if line.startswith("ops\t"))
    assert set(row[1].split(",")) == {"admin", "reports:read"}, row
