"""asyncio helpers that stay correct under cancellation.

Python 3.11's `asyncio.wait_for` can swallow a cancellation that arrives just as the awaited thing completes
(gh-86296), so a loop cancelled at that instant keeps running and whoever awaits it hangs. `asyncio.timeout` does not
have that flaw; every bounded wait in the engine goes through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """Await with a time limit; raises TimeoutError when it runs out."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for an event at most `seconds`; True if it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait until it is really done, cancelling again if a cancellation got lost."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
