"""asyncio helpers shared by the SDK and the server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Awaitable, Callable, Iterator, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for`, minus its 3.11 flaw: a cancel that arrives as `aw` finishes is not swallowed (wait_for
    returns the result and the task runs on, cancel lost: a loop around it never stops). Raises TimeoutError."""
    async with asyncio.timeout(timeout):
        return await aw


async def wait_state(done: Callable[[], bool], over: Callable[[], bool], moved: asyncio.Event,
                     timeout: float | None = None, recheck_s: float = 1.0) -> bool:
    """Wait until `done()` (True), or `timeout` seconds pass or `over()` says it never will be (False). `moved` is set
    whenever either may have changed (cleared here before each wait); both are looked at again every `recheck_s`
    anyway, for changes nobody signals."""
    loop = asyncio.get_running_loop()
    until = None if timeout is None else loop.time() + timeout
    while not done():
        left = None if until is None else until - loop.time()
        if over() or (left is not None and left <= 0):
            return False
        moved.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(moved.wait(), recheck_s if left is None else min(left, recheck_s))
    return True


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside it, SIGTERM (`kill`, `timeout`, `docker stop`, systemd) stops this program as Ctrl-C does, instead of
    ending it where it stands: inside `asyncio.run` the main task is cancelled, so a client's `finally` and `async
    with` blocks run (its server session or render is deleted at once rather than left running until the server
    notices; a half-written output is removed), and the program's `except KeyboardInterrupt` says it stopped. Only
    the first SIGTERM counts: `timeout` sends one to the program and one to its process group, and a second Ctrl-C
    makes `asyncio.run` raise wherever the cleanup stands (SIGKILL still ends it at once). The handler before it is
    put back on the way out, unless a SIGTERM came. For command-line programs, from the main thread (elsewhere it
    does nothing); a server installs its own handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:  # (after a SIGTERM it stays ignored: a repeat must not end the program on its way out)
        if signal.getsignal(signal.SIGTERM) is _interrupt:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already: a repeat must not cut the cleanup short
    if callable(signal.getsignal(signal.SIGINT)):  # Python's or asyncio.run's Ctrl-C handler: what Ctrl-C would do
        signal.raise_signal(signal.SIGINT)
    else:  # Ctrl-C ignored (a background job of a script): still stop, as Ctrl-C's default handler would
        signal.default_int_handler(signum, frame)
