"""Stripe's list pages as reconciliation and import read them: decoded once, each object kept with
the JSON text Stripe sent for it, errors raised as the stripe library raises them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import stripe
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from donations.settings import Secret
from donations.stripe_api import get_list, make_client, split_list
from tests.conftest import make_settings
from tests.fakestripe.world import World
from tests.test_fees import TEST_KEY, stripe_against

EVENTS = [
    {"id": "evt_1", "object": "event", "data": {"object": {"id": "ch_1", "amount": 1000,
                                                           "metadata": {"note": "caf\u00e9 \u2615"},
                                                           "refunds": []}}},
    {"id": "evt_2", "object": "event", "data": {"object": {"id": "in_1", "lines": [[1, 2], {}],
                                                           "total": -0, "paid": True}}},
]


@pytest.mark.parametrize("dumps", [
    json.dumps,  # the fake's
    lambda v: json.dumps(v, indent=2),  # Stripe's own: pretty-printed
    lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
    lambda v: " \n" + json.dumps(v, indent="\t") + "\r\n",
])
def test_a_list_is_decoded_with_each_objects_text_as_sent(dumps: Callable[[Any], str]) -> None:
    page = {"object": "list", "data": EVENTS, "has_more": True, "url": "/v1/events"}
    text = dumps(page)
    envelope, texts = split_list(text)
    assert envelope == json.loads(text)
    assert [json.loads(t) for t in texts] == EVENTS
    # each is a slice of the body, as Stripe wrote it
    assert all(t in text and t.startswith("{") and t.endswith("}") for t in texts)


def test_a_list_s_keys_in_any_order_and_an_empty_page() -> None:
    envelope, texts = split_list('{"has_more": false, "data": [], "url": "/v1/events"}')
    assert (envelope, texts) == ({"has_more": False, "data": [], "url": "/v1/events"}, [])
    assert split_list("{}") == ({}, [])
    assert split_list(" {\n}\n") == ({}, [])
    assert split_list('{"data": [ ]} ') == ({"data": []}, [])
    # `data` that is not an array is decoded as it is, with no texts
    assert split_list('{"data": null}') == ({"data": None}, [])


@pytest.mark.parametrize("text", [
    "", "[]", "null", '{"data": [1,]}', '{"data": [1}', '{"a": 1} x', '{"a": 1, "a": 2}',
    "{1: 2}", '{"data": [1] "x": 2}', '{"data": [1], }', '{"a" 1}',
])
def test_what_is_not_one_json_object_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # (json's own errors are ValueErrors too)
        split_list(text)


async def test_a_page_read_through_the_library_and_its_errors() -> None:
    world = World(seed=41)
    world.one_off(1500, "gbp")
    async with stripe_against(world) as (fake, client):
        page = await get_list(client, "/v1/events", {"limit": 2})
        assert [e["id"] for e in page.items] == [e["id"] for e in world.events[::-1][:2]]
        assert [json.loads(t) for t in page.texts] == page.items
        assert page.has_more is True
        # the library's request: its key, pinned version and the form-encoded query
        (request,) = fake.requests_to("/v1/events")
        assert request.query["limit"] == "2"
        assert request.headers["Authorization"] == f"Bearer {TEST_KEY}"
        assert request.headers["Stripe-Version"]

        fake.fail_next(1, 404, "/v1/events")
        with pytest.raises(stripe.InvalidRequestError) as refused:
            await get_list(client, "/v1/events", {"starting_after": "evt_gone"})
        assert (refused.value.http_status, refused.value.code) == (404, "resource_missing")


@asynccontextmanager
async def answering(status: int, body: str) -> AsyncIterator[stripe.StripeClient]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/events", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    http_client = stripe.AIOHTTPClient(timeout=5)
    client = make_client(make_settings("postgresql://unused", stripe_secret_key=Secret(TEST_KEY),
                                       stripe_api_base=f"http://127.0.0.1:{port}"),
                         http_client, max_network_retries=0)
    assert client is not None
    try:
        yield client
    finally:
        await http_client.close_async()  # type: ignore[no-untyped-call]
        await runner.cleanup()


async def test_a_body_that_is_not_a_list_is_the_library_s_api_error() -> None:
    async with answering(200, '{"object": "list", "data": [{"id": "evt_1"},') as client:
        with pytest.raises(stripe.APIError) as failed:
            await get_list(client, "/v1/events", {})
    assert failed.value.http_status == 200
    async with answering(401, '{"error": {"type": "invalid_request_error", '
                              '"message": "Invalid API Key provided"}}') as client:
        with pytest.raises(stripe.AuthenticationError):
            await get_list(client, "/v1/events", {})


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(envelope=st.dictionaries(st.text(max_size=6), _JSON, max_size=4),
       data=st.none() | st.lists(_JSON, max_size=5),
       indent=st.sampled_from([None, 0, 1, 2, "\t"]), ascii_only=st.booleans())
def test_any_json_object_is_split_as_json_reads_it(
    envelope: dict[str, Any], data: list[Any] | None, indent: int | str | None,
    ascii_only: bool,
) -> None:
    if data is not None:
        envelope = {**envelope, "data": data}
    text = json.dumps(envelope, indent=indent, ensure_ascii=ascii_only)
    decoded, texts = split_list(text)
    assert decoded == json.loads(text)
    items = decoded.get("data")
    expected = items if isinstance(items, list) else []
    assert [json.loads(t) for t in texts] == expected
