"""Several devices behind one front: one `StreamEngine` per device, a new session on the least-busy one.

One engine is one model on one device with one worker thread, and its sessions' windows run batched. A machine with
several GPUs runs one engine on each (each its own copy of the model) and places every new session on the engine
with the most free slots, so the batches stay as small as they can and no device idles while another is full.
A session stays on its engine for its life: its memory bank and its portrait live on that device.

`letstalk serve --device cuda:0,cuda:1` (or `cuda:all`) serves through one; an application can hold one too:

    pool = EnginePool([StreamEngine(LetsTalkPipeline.from_pretrained(device=d)) for d in ("cuda:0", "cuda:1")])
    async with pool:
        session = await pool.open_session(photo)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import LetsTalkError
from ..pipeline import Portrait
from .engine import CapacityError, Session, StreamEngine


class EnginePool:
    """Engines of the same model on different devices, used as one: `open_session` picks the engine."""

    def __init__(self, engines: Sequence[StreamEngine]) -> None:
        if not engines:
            raise LetsTalkError("an EnginePool needs at least one engine")
        first = engines[0].pipeline
        for e in engines[1:]:
            p = e.pipeline
            if (p.config.image_size, p.fps, p.config.audio.sample_rate, p.num_steps) != \
                    (first.config.image_size, first.fps, first.config.audio.sample_rate, first.num_steps):
                raise LetsTalkError(f"the engines of one pool run one model: {p.device} runs {p.config.image_size} px "
                                    f"at {p.fps} fps with {p.num_steps} step(s), {first.device} "
                                    f"{first.config.image_size} px at {first.fps} fps with {first.num_steps}")
        self.engines = list(engines)
        # the model's configuration, and where a portrait is prepared before its session has an engine (an avatar
        # uploaded once): open_session moves its latent to the chosen engine's device
        self.pipeline = first

    @property
    def max_sessions(self) -> int:
        return sum(e.config.max_sessions for e in self.engines)

    @property
    def sessions(self) -> dict[str, Session]:
        """Every open session of every engine, by id (a new dict: read it, do not change it)."""
        return {sid: s for e in self.engines for sid, s in e.sessions.items()}

    def choose(self) -> StreamEngine | None:
        """The engine a new session goes to: the most free slots, the first of those tied, passing over an engine
        whose last window failed (`StreamEngine.failing`) while another has a slot; None when all are full."""
        best = max(self.engines, key=lambda e: (e.free_slots() > 0 and not e.failing, e.free_slots()))
        return best if best.free_slots() > 0 else None

    async def open_session(self, portrait: np.ndarray | Portrait, seed: int = 0, detect_face: bool = True,
                           session_id: str | None = None, **kwargs) -> Session:
        """`StreamEngine.open_session` on the engine `choose` names (CapacityError when every one is full)."""
        if session_id is not None and any(session_id in e.sessions for e in self.engines):
            raise LetsTalkError(f"session id {session_id!r} is already in use")
        engine = self.choose()
        if engine is None:
            raise CapacityError(f"all {self.max_sessions} sessions of this pool's {len(self.engines)} engine(s) are "
                                "in use; retry later")
        return await engine.open_session(portrait, seed=seed, detect_face=detect_face, session_id=session_id,
                                         **kwargs)

    async def start(self) -> EnginePool:
        # One after the other: a warm-up times the windows it chooses threads and noise draws by, and another
        # device's warm-up beside it (its host work, the GIL) would make them read slower than they run.
        for e in self.engines:
            await e.start()
        return self

    async def stop(self) -> None:
        for e in self.engines:
            await e.stop()

    async def __aenter__(self) -> EnginePool:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
