"""asyncio helpers shared by the SDK and the server."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for`, minus its 3.11 flaw: a cancel that arrives as `aw` finishes is not swallowed (wait_for
    returns the result and the task runs on, cancel lost: a loop around it never stops). Raises TimeoutError."""
    async with asyncio.timeout(timeout):
        return await aw
