"""A local HTTP server speaking Stripe's v1 wire format, answering from a World's objects."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from . import writes
from .objects import API_VERSION, IdGenerator, Obj, as_sent
from .world import World

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_KEY_RE = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]+$")
_TOKEN_RE = re.compile(r"\[([^\[\]]*)\]")


class StripeError(Exception):
    """An error answered in Stripe's shape: `{"error": {"type", "message", "code", "param"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: Obj = {"message": message, "type": type}
        if code is not None:
            self.body["code"] = code
            self.body["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            self.body["param"] = param
        self.headers = dict(headers or {})


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket notation as nested values: `metadata[campaign]=x` gives a dict,
    `expand[]=a` and `expand[0]=a` give lists, `line_items[0][price_data][unit_amount]=5`
    gives a list of dicts."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        name, _, rest = key.partition("[")
        tokens = [name] + (_TOKEN_RE.findall("[" + rest) if rest else [])
        node: dict[str, Any] = root
        for i, tok in enumerate(tokens):
            # `a[]` appends: keep a numbered dict, turned into a list below.
            slot = str(len(node)) if tok == "" else tok
            if i == len(tokens) - 1:
                node[slot] = value
            else:
                child = node.setdefault(slot, {})
                if not isinstance(child, dict):
                    raise StripeError(400, f"Invalid value for {key}.", param=key)
                node = child
    out = _listify(root)
    return out if isinstance(out, dict) else {}


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v) for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        return [out[k] for k in sorted(out, key=int)]
    return out


@dataclass
class RecordedRequest:
    """One request the fake received: the parsed query and form, and its headers."""

    method: str
    path: str
    query: dict[str, Any]
    form: dict[str, Any]
    headers: dict[str, str]


_RECORDED = web.RequestKey("fakestripe_recorded", RecordedRequest)


@dataclass
class _Failure:
    remaining: int
    status: int
    path_prefix: str | None
    should_retry: bool | None
    after: int = 0  # matching requests to let through first
    code: str | None = None  # for a 400: Stripe's error code (email_invalid…)
    param: str | None = None  # for a 400: the parameter at fault


@dataclass
class Held:
    """Answers held back by `FakeStripe.hold`: `arrived` is set once one is held, and all are
    answered once `release` is called."""

    path_prefix: str
    after: int
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


# Retrievable resources: URL collection -> the `object` value its items have.
_RESOURCES: Mapping[str, str] = {
    "balance_transactions": "balance_transaction",
    "charges": "charge",
    "checkout/sessions": "checkout.session",
    "coupons": "coupon",
    "customers": "customer",
    "disputes": "dispute",
    "events": "event",
    "invoice_payments": "invoice_payment",
    "invoices": "invoice",
    "payment_intents": "payment_intent",
    "payouts": "payout",
    "prices": "price",
    "products": "product",
    "refunds": "refund",
    "subscriptions": "subscription",
}

# List filters accepted per collection: query parameter -> path into the object.
_FILTERS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "balance_transactions": {
        "type": ("type",),
        "source": ("source",),
        "currency": ("currency",),
    },
    "charges": {"payment_intent": ("payment_intent",), "customer": ("customer",)},
    "checkout/sessions": {
        "payment_intent": ("payment_intent",),
        "subscription": ("subscription",),
        "customer": ("customer",),
        "status": ("status",),
    },
    "customers": {"email": ("email",)},
    "disputes": {"charge": ("charge",), "payment_intent": ("payment_intent",)},
    "events": {"type": ("type",)},
    "invoice_payments": {"invoice": ("invoice",), "status": ("status",)},
    "invoices": {
        "customer": ("customer",),
        "status": ("status",),
        "subscription": ("parent", "subscription_details", "subscription"),
    },
    "payment_intents": {"customer": ("customer",)},
    "payouts": {"status": ("status",)},
    "prices": {"product": ("product",)},
    "refunds": {"charge": ("charge",), "payment_intent": ("payment_intent",)},
    "subscriptions": {"customer": ("customer",), "price": ("items", "data", "0", "price", "id")},
}


# Every list takes these; beside a collection's filters, a few take more (read in _matches).
_LIST_PARAMS = frozenset({"limit", "starting_after", "ending_before", "expand", "created"})
_MORE_LIST_PARAMS: Mapping[str, frozenset[str]] = {
    "events": frozenset({"types"}),
    "invoice_payments": frozenset({"payment"}),
    "balance_transactions": frozenset({"payout"}),
    "subscriptions": frozenset({"status"}),
}


def _dig(obj: Any, path: Sequence[str]) -> Any:
    for part in path:
        if isinstance(obj, list):
            obj = obj[int(part)] if part.isdigit() and int(part) < len(obj) else None
        elif isinstance(obj, dict):
            obj = obj.get(part)
        else:
            return None
    return obj


def _int_param(params: Mapping[str, Any], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise StripeError(400, f"Invalid integer: {raw}", param=name) from None


def _created_matches(params: Mapping[str, Any], created: int) -> bool:
    spec = params.get("created")
    if spec is None:
        return True
    if not isinstance(spec, dict):
        return created == _int_param(params, "created")
    checks = {
        "gt": lambda x: created > x,
        "gte": lambda x: created >= x,
        "lt": lambda x: created < x,
        "lte": lambda x: created <= x,
    }
    for op in spec:
        if op not in checks:
            raise StripeError(400, f"Received unknown parameter: created[{op}]", param="created")
        if not checks[op](_int_param(spec, op)):
            return False
    return True


class FakeStripe:
    """Stripe's API for the real `stripe` library: `GET /v1/<resource>/{id}` and lists, with
    `expand[]`, Bearer-key auth, Stripe's error shape, request recording and injected failures.

    Objects come from `world.objects` (and events from `world.events`); without a World, put
    objects in with `put`. Add routes to `app` before `start` to extend it.
    """

    def __init__(self, world: World | None = None) -> None:
        self.world = world
        self._objects: dict[str, Obj] = world.objects if world else {}
        self._events: list[Obj] = world.events if world else []
        self.requests: list[RecordedRequest] = []
        # Stripe's own clock, as the Date header of every answer gives it (unix seconds). With
        # a World: never before the last thing the World did (a World whose clock jumps months
        # ahead), nor before the machine's time (a World built in the past is history seen from
        # today); `use_world_clock` makes it exactly the World's. Without one: aiohttp's Date.
        self.clock: Callable[[], int] | None = None
        if world is not None:
            self.clock = lambda: max(world.now, int(time.time()))
        self._failures: list[_Failure] = []
        # Idempotency-Key -> (path, form as JSON, status, body): what Stripe saves of a POST that
        # began executing, replayed to every later request with the key, a 500 included
        # (writes.py answers from it)
        self.idempotent_answers: dict[str, tuple[str, str, int, Obj]] = {}
        self._held: list[Held] = []
        self._list_cache: dict[tuple[str, int, int], tuple[list[Obj], dict[str, int]]] = {}
        self._ids = IdGenerator(4242)
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_get("/v1/{collection:checkout/sessions}/{id}", self._retrieve)
        self.app.router.add_get("/v1/{collection:checkout/sessions}", self._list)
        self.app.router.add_get("/v1/{collection}/{id}", self._retrieve)
        self.app.router.add_get("/v1/{collection}", self._list)
        writes.install(self)  # POST: checkout and portal sessions, coupons, products, prices

    # -- control -------------------------------------------------------------------------------

    @property
    def objects(self) -> dict[str, Obj]:
        return self._objects

    def put(self, *objs: Obj) -> None:
        """Serve these objects (events go to the event list)."""
        for obj in objs:
            if obj.get("object") == "event":
                self._events.append(obj)
            else:
                self._objects[obj["id"]] = obj

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_prefix: str | None = None,
        *,
        should_retry: bool | None = None,
        after: int = 0,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        """Answer the next `n` requests (whose path starts with `path_prefix`, if given) with
        `status` (500 api_error, 429 rate_limit, 404 resource_missing or 400). `should_retry` sets
        Stripe-Should-Retry, which the library obeys over its own rules (it retries 5xx, not
        429, by default).
        `after` lets that many matching requests through first (fail from the third page).
        A 400 is an invalid_request_error with `code` and `param`."""
        self._failures.append(_Failure(n, status, path_prefix, should_retry, after, code, param))

    def hold(self, path_prefix: str, *, after: int = 0) -> Held:
        """Hold back the answers to requests whose path starts with `path_prefix` (after letting
        `after` of them through) until released: a Stripe call in flight for as long as a test
        needs (a shutdown, a hang-up, a signal meanwhile). Closing the fake releases them."""
        held = Held(path_prefix, after)
        self._held.append(held)
        return held

    def use_world_clock(self) -> None:
        """Answer with the World's time in the Date header, as Stripe answers with its own."""
        world = self.world
        assert world is not None, "a FakeStripe without a World has no clock of its own"
        self.clock = lambda: world.now

    def requests_to(self, path_prefix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.base_url = f"http://{host}:{bound[1]}"
        return self.base_url

    async def close(self) -> None:
        for held in self._held:
            held.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        query = parse_form(request.query.items())
        form: dict[str, Any] = {}
        if body and request.content_type == "application/x-www-form-urlencoded":
            form = parse_form(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        recorded = RecordedRequest(request.method, request.path, query, form, dict(request.headers))
        self.requests.append(recorded)
        request[_RECORDED] = recorded
        request_id = self._ids.new("req")
        await self._maybe_hold(request.path)
        try:
            try:
                self._maybe_fail(request.path)
            except StripeError as failed:
                key = request.headers.get("Idempotency-Key")
                if request.method == "POST" and key is not None and failed.status >= 500 \
                        and key not in self.idempotent_answers:
                    # Stripe saves a 500 of a request that began executing and answers it again
                    # to a retry with the same key ("including 500 errors": docs.stripe.com,
                    # Idempotent requests); it says Stripe-Should-Retry: false with it
                    self.idempotent_answers[key] = (request.path, json.dumps(form, sort_keys=True),
                                                    failed.status, {"error": failed.body})
                raise
            self._authenticate(request)
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                raise StripeError(
                    404,
                    f"Unrecognized request URL ({request.method}: {request.path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                ) from None
            except web.HTTPMethodNotAllowed:
                raise StripeError(
                    405, f"Unrecognized request URL ({request.method}: {request.path})."
                ) from None
        except StripeError as e:
            response = web.json_response({"error": e.body}, status=e.status, headers=e.headers)
        response.headers["Request-Id"] = request_id
        if self.clock is not None:
            response.headers["Date"] = formatdate(self.clock(), usegmt=True)
        response.headers["Stripe-Version"] = request.headers.get("Stripe-Version", API_VERSION)
        return response

    async def _maybe_hold(self, path: str) -> None:
        for held in self._held:
            if held.released.is_set() or not path.startswith(held.path_prefix):
                continue
            if held.after > 0:
                held.after -= 1
                continue
            held.arrived.set()
            await held.released.wait()

    def _maybe_fail(self, path: str) -> None:
        for failure in self._failures:
            if failure.remaining <= 0:
                continue
            if failure.path_prefix is not None and not path.startswith(failure.path_prefix):
                continue
            if failure.after > 0:
                failure.after -= 1
                continue
            failure.remaining -= 1
            headers = {}
            if failure.should_retry is not None:
                headers["Stripe-Should-Retry"] = "true" if failure.should_retry else "false"
            if failure.status == 400:
                raise StripeError(400, f"Invalid {failure.param or 'request'}",
                                  code=failure.code, param=failure.param, headers=headers)
            if failure.status == 404:
                raise StripeError(404, f"No such object: '{path.rsplit('/', 1)[-1]}'",
                                  code="resource_missing", headers=headers)
            if failure.status == 429:
                raise StripeError(
                    429,
                    "Too many requests hit the API too quickly. We recommend an exponential "
                    "backoff of your requests.",
                    code="rate_limit",
                    headers=headers,
                )
            raise StripeError(
                failure.status,
                "An unknown error occurred",
                type="api_error",
                headers=headers,
            )

    @staticmethod
    def _authenticate(request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if not auth:
            raise StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
                headers={"WWW-Authenticate": 'Bearer realm="Stripe"'},
            )
        if scheme.lower() != "bearer" or not _KEY_RE.match(key) or "_test_" not in key:
            shown = key[:8] + "*" * 4 + key[-4:] if len(key) > 12 else key
            raise StripeError(
                401,
                f"Invalid API Key provided: {shown}",
                headers={"WWW-Authenticate": 'Bearer realm="Stripe"'},
            )

    @staticmethod
    def _params(request: web.Request) -> dict[str, Any]:
        recorded: RecordedRequest = request[_RECORDED]
        return recorded.query if request.method in ("GET", "DELETE") else recorded.form

    def _lookup(self, collection: str, object_id: str) -> Obj:
        kind = _RESOURCES.get(collection)
        if kind is None:
            raise web.HTTPNotFound()
        if kind == "event":
            found = next((e for e in self._events if e["id"] == object_id), None)
        else:
            found = self._objects.get(object_id)
        if found is None or found.get("object") != kind:
            raise StripeError(
                404,
                f"No such {kind.replace('.', '_')}: '{object_id}'",
                code="resource_missing",
                param="id",
            )
        return found

    def _expand(self, obj: Obj, params: Mapping[str, Any]) -> Obj:
        paths = params.get("expand", [])
        if isinstance(paths, str):
            paths = [paths]
        out = copy.deepcopy(as_sent(obj, [str(p) for p in paths]))
        for path in paths:
            out = self._expand_path(out, str(path).split("."))
        return out

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value in self._objects:
            return copy.deepcopy(self._objects[value])
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        return value

    def _expand_path(self, node: Any, parts: Sequence[str]) -> Any:
        if isinstance(node, list):
            return [self._expand_path(n, parts) for n in node]
        if not isinstance(node, dict) or not parts or parts[0] not in node:
            return node
        head, rest = parts[0], parts[1:]
        node[head] = self._expand_path(self._resolve(node[head]), rest)
        return node

    # -- handlers ------------------------------------------------------------------------------

    async def _retrieve(self, request: web.Request) -> web.Response:
        obj = self._lookup(request.match_info["collection"], request.match_info["id"])
        return web.json_response(self._expand(obj, self._params(request)))

    async def _list(self, request: web.Request) -> web.Response:
        collection = request.match_info["collection"]
        kind = _RESOURCES.get(collection)
        if kind is None:
            raise web.HTTPNotFound()
        params = self._params(request)
        known = _LIST_PARAMS | _FILTERS.get(collection, {}).keys() \
            | _MORE_LIST_PARAMS.get(collection, frozenset())
        for name in params:
            if name not in known:  # as Stripe refuses it (a typo would otherwise filter nothing)
                raise StripeError(400, f"Received unknown parameter: {name}", param=name)
        limit = _int_param(params, "limit") or 10
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100", param="limit")
        if collection == "balance_transactions" and "payout" in params:
            # "For automatic Stripe payouts only" (stripe/params/_balance_transaction_list_params
            # .py, `payout`): a manual payout's listing is refused, every time
            payout = self._objects.get(str(params["payout"]))
            if payout is not None and payout.get("automatic") is False:
                raise StripeError(400, "Balance transaction history can only be filtered on "
                                  "automatic transfers, not manual.", param="payout")
        # The filtered, sorted list is kept between the pages of one listing, so that paging
        # through 100,000 events or 15,000 balance transactions costs a page per request, not a
        # scan and a sort, as a page of Stripe's does. Events only grow at the end: theirs is
        # kept while none is added. Other objects change in place: theirs is made again for
        # each listing's first page (one without a cursor).
        filters = {k: v for k, v in params.items()
                   if k not in ("limit", "starting_after", "ending_before")}
        cache_key: tuple[str, int, int] | None
        if kind == "event":
            cache_key = (repr(sorted(filters.items())), len(self._events),
                         id(self._events[-1]) if self._events else 0)
        else:
            cache_key = (f"{collection} {sorted(filters.items())!r}", len(self._objects), 0)
            if "starting_after" not in params and "ending_before" not in params:
                self._list_cache.pop(cache_key, None)
        if cache_key in self._list_cache:
            items, ids = self._list_cache[cache_key]
        else:
            if kind == "event":
                pool: list[Obj] = list(self._events)
            else:
                pool = [o for o in self._objects.values() if o.get("object") == kind]
            items = [o for o in pool if self._matches(collection, o, params)]
            # Newest first; among equal `created`, the later-made object first, as Stripe lists.
            order = {id(o): i for i, o in enumerate(pool)}
            items.sort(key=lambda o: (int(o.get("created", 0)), order[id(o)]), reverse=True)
            ids = {o["id"]: i for i, o in enumerate(items)}
            self._list_cache[cache_key] = (items, ids)
            while len(self._list_cache) > 8:  # a few listings under way at once
                del self._list_cache[next(iter(self._list_cache))]
        after, before = params.get("starting_after"), params.get("ending_before")
        for cursor, name in ((after, "starting_after"), (before, "ending_before")):
            if cursor is not None and cursor not in ids:
                raise StripeError(
                    400, f"No such object: '{cursor}'", code="resource_missing", param=name
                )
        if after is not None:
            window = items[ids[after] + 1 :]
            page, has_more = window[:limit], len(window) > limit
        elif before is not None:
            window = items[: ids[before]]
            page, has_more = window[-limit:], len(window) > limit
        else:
            page, has_more = items[:limit], len(items) > limit
        body = {
            "object": "list",
            "data": [self._expand_item(o, params) for o in page],
            "has_more": has_more,
            "url": f"/v1/{collection}",
        }
        return web.json_response(body)

    def _expand_item(self, obj: Obj, params: Mapping[str, Any]) -> Obj:
        # List endpoints take `expand[]=data.field`; strip the `data.` to expand each item.
        paths = params.get("expand", [])
        if isinstance(paths, str):
            paths = [paths]
        inner = [p[len("data.") :] for p in map(str, paths) if p.startswith("data.")]
        return self._expand(obj, {"expand": inner})

    def _matches(self, collection: str, obj: Obj, params: Mapping[str, Any]) -> bool:
        if not _created_matches(params, int(obj.get("created", 0))):
            return False
        for name, path in _FILTERS.get(collection, {}).items():
            wanted = params.get(name)
            if wanted is not None and _dig(obj, path) != wanted:
                return False
        if collection == "events":
            types = params.get("types")
            if types is not None and obj["type"] not in types:
                return False
        # Invoice payments by how they were paid: `payment[type]`, `payment[payment_intent]`
        if collection == "invoice_payments" and isinstance(params.get("payment"), dict):
            paid_by = obj.get("payment") or {}
            if any(paid_by.get(k) != v for k, v in params["payment"].items()):
                return False
        if collection == "balance_transactions" and "payout" in params:
            members = self.world.payout_members.get(params["payout"], []) if self.world else []
            if obj["id"] not in members:
                return False
        # Subscriptions lists leave out canceled ones unless asked (`status=all`/`canceled`).
        if collection == "subscriptions":
            status = params.get("status")
            if status is None and obj["status"] == "canceled":
                return False
            if status not in (None, "all") and obj["status"] != status:
                return False
        return True


@asynccontextmanager
async def running_fake_stripe(
    world: World | None = None,
    *,
    configure: Callable[[FakeStripe], None] | None = None,
) -> AsyncIterator[FakeStripe]:
    """Serve a FakeStripe on 127.0.0.1 on a free port; `fake.base_url` says where."""
    fake = FakeStripe(world)
    if configure is not None:
        configure(fake)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


__all__ = [
    "FakeStripe",
    "Held",
    "RecordedRequest",
    "StripeError",
    "parse_form",
    "running_fake_stripe",
]
