"""Text to speech (letstalk_rt.tts, espeak-ng): sentences, voices, the engine's say(), the server's `say`, the SDK,
`letstalk generate --text`."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal

import aiohttp
import numpy as np
import pytest

from conftest import speech_out
from letstalk_rt import tts
from letstalk_rt.errors import InputError
from letstalk_rt.tts import Speech, SpeechUnavailable, sentences
from server_helpers import collect_media, running_server

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (apt-get install espeak-ng); text is spoken with it")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.fixture
def no_espeak(monkeypatch):
    """espeak-ng gone from this machine, as on a server installed without it."""
    tts._voice_rows.cache_clear()
    tts.installed_variants.cache_clear()
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    yield
    tts._voice_rows.cache_clear()
    tts.installed_variants.cache_clear()


def test_text_is_cut_after_each_sentence_and_long_sentences_at_a_comma_or_space():
    assert sentences("Hello there!  How are you?\nFine, thanks.  ...") == ["Hello there!", "How are you?",
                                                                          "Fine, thanks."]
    assert sentences("3.5 apples, e.g. two") == ["3.5 apples, e.g.", "two"]  # a cut needs a space after the stop
    long = "one two three, " * 30  # 450 characters, no full stop
    pieces = sentences(long, most=100)
    assert all(len(p) <= 100 for p in pieces) and all(p.endswith(",") for p in pieces[:-1])
    assert " ".join(pieces).split() == long.split()  # nothing lost or repeated
    assert sentences("x" * 250, most=100) == ["x" * 100, "x" * 100, "x" * 50]  # no space at all: cut anyway
    assert sentences(" ... ?! \n ") == []


def test_speech_is_synthesised_at_16_khz_and_its_length_follows_the_text_and_rate():
    short, longer = Speech().synthesize("Hello."), Speech().synthesize("Hello there, how are you today?")
    assert short.dtype == np.float32 and 0.1 < np.abs(short).max() <= 1.0
    assert 0.3 < len(short) / 16000 < 1.5 and len(longer) > 2 * len(short)
    slow = Speech(rate=100).synthesize("Hello there, how are you today?")
    assert len(slow) > 1.4 * len(longer)
    # a text that looks like an option is spoken, not read as one (espeak-ng takes it on stdin)
    assert len(Speech().synthesize("-v xx --help")) > 8000


@pytest.mark.parametrize("has_d", [True, False])
def test_espeak_ng_is_asked_for_its_deterministic_mode_where_it_has_one(tmp_path, monkeypatch, has_d):
    """espeak-ng 1.52 seeds the noise of its breathy voices anew each run unless given `-D` (on Debian sid the same
    text came out two ways in 60 runs, and the synthetic corpus was not a function of its seed); 1.51 is deterministic
    without it and has no `-D`. A stand-in espeak-ng (the real one behind it) whose help lists `-D` is given it, one
    whose help does not is not, and both speak."""
    real, calls = shutil.which("espeak-ng"), tmp_path / "calls"
    fake = tmp_path / "espeak-ng"
    fake.write_text(f"""#!/bin/bash
if [ "$1" = --help ]; then
  echo "-b	   Input text encoding"{'; echo "-D	   Enable deterministic random mode"' if has_d else ''}
  exit 0
fi
echo "$*" >> {calls}
args=(); for a in "$@"; do [ "$a" = -D ] || args+=("$a"); done
exec {real} "${{args[@]}}"
""")
    fake.chmod(0o755)
    caches = (tts.deterministic_flags, tts._voice_rows, tts.installed_variants)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(tts.shutil, "which", lambda name: str(fake))
    try:
        assert tts.deterministic_flags() == (("-D",) if has_d else ())
        pcm = Speech(voice="en-us+f5").synthesize("Right life man autumn hand yellow.")
    finally:
        for cache in caches:
            cache.cache_clear()
    spoken = [line.split() for line in calls.read_text().splitlines() if "--stdout" in line]
    assert len(spoken) == 1 and ("-D" in spoken[0]) == has_d
    assert len(pcm) > 8000


def test_voices_are_checked_against_what_espeak_ng_has():
    ids = {v["id"] for v in tts.voices()}
    assert "en-us" in ids and len(ids) > 20
    for ok in ("en-us", "fr", "en", "en-us+f3"):  # "fr", "en": codes a listed voice also answers to
        assert Speech(ok).voice == ok
    with pytest.raises(InputError, match="no language 'xx'.*espeak-ng --voices"):
        Speech("xx")
    # an unknown variant would be spoken with the default timbre without a word: refused instead
    with pytest.raises(InputError, match="no variant 'nobody'"):
        Speech("en-us+nobody")
    for bad in ({"rate": 20}, {"pitch": 100}, {"rate": 1.5}, {"voice": ""}):
        with pytest.raises(InputError):
            Speech(**bad)
    with pytest.raises(InputError, match="at most 5000"):
        Speech().speak("word " * 1001)
    with pytest.raises(InputError, match="no words"):
        Speech().speak("?!")


def test_without_espeak_ng_it_says_how_to_install_it(no_espeak):
    with pytest.raises(SpeechUnavailable, match="apt-get install espeak-ng"):
        Speech()


# -- the engine


def _tiny_session(pipe, seed: int, **config):
    from letstalk_rt.stream import EngineConfig, StreamEngine

    async def open_():
        engine = await StreamEngine(pipe, EngineConfig(warmup=False, **config)).start()
        rng = np.random.default_rng(seed)
        portrait = pipe.prepare_portrait(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), detect=False)
        return engine, await engine.open_session(portrait)

    return open_()


async def _frames_until_quiet(session, most_s: float, quiet_s: float = 1.0) -> list:
    """Frames until `quiet_s` without speech after some speech (or `most_s` in all)."""
    out, quiet = [], 0
    async for frame in session.frames():
        out.append(frame)
        quiet = 0 if frame.speech else quiet + 1
        if len(out) >= most_s * 25 or (quiet >= quiet_s * 25 and any(f.speech for f in out)):
            return out
    return out


def _position(audio: np.ndarray, pcm: np.ndarray) -> int:
    """Where `pcm` (its first loud stretch onwards) lies sample-exact in `audio` (to a float rounding or two where
    `speech_out` undid a fade-in), or -1."""
    first = int(np.flatnonzero(np.abs(pcm) > 0.01)[0])
    for i in np.flatnonzero(np.isclose(audio, pcm[first], rtol=1e-6, atol=0)):
        part = audio[i:i + len(pcm) - first]
        if len(part) == len(pcm) - first and np.allclose(part, pcm[first:], rtol=1e-6, atol=0):
            return int(i)
    return -1


def test_say_speaks_each_sentence_in_order_and_a_second_say_follows_the_first(tiny_pipeline):
    speech = Speech("en-us", rate=220)
    first, second = "Hello there. Good day.", "Bye now."

    async def main():
        engine, session = await _tiny_session(tiny_pipeline, 1)
        session.unpace()  # every frame read, however busy the machine (a paced reader behind skips frames)
        one, two = session.say(first, speech), session.say(second, speech)
        frames = await _frames_until_quiet(session, 12.0)
        seconds = await one, await two
        await engine.stop()
        events = []
        async for event in session.events():
            events.append(event)
        return frames, seconds, events

    frames, seconds, events = run(main())
    audio = np.concatenate([f.audio for f in frames])
    texts = ["Hello there.", "Good day.", "Bye now."]
    spoken = [speech.synthesize(p) for p in texts]
    where = [_position(audio, pcm) for pcm in spoken]
    # each sentence's caption comes with the frame its audio starts in, and as an event when that frame is shown
    starts = [w - int(np.flatnonzero(np.abs(pcm) > 0.01)[0]) for w, pcm in zip(where, spoken)]
    assert [(i, f.captions) for i, f in enumerate(frames) if f.captions] == [
        (start // 640, (text,)) for start, text in zip(starts, texts)]
    captions = [e for e in events if e.type == "caption"]
    assert [e.text for e in captions] == texts
    assert [b.frame - a.frame for a, b in zip(captions, captions[1:])] == [
        b // 640 - a // 640 for a, b in zip(starts, starts[1:])]
    assert -1 not in where and where == sorted(where), where  # every sentence whole, sample-exact, in order
    assert where[1] == where[0] + len(spoken[0]) - int(np.flatnonzero(np.abs(spoken[0]) > 0.01)[0]) + \
        int(np.flatnonzero(np.abs(spoken[1]) > 0.01)[0])  # one say()'s sentences back to back
    assert seconds[0] == pytest.approx((len(spoken[0]) + len(spoken[1])) / 16000)
    assert seconds[1] == pytest.approx(len(spoken[2]) / 16000)


def test_interrupt_drops_the_sentences_not_yet_spoken_and_say_goes_on_after_it(tiny_pipeline):
    speech = Speech("en-us", rate=220)
    text = " ".join(f"This is sentence number {n}." for n in range(1, 9))  # ~12 s

    async def main():
        # at most 3 s queued: the say() is still making room for its later sentences when the interrupt comes
        # (every frame read and its speech whole, however busy the machine: a reader up to 10 s behind skips nothing,
        # and a session late is not caught up by playing its speech faster)
        engine, session = await _tiny_session(tiny_pipeline, 2, max_pending_seconds=3.0, late_skip_ms=10000,
                                              catch_up=False)
        task = session.say(text, speech)
        before, speaking = [], 0
        async for frame in session.frames():
            before.append(frame)
            speaking += frame.speech
            if speaking >= 25:  # a second of it shown
                break
        session.interrupt()
        after_interrupt = await _frames_until_quiet(session, 2.0, quiet_s=2.0)
        await asyncio.sleep(0)
        cancelled = task.cancelled()
        again = session.say("Still here.", speech)
        after = await _frames_until_quiet(session, 6.0)
        await again
        await engine.stop()
        captions = [e.text async for e in session.events() if e.type == "caption"]
        return after_interrupt, after, cancelled, captions

    after_interrupt, after, cancelled, captions = run(main())
    assert cancelled
    # what was said before the interrupt, and nothing of what was dropped
    # (a second of speech is shown before the interrupt: the first sentence, ~1.5 s, at most the start of another)
    assert captions[-1] == "Still here." and 1 <= len(captions) - 1 <= 2
    assert captions[:-1] == [f"This is sentence number {n}." for n in range(1, len(captions))]
    # nothing of the rest of the text: not queued, not synthesised (the first frame read is the one due when the
    # interrupt came, already on screen)
    assert not any(f.speech for f in after_interrupt[1:])
    audio = speech_out(after, drop_held=True)  # a held frame (generation late) is silent
    assert _position(audio, speech.synthesize("Still here.")) >= 0


def test_say_checks_its_text_and_voice_before_anything_is_spoken(tiny_pipeline):
    async def main():
        engine, session = await _tiny_session(tiny_pipeline, 3)
        with pytest.raises(InputError, match="non-empty"):
            session.say("   ")
        with pytest.raises(InputError, match="no language"):
            session.say("Hello.", Speech("xx"))
        with pytest.raises(InputError, match="no language 'xx'"):  # a voice alone is checked now too (its task
            session.say("Hello.", "xx")  # failed later, with nobody awaiting it)
        with pytest.raises(InputError, match="must be a Speech or a voice"):
            session.say("Hello.", 3)
        from letstalk_rt.stream.engine import MAX_SAYING

        waiting = [session.say("Hello.") for _ in range(MAX_SAYING)]
        with pytest.raises(InputError, match="already waiting"):
            session.say("Hello.")
        session.interrupt()  # drops them all: say() takes text again
        await asyncio.wait(waiting)
        assert all(task.cancelled() for task in waiting[1:])
        session.say("Hello.")
        await session.close()
        from letstalk_rt.stream.engine import SessionClosedError

        with pytest.raises(SessionClosedError):
            session.say("Hello.")
        await engine.stop()

    run(main())


# -- the server and the SDK


def test_sdk_say_speaks_through_the_server_and_its_errors_come_back_as_exceptions(tiny_pipeline):
    from letstalk_rt.client import AvatarClient, AvatarClientError, RequestError

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                voices = await client.voices()
                assert {"id": "en-us", "name": "English_(America)"} in voices
                session = await client.start_session()
                await session.connect()
                _, chunks, readers = collect_media(session)
                answer = await session.say("Hello there. How are you?", voice="en-us+f3", rate=200)
                assert answer["sentences"] == 2 and answer["voice"] == "en-us+f3"
                types, captions = [], []
                async for event in session.events():
                    types.append(event["type"])
                    if event["type"] == "caption":  # each sentence as its audio starts playing: subtitles
                        captions.append(event["text"])
                    if len(captions) == 2:
                        break
                assert captions == ["Hello there.", "How are you?"] and "speech_started" in types
                with pytest.raises(AvatarClientError, match="no language 'xx'"):
                    await session.say("Hello.", voice="xx")
                with pytest.raises(AvatarClientError, match="at most 5000"):
                    await session.say("word " * 1001)
                # the same websocket goes on after a refused say
                assert (await session.say("Hé, ça va ? Très bien.", voice="fr"))["sentences"] == 2
                # a session's own voice: its says speak with it unless they name another; a bad one is refused at once
                with pytest.raises(RequestError, match="voice 'xx': espeak-ng here has no language"):
                    await client.start_session(voice="xx")
                french = await client.start_session(voice="fr")
                assert french.info["voice"] == "fr" and (await french.say("Bonjour."))["voice"] == "fr"
                assert (await french.say("Hello.", voice="en-us"))["voice"] == "en-us"
                await french.close()
                assert (await client.metrics())["letstalk_says_total"] == 4  # the refused ones are not counted
                await session.close()
                await asyncio.gather(*readers)
                return chunks

    chunks = run(main())
    assert max(float(np.abs(c.pcm).max()) for c in chunks) > 1000  # the said speech came back as sound


def test_say_over_the_websocket_answers_bad_requests_with_their_id_and_a_missing_espeak_with_its_fix(
        tiny_pipeline, no_espeak):
    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{srv.url}/v1/voices") as resp:
                    assert resp.status == 503 and "apt-get install espeak-ng" in (await resp.json())["error"]
                async with http.post(f"{srv.url}/v1/sessions", json={"avatar_id": "default"}) as resp:
                    info = await resp.json()
                async with http.ws_connect(info["ws_url"], params={"token": info["token"]}) as ws:
                    await ws.send_str(json.dumps({"type": "say", "text": "Hello.", "id": 7}))
                    await ws.send_str(json.dumps({"type": "say", "id": "x"}))
                    errors = []
                    while len(errors) < 2:
                        event = json.loads((await ws.receive()).data)
                        if event["type"] == "error":
                            errors.append(event)
                return errors

    errors = run(main())
    assert errors[0]["id"] == 7 and errors[0]["code"] == "tts_unavailable" and "espeak-ng" in errors[0]["message"]
    assert errors[1]["id"] == "x" and errors[1]["code"] == "bad_message" and "non-empty" in errors[1]["message"]


# -- the command line


def test_generate_speaks_text_into_an_mp4_of_its_length(capsys, tmp_path, tiny_model_dir, astronaut_png):
    from letstalk_rt.cli import main
    from letstalk_rt.media import probe

    out = tmp_path / "said.mp4"
    sigterm = signal.getsignal(signal.SIGTERM)
    code = main(["generate", "--portrait", str(astronaut_png), "--text", "Hello there. Nice to meet you.",
                 "--voice", "en-us+m3", "--rate", "200", "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is sigterm  # its SIGTERM handling is the command's own: put back after
    pcm, said = Speech("en-us+m3", 200).speak_timed("Hello there. Nice to meet you.")
    seconds = len(pcm) / 16000
    info = probe(out)
    assert info.video_frames == math.ceil(seconds * 25) and abs(info.audio_seconds - seconds) <= 0.04
    # its captions beside it: each sentence while it is spoken, the second from where its audio starts
    assert said[0] == (0, "Hello there.") and said[1][1] == "Nice to meet you." and 0.3 < said[1][0] / 16000 < 2.0
    ms = round(said[1][0] / 16000 * 25) * 40
    second = f"00:00:{ms // 1000:02d}.{ms % 1000:03d}"
    end = round(seconds * 25) * 40
    assert (tmp_path / "said.vtt").read_text() == (
        f"WEBVTT\n\n1\n00:00:00.000 --> {second}\nHello there.\n\n"
        f"2\n{second} --> 00:00:{end // 1000:02d}.{end % 1000:03d}\nNice to meet you.\n\n")
    code = main(["generate", "--portrait", str(astronaut_png), "--text", "Hello.", "--voice", "xx",
                 "--out", str(tmp_path / "no.mp4"), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 2 and "no language 'xx'" in capsys.readouterr().err and not (tmp_path / "no.mp4").exists()


def test_tts_stream_example_speaks_through_say_and_through_its_own_tts(tiny_pipeline, capsys):
    """client_examples/tts_stream.py as a user runs it: the server's `say`, then PCM from a TTS of its own sent
    ahead of real time; the avatar comes back either way."""
    from conftest import client_example

    example = client_example("tts_stream")

    async def main():
        async with running_server(tiny_pipeline) as srv:
            common = ["--server", srv.url, "--text", "Hello there. Bye now.", "--linger", "1.5"]
            said = await example.run(example.parse_args(common))
            own = await example.run(example.parse_args([*common, "--own-tts", "--voice", "en-us+f3"]))
            return said, own

    said, own = run(main())
    out = capsys.readouterr().out
    assert "said 'Hello there.'" in out and "said 'Bye now.'" in out and "sentence 2:" in out
    assert out.index("sentence 2:") < out.index("all shown (audio_shown)")
    assert "event speech_started" in out and "event error" not in out
    for received in (said, own):
        assert received["video"] >= 25 and received["audio"] >= 50
