"""asyncio helpers shared by the SDK and the server."""

from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11):

    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """`asyncio.wait_for`, minus its 3.10/3.11 flaw: a cancel that arrives as `aw` finishes is not swallowed
        (wait_for returns the result and the task runs on, cancel lost: a loop around it never stops). Raises
        asyncio.TimeoutError (an alias of TimeoutError from 3.11)."""
        async with asyncio.timeout(timeout):
            return await aw

else:  # 3.10 has no asyncio.timeout; its wait_for keeps that flaw
    wait_for = asyncio.wait_for
