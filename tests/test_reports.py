"""The contributions and summary reports over a ledger built from signed webhooks, with the fees
fetched from the fake Stripe: rows, sums, CSV rules, formula injection, window edges, auth."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.resources
import io
import json
import os
import signal
import socket
import sys
import zoneinfo
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from donations import auth, cli, db, display, fees, payouts, reports
from donations.app import create_app
from donations.appkeys import TOTALS
from donations.errors import BadRequest, Unprocessable
from donations.metrics import Metrics
from donations.money import to_major
from tests.conftest import Client, make_settings, staff_cookie, wait_until
from tests.fakestripe import objects as o
from tests.fakestripe.world import DAY, DEFAULT_RATES, Emitted, World
from tests.test_cli import _env, _run
from tests.test_fees import stripe_against
from tests.test_reconcile import signalled_half_way
from tests.webhook_helpers import post_all

START = 1_795_000_000  # 2026-11-18T07:46:40Z, the World's clock at the start


@dataclass
class Ledger:
    world: World
    gbp: str
    usd: str
    jpy: str
    eur: str
    disputed: str
    subscription: str
    refund: str
    dispute: str
    payout: str


async def _ledger(client: Client, pool: asyncpg.Pool) -> Ledger:
    """Payments in four currencies (one JPY), a partial refund, a dispute won, a subscription;
    text from the public that a spreadsheet would run as a formula."""
    world = World(seed=501, start=START)
    gbp = world.one_off(2500, "gbp", email="+attacker@example.org", campaign="=1+2",
                        metadata={"note": "@SUM(A1)"})
    usd = world.one_off(2500, "usd", campaign="-2+3")
    jpy = world.one_off(1000, "jpy", email="\tjp@example.org")
    eur = world.one_off(1234, "eur", campaign="winter")
    refund = world.refund(eur.charge, 234)
    disputed = world.one_off(5000, "gbp")
    sub = world.subscribe(500, "gbp", email="reader@example.org")
    dispute = world.dispute(disputed.charge, "won")
    payout = world.payout()
    await post_all(client, world.events)
    # the fee worker settles the charges; the payout's listing every other movement
    async with stripe_against(world) as (_, stripe_client):
        while await fees.run_once(pool, stripe_client, Metrics()):
            pass
        assert await payouts.run_once(pool, stripe_client) == 1
    return Ledger(world, gbp.payment_intent, usd.payment_intent, jpy.payment_intent,
                  eur.payment_intent, disputed.payment_intent, sub.subscription, refund.refund,
                  dispute.dispute, payout.payout)


async def _bearer(pool: asyncpg.Pool, name: str = "finance", *scopes: str) -> dict[str, str]:
    async with db.connection(pool) as conn:
        token = await auth.create_token(conn, name, list(scopes or ("reports:read",)))
    return {"Authorization": f"Bearer {token}"}


def _parse(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


WIDE = {"from": "2026-11-01", "to": "2027-02-01"}


async def _csv(client: Client, headers: dict[str, str], **params: str) -> tuple[Any, str]:
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={**WIDE, **params})
    assert response.status == 200, await response.text()
    return response, (await response.read()).decode("utf-8")


async def test_the_streamed_reports_carry_the_request_id(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The contributions report (CSV and JSON over the API, and the staff page's download) is
    streamed, its headers sent from inside the handler, and still carries X-Request-ID."""
    headers = await _bearer(pool)
    for fmt in ("csv", "json"):
        response = await client.get("/v1/reports/contributions", params={**WIDE, "format": fmt},
                                    headers={**headers, "X-Request-ID": f"report-{fmt}"})
        assert response.status == 200
        await response.read()
        assert response.headers["X-Request-ID"] == f"report-{fmt}"
    cookie = await staff_cookie(client, headers["Authorization"].split()[1])
    download = await client.get("/staff/contributions.csv", params=WIDE,
                                headers={**cookie, "X-Request-ID": "report-staff"})
    assert download.status == 200
    await download.read()
    assert download.headers["X-Request-ID"] == "report-staff"


async def test_contributions_csv_has_a_row_per_movement_with_the_contracts_columns(
    client: Client, pool: asyncpg.Pool
) -> None:
    ledger = await _ledger(client, pool)
    headers = await _bearer(pool)
    response, body = await _csv(client, headers)

    assert response.headers["Content-Type"].startswith("text/csv")
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="contributions_2026-11-01_2027-02-01.csv"')
    assert body.endswith("\r\n") and "\r\n" in body.split("\n", 1)[0] + "\n"
    rows = _parse(body)
    contract = ["created_at", "type", "kind", "status", "currency", "amount", "fee", "net",
                "settlement_currency", "settlement_amount", "campaign", "email",
                "payment_intent", "charge", "invoice", "subscription", "customer", "payout"]
    assert set(contract) <= set(rows[0])
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    assert sorted((r["type"], r["status"]) for r in rows) == sorted(
        [("payment", "succeeded")] * 6 + [("refund", "succeeded")]
        + [("dispute", "funds_withdrawn"), ("dispute", "funds_reinstated")])

    by_pi = {r["payment_intent"]: r for r in rows if r["type"] == "payment"}
    bts = ledger.world.balance_transactions
    usd = by_pi[ledger.usd]
    # $25.00 settled as £20.00 less 1.5% + 20p: amounts in each currency's own major units
    assert (usd["currency"], usd["amount"], usd["settlement_currency"],
            usd["settlement_amount"], usd["fee"], usd["net"]) == (
        "usd", "25.00", "gbp", "20.00", "0.50", "19.50")
    jpy = by_pi[ledger.jpy]
    assert (jpy["currency"], jpy["amount"], jpy["settlement_amount"], jpy["fee"]) == (
        "jpy", "1000", "5.00", "0.28")
    assert by_pi[ledger.gbp]["kind"] == "one_off"
    recurring = [r for r in rows if r["kind"] == "recurring"]
    assert [(r["amount"], r["subscription"]) for r in recurring] == [("5.00", ledger.subscription)]
    assert recurring[0]["invoice"].startswith("in_") and recurring[0]["customer"]

    refund = next(r for r in rows if r["type"] == "refund")
    refund_bt = bts[refund["balance_transaction"]]
    assert (refund["currency"], refund["amount"], refund["refund"], refund["payment_intent"],
            refund["campaign"]) == ("eur", "-2.34", ledger.refund, ledger.eur, "winter")
    assert refund["settlement_amount"] == f"-{-refund_bt['amount'] / 100:.2f}"

    withdrawn, reinstated = (next(r for r in rows if r["status"] == s)
                             for s in ("funds_withdrawn", "funds_reinstated"))
    assert (withdrawn["amount"], withdrawn["fee"], withdrawn["net"], withdrawn["dispute"]) == (
        "-50.00", "20.00", "-70.00", ledger.dispute)
    assert (reinstated["amount"], reinstated["fee"], reinstated["net"]) == (
        "50.00", "0.00", "50.00")
    assert withdrawn["payment_intent"] == ledger.disputed
    assert withdrawn["created_at"] < reinstated["created_at"]
    assert {r["payout"] for r in rows} == {ledger.payout}


async def test_text_cells_that_would_run_as_formulas_are_neutralised(
    client: Client, pool: asyncpg.Pool
) -> None:
    ledger = await _ledger(client, pool)
    _, body = await _csv(client, await _bearer(pool))
    by_pi = {r["payment_intent"]: r for r in _parse(body) if r["type"] == "payment"}
    gbp = by_pi[ledger.gbp]
    assert gbp["campaign"] == "'=1+2"
    assert gbp["email"] == "'+attacker@example.org"
    assert by_pi[ledger.usd]["campaign"] == "'-2+3"
    assert by_pi[ledger.jpy]["email"] == "'\tjp@example.org"
    assert json.loads(gbp["metadata"]) == {"campaign": "=1+2", "note": "@SUM(A1)"}
    # numbers stay numbers, negative ones included
    assert all(not r["amount"].startswith("'") for r in _parse(body))
    for cell in ("=cmd", "+1", "-1", "@x", "\tx", "\rx"):
        assert reports.neutralise(cell) == "'" + cell
    assert reports.neutralise("winter") == "winter"
    assert reports.neutralise("") == ""


async def test_postgresql_formats_the_csv_exactly_as_the_python_reference(
    client: Client, pool: asyncpg.Pool
) -> None:
    await _ledger(client, pool)
    win = reports.window(WIDE["from"], WIDE["to"])
    raw = await pool.fetch(reports.CONTRIBUTIONS, win.start, win.end)
    formatted = await pool.fetch(reports.CONTRIBUTIONS_CSV, *reports.csv_arguments(win))
    assert len(raw) == len(formatted) == 9
    for python, sql in zip(raw, formatted, strict=True):
        assert reports.csv_cells(python) == [v if v is not None else "" for v in sql]
    for amount, currency, major in ((-5, "bhd", "-0.005"), (1000, "jpy", "1000"),
                                    (-5, "gbp", "-0.05"), (0, "usd", "0.00")):
        row = {**dict(raw[0]), "amount": amount, "currency": currency}
        assert reports.csv_cells(row)[5] == major


async def test_json_gives_the_same_rows_with_money_objects(
    client: Client, pool: asyncpg.Pool
) -> None:
    ledger = await _ledger(client, pool)
    headers = await _bearer(pool)
    _, body = await _csv(client, headers)
    rows = _parse(body)
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={**WIDE, "format": "json"})
    assert response.status == 200
    assert response.headers["Content-Disposition"].endswith('2027-02-01.json"')
    data = await response.json()
    assert data["rows"] == len(data["data"]) == len(rows)
    assert data["window"] == {"from": "2026-11-01T00:00:00Z", "to": "2027-02-01T00:00:00Z",
                              "tz": "UTC"}
    usd = next(r for r in data["data"] if r["payment_intent"] == ledger.usd)
    assert usd["amount"] == {"amount": 2500, "currency": "usd"}
    assert usd["settlement_amount"] == {"amount": 2000, "currency": "gbp"}
    assert usd["fee"] == {"amount": 50, "currency": "gbp"}
    gbp = next(r for r in data["data"] if r["payment_intent"] == ledger.gbp)
    assert gbp["campaign"] == "=1+2"  # JSON is not a spreadsheet: the value as given
    assert [r["type"] for r in data["data"]] == [r["type"] for r in rows]


async def test_pandas_reads_the_csv_and_the_sums_tie(client: Client, pool: asyncpg.Pool) -> None:
    pandas = pytest.importorskip("pandas", reason="pandas is not installed")
    await _ledger(client, pool)
    _, body = await _csv(client, await _bearer(pool))
    frame = pandas.read_csv(io.StringIO(body), dtype=str, keep_default_na=False)
    assert len(frame) == 9
    gbp = frame[frame["settlement_currency"] == "gbp"]
    # every movement settled in GBP: exact sums in pence, never floats
    pence = sum(int(v.replace(".", "")) for v in gbp["net"])
    assert pence == sum(int(v.replace(".", "")) for v in gbp["settlement_amount"]) - sum(
        int(v.replace(".", "")) for v in gbp["fee"])
    assert set(frame["type"]) == {"payment", "refund", "dispute"}


async def test_window_from_is_inclusive_and_to_exclusive(
    client: Client, pool: asyncpg.Pool
) -> None:
    ledger = await _ledger(client, pool)
    headers = await _bearer(pool)
    # a payment's movement is at its settlement (its balance transaction), else its creation
    created = await pool.fetchval(
        "SELECT coalesce(settled_at, created_at) FROM payments WHERE payment_intent = $1",
        ledger.usd)
    stamp = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    _, starting = await _csv(client, headers, **{"from": stamp})
    assert starting.count(ledger.usd) == 1
    assert ledger.gbp not in starting  # made before
    _, ending = await _csv(client, headers, to=stamp)
    assert ledger.usd not in ending and ledger.gbp in ending
    # a naive timestamp and a date are read in the given time zone
    just_after = (created + timedelta(seconds=1)).astimezone(UTC).replace(tzinfo=None)
    _, tokyo = await _csv(client, headers, to=(just_after + timedelta(hours=9)).isoformat(),
                          tz="Asia/Tokyo")
    assert ledger.usd in tokyo
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={"from": "2026-11-18", "to": "2026-11-19",
                                        "tz": "Pacific/Kiritimati"})  # UTC+14
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="contributions_2026-11-18_2026-11-19.csv"')
    assert ledger.gbp not in (await response.text())  # 07:46 UTC is the 18th's evening there
    _, nothing = await _csv(client, headers, **{"from": "2025-01-01", "to": "2025-02-01"})
    assert _parse(nothing) == [] and nothing.startswith("created_at,type,")


def test_window_parsing_refuses_what_it_cannot_read() -> None:
    w = reports.window("2026-11-01", "2026-12-01", "Europe/London")
    assert (w.start, w.end) == (datetime(2026, 11, 1, tzinfo=UTC),
                                datetime(2026, 12, 1, tzinfo=UTC))
    summer = reports.window("2026-07-01", "2026-07-02T00:00:00+00:00", "Europe/London")
    assert summer.start == datetime(2026, 6, 30, 23, tzinfo=UTC)
    cases: list[tuple[tuple[str | None, str | None, str | None], type[Exception], str]] = [
        ((None, "2026-12-01", None), BadRequest, "from"),
        (("2026-11-01", None, None), BadRequest, "to"),
        (("yesterday", "2026-12-01", None), BadRequest, "from"),
        (("2026-11-01", "2026-11-01", None), Unprocessable, "to"),
        (("2026-12-01", "2026-11-01", None), Unprocessable, "to"),
        (("2026-11-01", "2026-12-01", "Mars/Olympus"), BadRequest, "tz"),
        # moments that fall outside the years 1-9999 once in UTC
        (("0001-01-01", "2026-12-01", "Asia/Tokyo"), BadRequest, "from"),
        (("0001-01-01T00:00:00+01:00", "2026-12-01", None), BadRequest, "from"),
        (("2026-11-01", "9999-12-31T23:00:00-05:00", None), BadRequest, "to"),
    ]
    for args, error, name in cases:
        with pytest.raises(error) as caught:
            reports.window(*args)
        assert getattr(caught.value, "field", None) == name, args


async def test_bad_parameters_are_refused_naming_the_field(
    client: Client, pool: asyncpg.Pool
) -> None:
    headers = await _bearer(pool)
    cases = [
        ({"to": "2026-12-01"}, 400, "from"),
        ({**WIDE, "format": "xlsx"}, 400, "format"),
        ({"from": "2026-12-01", "to": "2026-11-01"}, 422, "to"),
        ({**WIDE, "tz": "Nowhere/Else"}, 400, "tz"),
        ({**WIDE, "from": "0001-01-01", "tz": "Asia/Tokyo"}, 400, "from"),
    ]
    for params, status, name in cases:
        response = await client.get("/v1/reports/contributions", headers=headers, params=params)
        assert response.status == status, params
        assert (await response.json())["error"]["field"] == name
    summary = await client.get("/v1/reports/summary", headers=headers, params={"from": "x"})
    assert summary.status == 400


# Every request that takes `tz`: the API's reports (the contributions in both formats), and the
# staff page's downloads.
TZ_ENDPOINTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("/v1/reports/contributions", {"format": "csv"}),
    ("/v1/reports/contributions", {"format": "json"}),
    ("/v1/reports/summary", {}), ("/v1/reports/payouts", {}),
    ("/staff/contributions.csv", {}), ("/staff/payouts.csv", {}),
)


def _tzif(name: str) -> bytes:
    """The compiled rules of an IANA zone, from wherever Python's zoneinfo reads them."""
    for folder in zoneinfo.TZPATH:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate.read_bytes()
    return (importlib.resources.files("tzdata.zoneinfo") / name).read_bytes()


async def test_a_tz_that_names_no_zone_file_is_400_naming_it(
    client: Client, pool: asyncpg.Pool
) -> None:
    """`tz` must name a zone: a folder of the IANA database (`America`), a name too long for a
    file name, or one in other letters than the database's (which PostgreSQL would take) is 400
    `invalid_tz` naming `tz`, as for any other unknown zone, on every request that takes it."""
    headers = await _bearer(pool)
    headers |= await staff_cookie(client, headers["Authorization"].split()[1])
    for path, params in TZ_ENDPOINTS:
        for tz in ("America", "x" * 300, "europe/london"):
            response = await client.get(path, headers=headers,
                                        params={**WIDE, **params, "tz": tz})
            body = await response.json()
            assert response.status == 400, (path, tz, body)
            assert (body["error"]["code"], body["error"]["field"]) == ("invalid_tz", "tz")


async def test_a_zone_python_knows_and_postgresql_does_not_is_read_as_its_twin_on_every_report(
    client: Client, pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    """`tz` is read with Python's time zone database, which may know zones PostgreSQL's does not:
    the embedded server's has no posix/ folder (posix/America/New_York), no posixrules nor
    localtime; a tzdata newer than the server's has zones it lacks. Such a zone is answered as
    its twin of the same rules on every request that takes `tz` (it was a 500 wherever the zone
    reached PostgreSQL: the payout reports), the payout placed at the start of its arrival day
    in that zone. Here a zone only Python knows: America/New_York's rules under a name of their
    own, on Python's TZPATH (for the service in this process; PYTHONTZPATH for the command)."""
    ledger = await _ledger(client, pool)
    headers = await _bearer(pool)
    cookie = await staff_cookie(client, headers["Authorization"].split()[1])
    own = tmp_path / "zones"
    (own / "Donations").mkdir(parents=True)
    (own / "Donations" / "New_York").write_bytes(_tzif("America/New_York"))
    arrival = datetime.fromtimestamp(ledger.world.get(ledger.payout)["arrival_date"], UTC).date()
    # from before the first payment to the end of the arrival day in New York: the payout is
    # placed at 05:00 UTC that day (midnight there), the day's first instant in the window's zone
    window = {"from": "2026-11-01",
              "to": (arrival + timedelta(days=1)).isoformat()}
    zones = ["Donations/New_York"]
    if (Path("/usr/share/zoneinfo") / "posix" / "America" / "New_York").is_file():
        zones.append("posix/America/New_York")  # the embedded server lacks it (Debian's tzdata)
    default_path = zoneinfo.TZPATH
    zoneinfo.reset_tzpath([str(own), *default_path])
    try:
        for zone in zones:
            for path, params in TZ_ENDPOINTS:
                answers = []
                for tz in (zone, "America/New_York"):
                    response = await client.get(path, params={**window, **params, "tz": tz},
                                                headers={**headers, **cookie})
                    text = await response.text()
                    assert response.status == 200, (path, tz, text[:500])
                    answers.append(text.replace(f'"tz": "{tz}"', '"tz": "?"'))
                assert answers[0] == answers[1], (path, zone)
                # not empty: the ledger's payout, its payments (the summary: their count)
                found = {"payouts": ledger.payout, "summary": '"payments": 6,'}
                assert found.get(path.split("/")[-1].split(".")[0], ledger.usd) in answers[0]
    finally:
        zoneinfo.reset_tzpath(default_path)

    tzpath = os.pathsep.join([str(own), *default_path])
    code, out, err = await _run("report", "payouts", "--tz", "Donations/New_York", "--format",
                                "json", *(f"--{k}={v}" for k, v in window.items()),
                                env=_env(DATABASE_URL=dsn, PYTHONTZPATH=tzpath))
    assert code == 0, err[-1500:]
    assert [p["id"] for p in json.loads(out)["data"]] == [ledger.payout]
    # the arrival day's first instant is where the window of the next day starts: not in it
    after = {"from": window["to"], "to": (arrival + timedelta(days=2)).isoformat()}
    response = await client.get("/v1/reports/payouts", headers=headers,
                                params={**after, "tz": "America/New_York"})
    assert (await response.json())["data"] == []


async def test_summary_ties_to_the_rows(client: Client, pool: asyncpg.Pool) -> None:
    ledger = await _ledger(client, pool)
    headers = await _bearer(pool)
    response = await client.get("/v1/reports/summary", headers=headers, params=WIDE)
    assert response.status == 200
    body = await response.json()
    by = {c["currency"]: c for c in body["by_currency"]}
    assert set(by) == {"gbp", "usd", "eur", "jpy"}
    gbp = by["gbp"]
    assert gbp["gross"] == {"amount": 2500 + 5000 + 500, "currency": "gbp"}
    assert gbp["disputes_withdrawn"]["amount"] == gbp["disputes_reinstated"]["amount"] == 5000
    assert gbp["net"]["amount"] == 8000
    assert (gbp["payments"], gbp["one_off"]["payments"], gbp["recurring"]["payments"]) == (3, 2, 1)
    assert gbp["recurring"]["gross"]["amount"] == 500
    assert (gbp["new_subscriptions"], gbp["ended_subscriptions"]) == (1, 0)
    assert gbp["monthly_recurring"] == {"amount": 500, "currency": "gbp"}
    eur = by["eur"]
    assert (eur["gross"]["amount"], eur["refunds"]["amount"], eur["net"]["amount"]) == (
        1234, 234, 1000)
    assert by["jpy"]["gross"] == {"amount": 1000, "currency": "jpy"}

    # the reporting block is the sum of the CSV's settled columns
    _, csv_body = await _csv(client, headers)
    rows = _parse(csv_body)

    def pence(value: str) -> int:
        return int(value.replace(".", "")) if value else 0

    rep = body["reporting"]
    assert rep["currency"] == "gbp" and rep["pending_settlement"] == 0
    assert rep["gross"]["amount"] == sum(pence(r["settlement_amount"]) for r in rows
                                         if r["type"] == "payment")
    assert rep["refunds"]["amount"] == -sum(pence(r["settlement_amount"]) for r in rows
                                            if r["type"] == "refund")
    assert rep["fees"]["amount"] == sum(pence(r["fee"]) for r in rows)
    assert rep["net"]["amount"] == sum(pence(r["net"]) for r in rows)
    assert rep["net"]["amount"] == (rep["gross"]["amount"] - rep["refunds"]["amount"]
                                    - rep["disputes_withdrawn"]["amount"]
                                    + rep["disputes_reinstated"]["amount"] - rep["fees"]["amount"])
    assert rep["payments"] == 6
    assert rep["monthly_recurring"] == {"amount": 500, "currency": "gbp"}

    # a window holding only the dispute's reinstatement
    reinstated = next(r for r in rows if r["status"] == "funds_reinstated")["created_at"]
    late = await (await client.get("/v1/reports/summary", headers=headers, params={
        "from": reinstated, "to": "2027-02-01"})).json()
    assert late["reporting"]["payments"] == 0
    assert late["reporting"]["disputes_reinstated"]["amount"] == 5000
    assert late["reporting"]["monthly_recurring"]["amount"] == 500
    assert ledger.subscription  # still active at the window's end


async def test_a_subscription_ended_in_the_window_is_not_recurring_at_its_end(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=502, start=START)
    monthly = world.subscribe(1000, "gbp")
    world.subscribe(12000, "usd", interval="year")
    await post_all(client, world.events)
    world.advance(86400)
    ended = world.cancel(monthly.subscription, at_period_end=False)
    await post_all(client, ended.events)
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/summary", headers=headers,
                                   params=WIDE)).json()
    rep = body["reporting"]
    assert (rep["new_subscriptions"], rep["ended_subscriptions"]) == (2, 1)
    by = {c["currency"]: c for c in body["by_currency"]}
    assert by["usd"]["monthly_recurring"] == {"amount": 1000, "currency": "usd"}
    assert by["gbp"]["monthly_recurring"]["amount"] == 0
    # no fee fetched yet, so no USD rate known: said, not guessed
    assert rep["monthly_recurring_unconverted"] == [{"amount": 1000, "currency": "usd"}]
    assert rep["pending_settlement"] == 2
    # at a window ending before the cancellation, the monthly one still counted
    cancelled_at = await pool.fetchval("SELECT ended_at FROM subscriptions WHERE id = $1",
                                       monthly.subscription)
    before = await (await client.get("/v1/reports/summary", headers=headers, params={
        "from": "2026-11-01", "to": cancelled_at.strftime("%Y-%m-%dT%H:%M:%SZ")})).json()
    assert before["reporting"]["monthly_recurring"]["amount"] == 1000


async def test_every_auth_case_on_the_report_endpoints(
    client: Client, pool: asyncpg.Pool
) -> None:
    reader = await _bearer(pool, "finance", "reports:read")
    admin = await _bearer(pool, "ops", "admin")
    portal = await _bearer(pool, "portal", "portal")
    revoked = await _bearer(pool, "old", "reports:read")
    async with db.connection(pool) as conn:
        await auth.revoke_token(conn, "old")
    cases = {
        "no token": ({}, 401),
        "not bearer": ({"Authorization": "Basic " + reader["Authorization"][7:]}, 401),
        "wrong token": ({"Authorization": "Bearer dnt_wrong"}, 401),
        "revoked token": (revoked, 401),
        "wrong scope": (portal, 403),
        "reports:read": (reader, 200),
        "admin": (admin, 200),
    }
    for path in ("/v1/reports/contributions", "/v1/reports/summary", "/v1/reports/payouts"):
        for name, (headers, status) in cases.items():
            response = await client.get(path, headers=headers, params=WIDE)
            assert response.status == status, (path, name)
            if status != 200:
                error = (await response.json())["error"]
                assert error["code"] == {401: "unauthorized", 403: "forbidden"}[status]


async def test_failed_attempts_are_rate_limited_and_never_logged_with_the_token(
    client: Client, pool: asyncpg.Pool
) -> None:
    from structlog.testing import capture_logs

    good = await _bearer(pool)
    limit = auth.FailedAttempts().limit
    with capture_logs() as logs:
        for i in range(limit):
            response = await client.get("/v1/reports/summary", params=WIDE,
                                        headers={"Authorization": f"Bearer dnt_guess{i}"})
            assert response.status == 401
        blocked = await client.get("/v1/reports/summary", params=WIDE, headers=good)
    assert blocked.status == 429
    assert int(blocked.headers["Retry-After"]) > 0
    assert (await blocked.json())["error"]["code"] == "too_many_attempts"
    failures = [e for e in logs if e["event"] == "auth_failed"]
    assert len(failures) == limit
    assert "dnt_guess" not in repr(logs)


async def test_the_cli_writes_the_same_reports(
    client: Client, pool: asyncpg.Pool, dsn: str, tmp_path: Any
) -> None:
    await _ledger(client, pool)
    _, body = await _csv(client, await _bearer(pool))
    env = _env(DATABASE_URL=dsn)
    out = tmp_path / "november.csv"
    code, _, err = await _run("report", "contributions", "--from", WIDE["from"], "--to",
                              WIDE["to"], "--out", str(out), env=env)
    assert code == 0, err
    assert out.read_bytes().decode() == body
    code, text, err = await _run("report", "summary", "--from", WIDE["from"], "--to", WIDE["to"],
                                 env=env)
    assert code == 0, err
    assert json.loads(text)["reporting"]["payments"] == 6
    code, _, err = await _run("report", "summary", "--from", "2026-12-01", "--to", "2026-11-01",
                              env=env)
    assert code == 1 and "to must be after from" in err


@pytest.mark.parametrize("report", ["summary", "contributions"])
async def test_a_cli_report_stopped_before_it_is_whole_leaves_the_out_file_as_it_was(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path, report: str
) -> None:
    """`report … --out FILE` stopped (SIGTERM: a cron job's timeout, a deploy) or failing before
    the report is whole leaves FILE as it was (last month's report, say), never emptied nor a
    shorter report that could pass for the whole, and leaves nothing beside it."""
    out = tmp_path / "report.out"
    out.write_text("last month's complete report\n")
    holder = await asyncpg.connect(dsn)
    try:
        # the command waits at its migrations, as behind another replica migrating
        await holder.execute("SELECT pg_advisory_lock($1)", db.MIGRATION_LOCK_KEY)

        async def waiting() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name = 'donations-migrate'"))

        code, err = await signalled_half_way(
            ["report", report, "--from", "2026-01-01", "--to", "2026-02-01", "--out", str(out)],
            _env(DATABASE_URL=dsn, LOG_LEVEL="warning"), signal.SIGTERM, waiting)
    finally:
        await holder.close()
    assert code == 128 + signal.SIGTERM, err
    assert out.read_text() == "last month's complete report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.out"]  # noqa: ASYNC240


def test_a_partial_left_by_a_killed_run_is_not_taken_for_an_unwritable_folder(
    server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial report left beside FILE by a run killed outright (SIGKILL, the OOM killer),
    whose pid was the same as this run's (a cron job in a container has the same pid every
    run), does not send `report --out FILE` to write FILE in place: a run failing before its
    report is whole still leaves FILE as it was."""
    out = tmp_path / "report.csv"
    out.write_text("last month's complete report\n")
    (tmp_path / f".report.csv.{os.getpid()}.partial").write_text("left by a killed run\n")
    base = server_dsn.rsplit("/", 1)[0]
    monkeypatch.setenv("DATABASE_URL", f"{base}/no_such_database_of_the_tests")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    code = cli.main(["report", "contributions", "--from", "2026-01-01", "--to", "2026-02-01",
                     "--out", str(out)])
    assert code == 1
    assert out.read_text() == "last month's complete report\n"


async def test_a_report_the_disk_cannot_take_leaves_the_out_file_as_it_was(
    dsn: str, tmp_path: Path
) -> None:
    """`report --out FILE` whose last bytes the disk refuses (full: here a file size limit,
    EFBIG) fails with one line saying so, leaves FILE as it was and nothing beside it."""
    out = tmp_path / "report.csv"
    out.write_text("last month's complete report\n")
    limited = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        " resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16)); from donations import cli;"
        " sys.exit(cli.main(sys.argv[1:]))")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", limited, "report", "contributions", "--from", "2026-01-01",
        "--to", "2026-02-01", "--out", str(out),
        env=_env(DATABASE_URL=dsn, LOG_LEVEL="warning"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1, err.decode()[-1500:]
    assert "Traceback" not in err.decode(), err.decode()[-1500:]
    assert err.decode().splitlines()[-1] == (
        f"donations: cannot write the report to {out}: File too large"), err.decode()[-1500:]
    assert out.read_text() == "last month's complete report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]  # noqa: ASYNC240


def test_a_cli_report_leaves_no_embedded_postgres_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without DATABASE_URL a report starts an embedded PostgreSQL: an `--out` that cannot be
    written (a folder that does not exist, a folder) is one line before it is started, and a
    report failing once it is started stops it."""
    started: list[str] = []  # the servers running
    starts: list[str] = []  # every start

    class Server:
        def stop(self) -> None:
            started.remove("running")

    async def with_database(_: object) -> tuple[str, Server]:
        started.append("running")
        starts.append("started")
        return "postgresql://postgres@127.0.0.1:1/never", Server()

    async def migrate(_: str) -> list[str]:
        raise db.MigrationError("the migrations on disk and in the database disagree")

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DONATIONS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOG_LEVEL", "warning")
    monkeypatch.setattr(cli, "_with_database", with_database)
    monkeypatch.setattr(db, "migrate", migrate)
    report = ["report", "contributions", "--from", "2026-01-01", "--to", "2026-02-01"]
    for out in (tmp_path / "no-such-folder" / "january.csv", tmp_path):
        assert cli.main([*report, "--out", str(out)]) == 1
        assert capsys.readouterr().err.splitlines()[-1].startswith(
            f"donations: cannot write the report to {out}: ")
        assert starts == []  # never started
    assert cli.main([*report, "--out", str(tmp_path / "january.csv")]) == 1
    assert "migration error" in capsys.readouterr().err
    assert (starts, started) == (["started"], [])  # started, and stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial report left


async def test_the_cli_summary_takes_format_json_as_the_other_reports_do(dsn: str) -> None:
    """`report summary` takes `--format json` (its only format, the default) like the other
    reports; `--format csv` is refused by the argument parser (exit 2)."""
    env = _env(DATABASE_URL=dsn)
    code, out, err = await _run("report", "summary", "--from", "2026-11-01", "--to",
                                "2026-12-01", "--format", "json", env=env)
    assert code == 0, err
    assert json.loads(out)["reporting_currency"] == "gbp"
    code, _, err = await _run("report", "summary", "--from", "2026-11-01", "--to",
                              "2026-12-01", "--format", "csv", env=env)
    assert code == 2 and "--format" in err


# --- a refund the bank sends back, and money settled in another currency -----------------------


def _minor(value: str) -> int:
    return int(value.replace(".", "")) if value else 0


async def _settle_everything(pool: asyncpg.Pool, world: World) -> None:
    """What the fee and payout workers do once Stripe answers."""
    async with stripe_against(world) as (_, stripe_client):
        while await fees.run_once(pool, stripe_client, Metrics()):
            pass
        while await payouts.run_once(pool, stripe_client):
            pass


async def test_a_refund_that_fails_after_its_payout_ties_the_report_to_both_payouts(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=901, start=START)
    paid = world.one_off(5000, "gbp", email="a@example.org")
    refund = world.refund(paid.charge, 2000)
    first = world.payout()
    world.advance(86_400)
    failed = world.fail_refund(refund.refund)  # the bank sends it back: refund_failure
    world.one_off(1000, "gbp", email="b@example.org")
    second = world.payout()
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)

    response = await client.get("/v1/reports/contributions", headers=headers, params=WIDE)
    assert response.status == 200
    rows = _parse(await response.text())
    bts = world.balance_transactions
    for po in (first.payout, second.payout):
        members = [t for t in world.payout_members[po] if bts[t]["type"] != "payout"]
        in_report = [r for r in rows if r["payout"] == po]
        assert sorted(r["balance_transaction"] for r in in_report) == sorted(members), po
        assert sum(_minor(r["net"]) for r in in_report) == world.get(po)["amount"], po
    refund_rows = [r for r in rows if r["refund"] == refund.refund]
    assert [(r["status"], r["amount"], r["balance_transaction"]) for r in refund_rows] == [
        ("failed", "-20.00", world.get(refund.refund)["balance_transaction"]),
        ("refund_failure", "20.00", failed.balance_transaction)]
    assert refund_rows[0]["created_at"] < refund_rows[1]["created_at"]
    detail = await (await client.get(f"/v1/reports/payouts/{second.payout}",
                                     headers=headers)).json()
    (back,) = [m for m in detail["balance_transactions"] if m["type"] == "refund_failure"]
    assert back["refund"] == refund.refund
    assert back["payment_amount"] == {"amount": 2000, "currency": "gbp"}  # money coming back


async def test_a_closed_months_summary_does_not_change_when_its_refund_fails_later(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=902, start=START)  # 2026-11-18
    paid = world.one_off(5000, "gbp")
    refund = world.refund(paid.charge, 2000)
    world.payout()
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)
    november = {"from": "2026-11-01", "to": "2026-12-01"}
    december = {"from": "2026-12-01", "to": "2027-01-01"}
    before = await (await client.get("/v1/reports/summary", headers=headers,
                                     params=november)).json()
    assert before["reporting"]["refunds"]["amount"] == 2000

    world.now = 1_796_688_000  # 2026-12-07T12:00:00Z: the bank returns the refund
    await post_all(client, world.fail_refund(refund.refund).events)
    await _settle_everything(pool, world)
    after = await (await client.get("/v1/reports/summary", headers=headers,
                                    params=november)).json()
    assert after["reporting"]["refunds"] == before["reporting"]["refunds"]
    assert after["reporting"]["net"] == before["reporting"]["net"]
    later = await (await client.get("/v1/reports/summary", headers=headers,
                                    params=december)).json()
    assert later["reporting"]["refunds"] == {"amount": -2000, "currency": "gbp"}  # came back


async def test_fees_settled_in_another_currency_are_given_in_that_currency(
    client: Client, pool: asyncpg.Pool
) -> None:
    world = World(seed=904, start=START)
    usd = world.one_off(2500, "usd")
    world.one_off(1000, "gbp")
    await post_all(client, world.events)
    # as Stripe's balance transaction reads for an account that also pays out USD in USD
    await pool.execute(
        "UPDATE payments SET fee = 58, net = 2442, settlement_currency = 'usd',"
        " settlement_amount = 2500 WHERE payment_intent = $1", usd.payment_intent)
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/summary", headers=headers, params=WIDE)).json()

    elsewhere = [{"currency": "usd", "movements": 1, "fees": {"amount": 58, "currency": "usd"},
                  "net": {"amount": 2442, "currency": "usd"}}]
    by = {c["currency"]: c for c in body["by_currency"]}
    assert by["usd"]["fees"] == {"amount": 0, "currency": "gbp"}  # none settled in GBP
    assert by["usd"]["settled_elsewhere"] == elsewhere
    assert by["gbp"]["settled_elsewhere"] == []
    assert body["reporting"]["settled_elsewhere"] == elsewhere
    assert body["reporting"]["gross"]["amount"] == 1000  # the GBP payment's only
    assert body["reporting"]["payments"] == 2


async def test_csv_quotes_commas_quotes_and_newlines_and_keeps_negative_amounts_numbers(
    client: Client, pool: asyncpg.Pool
) -> None:
    """RFC 4180 quoting of a campaign and e-mail with a comma, a double quote
    and a line break, in the PostgreSQL-formatted CSV, round-tripping exactly; a refund's
    negative amounts stay plain numbers (never neutralised); BHD and KRW to their exponents."""
    world = World(seed=905, start=START, rates={"gbp": Fraction(1), "bhd": Fraction(2),
                                                "krw": Fraction(1, 2000)})
    odd = 'Spring, "big" drive\r\nline two'
    paid = world.one_off(1050, "gbp", campaign=odd, email='x"y,z@example.org')
    world.refund(paid.charge, 50)
    world.one_off(1230, "bhd")
    world.one_off(1500, "krw")
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)
    response = await client.get("/v1/reports/contributions", headers=headers, params=WIDE)
    body = (await response.read()).decode()
    rows = _parse(body)
    assert len(rows) == 4
    payment = next(r for r in rows if r["type"] == "payment" and r["currency"] == "gbp")
    refund = next(r for r in rows if r["type"] == "refund")
    assert payment["campaign"] == odd and refund["campaign"] == odd
    assert payment["email"] == 'x"y,z@example.org'
    assert (refund["amount"], refund["settlement_amount"], refund["net"]) == (
        "-0.50", "-0.50", "-0.50")
    by_currency = {r["currency"]: r for r in rows if r["type"] == "payment"}
    assert by_currency["bhd"]["amount"] == "1.230"
    assert by_currency["krw"]["amount"] == "1500"
    # every record is one CSV record: the line break inside the cell is quoted
    assert body.count(f'"{odd.replace(chr(34), chr(34) * 2)}"') == 2


def test_window_on_dst_days_in_london() -> None:
    """A London day of 23 and of 25 hours, and a month spanning the change."""
    spring = reports.window("2026-03-29", "2026-03-30", "Europe/London")
    assert (spring.end - spring.start).total_seconds() == 23 * 3600
    autumn = reports.window("2026-10-25", "2026-10-26", "Europe/London")
    assert (autumn.end - autumn.start).total_seconds() == 25 * 3600
    october = reports.window("2026-10-01", "2026-11-01", "Europe/London")
    assert (october.start, october.end) == (datetime(2026, 9, 30, 23, tzinfo=UTC),
                                            datetime(2026, 11, 1, tzinfo=UTC))


def test_a_window_given_to_a_fraction_of_a_second_is_the_whole_second_it_is_written_as() -> None:
    """Stripe's times are whole seconds, and the window's labels write whole seconds: a `from`
    of 10:00:00.5 is 10:00:00, so a movement at the second the report names as its start is
    in it (found by fuzzing the campaigns' times, which had the same fault)."""
    w = reports.window("2026-11-01T10:00:00.5Z", "2026-11-01T11:00:00.999Z")
    assert (w.start, w.end) == (datetime(2026, 11, 1, 10, tzinfo=UTC),
                                datetime(2026, 11, 1, 11, tzinfo=UTC))
    assert w.as_json()["from"] == "2026-11-01T10:00:00Z"


def test_a_window_in_the_first_years_is_written_with_four_digit_years() -> None:
    """Window times and file names write the year with four digits, the year 1 too (strftime's
    %Y writes it as "1" on glibc)."""
    w = reports.window("0001-01-02T00:00:00Z", "0001-02-01")
    assert w.as_json()["from"] == "0001-01-02T00:00:00Z"
    assert w.filename("contributions", "csv") == (
        "contributions_0001-01-02T000000Z_0001-02-01.csv")


async def test_monthly_recurring_is_converted_at_the_latest_rate_stripe_applied(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Each currency's monthly recurring is converted at the rate of the payment in it that
    Stripe settled last (sql/024's look-up per currency), not an earlier one."""
    from fractions import Fraction

    world = World(seed=503, start=START)
    usd = world.subscribe(1000, "usd")  # its first invoice settled at 0.80
    world.one_off(4000, "eur")  # another currency's rate is no USD rate
    world.rates["usd"] = Fraction(3, 4)
    world.renew(usd.subscription)  # the renewal at 0.75
    await post_all(client, world.events)
    async with stripe_against(world) as (_, stripe_client):
        while await fees.run_once(pool, stripe_client, Metrics()):
            pass
    settled = await pool.fetch(
        "SELECT p.currency, b.exchange_rate::text AS rate FROM payments p"
        " JOIN balance_transactions b ON b.id = p.balance_transaction ORDER BY 1, 2")
    assert [(r["currency"], r["rate"]) for r in settled] == [
        ("eur", "0.85"), ("usd", "0.75"), ("usd", "0.8")]
    headers = await _bearer(pool)
    body = await (await client.get("/v1/reports/summary", headers=headers,
                                   params=WIDE)).json()
    rep = body["reporting"]
    assert rep["monthly_recurring"] == {"amount": 750, "currency": "gbp"}
    assert rep["monthly_recurring_unconverted"] == []


# --- a report cut short ---------------------------------------------------------------------------

# Payments enough for a report of some 10 MB, more than the sockets between the service and a
# client hold: the service is still writing it when the client goes away.
MANY_PAYMENTS = """
INSERT INTO payments (payment_key, kind, status, currency, amount, payment_intent, charge,
                      email, metadata, created_at)
SELECT 'pi_many' || i, 'one_off', 'succeeded', 'gbp', 500 + i % 5000, 'pi_many' || i,
       'ch_many' || i, 'reader' || i || '@example.org',
       jsonb_build_object('note', repeat('x', 400)),
       timestamptz '2026-12-01' + make_interval(secs => i)
  FROM generate_series(1, 20000) AS i
"""
STREAM_OUTCOMES = ("report_streamed", "report_stream_failed", "client_disconnected")


@contextlib.asynccontextmanager
async def served(dsn: str) -> AsyncIterator[tuple[str, int]]:
    """The service listening as `serve` runs it (donations/cli.py): a client that hangs up does
    not cancel its request (aiohttp's test server cancels it, so a hang-up never reaches the
    handler there)."""
    runner = web.AppRunner(create_app(make_settings(dsn)), access_log=None,
                           handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


async def _start_report(address: tuple[str, int], headers: dict[str, str]
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A real client asking for the large report: its headers and first rows read, the rest
    left unread (its socket's receive buffer kept small, so the service soon waits to write)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(("GET /v1/reports/contributions?from=2026-12-01&to=2027-01-01&format=csv "
                  f"HTTP/1.1\r\nHost: donations\r\nAuthorization: {headers['Authorization']}"
                  "\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200 "), head
    await asyncio.wait_for(reader.readexactly(2000), 30)
    return reader, writer


async def test_a_client_that_hangs_up_mid_report_is_no_failure_of_ours(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """A client that closes the connection while a streamed report is being written (a reader
    who cancels the download, a proxy's timeout) is logged `client_disconnected` (info), as a
    hang-up before the request is read is: no `report_stream_failed` error with a traceback
    that would page someone. The service carries on: the next report is whole."""
    from structlog.testing import capture_logs

    await pool.execute(MANY_PAYMENTS)
    headers = await _bearer(pool)
    with capture_logs() as logs:
        async with served(dsn) as address:
            _, writer = await _start_report(address, headers)
            writer.transport.abort()  # gone, the rest of the report unread

            async def ended() -> bool:
                return any(e["event"] in STREAM_OUTCOMES for e in logs)

            await wait_until(ended, within=30)
            async with (aiohttp.ClientSession() as session,
                        session.get(f"http://{address[0]}:{address[1]}/v1/reports/contributions",
                                    params={"from": "2026-12-01", "to": "2026-12-02"},
                                    headers=headers) as again):
                assert again.status == 200
                text = await again.text()
    outcomes = [e for e in logs if e["event"] in STREAM_OUTCOMES]
    assert [(e["event"], e["log_level"]) for e in outcomes] == [
        ("client_disconnected", "info"), ("report_streamed", "info")], outcomes
    assert (outcomes[0]["path"], outcomes[0]["report"]) == (
        "/v1/reports/contributions", "contributions")
    assert [e for e in logs if e["log_level"] in ("warning", "error", "critical")
            or "exc_info" in e] == []
    assert len(_parse(text)) == 20000


async def test_a_database_lost_mid_report_is_an_error_and_the_connection_is_cut(
    pool: asyncpg.Pool, dsn: str
) -> None:
    """The database connection of a report being streamed killed half-way (a failover): that is
    a failure of ours, logged `report_stream_failed` (error, with its traceback), and the
    connection is cut without the last chunk, so that the partial report cannot pass for a
    whole one."""
    from structlog.testing import capture_logs

    await pool.execute(MANY_PAYMENTS)
    headers = await _bearer(pool)
    with capture_logs() as logs:
        async with served(dsn) as address:
            reader, writer = await _start_report(address, headers)
            streaming = await wait_until(lambda: pool.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND strpos($1, query) = 1",
                reports.CONTRIBUTIONS_CSV), within=30)
            assert await pool.fetchval("SELECT pg_terminate_backend($1)", streaming)
            rest = await asyncio.wait_for(reader.read(), 30)  # to the end: the service cuts it
            writer.close()
    assert not rest.endswith(b"0\r\n\r\n")  # no final chunk
    outcomes = [e for e in logs if e["event"] in STREAM_OUTCOMES]
    assert [(e["event"], e["log_level"]) for e in outcomes] == [
        ("report_stream_failed", "error")], outcomes
    assert outcomes[0]["exc_info"] and outcomes[0]["report"] == "contributions"


# --- found in review: UGX, a failed bank debit Stripe booked, `report --out` ----------------------


async def test_ugx_amounts_are_read_as_stripe_writes_them_with_two_decimals(
    client: Client, pool: asyncpg.Pool
) -> None:
    """docs.stripe.com/currencies#special-cases: "UGX became a zero-decimal currency, but
    backwards compatibility requires you to represent it as a two-decimal value, where the
    decimal amount is always 00. To charge 5 UGX, provide an amount value of 500." A payment of
    USh 5,000 reaches us as `amount: 500000`: the contributions CSV says 5000.00 shillings, the
    widget "UGX 5,000", and the summary converts it at its value, not 100 times it."""
    world = World(seed=9101, start=START,
                  rates={**DEFAULT_RATES, "ugx": Fraction(1, 5000)})
    paid = world.one_off(500_000, "ugx")  # USh 5,000.00 as Stripe writes it
    await post_all(client, world.events)
    response = await client.get("/v1/reports/contributions", headers=await _bearer(pool),
                                params=WIDE)
    assert response.status == 200
    (row,) = [r for r in _parse(await response.text()) if r["payment_intent"]
              == paid.payment_intent]
    assert (row["currency"], row["amount"]) == ("ugx", "5000.00")
    assert to_major(500_000, "ugx") == "5000.00"
    assert display.money(500_000, "ugx") == "UGX\u00a05,000"
    # USh 5,000 at 1/5000 GBP per shilling is £1.00 (100 pence), not £100
    assert reports.convert(500_000, "ugx", "gbp", Fraction(1, 5000)) == 100


async def test_a_failed_bank_debit_stripe_booked_is_in_the_contributions_that_tie_to_its_payout(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A SEPA/Bacs debit that Stripe booked into the balance when submitted and reversed when
    the bank refused it (its charge's `balance_transaction`, type `payment`/category `charge`,
    with Stripe's fee; then its `failure_balance_transaction`, type `payment_failure_refund`/
    category `charge_failure`, the settled amount back out and the fee kept: stripe/_charge.py)
    is paid out like any other movement: the payout is the card payment's net less that kept
    fee. The contributions report has a `payment` row for the booking (positive, status
    `failed`, at its transaction's time) and one for the reversal (negative, status
    `payment_failure`, at its own), so the rows naming the payout add up to it and the
    summary's fees and net are Stripe's. A failed payment is no contribution: the summary's
    counts, its gross (in and out again) and the public totals are the card payment's only."""
    world = World(seed=9102, start=START)
    card = world.one_off(2500, "gbp")
    debit = world.async_checkout(3000, "eur", False, booked=True)
    paid_out = world.payout()
    charge = world.get(debit.charge)
    booking = world.balance_transactions[charge["balance_transaction"]]
    reversal = world.balance_transactions[charge["failure_balance_transaction"]]
    assert {booking["id"], reversal["id"]} <= set(paid_out.balance_transactions)
    assert (reversal["amount"], reversal["fee"]) == (-booking["amount"], 0)
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)

    response = await client.get("/v1/reports/contributions", headers=headers, params=WIDE)
    assert response.status == 200
    rows = _parse(await response.text())
    mine = [r for r in rows if r["payment_intent"] == debit.payment_intent]

    def at(bt: dict[str, Any]) -> str:
        return datetime.fromtimestamp(int(bt["created"]), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def major(amount: int) -> str:
        return to_major(amount, "gbp")

    assert [(r["created_at"], r["type"], r["kind"], r["status"], r["currency"], r["amount"],
             r["fee"], r["net"], r["settlement_currency"], r["settlement_amount"], r["charge"],
             r["balance_transaction"], r["payout"]) for r in mine] == [
        (at(booking), "payment", "one_off", "failed", "eur", "30.00", major(booking["fee"]),
         major(booking["net"]), "gbp", major(booking["amount"]), debit.charge, booking["id"],
         paid_out.payout),
        (at(reversal), "payment", "one_off", "payment_failure", "eur", "-30.00", "0.00",
         major(reversal["net"]), "gbp", major(reversal["amount"]), debit.charge,
         reversal["id"], paid_out.payout)]
    payout_amount = world.get(paid_out.payout)["amount"]
    in_payout = [r for r in rows if r["payout"] == paid_out.payout]
    assert sorted(r["balance_transaction"] for r in in_payout) == sorted(
        t for t in paid_out.balance_transactions
        if world.balance_transactions[t]["type"] != "payout")
    assert sum(_minor(r["net"]) for r in in_payout) == payout_amount

    summary = await (await client.get("/v1/reports/summary", headers=headers,
                                      params=WIDE)).json()
    stripe_fees = sum(int(bt["fee"]) for bt in world.balance_transactions.values()
                      if bt["type"] != "payout")
    rep = summary["reporting"]
    assert rep["fees"]["amount"] == stripe_fees == 2 * booking["fee"]
    assert rep["net"]["amount"] == payout_amount
    assert (rep["gross"]["amount"], rep["payments"], rep["one_off"]["payments"],
            rep["pending_settlement"]) == (2500, 1, 1, 0)
    eur = next(c for c in summary["by_currency"] if c["currency"] == "eur")
    assert (eur["gross"], eur["net"], eur["payments"], eur["fees"], eur["settled_net"]) == (
        {"amount": 0, "currency": "eur"}, {"amount": 0, "currency": "eur"}, 0,
        {"amount": booking["fee"], "currency": "gbp"},
        {"amount": -booking["fee"], "currency": "gbp"})
    # the public totals: the card payment only
    totals = await (await client.get("/v1/totals")).json()
    assert (totals["contributions"], totals["raised"]) == (1, {"amount": 2500, "currency": "gbp"})
    # the payment row itself keeps no fee or net (it kept no money), only the two ids
    row = await pool.fetchrow(
        "SELECT status, balance_transaction, fee, net, booked_balance_transaction,"
        "       failure_balance_transaction FROM payments WHERE payment_key = $1",
        debit.payment_intent)
    assert row is not None and tuple(row) == ("failed", None, None, None, booking["id"],
                                              reversal["id"])
    assert card.payment_intent in {r["payment_intent"] for r in in_payout}


async def test_a_failed_bank_debits_booking_and_reversal_are_fetched_before_any_payout(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The fee worker fetches the booking and the reversal as soon as the charge says it failed
    (as it does a refund's and its failure's), not only once a payout lists them: the rows have
    their fees and net before any payout, and a booking and a reversal that fall either side of
    a month's end are each in their own month (a closed month does not change)."""
    world = World(seed=9106, start=1_795_996_800)  # 2026-11-30T00:00:00Z
    debit = world.async_checkout(3000, "gbp", False, booked=True, settle_after=3 * 86_400)
    charge = world.get(debit.charge)
    await post_all(client, world.events)
    queued = {r["id"] for r in await pool.fetch("SELECT id FROM balance_transaction_fetches")}
    assert queued == {charge["balance_transaction"], charge["failure_balance_transaction"]}
    async with stripe_against(world) as (_, stripe_client):
        while await fees.run_once(pool, stripe_client, Metrics()):
            pass
    headers = await _bearer(pool)
    booking = world.balance_transactions[charge["balance_transaction"]]
    sums = []
    for month in ({"from": "2026-11-01", "to": "2026-12-01"},
                  {"from": "2026-12-01", "to": "2027-01-01"}):
        _, text = await _csv(client, headers, **month)
        (row,) = _parse(text)
        assert row["fee"] != "" and row["payout"] == ""
        rep = (await (await client.get("/v1/reports/summary", headers=headers,
                                       params=month)).json())["reporting"]
        sums.append((row["status"], rep["gross"]["amount"], rep["fees"]["amount"],
                     rep["net"]["amount"], rep["payments"]))
    assert sums == [("failed", 3000, booking["fee"], booking["net"], 0),
                    ("payment_failure", -3000, 0, -3000, 0)]


async def test_a_report_out_in_a_folder_that_does_not_exist_is_one_line_and_exit_1(
    dsn: str, tmp_path: Path
) -> None:
    """README: "a report that cannot be written (a full disk, a pipe closed by its reader) is one
    line, `cannot write the report to …`, and exit 1". `--out` in a folder that does not exist
    (a typo in a cron job's path, a share not mounted) or naming a folder is such a report, not
    a traceback of the FileNotFoundError / IsADirectoryError of opening it."""
    env = _env(DATABASE_URL=dsn, LOG_LEVEL="warning")
    for out in (tmp_path / "no-such-folder" / "november.csv", tmp_path):
        code, _, err = await _run("report", "contributions", "--from", "2026-11-01", "--to",
                                  "2026-12-01", "--out", str(out), env=env)
        assert "Traceback" not in err, err[-1500:]
        assert code == 1, err[-1500:]
        assert err.splitlines()[-1].startswith(
            f"donations: cannot write the report to {out}: "), err[-1500:]


async def _inserted_payment(conn: Any, key: str, amount: int, currency: str = "gbp", **columns: Any
                   ) -> None:
    values = {"payment_key": key, "kind": "one_off", "status": "succeeded",
              "currency": currency, "amount": amount,
              "created_at": datetime(2026, 11, 10, 12, tzinfo=UTC), **columns}
    names = ", ".join(values)
    marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    await conn.execute(f"INSERT INTO payments ({names}) VALUES ({marks})",  # noqa: S608 - test
                       *values.values())


async def _inserted_balance_transaction(conn: Any, bt_id: str, amount: int, currency: str,
                               rate: str | None, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO balance_transactions (id, type, amount, currency, fee, net, exchange_rate,"
        " reporting_category, created_at, data) VALUES ($1, 'charge', $2, $3, 0, $2, $4::numeric,"
        " 'charge', $5, '{}')", bt_id, amount, currency, rate, at)


async def test_monthly_recurring_is_converted_at_a_rate_to_the_reporting_currency(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The summary converts a currency's monthly recurring into the reporting currency at the
    latest rate Stripe applied converting a payment in it *into the reporting currency*: on an
    account that also settles in EUR, a later USD payment settled in EUR gives no rate to GBP."""
    async with db.connection(pool) as conn:
        await _inserted_balance_transaction(conn, "txn_gbp", 790, "gbp", "0.79",
                                            datetime(2026, 11, 5, tzinfo=UTC))
        await _inserted_payment(conn, "pi_to_gbp", 1000, "usd", balance_transaction="txn_gbp",
                                created_at=datetime(2026, 11, 5, tzinfo=UTC))
        await _inserted_balance_transaction(conn, "txn_eur", 920, "eur", "0.92",
                                            datetime(2026, 11, 6, tzinfo=UTC))
        await _inserted_payment(conn, "pi_to_eur", 1000, "usd", balance_transaction="txn_eur",
                                created_at=datetime(2026, 11, 6, tzinfo=UTC))
        await conn.execute(
            "INSERT INTO subscriptions (id, status, currency, amount, interval, interval_count,"
            " created_at) VALUES ('sub_usd', 'active', 'usd', 1000, 'month', 1, $1)",
            datetime(2026, 11, 1, tzinfo=UTC))
    response = await client.get("/v1/reports/summary", headers=await _bearer(pool),
                                params={"from": "2026-11-01", "to": "2026-12-01"})
    assert response.status == 200, await response.text()
    reporting = (await response.json())["reporting"]
    # $10.00 a month at the USD->GBP rate Stripe applied (0.79), not the USD->EUR one (0.92)
    assert reporting["monthly_recurring"] == {"amount": 790, "currency": "gbp"}


def _retry_debit(world: World, payment_intent: str, out: Emitted, *,
                 booked: bool) -> dict[str, Any]:
    """Another SEPA debit on the same payment intent (as Stripe's retries of an invoice's
    payment make: one payment intent, a new charge per try), submitted a day later (booked by
    Stripe then, if `booked`) and answered by the bank three days after; its charge."""
    pi = world.get(payment_intent)
    world.advance(DAY)
    ch = world._put(o.charge(ids=world.ids, amount=pi["amount"], currency=pi["currency"],
                             created=world.now, status="pending", payment_intent=pi["id"],
                             method="sepa_debit"))
    if booked:
        ch["balance_transaction"] = world._charge_bt(ch, type="payment")["id"]
    world._emit(out, "charge.pending", ch)
    pi.update(status="processing", latest_charge=ch["id"], last_payment_error=None,
              processing={"type": "sepa_debit", "sepa_debit": {}})
    world._emit(out, "payment_intent.processing", pi)
    world.advance(3 * DAY)
    return ch


def _retry_debit_that_succeeds(world: World, payment_intent: str) -> Emitted:
    """A second debit on the same payment intent that the bank collects (a retry that works)."""
    out = Emitted()
    ch = _retry_debit(world, payment_intent, out, booked=False)
    pi = world.get(payment_intent)
    ch.update(status="succeeded", paid=True, captured=True, amount_captured=pi["amount"],
              outcome=o.outcome(failed=False))
    world._emit(out, "charge.succeeded", ch)
    pi.update(status="succeeded", amount_received=pi["amount"], processing=None)
    world._emit(out, "payment_intent.succeeded", pi)
    world._attach_bt(out, ch)
    return out


async def test_a_refused_debit_before_a_successful_retry_is_joined_to_its_payment_in_the_payout(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A SEPA debit Stripe booked and the bank refused, then tried again on the same payment
    intent and collected: one payment, three balance transactions in the payout (the booking,
    its reversal, the successful debit). The payouts report joins each transaction to the
    ledger; the README says of such a booking and reversal: "in the payouts report both
    transactions are joined to it and net to what Stripe kept". Here the booking and reversal
    come back with no payment at all (payment_key, payment_amount, kind all null), so finance
    cannot tell whose money the payout took back."""
    world = World(seed=4403, start=START)
    first = world.async_checkout(4500, "eur", False, booked=True)
    _retry_debit_that_succeeds(world, first.payment_intent)
    paid = world.payout()
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)
    response = await client.get(f"/v1/reports/payouts/{paid.payout}", headers=headers)
    assert response.status == 200
    payout = await response.json()
    assert payout["balanced"] is True
    debits = [(m["type"], m["payment_key"], m["payment_amount"])
              for m in payout["balance_transactions"] if m["type"] != "payout"]
    eur = {"currency": "eur"}
    assert sorted(debits, key=str) == sorted([
        ("payment", first.payment_intent, {"amount": 4500, **eur}),
        ("payment_failure_refund", first.payment_intent, {"amount": -4500, **eur}),
        ("payment", first.payment_intent, {"amount": 4500, **eur}),
    ], key=str)


async def test_an_authorisation_released_before_basil_is_no_refund_in_the_reports(
    client: Client, pool: asyncpg.Pool
) -> None:
    """Before API version 2025-03-31 cancelling an uncaptured payment made a Refund for the
    amount released (Stripe's changelog, "Partially capturing or canceling payments no longer
    creates a Refund"); the service applies refund, charge and payment intent events of
    versions from 2022-11-15 (README, "Other API versions"), and `donations import` brings in
    the Refunds Stripe still lists from then. £30 authorised and released moved no money: the
    contributions report must have no row for it and the summary no refund (there is no
    payment to refund), or finance's refunds are overstated by money never taken."""
    old = "2024-06-20"
    t0 = START
    pi, ch = "pi_review_released", "ch_review_released"
    held_pi = o.payment_intent(amount=3000, currency="gbp", created=t0, id=pi, latest_charge=ch)
    held_pi.update(status="requires_capture", amount_capturable=3000, amount_received=0,
                   capture_method="manual")
    held = o.charge(amount=3000, currency="gbp", created=t0, id=ch, payment_intent=pi,
                    balance_transaction=None)
    held.update(captured=False, amount_captured=0)
    canceled_pi = dict(held_pi, status="canceled", amount_capturable=0,
                       cancellation_reason="requested_by_customer")
    refund = o.refund(amount=3000, currency="gbp", created=t0 + 600, charge=ch,
                      payment_intent=pi, id="re_review_released", reason=None)
    released = dict(held, amount_refunded=3000, refunded=True)
    events = [
        o.event("charge.succeeded", held, created=t0, id="evt_review_rel_1", api_version=old),
        o.event("payment_intent.amount_capturable_updated", held_pi, created=t0,
                id="evt_review_rel_2", api_version=old),
        o.event("payment_intent.canceled", canceled_pi, created=t0 + 600,
                id="evt_review_rel_3", api_version=old),
        o.event("refund.created", refund, created=t0 + 600, id="evt_review_rel_4",
                api_version=old),
        o.event("charge.refunded", released, created=t0 + 600, id="evt_review_rel_5",
                api_version=old),
    ]
    await post_all(client, events)
    assert await pool.fetchval("SELECT status FROM payments WHERE payment_key = $1", pi) \
        != "succeeded"
    headers = await _bearer(pool)
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={**WIDE, "format": "json"})
    assert response.status == 200
    assert [(r["type"], r["status"], r["amount"]) for r in (await response.json())["data"]
            if r["payment_intent"] == pi] == []
    summary = await (await client.get("/v1/reports/summary", headers=headers,
                                      params=WIDE)).json()
    assert summary["reporting"]["refunds"] == {"amount": 0, "currency": "gbp"}


def _retry_debit_that_fails_again(world: World, payment_intent: str) -> Emitted:
    """A second debit on the same payment intent, booked by Stripe when submitted and reversed
    when the bank refuses it, Stripe keeping its fee again."""
    out = Emitted()
    ch = _retry_debit(world, payment_intent, out, booked=True)
    pi = world.get(payment_intent)
    booking = world.balance_transactions[ch["balance_transaction"]]
    ch["failure_balance_transaction"] = world._bt(
        amount=-int(booking["amount"]), currency=world.settlement_currency, source=ch["id"],
        type="payment_failure_refund", reporting_category="charge_failure",
        exchange_rate=booking["exchange_rate"], description="PAYMENT FAILURE")["id"]
    ch.update(status="failed", failure_code="debit_not_authorized",
              failure_message="The customer's bank account could not be debited.",
              outcome=o.outcome(failed=True))
    world._emit(out, "charge.failed", ch)
    pi.update(status="requires_payment_method", processing=None,
              last_payment_error={"charge": ch["id"], "code": "debit_not_authorized",
                                  "type": "invalid_request_error"})
    world._emit(out, "payment_intent.payment_failed", pi)
    return out


async def test_every_failed_bank_debit_stripe_booked_is_in_the_report_that_ties_to_the_payout(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A payment intent whose bank debit Stripe booked and the bank refused twice (a retried
    SEPA debit: two charges on one payment intent) moved money four times at Stripe: two
    bookings, each with the fee Stripe keeps, and two reversals. The contributions report must
    list every one of them, and the summary's fees and net must be what Stripe kept, so that
    the month ties to the payout that carried them (the README: "its fee stays in the fees:
    Stripe keeps it"; "each payout ties")."""
    world = World(seed=4401, start=START)
    world.one_off(2500, "gbp")
    first = world.async_checkout(4500, "eur", False, booked=True)
    _retry_debit_that_fails_again(world, first.payment_intent)
    paid = world.payout()
    await post_all(client, world.events)
    await _settle_everything(pool, world)
    headers = await _bearer(pool)

    stripe_bookings = [bt for bt in world.balance_transactions.values()
                       if bt["type"] in ("payment", "payment_failure_refund")]
    assert len(stripe_bookings) == 4
    response = await client.get("/v1/reports/contributions", headers=headers,
                                params={**WIDE, "format": "json"})
    assert response.status == 200
    rows = [r for r in (await response.json())["data"]
            if r["payment_intent"] == first.payment_intent]
    assert sorted(r["balance_transaction"] for r in rows) == sorted(
        bt["id"] for bt in stripe_bookings)

    summary = await (await client.get("/v1/reports/summary", headers=headers,
                                      params=WIDE)).json()
    stripe_fees = sum(int(bt["fee"]) for bt in world.balance_transactions.values())
    payout_amount = int(world.get(paid.payout)["amount"])
    assert summary["reporting"]["fees"]["amount"] == stripe_fees
    assert summary["reporting"]["net"]["amount"] == payout_amount
    # and in the payouts report each of the four is joined to the payment
    payout = await (await client.get(f"/v1/reports/payouts/{paid.payout}",
                                     headers=headers)).json()
    assert sorted(m["payment_key"] for m in payout["balance_transactions"]
                  if m["type"] in ("payment", "payment_failure_refund")) == [
        first.payment_intent] * 4


@pytest.mark.xfail(strict=True, reason=(
    "a known limitation: the public totals keep each subscription's yearly value rounded to a "
    "minor unit, so subscriptions billed on an interval that does not divide a year (every 7 "
    "months, every 3 weeks) can differ from the summary's exact figure by up to 1/24 of a minor "
    "unit a month each; the site's own checkouts sell monthly and yearly ones only"))
async def test_monthly_recurring_of_the_public_totals_agrees_with_the_summary_to_the_penny(
    client: Client, pool: asyncpg.Pool
) -> None:
    """22 subscriptions of £10.00 charged every 7 months bring in 22 * 1000 / 7 = 3142.86
    pence a month: £31.43, rounded half up once, which is what the finance summary says. The
    public totals must say the same (the contract: monthly_recurring "sums their price after
    discounts ... yearly ones divided by 12"; the README: "kept as a yearly value and the sum is
    divided by 12 once, rounded half up"). They round each subscription's yearly value to a
    whole penny first (1714.29 -> 1714), and 22 of those errors make £31.42."""
    created = datetime(2026, 11, 2, 10, tzinfo=UTC)
    for i in range(22):
        await pool.execute(
            "INSERT INTO subscriptions (id, status, currency, amount, interval, interval_count,"
            " created_at) VALUES ($1, 'active', 'gbp', 1000, 'month', 7, $2)",
            f"sub_review_{i}", created)
    headers = await _bearer(pool)
    summary = await (await client.get("/v1/reports/summary", headers=headers, params={
        "from": "2026-11-01", "to": "2026-12-01"})).json()
    assert summary["reporting"]["monthly_recurring"] == {"amount": 3143, "currency": "gbp"}
    client.app[TOTALS].clear()
    public = await (await client.get("/v1/totals")).json()
    assert public["active_subscriptions"] == 22
    assert public["monthly_recurring"] == summary["reporting"]["monthly_recurring"]
