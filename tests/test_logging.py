"""Logs: one JSON object a line, a line per request with its id, the event bound while it is
handled, and no e-mail address or secret in full anywhere."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from donations import db
from donations.app import install_routes
from donations.checkout import _EMAIL
from donations.errors import BadRequest
from donations.logging import _scrub, configure, mask_email, redact, scrubbed
from donations.metrics import Metrics
from tests.conftest import WEBHOOK_SECRET, Client, raw_request
from tests.fakestripe.signing import signed_request
from tests.fakestripe.world import World
from tests.webhook_helpers import post_all, post_event

EMAIL = "jane.doe@example.org"
MASKED = "j***@example.org"


class Output:
    """What the configured pipeline wrote."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.text.splitlines()]
        assert all(isinstance(p, dict) for p in parsed)
        return parsed

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == name]


def _pipeline(log_format: str, log_level: str = "debug") -> Iterator[Output]:
    root = logging.getLogger()
    level = root.level
    quiet = {name: logging.getLogger(name).level for name in ("aiohttp.access", "stripe")}
    configure(log_format, log_level)
    # Loggers cached on first use would keep this pipeline after the test, where other tests
    # capture logs with structlog.testing; everything else stays as configure() set it.
    structlog.configure(cache_logger_on_first_use=False)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    output = Output()
    handler.setStream(output.stream)
    try:
        yield output
    finally:
        structlog.reset_defaults()
        root.removeHandler(handler)
        root.setLevel(level)
        for name, old in quiet.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture
def json_logs() -> Iterator[Output]:
    yield from _pipeline("json")


@pytest.fixture
def console_logs() -> Iterator[Output]:
    yield from _pipeline("console")


@pytest.fixture
def info_logs() -> Iterator[Output]:
    yield from _pipeline("json", "info")


@pytest.fixture
def warning_logs() -> Iterator[Output]:
    yield from _pipeline("json", "warning")


def test_mask_email_keeps_the_first_letter_and_the_domain() -> None:
    assert mask_email(EMAIL) == MASKED
    assert mask_email("x@y.org") == "x***@y.org"
    assert mask_email("not an address") == "***"


def test_an_email_in_any_field_is_masked(json_logs: Output) -> None:
    log = structlog.get_logger("tests.logging")
    log.info(
        "supporter_note",
        email=EMAIL,
        customer_email="bob@example.com",
        note=f"reply to {EMAIL} tomorrow",
        billing={"details": {"address": EMAIL}},
        recipients=[EMAIL, "bob@example.com"],
    )
    (line,) = json_logs.events("supporter_note")
    assert line["email"] == MASKED
    assert line["customer_email"] == "b***@example.com"
    assert line["note"] == f"reply to {MASKED} tomorrow"
    assert line["billing"] == {"details": {"address": MASKED}}
    assert line["recipients"] == [MASKED, "b***@example.com"]
    assert EMAIL not in json_logs.text
    assert "bob@example.com" not in json_logs.text


def test_secrets_are_redacted_by_shape_and_by_key(json_logs: Output) -> None:
    log = structlog.get_logger("tests.logging")
    log.warning(
        "config_seen",
        detail=f"secret {WEBHOOK_SECRET} and key sk_live_51HxYzAbC123 in use",
        rotated=["whsec_old0123", "rk_test_abc_def"],
        authorization="Bearer sk_test_abc",
        Token="t-123",
        secret="plain words",
        api_key="k",
        password="hunter2",
        signature="t=1,v1=abc",
    )
    (line,) = json_logs.events("config_seen")
    assert line["detail"] == "secret whsec_[redacted] and key sk_live_[redacted] in use"
    assert line["rotated"] == ["whsec_[redacted]", "rk_test_[redacted]"]
    for key in ("authorization", "Token", "secret", "api_key", "password", "signature"):
        assert line[key] == "[redacted]", key
    for leaked in (WEBHOOK_SECRET, "test_secret_for", "51HxYzAbC123", "hunter2", "t-123"):
        assert leaked not in json_logs.text


def test_a_traceback_is_scrubbed_too(json_logs: Output) -> None:
    log = structlog.get_logger("tests.logging")
    try:
        raise ValueError(f"no customer for {EMAIL} with key sk_live_abc123")
    except ValueError:
        log.exception("lookup_failed")
    (line,) = json_logs.events("lookup_failed")
    assert line["level"] == "error"
    assert "ValueError: no customer for j***@example.org with key sk_live_[redacted]" in (
        line["exception"])
    assert EMAIL not in json_logs.text
    assert "abc123" not in json_logs.text


def test_standard_library_records_go_through_the_same_pipeline(json_logs: Output) -> None:
    logging.getLogger("aiohttp.server").error("Error handling request from %s", EMAIL)
    (line,) = json_logs.events(f"Error handling request from {MASKED}")
    assert (line["logger"], line["level"]) == ("aiohttp.server", "error")
    assert EMAIL not in json_logs.text


def test_the_pools_reconnect_warnings_carry_no_traceback(json_logs: Output) -> None:
    # what asyncpg's pool logs on each failed reconnect while PostgreSQL is down
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor; retrying", exc_info=True)
    (line,) = json_logs.lines()
    assert line["level"] == "warning"
    assert line["event"].startswith("Failed to restore the pool connection floor; retrying")
    assert "ConnectionRefusedError" in line["event"]
    assert "exception" not in line
    assert "Traceback" not in json_logs.text


_MALFORMED_REQUESTS = {
    "nul-in-a-header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Probe: a\x00b\r\n"
                       b"Connection: close\r\n\r\n",
    "content-length-not-a-number": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Length: abc\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(_MALFORMED_REQUESTS.values()),
                         ids=list(_MALFORMED_REQUESTS))
async def test_a_request_aiohttp_cannot_parse_is_one_info_line_without_a_traceback(
    info_logs: Output, client: Client, request_bytes: bytes
) -> None:
    """A request aiohttp's parser refuses (a NUL in a header value, as a scanner's probe sends;
    a Content-Length that is no number) is the client's fault, answered 400 by aiohttp, which
    logs it (`aiohttp.server`, "Error handling request from …") at ERROR with a traceback: any
    scanner would fill the error log. One line at info naming the error, as the pool's
    reconnect warnings are written."""
    status, _ = await raw_request(client, request_bytes)
    assert status == 400
    await asyncio.sleep(0.1)
    (line,) = [line for line in info_logs.lines() if line["logger"] == "aiohttp.server"]
    assert line["level"] == "info", line
    assert line["event"].startswith("Error handling request from "), line
    assert "BadHttpMessage" in line["event"] or "InvalidHeader" in line["event"], line
    assert "\n" not in line["event"], line
    assert "exception" not in line
    assert "Traceback" not in info_logs.text


_REFUSED_BY_THE_PARSER = {
    **_MALFORMED_REQUESTS,
    "content-length-and-chunked": b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    "header-line-too-long": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: "
                            + b"r" * 9000 + b"\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(_REFUSED_BY_THE_PARSER.values()),
                         ids=list(_REFUSED_BY_THE_PARSER))
async def test_a_request_aiohttp_cannot_parse_gets_a_json_error_with_a_request_id(
    info_logs: Output, client: Client, request_bytes: bytes
) -> None:
    """What aiohttp's HTTP parser refuses before any route sees it is answered as every other
    bad input is: 400, a JSON error naming the problem (never the request's bytes quoted back),
    an X-Request-ID that the log line about it carries too, and the connection closed."""
    head, body = await _raw_exchange(client, request_bytes)
    assert head[0].split(b" ")[1] == b"400", head
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.decode("latin-1").partition(":") for line in head[1:])}
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == "malformed_request", error
    assert error["message"].startswith("not a valid HTTP request: "), error
    assert "\\x" not in error["message"] and "rrrrrrrr" not in error["message"], error
    request_id = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
    await asyncio.sleep(0.1)
    (line,) = [line for line in info_logs.lines() if line["logger"] == "aiohttp.server"]
    assert line["request_id"] == request_id, line


async def test_a_request_target_no_route_can_match_gets_a_json_404(client: Client) -> None:
    """`OPTIONS *` (the asterisk form, which some probes and proxies send) never reaches the
    routes: aiohttp's router refuses it itself, and the answer is still the service's."""
    head, body = await _raw_exchange(
        client, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head[0].split(b" ")[1] == b"404", head
    assert json.loads(body) == {"error": {"code": "not_found", "message": "Not Found"}}
    assert any(line.lower().startswith(b"x-request-id: ") for line in head), head


async def _raw_exchange(client: Client, request: bytes) -> tuple[list[bytes], bytes]:
    """Send the bytes as they are; the answer's status and header lines, and its body."""
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # until aiohttp closes the connection
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


@pytest.mark.parametrize(("header", "secret"), [
    ("Authorization: Bearer ", "dnt_" + "Q" * 43),  # a staff token (auth.ISSUED_PREFIX)
    ("Cookie: donations_staff=", "dns_" + "Z" * 43),  # a staff page session (SESSION_PREFIX)
])
async def test_a_credential_in_a_request_aiohttp_refuses_never_reaches_the_log(
    info_logs: Output, client: Client, header: str, secret: str
) -> None:
    """aiohttp's message for a header it refuses (a stray control character after a pasted
    token) quotes the header line whole: the line logged leaves the request's bytes out, and
    the service's own tokens and sessions are redacted wherever they appear, as Stripe's keys
    are."""
    request = (b"GET /v1/campaigns HTTP/1.1\r\nHost: x\r\n" + header.encode() + secret.encode()
               + b"\x01\r\nConnection: close\r\n\r\n")
    status, _ = await raw_request(client, request)
    assert status == 400
    await asyncio.sleep(0.1)
    (line,) = [line for line in info_logs.lines() if line["logger"] == "aiohttp.server"]
    assert "<request bytes>" in line["event"], line
    assert secret not in info_logs.text and secret[4:] not in info_logs.text
    assert _scrub("event", f"given {secret}.") == f"given {secret[:4]}[redacted]."


async def test_at_warning_a_request_aiohttp_cannot_parse_is_not_written(
    warning_logs: Output, client: Client
) -> None:
    status, _ = await raw_request(client, _MALFORMED_REQUESTS["nul-in-a-header"])
    assert status == 400
    await asyncio.sleep(0.1)
    assert [line for line in warning_logs.lines() if line["logger"] == "aiohttp.server"] == []


def test_json_output_is_one_object_a_line(json_logs: Output) -> None:
    log = structlog.get_logger("tests.logging")
    log.info("first", text="a\nmultiline\nvalue")
    log.warning("second", count=2)
    logging.getLogger("tests.stdlib").info("third")
    lines = json_logs.text.splitlines()
    assert len(lines) == 3
    parsed = json_logs.lines()
    assert [p["event"] for p in parsed] == ["first", "second", "third"]
    assert parsed[0]["text"] == "a\nmultiline\nvalue"
    for p in parsed:
        assert {"event", "level", "logger", "timestamp"} <= set(p)
        assert p["timestamp"].endswith("Z")


def test_console_output_masks_as_json_does(console_logs: Output) -> None:
    structlog.get_logger("tests.logging").info("supporter_note", note=f"from {EMAIL}")
    assert "supporter_note" in console_logs.text
    assert MASKED in console_logs.text
    assert EMAIL not in console_logs.text


async def test_a_webhook_request_logs_one_request_line_and_binds_the_event(
    json_logs: Output, client: Client
) -> None:
    event = World(seed=301).one_off(1000, "gbp").events[0]
    body, headers = signed_request(event, WEBHOOK_SECRET)
    response = await client.post(
        "/webhooks/stripe", data=body, headers={**headers, "X-Request-ID": "req-test-301"})
    assert response.status == 200

    requests = [r for r in json_logs.events("request") if r.get("request_id") == "req-test-301"]
    assert len(requests) == 1
    request = requests[0]
    assert (request["method"], request["path"], request["status"]) == (
        "POST", "/webhooks/stripe", 200)
    assert isinstance(request["duration_ms"], int | float)
    assert request["duration_ms"] >= 0

    (handled,) = json_logs.events("webhook_event")
    assert handled["request_id"] == "req-test-301"
    assert (handled["event_id"], handled["event_type"]) == (event["id"], event["type"])
    assert handled["outcome"] in ("processed", "ignored")

    await client.get("/healthz")  # the next request starts with nothing bound
    (health,) = [r for r in json_logs.events("request") if r["path"] == "/healthz"]
    assert "event_id" not in health
    assert health["request_id"] != "req-test-301"


async def test_at_info_every_request_has_its_line_with_id_status_and_duration(
    info_logs: Output, client: Client
) -> None:
    for path in ("/healthz", "/v1/totals", "/no/such/path"):
        response = await client.get(path)
        (line,) = [r for r in info_logs.events("request") if r["path"] == path]
        assert line["request_id"] == response.headers["X-Request-ID"]
        assert (line["method"], line["status"], line["level"]) == ("GET", response.status, "info")
        assert line["duration_ms"] >= 0


async def test_at_warning_the_request_line_is_not_written_but_warnings_are(
    warning_logs: Output, client: Client
) -> None:
    assert (await client.get("/healthz", headers={"X-Request-ID": "req-quiet"})).status == 200
    structlog.get_logger("donations.test").warning("still_written", request_id="req-quiet")
    assert warning_logs.events("request") == []
    assert [e["request_id"] for e in warning_logs.events("still_written")] == ["req-quiet"]


async def test_a_supporters_email_is_never_logged_in_full(
    json_logs: Output, client: Client, pool: asyncpg.Pool
) -> None:
    paid = World(seed=302).one_off(2500, "gbp", email=EMAIL)
    charge = paid.of_type("charge.succeeded")[0]
    assert charge["data"]["object"]["billing_details"]["email"] == EMAIL
    await post_all(client, paid.events)

    # and when applying fails with an error that quotes the address
    async with pool.acquire() as conn:
        await conn.execute("""
            CREATE FUNCTION refuse_payments() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'payment for % refused', NEW.email; END $$;
            CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON payments
                FOR EACH ROW EXECUTE FUNCTION refuse_payments();
        """)
    try:
        again = World(seed=303).one_off(1000, "gbp", email=EMAIL)
        status, _ = await post_event(client, again.of_type("charge.succeeded")[0])
        assert status == 500
    finally:
        async with pool.acquire() as conn:
            await conn.execute("DROP TRIGGER refuse ON payments; DROP FUNCTION refuse_payments()")

    assert json_logs.events("webhook_event")
    failed = json_logs.events("event_apply_failed")
    assert failed, "the failure was not logged"
    assert MASKED in json.dumps(failed)
    assert EMAIL not in json_logs.text
    assert "jane.doe" not in json_logs.text


def test_redact_leaves_other_values_alone() -> None:
    event = {"event": "x", "amount": 2500, "currency": "gbp", "ok": True, "n": None}
    assert redact(None, "info", dict(event)) == event



async def test_every_failure_is_answered_in_the_contracts_shape_and_a_crash_is_logged(
    json_logs: Output, aiohttp_client: AiohttpClient
) -> None:
    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("boom at sk_test_abcdef123")

    async def refused(request: web.Request) -> web.Response:
        raise BadRequest("bad_thing", "that is not acceptable", field="amount")

    async def away(request: web.Request) -> web.Response:
        raise db.DatabaseUnavailable("connection refused")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    table = web.RouteTableDef()
    for path, handler in (("/crash", crash), ("/refused", refused), ("/away", away),
                          ("/moved", moved)):
        table.get(path)(handler)
    install_routes(app, Metrics(), [table])
    client = await aiohttp_client(app)

    crashed = await client.get("/crash", headers={"X-Request-ID": "req-crash"})
    assert crashed.status == 500
    assert (await crashed.json())["error"]["code"] == "internal_error"
    assert crashed.headers["X-Request-ID"] == "req-crash"
    (logged,) = json_logs.events("request_crashed")
    assert logged["request_id"] == "req-crash" and logged["path"] == "/crash"
    assert "RuntimeError: boom at sk_test_[redacted]" in logged["exception"]

    bad = await client.get("/refused")
    assert bad.status == 400
    assert (await bad.json())["error"] == {
        "code": "bad_thing", "message": "that is not acceptable", "field": "amount"}
    unavailable = await client.get("/away")
    assert unavailable.status == 503 and unavailable.headers["Retry-After"] == "5"
    assert (await unavailable.json())["error"]["code"] == "database_unavailable"
    redirect = await client.get("/moved", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/elsewhere"

    statuses = {(r["path"], r["status"]) for r in json_logs.events("request")}
    assert {("/crash", 500), ("/refused", 400), ("/away", 503)} <= statuses


@pytest.mark.parametrize("email", ["jane.doe~@example.org", "{jane}@example.org",
                                   "o.brien+tag@example.org", "josé@exämple.org"])
def test_any_address_checkout_accepts_is_masked_inside_text(json_logs: Output,
                                                            email: str) -> None:
    log = structlog.get_logger("tests.logging")
    try:
        raise ValueError(f"payment for {email} refused")
    except ValueError:
        log.exception("event_apply_failed", note=f"for '{email}'")
    local = email.split("@", maxsplit=1)[0]
    assert email not in json_logs.text
    assert local not in json_logs.text


def test_a_traceback_in_console_logs_is_scrubbed_too(console_logs: Output) -> None:
    log = structlog.get_logger("tests.logging")
    try:
        raise ValueError(f"refused for {EMAIL} with sk_test_abcdef123456")
    except ValueError:
        log.exception("event_apply_failed")
    assert "Traceback" in console_logs.text and "ValueError" in console_logs.text
    assert EMAIL not in console_logs.text
    assert "abcdef123456" not in console_logs.text


def test_addresses_are_found_from_each_at_sign_however_long_the_text() -> None:
    local = "a" * 8000  # a long request path: only the last 64 characters can be an address
    masked = _scrub("path", f"/v1/{local}@example.org/x")
    assert masked == f"/v1/{local[:-64]}a***@example.org/x"
    assert _scrub("path", "/v1/" + "x@/" * 4000) == "/v1/" + "x@/" * 4000  # no domain: as is


@pytest.mark.parametrize("email", ["jane.doe=news@example.org", "jane.doe/news@example.org",
                                   "jane.doe#news@example.org", "jane.doe&news@example.org"])
def test_addresses_checkout_accepts_are_masked_whole_in_free_text(
    json_logs: Output, email: str
) -> None:
    """README: "E-mails are masked (`j***@example.org`) … by the logging pipeline itself".
    Checkout accepts RFC 5322 dot-atoms, whose atext includes = / # & ? and ', and Stripe's
    refusals are logged with their message (checkout's `stripe_call_failed`, `stripe_message`:
    "Invalid email address: …"). _mask_addresses stops its walk back from the @ at any of
    those characters (logging._LOCAL_ENDS), so `jane.doe=news@example.org` is written as
    `jane.doe=n***@example.org`: all but three letters of the address, in the clear."""
    assert _EMAIL.match(email)  # an address the checkout form takes
    log = structlog.get_logger("tests.logging")
    log.warning("stripe_call_failed", operation="checkout_session_create",
                stripe_message=f"Invalid email address: {email}")
    assert "example.org" in json_logs.text
    assert "jane.doe" not in json_logs.text, json_logs.text


def test_free_text_cut_short_is_scrubbed_before_the_cut() -> None:
    """Checkout logs Stripe's refusal message cut to 300 characters. Cut first, an address
    whose domain falls past the cut (`jane.doe@`) is no longer one the pipeline recognises, and
    its local part would be written; scrubbed first, nothing of it is left."""
    message = "Invalid email address: " + "x" * 260 + " jane.doe@example.org"
    cut_at = message.index("@") + 1
    assert "jane.doe" in str(_scrub("stripe_message", message[:cut_at]))  # the cut alone
    assert "jane.doe" not in scrubbed(message)[:cut_at]
