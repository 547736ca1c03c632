"""Group commit for webhooks: deliveries that arrive together are applied in one transaction.

Each delivery waits for the commit of the group it joined, so it is still answered 2xx only once
its event is durably stored. A group is whatever has queued up while the previous ones were being
applied (nothing waits for company: under light traffic a group is one event), at most MAX_GROUP
events; WORKERS groups are applied at once, each on its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from donations import tasks
from donations.events import Event
from donations.ingest import Outcome, ingest_many
from donations.ledger import FoundingOffer

MAX_GROUP = 64
WORKERS = 2

_Waiting = tuple[Event, str, asyncio.Future[Outcome]]


class Batcher:
    def __init__(self, pool: asyncpg.Pool, offer: FoundingOffer) -> None:
        self._pool = pool
        self._offer = offer
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()

    async def ingest(self, event: Event, raw: str) -> Outcome:
        """Store and apply the event with whatever else is waiting; its outcome once committed."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, raw, done))
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
            for n in range(WORKERS):
                await stack.enter_async_context(tasks.running(self._work(), f"webhook-group-{n}"))
            yield

    async def _work(self) -> None:
        while True:
            group = [await self._queue.get()]
            while len(group) < MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
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
