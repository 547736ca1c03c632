"""Group commit for webhooks: deliveries that arrive together are applied in one transaction.

Each delivery waits for the commit of the group it joined, so it is still answered 2xx only once
its event is durably stored. A group is whatever has queued up while the previous ones were being
applied (nothing waits for company: under light traffic a group is one event), at most MAX_GROUP
events; WORKERS groups are applied at once, each on its own connection.

Events are shared out among the workers by what they are about (`route`), so that the events of
one payment, or of one reader's subscription, usually queue for the same worker: two groups
applied at once that touch the same payment wait for each other's commit (the ledger's locks),
and measured, that waiting cost more than a second worker gained.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from donations import tasks
from donations.events import Event, ref
from donations.ingest import Outcome, ingest_many
from donations.ledger import FoundingOffer

MAX_GROUP = 64
WORKERS = 2

_Waiting = tuple[Event, str, asyncio.Future[Outcome]]


def route(event: Event) -> str:
    """What the event is about, as far as sharing out work goes: the reader (the Stripe customer)
    when the object names one, else its payment, else the object itself. Only a hint: events
    routed apart that touch the same rows are still applied correctly, one after the other."""
    obj = event.obj
    for field in ("customer", "payment_intent", "charge", "id"):
        value = ref(obj.get(field))
        if value:
            return value
    return event.id


class Batcher:
    def __init__(self, pool: asyncpg.Pool, offer: FoundingOffer) -> None:
        self._pool = pool
        self._offer = offer
        self._queues: list[asyncio.Queue[_Waiting]] = [asyncio.Queue() for _ in range(WORKERS)]

    async def ingest(self, event: Event, raw: str) -> Outcome:
        """Store and apply the event with whatever else is waiting; its outcome once committed."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queues[hash(route(event)) % WORKERS].put_nowait((event, raw, done))
        try:
            # shielded: a caller that goes away (the client hung up) leaves its group unharmed
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # nobody will read the outcome now: take it when it comes, so that an outage
            # (answered to the rest of the group) is not reported as never retrieved
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for n, queue in enumerate(self._queues):
                await stack.enter_async_context(
                    tasks.running(self._work(queue), f"webhook-group-{n}"))
            yield

    async def _work(self, queue: asyncio.Queue[_Waiting]) -> None:
        while True:
            group = [await queue.get()]
            while len(group) < MAX_GROUP and not queue.empty():
                group.append(queue.get_nowait())
            try:
                outcomes = await ingest_many(self._pool, [(e, raw) for e, raw, _ in group],
                                             self._offer)
            except asyncio.CancelledError:
                for _, _, done in group:
                    done.cancel()
                raise
            except Exception as exc:  # an outage (ingest_many raises nothing else): 503 to all
                for _, _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, _, done), outcome in zip(group, outcomes, strict=True):
                if not done.done():
                    done.set_result(outcome)
