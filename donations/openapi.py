"""The OpenAPI 3 description of the HTTP interface, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from donations import __version__
from donations.inputs import WHOLE_NUMBER_DIGITS
from donations.reconcile import PAGE_DEFAULT, PAGE_MAX, RUN_EMBEDDED

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


_REPORT_WINDOW: list[dict[str, Any]] = [
    {"name": "from", "in": "query", "required": True, "description": "inclusive: an ISO date "
     "(midnight in tz) or timestamp", "schema": {"type": "string"}},
    {"name": "to", "in": "query", "required": True, "description": "exclusive",
     "schema": {"type": "string"}},
    {"name": "tz", "in": "query", "description": "IANA time zone for dates and naive "
     "timestamps; UTC when absent", "schema": {"type": "string"}},
]

# A difference reconciliation found, the same wherever it is given.
_DISCREPANCY: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "integer"},
    "kind": {"type": "string", "enum": [
        "missing_in_ledger", "missing_at_stripe", "amount_mismatch", "currency_mismatch",
        "status_mismatch", "fee_mismatch", "fee_missing"]},
    "object": {"type": "string", "enum": ["payment", "refund", "dispute"]},
    "stripe_id": {"type": "string", "description": "the charge, refund or dispute"},
    "balance_transaction": {"type": ["string", "null"]},
    "ledger": {"type": ["object", "null"], "description": "the ledger's values; null when it "
               "has no row"},
    "stripe": {"type": ["object", "null"], "description": "the balance transaction's values; "
               "null when there is none"},
    "repaired": {"type": "boolean"},
    "found_at": {"type": "string", "format": "date-time"},
    "resolved_at": {"type": ["string", "null"], "format": "date-time",
                    "description": "null while open"},
    "acknowledged": {"type": ["object", "null"], "properties": {
        "by": {"type": "string"}, "note": {"type": "string"}}},
    "first_run": {"type": "integer", "description": "the run that found it"},
    "last_run": {"type": "integer", "description": "the last run that found it"},
}}
_RUN: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "integer"},
    "trigger": {"type": "string", "enum": ["command", "schedule"]},
    "status": {"type": "string", "enum": ["running", "succeeded", "failed"]},
    "window": {"type": "object", "properties": {
        "start": {"type": "string", "format": "date-time"},
        "end": {"type": "string", "format": "date-time"}}},
    "started_at": {"type": "string", "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
    "duration_seconds": {"type": ["number", "null"]},
    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
    "error": {"type": ["string", "null"]},
    "discrepancies": {"type": "array", "items": _DISCREPANCY, "maxItems": RUN_EMBEDDED,
                      "description": f"the first {RUN_EMBEDDED} it found or found again, "
                      "by id"},
    "discrepancies_total": {"type": "integer", "description": "how many it found or found "
                            "again"},
    "discrepancies_has_more": {"type": "boolean"},
    "discrepancies_next": {"type": ["string", "null"], "description": "the path of the next "
                           "page of /v1/reconciliation/runs/{id}/discrepancies; null when "
                           "all are here"},
}}
_DISCREPANCY_PAGE: dict[str, Any] = {
    "type": "object", "required": ["data", "has_more", "next"], "properties": {
        "data": {"type": "array", "items": _DISCREPANCY},
        "has_more": {"type": "boolean"},
        "next": {"type": ["string", "null"], "description": "the path of the next page; null "
                 "on the last"}}}
# An id in a path or a page's `after`: inputs.whole_number reads at most 18 digits; anything
# else is 400 invalid_after (a query) or 404 (a path: no such id).
_ID: dict[str, Any] = {"type": "integer", "minimum": 0,
                       "maximum": 10**WHOLE_NUMBER_DIGITS - 1}
_PAGE: list[dict[str, Any]] = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": PAGE_MAX,
                "default": PAGE_DEFAULT}},
    {"name": "after", "in": "query", "required": False, "description": "the last id of the "
     "page before", "schema": {**_ID, "default": 0}},
]

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "donations",
        "version": __version__,
        "description": "A reader-funded publisher's system of record for Stripe money.",
    },
    "paths": {
        "/webhooks/stripe": {
            "post": {
                "summary": "Receive a Stripe event",
                "description": "Verified by Stripe-Signature (5 minute tolerance, any configured "
                "secret). Answered 2xx only once the event is durably stored; duplicates too.",
                "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True,
                                "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object"}}}},
                "responses": {
                    "200": _json({"type": "object", "properties": {
                        "received": {"type": "boolean"},
                        "outcome": {"type": "string", "enum": [
                            "processed", "ignored", "needs_attention", "duplicate"]},
                    }}, "Stored (and applied, ignored or set aside for attention)"),
                    "400": _error("Bad or missing signature, malformed body, not an event, "
                                  "or an event of the other livemode"),
                    "413": _error("Body over 1 MiB"),
                    "500": _error("Stored, but applying it failed; Stripe will retry"),
                    "503": _error("The database is unavailable or no webhook secret is set"),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {
            "200": _json({"type": "object"}, "The process answers")}}},
        "/readyz": {"get": {"summary": "Readiness", "responses": {
            "200": _json({"type": "object"}, "Database reachable, migrations applied"),
            "503": _json({"type": "object"}, "Database unreachable or migrations pending")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/v1/reconciliation/runs": {"get": {
            "summary": "Recent reconciliation runs and their discrepancies (reports:read)",
            "description": "Newest first: each run's window, counts, duration and the "
            f"discrepancies it found or found again: the first {RUN_EMBEDDED} by id (the "
            "first page of /v1/reconciliation/runs/{id}/discrepancies), with "
            "discrepancies_total, "
            "discrepancies_has_more and discrepancies_next (where the next page is). "
            "open_discrepancies counts all unresolved.",
            "security": [{"bearer": []}],
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                       "default": 20}}],
            "responses": {
                "200": _json({"type": "object", "required": ["runs", "open_discrepancies"],
                              "properties": {
                                  "runs": {"type": "array", "items": _RUN},
                                  "open_discrepancies": {"type": "integer"}}},
                             "Recent runs"),
                "400": _error("limit is not a whole number from 1 to 100"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks reports:read"),
            }}},
        "/v1/reconciliation/runs/{id}/discrepancies": {"get": {
            "summary": "Every discrepancy a run found or found again, a page at a time "
            "(reports:read)",
            "description": "In the order of their ids; the next page is after the last id "
            "of this one (`next`).",
            "security": [{"bearer": []}],
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": _ID}, *_PAGE],
            "responses": {
                "200": _json(_DISCREPANCY_PAGE, "A page of the run's discrepancies"),
                "400": _error("limit or after cannot be read (the field is named)"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks reports:read"),
                "404": _error("No reconciliation run has this id (run_not_found)"),
            }}},
        "/v1/reconciliation/discrepancies": {"get": {
            "summary": "Discrepancies whichever run found them, open ones unless told, a page "
            "at a time (reports:read)",
            "description": "In the order of their ids; the next page is after the last id "
            "of this one (`next`, which keeps status and limit).",
            "security": [{"bearer": []}],
            "parameters": [{"name": "status", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["open", "resolved", "all"],
                                       "default": "open"}}, *_PAGE],
            "responses": {
                "200": _json(_DISCREPANCY_PAGE, "A page of discrepancies"),
                "400": _error("status, limit or after cannot be read (the field is named)"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks reports:read"),
            }}},
        "/v1/reconciliation/discrepancies/{id}/acknowledge": {"post": {
            "summary": "Acknowledge an open discrepancy finance has explained (admin)",
            "description": "Resolves it with the token's name and the note. Later runs that "
            "find exactly the same difference (kind, object, both sides' values) do not open it "
            "again; a difference that changes is opened as a new discrepancy.",
            "security": [{"bearer": []}],
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": _ID}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["note"],
                "properties": {"note": {"type": "string", "minLength": 1,
                                        "maxLength": 1000}}}}}},
            "responses": {
                "200": _json(_DISCREPANCY, "The discrepancy, acknowledged"),
                "400": _error("The body is not a JSON object, or note is missing, empty or "
                              "holds U+0000"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks admin"),
                "404": _error("No discrepancy has this id"),
                "409": _error("The discrepancy is already resolved"),
                "413": _error("Body over 64 KiB"),
                "422": _error("note longer than 1000 characters"),
            }}},
        "/v1/reports/contributions": {"get": {
            "summary": "Payments, refunds and dispute movements in a window (reports:read)",
            "description": "One row per movement, streamed. CSV (RFC 4180, amounts in major "
            "units, text that a spreadsheet would run neutralised with a leading apostrophe) or "
            "JSON (the same rows, money objects). Content-Disposition names the file after the "
            "window.",
            "security": [{"bearer": []}],
            "parameters": [*_REPORT_WINDOW, {"name": "format", "in": "query",
                                             "schema": {"type": "string",
                                                        "enum": ["csv", "json"],
                                                        "default": "csv"}}],
            "responses": {
                "200": {"description": "The rows", "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "object"}}}},
                "400": _error("A missing or unreadable from, to, tz or format"),
                "401": _error("No, unknown or revoked token"),
                "403": _error("The token lacks reports:read"),
                "422": _error("to is not after from"),
                "429": _error("Too many failed token attempts from this client"),
            }}},
        "/v1/reports/summary": {"get": {
            "summary": "Gross, refunds, disputes, fees, net, counts and monthly recurring "
            "(reports:read)",
            "security": [{"bearer": []}],
            "parameters": _REPORT_WINDOW,
            "responses": {"200": _json({"type": "object"}, "By payment currency and as "
                                       "settled in the reporting currency"),
                          "400": _error("A missing or unreadable from, to or tz"),
                          "401": _error("No or unknown token"),
                          "403": _error("The token lacks reports:read"),
                          "422": _error("to is not after from")}}},
        "/v1/reports/payouts": {"get": {
            "summary": "Payouts arriving in the window, each with the balance transactions "
            "that make it up and whether they sum to it (reports:read)",
            "security": [{"bearer": []}],
            "parameters": _REPORT_WINDOW,
            "responses": {"200": _json({"type": "object"}, "data: payouts, each with "
                                       "balance_transactions joined to the ledger; unbalanced: "
                                       "ids of those whose parts do not sum to them"),
                          "400": _error("A missing or unreadable from, to or tz"),
                          "401": _error("No or unknown token"),
                          "403": _error("The token lacks reports:read"),
                          "422": _error("to is not after from")}}},
        "/v1/reports/payouts/{id}": {"get": {
            "summary": "One payout with its balance transactions joined to the ledger "
            "(reports:read)",
            "security": [{"bearer": []}],
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object"}, "The payout and its transactions"),
                          "404": _error("No such payout"),
                          "401": _error("No or unknown token"),
                          "403": _error("The token lacks reports:read")}}},
        "/staff/": {"get": {
            "summary": "Finance staff page: token login (cookie), a month's summary, a 12-month "
            "chart, CSV downloads",
            "parameters": [{"name": "month", "in": "query", "schema": {
                "type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$"},
                "description": "read once signed in (400 when not a month); the sign-in page "
                               "ignores it"}],
            "responses": {
                "200": {"description": "HTML: the sign-in page, or signed in the month's "
                        "figures", "content": {"text/html": {"schema": {"type": "string"}}}},
                "400": _error("Signed in: month is not a month from 1970-01 to 9998-12 "
                              "(invalid_month)"),
                "429": {"description": "With a session cookie, after too many failed token "
                        "attempts from this client: the sign-in page saying so; see "
                        "Retry-After", "content": {"text/html": {"schema": {"type": "string"}}}},
                "503": _error("With a session cookie: the database is unavailable or busy; see "
                              "Retry-After"),
            }}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3 description")}}},
    },
    "components": {
        "schemas": {
            "Money": {
                "type": "object",
                "required": ["amount", "currency"],
                "properties": {
                    "amount": {"type": "integer", "description": "minor units"},
                    "currency": {"type": "string", "pattern": "^[a-z]{3}$"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"},
                    },
                }},
            },
        },
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}


# --- checkout (donations/checkout.py, donations/portal.py) ----------------------------------

_MONEY = {"$ref": "#/components/schemas/Money"}
_CHECKOUT_ERRORS = {
    "400": _error("Malformed body or field (the field is named), or a bad Idempotency-Key"),
    "403": _error("A browser Origin not on SITE_ORIGINS"),
    "409": _error("Idempotency-Key reused with another body, or its first request still "
                  "running"),
    "413": _error("Body over 64 KiB"),
    "422": _error("A field out of range: currency, amount limits, e-mail, URL not on "
                  "SITE_ORIGINS, unknown campaign, metadata over Stripe's limits"),
    "429": _error("Over a checkout rate limit (per client network or overall); see "
                  "Retry-After"),
    "502": _error("Stripe refused the request (stripe_rejected_request, "
                  "stripe_authentication_failed, stripe_idempotency_conflict)"),
    "503": _error("stripe_not_configured, stripe_not_set_up, stripe_unavailable, "
                  "stripe_rate_limited or database_unavailable; see Retry-After"),
}


def _checkout(summary: str, recurring: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "amount": {"type": "integer", "description": "minor units (1000 is £10.00, ¥1,000)"},
        "currency": {"type": "string", "pattern": "^[a-z]{3}$"},
        "email": {"type": "string", "description": "pre-fills Checkout"},
        "campaign": {"type": "string", "description": "a campaign slug"},
        "success_url": {"type": "string", "description": "on SITE_ORIGINS; may contain "
                        "{CHECKOUT_SESSION_ID}"},
        "cancel_url": {"type": "string", "description": "on SITE_ORIGINS"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "the form's own (referrer, variant…): up to 48 keys"},
    }
    answer: dict[str, Any] = {
        "id": {"type": "string"}, "url": {"type": "string"},
        "expires_at": {"type": "string", "format": "date-time"},
        "amount": _MONEY, "campaign": {"type": ["string", "null"]},
    }
    required = ["amount", "currency", "success_url", "cancel_url"]
    if recurring:
        properties["interval"] = {"type": "string", "enum": ["month", "year"]}
        answer["interval"] = {"type": "string", "enum": ["month", "year"]}
        answer["founding_discount"] = {"type": "boolean"}
        required.append("interval")
    return {"post": {
        "summary": summary,
        # idempotency.key_of: anything else is 400 invalid_idempotency_key
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                   "pattern": "^[!-~]{1,200}$"},
                        "description": "1 to 200 visible ASCII characters (a UUID is best)"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": required, "properties": properties,
            "additionalProperties": False}}}},
        "responses": {
            "201": _json({"type": "object", "properties": answer},
                         "A Stripe Checkout Session: send the reader to `url`"),
            **_CHECKOUT_ERRORS,
        },
    }}


SPEC["paths"].update({
    "/v1/checkout/contributions": _checkout("Start a one-off contribution", recurring=False),
    "/v1/checkout/subscriptions": _checkout(
        "Start a monthly or yearly subscription (founding discount while seats remain)",
        recurring=True),
    "/v1/checkout/options": {"get": {
        "summary": "Currencies, suggested amounts and limits, and the founding offer",
        "responses": {
            "200": _json({"type": "object"}, "What the forms offer"),
            "403": _error("A browser Origin not on SITE_ORIGINS (origin_not_allowed)"),
            "503": _error("The database is unavailable or busy; see Retry-After"),
        },
    }},
    "/v1/portal-sessions": {"post": {
        "summary": "A Stripe customer portal link for a supporter",
        "security": [{"bearer": []}],
        # portal.create_portal_session: either customer or email, nothing else
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["return_url"], "properties": {
                "customer": {"type": "string", "pattern": "^cus_[A-Za-z0-9]{1,250}$",
                             "description": "a Stripe customer id"},
                "email": {"type": "string", "minLength": 1, "maxLength": 254,
                          "description": "the supporter's, as in the ledger"},
                "return_url": {"type": "string", "description": "on SITE_ORIGINS"}},
            "oneOf": [{"required": ["customer"]}, {"required": ["email"]}],
            "additionalProperties": False}}}},
        "responses": {
            "201": _json({"type": "object", "properties": {"url": {"type": "string"}}},
                         "Send the supporter to `url`"),
            "400": _error("Malformed body or field, an unknown field, or neither or both of "
                          "customer and email (the field is named)"),
            "401": _error("No or unknown token"),
            "403": _error("A token without the portal or admin scope"),
            "404": _error("No such supporter (by e-mail in the ledger, or at Stripe)"),
            "413": _error("Body over 64 KiB"),
            "422": _error("return_url not an http(s) URL on SITE_ORIGINS, or email or "
                          "return_url too long"),
            "502": _error("Stripe refused the request"),
            "503": _error("Stripe not configured or unavailable"),
        },
    }},
})


# --- public totals (donations/totals_api.py, donations/embed.py) -----------------------------

_TOTALS_MONEY = {"$ref": "#/components/schemas/Money"}
_TOTALS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {
    "campaign": {"type": ["string", "null"], "description": "the slug; null for everything"},
    "title": {"type": ["string", "null"]},
    "currency": {"type": "string", "description": "the reporting currency"},
    "raised": _TOTALS_MONEY,
    "goal": {"oneOf": [_TOTALS_MONEY, {"type": "null"}]},
    "percent_of_goal": {"type": ["number", "null"], "description": "two decimals"},
    "supporters": {"type": "integer"}, "contributions": {"type": "integer"},
    "active_subscriptions": {"type": "integer"}, "monthly_recurring": _TOTALS_MONEY,
    "founding_seats_left": {"type": "integer"},
    "by_currency": {"type": "array", "items": {"type": "object", "properties": {
        "currency": {"type": "string"}, "raised": _TOTALS_MONEY,
        "contributions": {"type": "integer"}, "active_subscriptions": {"type": "integer"},
        "monthly_recurring": _TOTALS_MONEY}}},
    "display": {"type": "object", "description": "the same figures written for people "
                "(heading, summary, raised, goal, percent_filled)"},
    "as_of": {"type": "string", "format": "date-time"},
}}
_CACHED = ("Public and cacheable: Cache-Control (public, max-age=TOTALS_TTL, "
           "stale-while-revalidate), a weak ETag answered 304 on If-None-Match, and "
           "Access-Control-Allow-Origin: *.")
_SLUG = [{"name": "slug", "in": "path", "required": True, "schema": {"type": "string"}}]
_SVG_QUERY: list[dict[str, Any]] = [
    {"name": "width", "in": "query", "schema": {"type": "integer", "minimum": 200,
                                                 "maximum": 1200, "default": 480}},
    *({"name": n, "in": "query",
       "schema": {"type": "string", "pattern": "^(#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6}))?$"},
       "description": f"{n} colour, hex (empty: the default)"}
      for n in ("bar", "track", "text", "background")),
]


def _public(summary: str, media: str, schema: dict[str, Any], campaign: bool,
            query: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": _CACHED, "content": {media: {"schema": schema}}},
        "304": {"description": "Not modified (If-None-Match)"},
        "503": _error("The database is unavailable and no recent figures are held"),
    }
    if campaign:
        responses["404"] = _error("No campaign has that slug (campaign_not_found)")
    if query:
        responses["400"] = _error("A bad width or colour (the field is named)")
    return {"get": {"summary": summary, "parameters": (_SLUG if campaign else []) + (query or []),
                    "responses": responses}}


SPEC["paths"].update({
    "/v1/totals": _public("Totals over everything", "application/json", _TOTALS_SCHEMA,
                          campaign=False),
    "/v1/campaigns/{slug}/totals": _public("A campaign's totals (its window)", "application/json",
                                           _TOTALS_SCHEMA, campaign=True),
    "/v1/totals/progress.svg": _public("The totals as an accessible SVG progress bar",
                                       "image/svg+xml", {"type": "string"}, campaign=False,
                                       query=_SVG_QUERY),
    "/v1/campaigns/{slug}/progress.svg": _public(
        "A campaign's progress bar (SVG)", "image/svg+xml", {"type": "string"}, campaign=True,
        query=_SVG_QUERY),
    "/embed/{slug}": _public("The widget as a self-contained page for an iframe", "text/html",
                             {"type": "string"}, campaign=True),
    "/embed.js": {"get": {"summary": "The script that fills <div data-donations-campaign> "
                          "elements (under 5 KB)", "responses": {
                              "200": {"description": "JavaScript", "content": {
                                  "text/javascript": {"schema": {"type": "string"}}}},
                              "304": {"description": "Not modified (If-None-Match)"}}}},
})

# the embed page is shown inside the site's iframe: its 404 is a page saying so, not JSON
SPEC["paths"]["/embed/{slug}"]["get"]["responses"]["404"] = {
    "description": "No campaign has that slug: a small page saying so",
    "content": {"text/html": {"schema": {"type": "string"}}}}

_CAMPAIGN: dict[str, Any] = {"type": "object", "properties": {
    "slug": {"type": "string"}, "title": {"type": "string"},
    "goal": {"oneOf": [_MONEY, {"type": "null"}]},
    "starts_at": {"type": ["string", "null"], "format": "date-time"},
    "ends_at": {"type": ["string", "null"], "format": "date-time"},
    "created_at": {"type": "string", "format": "date-time"}}}

SPEC["paths"].update({
    "/v1/campaigns": {
        "get": {
            "summary": "Every campaign, oldest first (admin)",
            "security": [{"bearer": []}],
            "responses": {
                "200": _json({"type": "object", "required": ["data"], "properties": {
                    "data": {"type": "array", "items": _CAMPAIGN}}}, "The campaigns"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks admin"),
            }},
        "post": {
            "summary": "Create a campaign (admin)",
            "description": "Its totals count the contributions that name it, made inside "
            "its window when it has one (starts inclusive, ends exclusive); a goal is in "
            "the reporting currency.",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["slug", "title"], "properties": {
                    "slug": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$"},
                    "title": {"type": "string", "minLength": 1, "maxLength": 200},
                    "goal": {"oneOf": [_MONEY, {"type": "null"}]},
                    "starts": {"type": ["string", "null"],
                               "description": "RFC 3339 or a date; null or absent: no start"},
                    "ends": {"type": ["string", "null"],
                             "description": "RFC 3339 or a date; null or absent: no end"}},
                "additionalProperties": False}}}},
            "responses": {
                "201": _json(_CAMPAIGN, "The campaign"),
                "400": _error("A field that cannot be read or is not one of these (the field "
                              "is named)"),
                "401": _error("No or unknown token"),
                "403": _error("The token lacks admin"),
                "409": _error("A campaign with that slug exists (campaign_exists)"),
                "413": _error("Body over 64 KiB"),
                "422": _error("A value out of range: slug, title, goal currency, window"),
            }},
    },
})


# Every route that takes a token (auth.check) answers 429 after too many failed attempts from
# the client, and 503 when the database is unavailable.
for _operations in SPEC["paths"].values():
    for _operation in _operations.values():
        if "security" in _operation:
            _operation["responses"].setdefault(
                "429", _error("Too many failed token attempts from this client; see "
                              "Retry-After"))
            _operation["responses"].setdefault(
                "503", _error("The database is unavailable; see Retry-After"))
