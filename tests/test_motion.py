"""A session's motion carried to another session (letstalk_rt/stream/motion.py): the engine's side, and its bytes.

The server's GET / PUT .../motion are in test_server.py, the SDK's and the pages' moves that carry it in
test_client.py and test_browser.py."""

from __future__ import annotations

import pytest
import torch

from conftest import speechlike
from letstalk_rt.errors import InputError, LetsTalkError
from letstalk_rt.memory import MemoryBank
from letstalk_rt.stream import EngineConfig, Motion, StreamEngine
from server_helpers import run
from test_recording import _portrait


async def _say(session, seconds: float, seed: int = 0) -> list:
    """The frames `session` (unpaced) shows saying `seconds` of speech."""
    session.push_audio(speechlike(seconds, seed=seed), ahead=True)
    session.end_speech()
    shown = []
    async for frame in session.frames():
        shown.append(frame)
        if session.audio_shown:
            return shown


def test_a_session_goes_on_from_the_frames_another_showed_last(tiny_pipeline, second_pipeline, monkeypatch):
    """motion() is the latents of the frames shown last; a session given them (continue_from, through its bytes)
    generates its first window from them, not from the portrait alone, on its own device's engine too (the copy of
    the same model an EnginePool's other device holds: a move off a hung device); its frames then differ from a fresh
    session's with the same seed and speech, and are the same for two sessions given the same motion."""
    conditioned = []  # (bank, its carried latents) at each window's conditioning
    condition = MemoryBank.condition

    def recording(self, *args, **kwargs):
        conditioned.append((self, None if self.latents is None else self.latents.clone()))
        return condition(self, *args, **kwargs)

    monkeypatch.setattr(MemoryBank, "condition", recording)

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        other = await StreamEngine(second_pipeline, EngineConfig(warmup=False)).start()
        try:
            portrait = _portrait(tiny_pipeline, 40)
            a = await engine.open_session(portrait)
            a.unpace()
            with pytest.raises(LetsTalkError, match="shown no frame yet"):
                a.motion()
            shown = await _say(a, 1.0)
            motion = a.motion()
            carried = Motion.from_bytes(motion.to_bytes())
            assert torch.equal(carried.latents, motion.latents)
            assert (carried.model, carried.portrait) == (motion.model, motion.portrait)
            assert torch.equal(motion.latents[-1], shown[-1].latent)  # the frame on screen is the last
            await a.close()

            firsts = {}
            for name, on, given in (("carried", engine, carried), ("again", other, carried), ("fresh", engine, None)):
                s = await on.open_session(portrait, seed=3)
                s.unpace()
                if given is not None:
                    s.continue_from(given)
                frames = await _say(s, 0.5, seed=1)
                mine = [latents for bank, latents in conditioned if bank is s._w.stream.memory]
                # (a window the worker began before continue_from is not shown: the one after starts from the motion)
                firsts[name] = (frames[0].video, mine[0] if given is None else next(z for z in mine if z is not None))
                await s.close()
            return motion, firsts
        finally:
            await engine.stop()
            await other.stop()

    motion, firsts = run(main())
    num_carried = firsts["carried"][1].shape[0]
    assert torch.equal(firsts["carried"][1], motion.latents[-num_carried:])  # the first window's memory: A's frames
    assert torch.equal(firsts["again"][1], motion.latents[-num_carried:])
    assert firsts["fresh"][1] is None  # a fresh session's first window: the portrait alone
    assert (firsts["carried"][0] == firsts["again"][0]).all()
    assert (firsts["carried"][0] != firsts["fresh"][0]).any()


def test_a_motion_is_refused_for_another_portrait_model_or_shape_and_while_speech_is_unshown(tiny_pipeline):
    """continue_from() says why it cannot: the motion of another portrait or model, latents of another shape (the
    session is left as it was), or speech pushed and not yet shown (between utterances only)."""
    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            a = await engine.open_session(_portrait(tiny_pipeline, 40))
            a.unpace()
            await _say(a, 0.5)
            motion = a.motion()
            other_face = await engine.open_session(_portrait(tiny_pipeline, 200))
            with pytest.raises(InputError, match="another portrait"):
                other_face.continue_from(motion)
            same = await engine.open_session(_portrait(tiny_pipeline, 40))
            with pytest.raises(InputError, match="another model"):
                same.continue_from(Motion(motion.latents, "0" * 16, motion.portrait))
            with pytest.raises(InputError, match="latents are"):
                same.continue_from(Motion(motion.latents[:, :, :2], motion.model, motion.portrait))
            assert same._reset is None  # nothing changed by a refusal
            same.push_audio(speechlike(0.5))
            with pytest.raises(LetsTalkError, match="speech not yet shown"):
                same.continue_from(motion)
            same.interrupt()
            restarts = []  # (read as they are given: the worker thread may take them at once)
            restart = same._restart
            same._restart = lambda latents: restarts.append(latents) or restart(latents)
            same.continue_from(motion)  # (nothing left unshown)
            assert torch.equal(torch.stack(restarts[-1]), motion.latents[-same.player.recent_latents.maxlen:])
        finally:
            await engine.stop()

    run(main())


def _bytes_with(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated", "format", "no digests", "two tensors", "dtype",
                                  "dims", "nan", "huge", "too long"])
def test_bytes_that_are_not_a_motion_are_refused_saying_so(case):
    good = Motion(torch.randn(2, 4, 2, 2), "a" * 16, "b" * 16)
    meta = {"format": "letstalk-motion/1", "model": good.model, "portrait": good.portrait}
    data = {
        "empty": b"",
        "garbage": b"\x00" * 40,
        "truncated": good.to_bytes()[:-8],
        "format": _bytes_with({"latents": good.latents}, {**meta, "format": "other/1"}),
        "no digests": _bytes_with({"latents": good.latents}, {"format": meta["format"]}),
        "two tensors": _bytes_with({"latents": good.latents, "x": good.latents.clone()}, meta),
        "dtype": _bytes_with({"latents": good.latents.half()}, meta),
        "dims": _bytes_with({"latents": good.latents[0].clone()}, meta),
        "nan": _bytes_with({"latents": good.latents * float("nan")}, meta),
        "huge": _bytes_with({"latents": good.latents * 1e9}, meta),
        "too long": good.to_bytes() + b" " * (1 << 20),
    }[case]
    with pytest.raises(InputError, match="motion"):
        Motion.from_bytes(data)
    assert torch.equal(Motion.from_bytes(good.to_bytes()).latents, good.latents)
