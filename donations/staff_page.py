"""The finance staff page: a token login kept in a cookie, a month's summary, a 12-month chart."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any

import structlog
from aiohttp import web

from donations import auth, db, payouts, reports
from donations.appkeys import POOL, SETTINGS
from donations.errors import ApiError, BadRequest, Forbidden, TooManyRequests, Unauthorized
from donations.money import exponent, to_major

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

COOKIE = "donations_staff"
COOKIE_PATH = "/staff"
COOKIE_MAX_AGE = 8 * 3600  # a working day; then the token is asked for again
SCOPE = "reports:read"
# No scripts at all, styles only inline, forms only to ourselves, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --- authentication by cookie ---------------------------------------------------------------


async def _staff(request: web.Request) -> auth.Token | None:
    """The token behind the cookie's session when the session is live and the token may read
    reports; None otherwise."""
    value = request.cookies.get(COOKIE)
    if not value:
        return None
    try:
        return await auth.check_session(request, value, SCOPE)
    except (Unauthorized, Forbidden):
        return None


async def _require_staff(request: web.Request) -> auth.Token:
    token = await _staff(request)
    if token is None:
        raise web.HTTPSeeOther("/staff/")
    return token


def _same_origin(request: web.Request) -> None:
    """Refuse a form posted from another site (the cookie is SameSite=Strict as well).

    The page's own forms may send `Origin: null` (its Referrer-Policy is no-referrer), and so
    may a sandboxed frame on any site: the browser's Sec-Fetch-Site tells them apart."""
    fetched_from = request.headers.get("Sec-Fetch-Site")
    if fetched_from is not None and fetched_from not in ("same-origin", "none"):
        raise Forbidden("cross_origin", "forms are only accepted from this site")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and origin.split("://", 1)[-1] != request.host:
        raise Forbidden("cross_origin", "forms are only accepted from this site")


def _page(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers={**SECURITY_HEADERS, **(headers or {})})


@routes.post("/staff/login")
async def login(request: web.Request) -> web.Response:
    _same_origin(request)
    try:
        form = await request.post()
    # ValueError (UnicodeDecodeError among them): bytes not in the form's charset, a multipart
    # part without a name; LookupError: a charset Python does not know
    except (ValueError, LookupError):
        return _page(login_page("The form could not be read; try again."), status=400)
    value = str(form.get("token") or "").strip()
    if not value:
        return _page(login_page("Enter your token."), status=400)
    try:
        token = await auth.check(request, value, SCOPE)
    except Unauthorized:
        return _page(login_page("That token is unknown or revoked."), status=401)
    except Forbidden:
        return _page(login_page("That token cannot read reports."), status=403)
    except ApiError as exc:  # rate limited
        return _page(login_page(exc.message), status=exc.status, headers=exc.headers)
    # the cookie carries a session of its own, never the token (which also opens the API);
    # the session this browser had ends here (else signing out would leave it open)
    async with db.connection(request.app[POOL]) as conn, conn.transaction():
        earlier = request.cookies.get(COOKIE)
        if earlier:
            await auth.close_session(conn, earlier)
        session = await auth.open_session(conn, token, timedelta(seconds=COOKIE_MAX_AGE))
    response = web.HTTPSeeOther("/staff/")
    response.set_cookie(COOKIE, session, path=COOKIE_PATH, max_age=COOKIE_MAX_AGE, secure=True,
                        httponly=True, samesite="Strict")
    raise response


@routes.post("/staff/logout")
async def logout(request: web.Request) -> web.Response:
    _same_origin(request)
    value = request.cookies.get(COOKIE)
    if value:  # the session ends here, whatever becomes of the cookie
        async with db.connection(request.app[POOL]) as conn:
            await auth.close_session(conn, value)
    response = web.HTTPSeeOther("/staff/")
    response.del_cookie(COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")
    raise response


# --- pages ----------------------------------------------------------------------------------


@routes.get("/staff")
async def staff_no_slash(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/staff/")


@routes.get("/staff/")
async def staff(request: web.Request) -> web.Response:
    try:
        token = await _staff(request)
    except TooManyRequests as exc:  # too many failed attempts from this address: the page says so
        return _page(login_page(exc.message), status=exc.status, headers=exc.headers)
    if token is None:
        return _page(login_page())
    month = _month(request.query.get("month"))
    reporting = request.app[SETTINGS].reporting_currency
    months = [_add_months(month, -i) for i in range(11, -1, -1)]
    async with db.connection(request.app[POOL]) as conn:
        summaries = [await reports.summary(conn, reports.month_window(m), reporting)
                     for m in months]
    return _page(dashboard(month, summaries[-1], list(zip(months, summaries, strict=True)),
                           reporting))


@routes.get("/staff/contributions.csv")
async def contributions_csv(request: web.Request) -> web.StreamResponse:
    await _require_staff(request)
    return await reports.stream_response(request, reports.query_window(request), "csv")


@routes.get("/staff/payouts.csv")
async def payouts_csv(request: web.Request) -> web.StreamResponse:
    await _require_staff(request)
    return await payouts.stream_report(request, reports.query_window(request), "csv")


def _month(value: str | None) -> date:
    if not value:
        today = datetime.now(UTC).date()
        return today.replace(day=1)
    try:
        month = date.fromisoformat(f"{value}-01")
    except ValueError:
        raise BadRequest("invalid_month", "month is YYYY-MM", field="month") from None
    if not 1970 <= month.year <= 9998:  # (the page reads the 11 months before and the next)
        raise BadRequest("invalid_month", "month is YYYY-MM, from 1970", field="month")
    return month


def _add_months(month: date, n: int) -> date:
    y, m = divmod(month.month - 1 + n, 12)
    return date(month.year + y, m + 1, 1)


# --- HTML -----------------------------------------------------------------------------------

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:64rem;padding:0 1rem;
color:#1b1b1b}
h1{font-size:1.4rem}table{border-collapse:collapse;margin:1rem 0}
th,td{padding:.3rem .7rem;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}
.note{color:#555;font-size:.9rem}form.inline{display:inline}
label{display:block;margin:.5rem 0}input[type=password]{width:28rem;max-width:100%}
.error{color:#a00}
"""


def _layout(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")


def login_page(message: str | None = None) -> str:
    error = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
    return _layout("Finance reports: sign in", f"""
<h1>Finance reports</h1>{error}
<form method="post" action="/staff/login">
<label>Access token (from <code>donations tokens create --scope reports:read</code>)
<input type="password" name="token" autocomplete="off" required></label>
<button type="submit">Sign in</button></form>""")


def _m(money: dict[str, Any]) -> str:
    return escape(f"{to_major(money['amount'], money['currency'])} "
                  f"{money['currency'].upper()}")


def dashboard(
    month: date, summary: dict[str, Any], history: list[tuple[date, dict[str, Any]]],
    reporting: str,
) -> str:
    win = reports.month_window(month)
    query = f"from={win.start_label}&amp;to={win.end_label}"
    r = summary["reporting"]
    rows = [
        ("Gross", _m(r["gross"])), ("Refunds", _m(r["refunds"])),
        ("Disputes withdrawn", _m(r["disputes_withdrawn"])),
        ("Disputes reinstated", _m(r["disputes_reinstated"])), ("Fees", _m(r["fees"])),
        ("Net", _m(r["net"])), ("Payments", str(r["payments"])),
        ("One-off", f'{r["one_off"]["payments"]} · {_m(r["one_off"]["gross"])}'),
        ("Recurring", f'{r["recurring"]["payments"]} · {_m(r["recurring"]["gross"])}'),
        ("New subscriptions", str(r["new_subscriptions"])),
        ("Ended subscriptions", str(r["ended_subscriptions"])),
        ("Monthly recurring at month end", _m(r["monthly_recurring"])),
    ]
    figures = "".join(f"<tr><th scope=row>{k}</th><td>{v}</td></tr>" for k, v in rows)
    currency_rows = "".join(
        f"<tr><td>{escape(c['currency'].upper())}</td><td>{_m(c['gross'])}</td>"
        f"<td>{_m(c['refunds'])}</td><td>{_m(c['disputes_withdrawn'])}</td>"
        f"<td>{_m(c['disputes_reinstated'])}</td><td>{_m(c['net'])}</td>"
        f"<td>{c['payments']}</td><td>{_m(c['monthly_recurring'])}</td></tr>"
        for c in summary["by_currency"]
    )
    notes = []
    if r["pending_settlement"]:
        notes.append(f'{r["pending_settlement"]} movement(s) not yet settled by Stripe: their '
                     f"fees and net are not counted yet, and their amounts only when in "
                     f"{escape(reporting.upper())}.")
    for other in r.get("settled_elsewhere") or []:
        notes.append(f'{other["movements"]} movement(s) settled in '
                     f'{escape(other["currency"].upper())}, not in these figures: fees '
                     f'{_m(other["fees"])}, net {_m(other["net"])}.')
    if r.get("monthly_recurring_unconverted"):
        left_out = ", ".join(_m(m) for m in r["monthly_recurring_unconverted"])
        notes.append(f"Monthly recurring leaves out {left_out} (no exchange rate from Stripe "
                     "for that currency yet).")
    pending = "".join(f'<p class="note">{n}</p>' for n in notes)
    previous, following = _add_months(month, -1), _add_months(month, 1)
    return _layout(f"Finance reports: {month:%B %Y}", f"""
<h1>Finance reports: {month:%B %Y}</h1>
<form method="get" action="/staff/"><label>Month <input type="month" name="month"
value="{month:%Y-%m}"></label><button type="submit">Show</button>
<a href="/staff/?month={previous:%Y-%m}">&larr; {previous:%b %Y}</a> ·
<a href="/staff/?month={following:%Y-%m}">{following:%b %Y} &rarr;</a></form>
<h2>In {escape(reporting.upper())} (as settled by Stripe)</h2>
<table>{figures}</table>{pending}
<h2>By payment currency</h2>
<table><thead><tr><th>Currency</th><th>Gross</th><th>Refunds</th><th>Disputes withdrawn</th>
<th>Reinstated</th><th>Net</th><th>Payments</th><th>Monthly recurring</th></tr></thead>
<tbody>{currency_rows}</tbody></table>
<h2>Last 12 months</h2>
{chart(history, reporting)}
<h2>Downloads</h2>
<ul><li><a href="/staff/contributions.csv?{query}">Contributions, {month:%B %Y} (CSV)</a></li>
<li><a href="/staff/payouts.csv?{query}">Payouts arriving in {month:%B %Y} (CSV)</a></li></ul>
<form class="inline" method="post" action="/staff/logout"><button type="submit">Sign out
</button></form>""")


@dataclass(frozen=True)
class _Point:
    label: str
    gross: int
    net: int
    mrr: int


def _round_up(value: int, multiple: int) -> int:
    """`value` (>= 0) up to a multiple of `multiple`."""
    return -(-value // multiple) * multiple


def chart(history: list[tuple[date, dict[str, Any]]], currency: str) -> str:
    """Gross and net bars and a monthly-recurring line per month, as inline SVG."""
    points = [_Point(f"{m:%b %y}", s["reporting"]["gross"]["amount"],
                     s["reporting"]["net"]["amount"],
                     s["reporting"]["monthly_recurring"]["amount"]) for m, s in history]
    width, height, left, top, bottom = 760, 280, 70, 20, 40
    plot_w, plot_h = width - left - 10, height - top - bottom
    # the scale's ends in whole major units (an empty year still has a readable axis)
    unit = int(10 ** exponent(currency))
    high = max([0, *(max(p.gross, p.net, p.mrr) for p in points)])
    low = min([0, *(min(p.gross, p.net, p.mrr) for p in points)])
    step_of_4 = 4 * unit  # the axis has four steps: the ends are multiples of four units
    high = max(step_of_4, _round_up(high, step_of_4))
    low = -_round_up(-low, step_of_4)
    span = high - low

    def y(value: int) -> float:
        return top + plot_h * (high - value) / span

    step = plot_w / max(1, len(points))
    bar = step / 3
    parts = [f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - 10}" y2="{y(0):.1f}" '
             'stroke="#888"/>']
    for tick in range(5):
        value = low + span * tick // 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{escape(to_major(value, currency))}</text>')
    line = []
    for i, p in enumerate(points):
        x = left + i * step + step / 6
        for offset, value, colour, name in ((0.0, p.gross, "#3b6ea5", "gross"),
                                            (bar, p.net, "#7fb069", "net")):
            top_y = min(y(value), y(0))
            parts.append(
                f'<rect x="{x + offset:.1f}" y="{top_y:.1f}" width="{bar:.1f}" '
                f'height="{abs(y(value) - y(0)):.1f}" fill="{colour}"><title>'
                f"{escape(p.label)} {name}: {escape(to_major(value, currency))} "
                f"{escape(currency.upper())}</title></rect>")
        line.append(f"{x + bar:.1f},{y(p.mrr):.1f}")
        parts.append(f'<text x="{x + bar:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                     f'font-size="11">{escape(p.label)}</text>')
    parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#c0504d" '
                 'stroke-width="2"/>')
    legend = [("#3b6ea5", "Gross"), ("#7fb069", "Net"), ("#c0504d", "Monthly recurring")]
    for i, (colour, name) in enumerate(legend):
        x = left + i * 160
        parts.append(f'<rect x="{x}" y="{height - 14}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{x + 16}" y="{height - 4}" font-size="12">{name}</text>')
    title = f"Gross, net and monthly recurring in {currency.upper()}, last 12 months"
    # the same figures as a table: an image's parts are not read out by a screen reader
    rows = "".join(
        f"<tr><th scope=row>{escape(p.label)}</th><td>{escape(to_major(p.gross, currency))}</td>"
        f"<td>{escape(to_major(p.net, currency))}</td>"
        f"<td>{escape(to_major(p.mrr, currency))}</td></tr>" for p in points)
    table = (f'<details><summary>The figures of the chart</summary><table id="chart-figures">'
             f"<caption>{escape(title)}</caption><thead><tr><th>Month</th><th>Gross</th>"
             f"<th>Net</th><th>Monthly recurring</th></tr></thead><tbody>{rows}</tbody></table>"
             "</details>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" aria-label="{escape(title)}" '
            f'aria-describedby="chart-figures">'
            f"<title>{escape(title)}</title>{''.join(parts)}</svg>{table}")
