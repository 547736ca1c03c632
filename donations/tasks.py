"""Background tasks that live as long as the application: started in a cleanup context, cancelled
and awaited when it closes. One that stops before that (a bug its loop did not catch) is logged
at once and makes `/readyz` answer 503, so that an orchestrator replaces the process rather than
letting it serve on without, say, its fee worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# the tasks running now, by name (one application per process; a test's app removes its own)
_RUNNING: dict[str, asyncio.Task[None]] = {}


def stopped() -> list[str]:
    """The background tasks that ended although nobody stopped them."""
    return sorted(name for name, task in _RUNNING.items() if task.done())


def _ended(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        log.error("background_task_stopped", task=task.get_name(), reason="cancelled")
    elif (error := task.exception()) is not None:
        log.error("background_task_stopped", task=task.get_name(),
                  error=type(error).__name__, exc_info=error)
    else:
        log.error("background_task_stopped", task=task.get_name(), reason="returned")


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(_ended)
    _RUNNING[name] = task
    try:
        yield
    finally:
        if _RUNNING.get(name) is task:
            del _RUNNING[name]
        task.remove_done_callback(_ended)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
