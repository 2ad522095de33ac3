"""The Python SDK (letstalk_rt.client) against a live server on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
import torch
from aiohttp import web
from aiortc import RTCSessionDescription
from conftest import speechlike
from server_helpers import (
    SpeechTrack,
    collect_media,
    cut_network,
    hang,
    lose_packets,
    run,
    running_server,
    turn_server,
    two_device_server,
    wait_until,
)


def test_sdk_needs_no_engine():
    """The SDK and what it shows frames on import in an install without the engine (`pip install letstalk-rt`: no
    torch nor the engine's other packages)."""
    from without_engine import PRELUDE

    code = PRELUDE + ("import letstalk_rt.client, letstalk_rt.devices, letstalk_rt.framing, letstalk_rt.media\n"
                      "from letstalk_rt.stream import FileSource, MicrophoneSource, Event\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sdk_streams_speech_and_receives_frames_audio_and_events(tiny_pipeline):
    """start_session -> connect (WebRTC) -> send_audio over the websocket -> frames, audio and events
    (callbacks and the iterator) -> interrupt -> close frees the server's session."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                assert (await client.health())["status"] == "ok"
                assert [a["id"] for a in await client.avatars()] == ["default"]
                session = await client.start_session(avatar_id="default", seed=3)
                seen: list[str] = []
                session.on("speech_started", lambda ev: seen.append(ev["type"]))

                @session.on("*")
                async def count(ev):  # coroutine callbacks run as tasks
                    seen.append("any")

                await session.connect()
                frames, chunks, readers = collect_media(session)
                speech = speechlike(1.5)
                for i in range(0, len(speech), 1600):  # 100 ms chunks, float32, at real-time pace
                    await session.send_audio(speech[i:i + 1600], sample_rate=16000)
                    await asyncio.sleep(0.1)
                await session.end_speech()
                types = []
                async for event in session.events():
                    types.append(event["type"])
                    if event["type"] == "speech_stopped":
                        break
                assert "ready" in types and "speech_started" in types
                rtt = await session.ping()
                assert 0 <= rtt < 2
                await session.send_audio((speechlike(2.0, 48000) * 32767).astype(np.int16), sample_rate=48000)
                await session.interrupt()
                async for event in session.events():
                    if event["type"] == "interrupted":
                        break
                stats = await session.stats()
                assert stats["peer_connection"] == "connected" and stats["websocket"] is True
                assert stats["stats"]["frames_generated"] > 0
                await session.close()
                await asyncio.gather(*readers)  # the iterators end when the connection closes
                counts = session.frames_received
                assert not srv.manager.sessions
                return frames, chunks, seen, counts

    frames, chunks, seen, counts = run(main())
    assert len(frames) >= 25 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    assert len(chunks) >= 50 and chunks[0].sample_rate == 48000 and chunks[0].pcm.dtype == np.int16
    assert max(float(np.abs(c.pcm).max()) for c in chunks) > 300  # the speech came back as audio
    assert "speech_started" in seen and seen.count("any") > 3
    assert counts["video"] >= len(frames)


def test_sdk_knows_when_the_audio_it_sent_has_been_shown(tiny_pipeline):
    """AvatarSession.audio_shown: False from a send until an audio_played event covers its last message (the server
    counts the messages it got; an event for earlier audio must not end a later utterance); True at once after
    interrupt(), and the count goes on right after it."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline, engine_config={"max_pending_seconds": 12.0}) as srv, \
                AvatarClient(srv.url) as client:
            session = await client.start_session()
            played: list[tuple[float, dict]] = []
            session.on("audio_played", lambda ev: played.append((time.monotonic(), ev)))
            await session.connect()
            assert session.max_queued_seconds == 12.0  # the server's, said in its `ready`
            frames, chunks, readers = collect_media(session, timed=True)
            await wait_until(lambda: len(frames) >= 10, 20, "frames")
            assert session.audio_shown  # nothing sent
            speech = speechlike(1.0)
            await session.send_audio(speech, ahead=True)
            await session.end_speech()
            sent_first = time.monotonic()
            assert not session.audio_shown
            await wait_until(lambda: played, 20, "the first utterance played")
            # a second utterance sent as the first ends: the first's event (already here) does not cover it
            await session.send_audio(speechlike(1.5, seed=1), ahead=True)
            await session.send_audio(speechlike(0.5, seed=2), ahead=True)  # two messages: 0.5 s each at most
            await session.end_speech()
            sent_second = time.monotonic()
            await asyncio.sleep(0.3)
            early = session.audio_shown
            assert await session.wait_audio_shown(timeout=20), "the second utterance played"
            shown_second = time.monotonic()
            await session.send_audio(speechlike(3.0, seed=3), ahead=True)
            assert not session.audio_shown
            await session.interrupt()
            after_interrupt = session.audio_shown
            await session.send_audio(speechlike(0.5, seed=4), ahead=True)
            await session.end_speech()
            counted_on = not session.audio_shown
            await wait_until(lambda: session.audio_shown, 20, "the speech after the interrupt played")
            ss = srv.manager.sessions[session.id]
            server_counts = ss.audio_messages, ss.audio_messages_played
            await session.send_audio(speechlike(0.5, seed=5), ahead=True)
            await srv.manager.close(ss, "ended by the operator")  # no audio_played can come: the wait says so
            assert not await session.wait_audio_shown(timeout=20)
            await session.close()
            await asyncio.gather(*readers)
            return (played, sent_first, sent_second, early, shown_second, after_interrupt, counted_on,
                    server_counts)

    played, sent_first, sent_second, early, shown_second, after_interrupt, counted_on, server_counts = run(main())
    assert played[0][0] - sent_first >= 0.9  # a second of speech plays for a second
    assert not early and shown_second - sent_second >= 1.9  # 2 s more: not ended by the first utterance's event
    assert played[0][1]["audio_messages"] == 2  # 1 s of 16 kHz audio goes in two 0.5-s messages
    assert after_interrupt and counted_on
    assert server_counts == (2 + 4 + 6 + 1, 13)


def test_sdk_sends_a_local_audio_track_and_uploads_a_portrait(tiny_pipeline, astronaut_png):
    from aiortc import VideoStreamTrack

    from letstalk_rt.client import AvatarClient, AvatarNotFoundError, RequestError
    from letstalk_rt.media import load_image

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                session = await client.start_session(portrait=astronaut_png)
                started = asyncio.Event()
                session.on("speech_started", lambda ev: started.set())
                with pytest.raises(ValueError, match="expected an audio track, got a video one"):
                    await session.connect(audio_track=VideoStreamTrack())  # refused before anything is opened
                await session.connect(audio_track=SpeechTrack(1.5))
                await asyncio.wait_for(started.wait(), 20)
                same = await client.start_session(portrait=astronaut_png.read_bytes())
                assert same.id != session.id and len(srv.manager.sessions) == 2
                # uploaded once, opened by id
                photo = load_image(astronaut_png)  # a picture in memory, as open_session takes one
                made = await client.create_avatar(photo, name="Astro", avatar_id="astro")
                assert made["id"] == "astro" and made in await client.avatars()
                on_avatar = await client.start_session(avatar_id="astro")
                assert on_avatar.info["video"]["width"] == 32 and len(srv.manager.sessions) == 3
                await client.delete_avatar("astro")
                with pytest.raises(AvatarNotFoundError, match="HTTP 404.*does not exist"):
                    await client.delete_avatar("astro")
                with pytest.raises(RequestError, match="HTTP 415.*not an image"):
                    await client.create_avatar(b"not an image")
            await wait_until(lambda: not srv.manager.sessions, 10, "the client's sessions to be closed")

    run(main())


def test_a_portrait_held_in_memory_is_uploaded_with_its_pixels_as_they_are(tmp_path):
    """An RGB, RGBA or grey uint8 array, or a PIL image, goes up as a PNG the server decodes to the same pixels;
    what cannot be a picture is refused before anything is sent, and a path that is not a file says what to give
    (one line for `letstalk generate --server`, not a traceback)."""
    from PIL import Image

    from letstalk_rt.client import _upload
    from letstalk_rt.errors import InputError
    from server.app import decode_image

    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for given, seen in ((rgb, rgb), (Image.fromarray(rgb), rgb), (rgb[..., 1], np.repeat(rgb[..., 1:2], 3, 2)),
                        (rgb[..., :1], np.repeat(rgb[..., :1], 3, 2)),
                        (np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), rgb)):
        data, name = _upload("portrait", given)
        assert name == "portrait.png"
        np.testing.assert_array_equal(decode_image(data, 10**6), seen)
    with pytest.raises(ValueError, match="must be uint8"):
        _upload("portrait", rgb / 255.0)
    with pytest.raises(TypeError, match="portrait must be a path, image bytes"):
        _upload("portrait", 42)
    with pytest.raises(TypeError, match="audio must be a path or bytes"):
        _upload("audio", rgb)
    with pytest.raises(InputError, match=r"image file '.*nope.png' does not exist; give a PNG/JPEG"):
        _upload("portrait", tmp_path / "nope.png")
    with pytest.raises(InputError, match=r"audio file '.*' is a directory; give a WAV/MP3"):
        _upload("audio", str(tmp_path))


def test_sdk_full_frame_session_receives_the_whole_photo(tiny_pipeline, astronaut_png):
    """start_session(full_frame=N): the server answers with the whole photo's size, fit to N, and the video that
    arrives over WebRTC is the photo: away from the face, what the peer receives is the photo itself. The same face
    small in a wide scene is framed head and shoulders (its square a third of the frames' height), or shown in the
    whole scene with framing=0."""
    import io

    from PIL import Image

    from letstalk_rt.client import AvatarClient

    photo = Image.open(astronaut_png).convert("RGB").crop((0, 0, 512, 384))  # 4:3, the face near the top centre
    upload = io.BytesIO()
    photo.save(upload, format="PNG")
    expected = np.asarray(photo.resize((96, 72), Image.LANCZOS)).astype(int)
    scene = Image.new("RGB", (2048, 1152), (90, 90, 90))
    scene.paste(Image.open(astronaut_png).convert("RGB").resize((400, 400)), (1200, 250))
    wide = io.BytesIO()
    scene.save(wide, format="PNG")

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                boxes = []
                for framing in (None, 0):
                    small = await client.start_session(portrait=wide.getvalue(), full_frame=192, framing=framing)
                    boxes.append(small.info["video"]["face_box"])
                    await small.close()
                (x, y, w, h), whole = boxes
                assert abs(h - 108 / 3) <= 2 and abs(x + w / 2 - 96) <= 2 and whole[2] < 0.5 * w, boxes
                session = await client.start_session(portrait=upload.getvalue(), full_frame=96)
                video = dict(session.info["video"])
                x, y, w, h = video.pop("face_box")  # the face's square, found in the photo, in the frame's pixels
                assert video == {"width": 96, "height": 72, "fps": 25}
                assert 15 <= x <= 30 and 0 <= y <= 5 and 35 <= w <= 50 and abs(w - h) <= 1, (x, y, w, h)
                await session.connect()
                frames = []
                async for frame in session.video_frames():
                    frames.append(frame)
                    if len(frames) == 10:
                        break
                await session.close()
                return frames

    frames = run(main())
    assert {f.shape for f in frames} == {(72, 96, 3)}
    corner = np.abs(frames[-1][40:, :16].astype(int) - expected[40:, :16])  # the flag, left of the face's square
    assert corner.mean() < 12, corner.mean()  # the photo, through VP8 at 96 x 72


def test_sdk_connects_through_the_servers_turn_relay_with_credentials_made_per_session(tiny_pipeline, tmp_path,
                                                                                       caplog):
    """A server given a TURN server and its shared secret hands each session its own time-limited credentials; a
    client allowed only relayed candidates connects through the (real, coturn) relay with them and gets the avatar.
    With credentials made from a wrong secret, the relay refuses them: a relay-only connect() says so at once, and
    a client that may connect directly still does, both ends warning that the relay gave no address."""
    from letstalk_rt.client import AvatarClient, AvatarClientError

    async def main(turn, secret):
        async with running_server(tiny_pipeline, ice_servers=[turn.url], turn_secret=secret, turn_ttl_s=600) as srv:
            async with AvatarClient(srv.url, relay_only=True) as client:
                session = await client.start_session()
                if secret != turn.secret:
                    with pytest.raises(AvatarClientError, match="relay only: the TURN server .* refused the cred"):
                        await session.connect()
                    assert session.pc is None
                    async with AvatarClient(srv.url) as direct:  # not relay only: reaches the server directly
                        other = await direct.start_session()
                        await other.connect()
                        assert other.route() == {"local": "host", "remote": "host"}
                        assert (await other.stats())["route"] == {"local": "host", "remote": "host"}
                        counted = await direct.metrics()
                        assert counted['letstalk_peer_connections_total{route="direct"}'] == 1
                        assert counted['letstalk_peer_connections_total{route="relay"}'] == 0
                        await other.close()
                    return session.info, None, None
                await session.connect()
                frames = []
                async for frame in session.video_frames():
                    frames.append(frame)
                    if len(frames) == 5:
                        break
                pairs = session.route(), (await session.stats())["route"]  # the server's side, as its API says it
                counted = await client.metrics()
                assert counted['letstalk_peer_connections_total{route="relay"}'] == 1
                assert counted['letstalk_peer_connections_total{route="direct"}'] == 0
                await session.close()
                return session.info, frames, pairs

    with turn_server(tmp_path) as turn:
        info, frames, (client_pair, server_pair) = run(main(turn, turn.secret))
        (entry,) = info["ice_servers"]
        assert entry["urls"] == [turn.url]
        expires, _, user = entry["username"].partition(":")
        assert user == info["session_id"] and abs(int(expires) - (time.time() + 600)) < 60
        assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
        assert client_pair["local"] == "relay" and server_pair["remote"] == "relay", (client_pair, server_pair)
        assert entry["username"] in turn.log.read_text()  # coturn saw this session's own username

        caplog.clear()
        info, _, _ = run(main(turn, "not-the-turn-servers-secret"))
        assert info["ice_servers"][0]["username"].endswith(info["session_id"])
        warned = [r for r in caplog.records if "gave no relayed address" in r.getMessage()]
        assert {r.name for r in warned} == {"letstalk_rt.client", "letstalk.server"}, warned


@pytest.mark.parametrize("answer_at_once", [True, False])
def test_a_check_that_the_relay_dropped_is_sent_again_when_the_peers_check_arrives(tmp_path, monkeypatch,
                                                                                  answer_at_once):
    """The answering side's first check to a relayed peer is dropped by the TURN server (the peer has not opened the
    way yet); `answer_checks_at_once` sends it again as soon as the peer's own check arrives on that pair. Without it
    aioice waits for its retransmission timeout (500 ms, made 3 s here so that the two cases cannot be confused)."""
    import time

    import aioice.stun
    from aiortc import RTCPeerConnection, VideoStreamTrack

    from letstalk_rt.rtc import answer_checks_at_once, ice_configuration

    monkeypatch.setattr(aioice.stun, "RETRY_RTO", 3.0)

    async def main(turn):
        from letstalk_rt.server.auth import turn_credentials

        username, credential = turn_credentials(turn.secret, "pair", 600)
        relayed = [{"urls": [turn.url], "username": username, "credential": credential}]
        offerer = RTCPeerConnection(ice_configuration(relayed, relay_only=True))
        answerer = RTCPeerConnection(ice_configuration())
        try:
            offerer.addTransceiver("video", direction="recvonly")
            await offerer.setLocalDescription(await offerer.createOffer())
            await answerer.setRemoteDescription(offerer.localDescription)
            answerer.addTrack(VideoStreamTrack())
            if answer_at_once:
                assert answer_checks_at_once(answerer) and answer_checks_at_once(offerer)
            await answerer.setLocalDescription(await answerer.createAnswer())
            hosts = {line.split()[4] for line in answerer.localDescription.sdp.splitlines()
                     if line.startswith("a=candidate:") and line.endswith("typ host") and line.count(".") == 3}
            # the answerer's first checks out (and dropped by the relay) before the offerer's own arrive: on a busy
            # machine they could otherwise go out after, through the way the offerer's opened, and the control below
            # connected at once (0.02 s, a CI run) with nothing resent
            await asyncio.sleep(0.25)
            start = time.monotonic()
            await offerer.setRemoteDescription(answerer.localDescription)
            while answerer.iceConnectionState != "completed":
                await asyncio.sleep(0.005)
            return time.monotonic() - start, hosts
        finally:
            await offerer.close()
            await answerer.close()

    with turn_server(tmp_path) as turn:
        took, hosts = run(main(turn), timeout=60)
    if answer_at_once:
        assert took < 1.5, took
    elif len(hosts) > 1:  # each address is a pair of its own, and the later pairs' first checks go out after the
        # relay has opened the way (the peer's check came in): one of them connects at once, whatever aioice does
        pytest.skip(f"the control needs one IPv4 address besides loopback; this machine has {sorted(hosts)} "
                    f"(a Docker bridge's, say)")
    else:
        assert took > 2.0, took  # the dropped check waited out its timeout (3 s from its send, 0.25 s before start)


def test_sdk_reconnects_when_its_network_goes_and_its_iterators_go_on(tiny_pipeline):
    """connect(reconnect=True), the default: the client's network goes mid-stream; once no media came for 2 s the
    SDK offers a new peer connection (and opens a new websocket), the server lets it replace the one whose peer went
    silent, and frames, audio and events go on, media times continuing. A second peer while the first is heard is
    still refused (409)."""
    from letstalk_rt.client import RECONNECT_STALL_S, AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            seen: list[dict] = []
            session.on("*", seen.append)
            await session.connect()
            frames, chunks, readers = collect_media(session, timed=True)
            await wait_until(lambda: len(frames) >= 25, 20, "a second of frames")
            async with aiohttp.ClientSession() as http:  # another viewer, while this one is heard: refused
                async with http.post(session.offer_url, data=b"v=0", headers={
                        **session._headers(), "Content-Type": "application/sdp"}) as resp:
                    assert resp.status == 409 and "heard" in (await resp.json())["error"]
            server_pc = srv.manager.sessions[session.id].pc
            assert cut_network(session.pc) > 0
            cut_at, before = time.monotonic(), len(frames)
            took = await wait_until(lambda: any(e["type"] == "reconnected" for e in seen), 30, "the reconnect")
            await wait_until(lambda: len(frames) >= before + 50, 20, "frames after the reconnect")
            ss = srv.manager.sessions[session.id]
            assert ss.pc is not server_pc and ss.pc.connectionState == "connected"
            assert (await client.metrics())["letstalk_reconnects_total"] == 1
            await session.send_audio(speechlike(1.0), sample_rate=16000)  # the new websocket carries speech
            await session.end_speech()
            await wait_until(lambda: any(e["type"] == "speech_started" for e in seen), 20, "speech after it")
            await session.close()
            await asyncio.gather(*readers)
            return frames, chunks, seen, took, cut_at, before

    frames, chunks, seen, took, cut_at, before = run(main())
    types = [e["type"] for e in seen]
    assert types.index("reconnecting") < types.index("reconnected") and "error" not in types
    reason = next(e for e in seen if e["type"] == "reconnecting")["reason"]
    assert reason == f"no media for {RECONNECT_STALL_S:g} s"
    assert RECONNECT_STALL_S <= took < RECONNECT_STALL_S + 6, took
    times = [f.time for f in frames]
    assert all(b > a for a, b in zip(times, times[1:])), "media times go back after the reconnect"
    gap = max(b - a for a, b in zip(times, times[1:]))
    assert RECONNECT_STALL_S <= gap < took + 3  # the outage, on the media timeline too
    audio_times = [c.time for c in chunks]
    assert all(b > a for a, b in zip(audio_times, audio_times[1:]))
    assert len(frames) >= before + 50


def test_audio_packets_lost_on_the_way_leave_the_sdks_sound_and_frames_no_later(tiny_pipeline):
    """Audio packets lost on the way to the SDK (3, a second apart: a lossy mobile link): the sound after each comes as
    soon after its media time as before, and so do the frames, which wait for their audio (`align`). aiortc's buffer,
    and ours before, left all audio after the first loss 300 ms later for the rest of the call, and the frames with it
    (`rtc.FrameAtOnceJitterBuffer`). The lost 20 ms are concealed in place (libopus), not left out."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            await session.connect()
            frames, chunks, readers = collect_media(session, timed=True)
            await wait_until(lambda: len(frames) >= 50, 20, "2 s of frames")
            before = len(chunks), len(frames)
            loss = lose_packets(session.pc, "audio", count=3, every=50)
            await wait_until(lambda: len(loss.lost) == 3, 20, "3 audio packets lost")
            after = len(chunks), len(frames)
            await wait_until(lambda: len(frames) >= after[1] + 50, 20, "2 s of frames after the losses")
            await session.close()
            await asyncio.gather(*readers)
            return frames, chunks, before, after, loss.lost

    frames, chunks, before, after, lost = run(main())
    assert all(b - a == 50 for a, b in zip(lost, lost[1:]))  # (sequence numbers: one lost in each 50)

    def lag(items) -> float:  # the median of how long after its media time each came (the link's and the SDK's delay)
        return float(np.median([item.received_at - item.time for item in items]))

    for kind, items, start, end in (("audio", chunks, before[0], after[0]), ("video", frames, before[1], after[1])):
        was, now = lag(items[start - 25:start]), lag(items[end + 25:])
        assert now - was < 0.1, f"{kind}: {1000 * (now - was):.0f} ms later after the losses"
    times = [c.time for c in chunks]
    assert all(b > a for a, b in zip(times, times[1:]))  # in order, none twice
    ends = [c.time + len(c.pcm) / c.sample_rate for c in chunks]  # and none missing: the lost 20 ms concealed
    assert max(abs(b - a) for a, b in zip(ends, times[1:])) < 1e-3, "a gap in the sound where a packet was lost"

def test_lost_speech_is_decoded_from_the_next_packets_fec_both_ways(tiny_pipeline):
    """The SDK's microphone (`connect(audio_track=...)`) goes with in-band FEC (the track encodes it itself once the
    answer says Opus), and so does the avatar's sound: a speech packet lost on the way to the server is decoded from
    the next one by the server's receiver, and one lost on the way back by the SDK's (`rtc.FecOpusDecoder`). Before,
    aiortc's sender sent no FEC, and both receivers could only conceal what was lost."""
    from letstalk_rt.client import AvatarClient
    from letstalk_rt.rtc import FecOpusDecoder

    async def lose(pc, what: str) -> int:  # 10 of `pc`'s incoming audio packets, 7 apart: how many came back from FEC
        recovered = FecOpusDecoder.recovered
        loss = lose_packets(pc, "audio", count=10, every=7)
        await wait_until(lambda: len(loss.lost) == 10, 20, f"10 packets lost on the way to {what}")
        await asyncio.sleep(0.2)  # (the last one's next packet, through the decoder)
        return FecOpusDecoder.recovered - recovered

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            await session.connect(audio_track=SpeechTrack(8.0))  # the avatar says it back
            _, chunks, readers = collect_media(session, timed=True)
            await wait_until(lambda: len(chunks) >= 50, 20, "the avatar's sound")
            to_server = await lose(srv.manager.sessions[session.id].pc, "the server")
            to_sdk = await lose(session.pc, "the SDK")
            await session.close()
            await asyncio.gather(*readers)
            return to_server, to_sdk

    to_server, to_sdk = run(main())
    # (5-6 of 10 in runs here: a packet lost in speech; one after silence has no copy, and is concealed)
    assert to_server >= 2 and to_sdk >= 2, (to_server, to_sdk)


def test_a_video_packet_lost_twice_is_asked_for_again_and_no_frame_is_dropped(tiny_pipeline):
    """A video packet lost on the way to the SDK, and its retransmission lost too: aiortc asks for a lost packet again
    only when another gap shows, so the SDK waited out `rtc.VIDEO_GAP_S`, dropped the frame, asked for a key frame,
    and the video froze half a second. Now (`rtc.NACK_AGAIN_S`) it asks again and the second retransmission comes:
    every frame arrives, none more than a few frames late."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            _, frames, readers = await _watch(session)
            loss = lose_packets(session.pc, "video", count=1, every=10, retransmissions=1)
            await wait_until(lambda: loss.lost_rtx == 1, 20, "a video packet and its retransmission lost")
            after = len(frames)
            await wait_until(lambda: len(frames) >= after + 50, 20, "2 s of frames after the loss")
            await session.close()
            await asyncio.gather(*readers)
            return frames

    frames = run(main())
    times = [f.time for f in frames]
    assert max(b - a for a, b in zip(times, times[1:])) < 0.05, "a frame was dropped"  # 25 fps: 0.04 apart
    arrivals = [f.received_at for f in frames]
    assert max(b - a for a, b in zip(arrivals, arrivals[1:])) < 0.35, "the video froze"


async def _watch(session, **connect) -> tuple[list[dict], list, list[asyncio.Task]]:
    """Connect an SDK session and read it (the move tests): its events as they come, its timed frames (and audio), once
    a second of frames came. -> (events, frames, reading tasks)."""
    seen: list[dict] = []
    session.on("*", seen.append)
    await session.connect(**connect)
    frames, _, readers = collect_media(session, timed=True)
    await wait_until(lambda: len(frames) >= 25, 20, "a second of frames")
    return seen, frames, readers


async def _moved(seen: list[dict], frames: list, where: str) -> None:
    """Until the session has moved (its `moved` event) and a second of frames came from `where`."""
    await wait_until(lambda: any(e["type"] == "moved" for e in seen), 30, "the move")
    before = len(frames)
    await wait_until(lambda: len(frames) >= before + 25, 20, f"frames from {where}")


def _motions(monkeypatch) -> list[tuple[str, str, object]]:
    """(session id, "served" or "given", the Motion) for each motion the engines answered (GET .../motion) or were
    given (PUT) from now on, in order."""
    from letstalk_rt.stream.engine import Session

    seen: list[tuple[str, str, object]] = []
    motion, continue_from = Session.motion, Session.continue_from

    def served(self):
        seen.append((self.id, "served", motion(self)))
        return seen[-1][2]

    def given(self, m):
        continue_from(self, m)
        seen.append((self.id, "given", m))

    monkeypatch.setattr(Session, "motion", served)
    monkeypatch.setattr(Session, "continue_from", given)
    return seen


def test_a_session_on_a_stopping_server_moves_to_another_and_its_iterators_go_on(tiny_pipeline, second_pipeline,
                                                                                 astronaut_png, monkeypatch):
    """A rolling update: server A drains (`session_ending`, reason server_stopping) and the app moves its session to
    server B (`move(client_b)` on the event): a new session there from the same uploaded portrait that goes on from
    the old one's motion (the frames it showed last), the frame, audio and event iterators going on with media times
    still rising, sends going to the new session (its token good at B), and the old session deleted (A's drain ends at
    once)."""
    from letstalk_rt.client import AvatarClient

    motions = _motions(monkeypatch)

    async def main():
        async with running_server(tiny_pipeline) as a, running_server(second_pipeline) as b, \
                AvatarClient(a.url) as client_a, AvatarClient(b.url) as client_b:
            session = await client_a.start_session(portrait=astronaut_png, seed=3)
            old_id = session.id
            portrait = a.engine.sessions[old_id]._w.stream.portrait.image.copy()
            session.on("session_ending", lambda event: session.move(client_b, reason=event["reason"]))
            seen, frames, readers = await _watch(session, move=False)
            drain = asyncio.ensure_future(a.manager.drain(30))
            await _moved(seen, frames, "B")
            drained = await asyncio.wait_for(drain, 10)  # its only session deleted: A can stop now
            placed = list(b.manager.sessions)
            moved_portrait = b.engine.sessions[session.id]._w.stream.portrait.image
            await session.send_audio(speechlike(1.0), sample_rate=16000)
            await session.end_speech()
            moved_at = next(i for i, e in enumerate(seen) if e["type"] == "moved")
            await wait_until(lambda: any(e["type"] == "speech_started" for e in seen[moved_at:]), 20, "speech at B")
            stats = await session.stats()
            await session.close()
            await asyncio.gather(*readers)
            return old_id, session.id, portrait, moved_portrait, seen, drained, placed, frames, stats, \
                list(b.manager.sessions)

    old_id, new_id, portrait, moved_portrait, seen, drained, placed, frames, stats, left = run(main())
    types = [e["type"] for e in seen]
    assert types.index("session_ending") < types.index("moved") and "error" not in types, types
    moved = next(e for e in seen if e["type"] == "moved")
    assert moved["from_session_id"] == old_id and moved["session_id"] == new_id != old_id
    assert moved["reason"] == "server_stopping" and moved["after_s"] < 10 and moved["motion"] is True
    assert [(sid, how) for sid, how, _ in motions] == [(old_id, "served"), (new_id, "given")]
    assert torch.equal(motions[0][2].latents, motions[1][2].latents)  # B's session goes on from A's frames
    assert drained is True and placed == [new_id] and left == []
    assert np.array_equal(portrait, moved_portrait)  # the same photo, uploaded again
    assert stats["session_id"] == new_id and stats["peer_connection"] == "connected"
    times = [f.time for f in frames]
    assert all(y > x for x, y in zip(times, times[1:])), "media times go back after the move"


def test_a_viewer_reads_the_sessions_events_and_follows_it_to_the_server_it_moved_to(tiny_pipeline, second_pipeline):
    """An SDK viewer (`connect(viewer=True)` on a session another client drives) gets the session's events from its
    event stream, leaving the driving client's websocket alone; when that client moves the session to server B, the
    viewer watches the new session there by itself (its `closed` event's `moved_to`): a `moved` event, frames again,
    media times still rising, its viewer at B freed by close()."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as a, running_server(second_pipeline) as b, \
                AvatarClient(a.url) as owner, AvatarClient(b.url) as owner_b, AvatarClient(a.url) as other:
            session = await owner.start_session(seed=3)
            driven, _, owner_readers = await _watch(session, move=False)
            watched = await other.session(session.id, session.token)
            seen, frames, readers = await _watch(watched, viewer=True)
            await session.send_audio(speechlike(0.6), sample_rate=16000)
            await session.end_speech()
            await wait_until(lambda: any(e["type"] == "speech_started" for e in seen), 20, "the viewer's events")
            kept_ws = a.manager.sessions[session.id].ws is not None  # the driving client's websocket: still its own
            old_id = session.id
            await session.move(owner_b)
            await _moved(seen, frames, "B")
            viewers_b = len(b.manager.sessions[session.id].viewers)
            own = watched._own_client
            await watched.close()
            await wait_until(lambda: not b.manager.sessions[session.id].viewers, 10, "the viewer at B freed")
            await session.close()
            await asyncio.gather(*readers, *owner_readers)
            return old_id, session.id, watched.id, seen, driven, frames, kept_ws, viewers_b, own

    old_id, new_id, watched_id, seen, driven, frames, kept_ws, viewers_b, own = run(main())
    assert kept_ws and any(e["type"] == "speech_started" for e in driven)
    types = [e["type"] for e in seen]
    assert "closed" not in types and "error" not in types, types
    moved = next(e for e in seen if e["type"] == "moved")
    assert moved["from_session_id"] == old_id and moved["session_id"] == watched_id == new_id != old_id
    assert viewers_b == 1 and own is not None and own._http is None  # its client for B: closed with it
    times = [f.time for f in frames]
    assert all(y > x for x, y in zip(times, times[1:])), "media times go back after the move"


def test_a_session_whose_device_hung_moves_by_itself_to_another_device(tiny_pipeline, second_pipeline, monkeypatch):
    """connect()'s default `move`: a session on a device that stopped answering (told `session_ending`, reason
    device_hung) goes on by itself in a new session through the same URL, which the server puts on its other device;
    frames come again, the old session is deleted, the new one goes on from its motion (the frames it showed last:
    kept off the device, so a hung one still gives them), and the speech it had not shown is sent to the new one,
    which shows it to its end. With nowhere to go (one server, stopping), an `error` event
    (move_failed) says so and the old session streams on until the server ends it."""
    import threading

    from letstalk_rt.client import AvatarClient

    gate = threading.Event()
    motions = _motions(monkeypatch)

    async def main():
        async with two_device_server(tiny_pipeline, second_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session(seed=1)
            old_id = session.id
            seen, frames, readers = await _watch(session)
            await session.send_audio(speechlike(3.0), sample_rate=16000, ahead=True)
            await session.end_speech()
            await wait_until(lambda: any(e["type"] == "speech_started" for e in seen), 20, "the speech shown")
            hung = srv.engine.sessions[old_id].engine
            hang(hung, gate)  # a device that stopped answering
            await _moved(seen, frames, "the other device")
            await wait_until(lambda: old_id not in srv.engine.sessions, 10, "the old session deleted")
            placed = srv.engine.sessions[session.id].engine
            replayed = srv.manager.sessions[session.id].audio_messages
            shown = await session.wait_audio_shown(30)
            gate.set()
            await session.close()
            await asyncio.gather(*readers)
            return old_id, session.id, seen, hung, placed, frames, replayed, shown

    try:
        old_id, new_id, seen, hung, placed, frames, replayed, shown = run(main())
    finally:
        gate.set()
    ending = next(e for e in seen if e["type"] == "session_ending")
    moved = next(e for e in seen if e["type"] == "moved")
    assert ending["reason"] == moved["reason"] == "device_hung" and ending["session_id"] == old_id
    assert moved["from_session_id"] == old_id and moved["session_id"] == new_id != old_id
    assert placed is not hung
    assert moved["motion"] is True
    assert [(sid, how) for sid, how, _ in motions] == [(old_id, "served"), (new_id, "given")]
    moved_at = seen.index(moved)
    assert 1 <= replayed <= 6 and shown, (replayed, shown)  # (3 s: 6 messages, some shown before the hang)
    after = [e for e in seen[moved_at:] if e["type"] in ("speech_started", "audio_played")]
    assert after[0]["type"] == "speech_started" and after[-1]["audio_messages"] == replayed, after
    times = [f.time for f in frames]
    assert all(y > x for x, y in zip(times, times[1:]))

    async def nowhere():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session(seed=1)
            seen: list[dict] = []
            session.on("*", seen.append)
            await session.connect()
            frames, chunks, readers = collect_media(session)
            await wait_until(lambda: len(frames) >= 10, 20, "frames")
            drained = await srv.manager.drain(4.0)  # the move is refused (503) until 2 s before the end
            during = len(frames)
            await srv.manager.close_all()
            await asyncio.gather(*readers)
            return seen, drained, during, session.close_reason

    seen, drained, during, reason = run(nowhere())
    types = [e["type"] for e in seen]
    failed = next(e for e in seen if e["type"] == "error")
    assert types.index("session_ending") < types.index("error") < types.index("closed") and "moved" not in types
    assert failed["code"] == "move_failed" and "shutting down" in failed["message"], failed
    assert drained is False and during >= 10 + 25 and reason == "server stopping"


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is None, reason="needs espeak-ng (the server's TTS)")
def test_a_move_says_again_the_say_text_not_yet_shown_from_the_sentence_on_screen(tiny_pipeline, second_pipeline):
    """A session saying a text with say() moves off a hung device while its second sentence is on screen: the new
    session says the rest, from that sentence (said again from its start), in the same voice, and not the first."""
    import threading

    from letstalk_rt.client import AvatarClient

    gate = threading.Event()
    text = ["The first sentence is said before the move.", "The second one is on screen when it comes.",
            "And the third is said after it."]

    async def main():
        async with two_device_server(tiny_pipeline, second_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session(seed=1)
            old_id = session.id
            seen, frames, readers = await _watch(session)
            await session.say(" ".join(text), voice="en-gb")
            await wait_until(lambda: any(e.get("text") == text[1] for e in seen), 30, "the second sentence shown")
            hang(srv.engine.sessions[old_id].engine, gate)
            await _moved(seen, frames, "the other device")
            await wait_until(lambda: any(e.get("text") == text[2] and e["session_id"] == session.id for e in seen), 30,
                             "the last sentence")
            await wait_until(lambda: not session._said, 20, "the text over")
            gate.set()
            await session.close()
            await asyncio.gather(*readers)
            return seen, old_id, session.id

    try:
        seen, old_id, new_id = run(main())
    finally:
        gate.set()
    before = [e["text"] for e in seen if e["type"] == "caption" and e["session_id"] == old_id]
    after = [e["text"] for e in seen if e["type"] == "caption" and e["session_id"] == new_id]
    assert before[:2] == text[:2] and after == text[1:], (before, after)
    said, said_again = [e for e in seen if e["type"] == "say"]
    assert said["voice"] == said_again["voice"] == "en-gb" and (said["sentences"], said_again["sentences"]) == (3, 2)


def test_a_session_closed_while_it_moves_leaves_no_session_on_the_server(tiny_pipeline, second_pipeline, monkeypatch):
    """close() while a move is under way frees every session the move touched before it returns: the old one, and
    the new one the server is still making (a device_hung move by itself, cancelled by close(); an app's move(),
    which then raises), not left open until the server's idle timeout."""
    import threading

    import letstalk_rt.server.app as app_module
    from letstalk_rt.client import AvatarClient, AvatarClientError

    opening, making, made = asyncio.Event(), asyncio.Event(), asyncio.Event()
    open_checked = app_module._open_checked

    async def slow_open(*args, **kwargs):  # a new session the server takes its time to make
        if not making.is_set():
            return await open_checked(*args, **kwargs)
        opening.set()
        await asyncio.sleep(0.5)
        try:
            return await open_checked(*args, **kwargs)
        finally:
            made.set()

    monkeypatch.setattr(app_module, "_open_checked", slow_open)
    gate = threading.Event()

    async def main():
        left = []
        async with two_device_server(tiny_pipeline, second_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session(seed=1)
            seen, frames, readers = await _watch(session)
            making.set()
            hang(srv.engine.sessions[session.id].engine, gate)  # the move by itself
            await wait_until(opening.is_set, 20, "the new session asked for")
            await session.close()
            await wait_until(made.is_set, 20, "the new session made")
            await asyncio.sleep(0.2)
            left.append(list(srv.manager.sessions))
            gate.set()
            await asyncio.gather(*readers)

            session = await client.start_session(seed=1)
            await _watch(session)
            opening.clear()
            made.clear()
            move = asyncio.ensure_future(session.move())  # the app's
            await wait_until(opening.is_set, 20, "the new session asked for")
            await session.close()
            await wait_until(made.is_set, 20, "the new session made")
            left.append(list(srv.manager.sessions))
            with pytest.raises(AvatarClientError, match="closed"):
                await move
            return seen, left

    try:
        seen, left = run(main())
    finally:
        gate.set()
    assert any(e["type"] == "session_ending" for e in seen) and not any(e["type"] == "moved" for e in seen)
    assert left == [[], []]


def test_the_speech_a_move_would_send_again_is_what_is_not_yet_shown_and_stays_bounded():
    """What the SDK keeps for a move to send again: the audio messages not yet covered by an `audio_played` event or
    dropped by an interrupt, with the utterance ends where they were; never more than the server queues, whatever its
    events say (hours of live speech to a server that never answers keep ~a minute)."""
    from letstalk_rt.client import AvatarClient, AvatarSession

    class Socket:
        async def send_bytes(self, data):
            pass

        async def send_str(self, text):
            pass

    async def main():
        session = AvatarSession(AvatarClient("http://127.0.0.1:9"), {
            "session_id": "s", "token": "t", "expires_at": 0, "offer_url": "/o", "ws_url": "/w"}, how={"options": {}})
        ws, second = Socket(), np.zeros(16000, np.int16).tobytes()  # one second at 16 kHz
        for i in range(4):
            await session._send_chunk(ws, second, (16000, 1, False))
        await session._send_end(ws)
        await session._send_chunk(ws, second[:3200], (48000, 2, True))
        kept = [(len(c), f, ended) for c, f, ended in session._unshown]
        session._dispatch({"type": "audio_played", "audio_messages": 3})
        after_played = [(len(c), ended) for c, _, ended in session._unshown]
        for i in range(200):  # 200 s, nothing shown
            await session._send_chunk(ws, second, (16000, 1, False))
        bounded = session._unshown_s
        session._audio_done = session._audio_sent  # (interrupt()'s)
        session._forget_shown()
        return kept, after_played, bounded, len(session._unshown), session.max_queued_seconds

    kept, after_played, bounded, left, queued = asyncio.run(main())
    assert kept == [(32000, (16000, 1, False), False)] * 3 + [(32000, (16000, 1, False), True),
                                                             (3200, (48000, 2, True), False)]
    assert after_played == [(32000, True), (3200, False)]
    assert 2 * queued <= bounded <= 2 * queued + 1 and left == 0


def test_the_say_texts_a_move_would_say_again_are_followed_by_their_captions():
    """What the SDK keeps of say() for a move: each text's sentences, the one shown now (its `caption` event); a text
    is over when the next one's first caption comes or speech stops on its last sentence (not on an earlier one: a
    pause between sentences), all of them once interrupted; wait_audio_shown(said=True) waits for them."""
    from letstalk_rt.client import AvatarClient, AvatarSession

    info = {"session_id": "s", "token": "t", "expires_at": 0, "offer_url": "/o", "ws_url": "/w"}

    async def main():
        client = AvatarClient("http://127.0.0.1:9")
        session = AvatarSession(client, info, how={"options": {}})
        states, waited = [], []

        async def accepted(message, timeout):
            return 0.0, {"type": "say", "sentences": len(message["text"].split(". "))}

        session._request = accepted
        await session.say("One. Two. Three.", voice="fr")
        await session.say("Four. Five.")
        waiting = asyncio.ensure_future(session.wait_audio_shown(said=True))
        for kind, text in [("caption", "One."), ("caption", "Two."), ("speech_stopped", None), ("caption", "Three."),
                           ("caption", "Four."), ("speech_stopped", None), ("caption", "Five."),
                           ("speech_stopped", None)]:
            await asyncio.sleep(0)
            waited.append(waiting.done())
            session._dispatch({"type": kind, **({"text": text} if text else {})})
            states.append([(pieces, at) for pieces, _, at in session._said])
        await asyncio.sleep(0)
        waited.append(waiting.done() and waiting.result())
        await session.say("Six.")
        session._dispatch({"type": "interrupted"})
        return states, waited, session._said

    states, waited, left = asyncio.run(main())
    first, second = ["One.", "Two.", "Three."], ["Four.", "Five."]
    assert states == [
        [(first, 0), (second, -1)], [(first, 1), (second, -1)],
        [(first, 1), (second, -1)],  # speech stopped between sentences: still saying it
        [(first, 2), (second, -1)], [(second, 0)], [(second, 0)], [(second, 1)], [],
    ]
    assert waited == [False] * 8 + [True]  # until the last text's speech stopped
    assert not left


def test_a_session_outlives_its_first_token_the_sdk_renewing_it(tiny_pipeline):
    """A session's token holds the server's --token-ttl (an hour) from when it was given, and a session may last
    hours: the SDK renews it while the session is open, so a reconnect after the first token expired, a client
    attached with the new one and close() all still work. (Without the renewal the reconnect fails with 401 and
    close() leaves the session on the server.)"""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline, token_ttl_s=3) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            first, first_expiry = session.token, session.expires_at
            seen: list[dict] = []
            session.on("*", seen.append)
            await session.connect()
            frames, _, readers = collect_media(session, timed=True)
            await wait_until(lambda: time.time() > first_expiry + 0.5, 10, "the first token to expire")
            assert session.token != first and session.expires_at > time.time()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{srv.url}/v1/sessions/{session.id}",
                                    headers={"Authorization": f"Bearer {first}"}) as resp:
                    assert resp.status == 401 and "expired" in (await resp.json())["error"]
            assert cut_network(session.pc) > 0
            await wait_until(lambda: any(e["type"] in ("reconnected", "error") for e in seen), 30, "the reconnect")
            before = len(frames)
            await wait_until(lambda: len(frames) >= before + 25, 20, "frames after the reconnect")
            other = await client.session(session.id, session.token)
            assert other.expires_at == session.expires_at  # (read from the token given: what it renews from)
            await other.close()
            await session.close()
            await asyncio.gather(*readers)
            return seen, srv.manager.sessions

    seen, left = run(main())
    assert [e["type"] for e in seen if e["type"] in ("reconnected", "error")][:1] == ["reconnected"], seen[-3:]
    assert not left  # close() ended it on the server


@pytest.mark.parametrize("clock_off_s", [7200.0, -7200.0])
def test_the_sdk_renews_its_token_in_time_on_a_machine_whose_clock_is_off(tiny_pipeline, monkeypatch, clock_off_s):
    """A token's expiry is on the server's clock. A client machine whose clock is hours off (a kiosk without a
    real-time clock before NTP set it, a VM's drifted one) renews its sessions' tokens in time all the same: it counts
    down from the server's time (its answers' Date header) on its monotonic clock. (Before, a clock ahead took the
    token for expired and never renewed it; one behind waited hours past its expiry.) A session attached by its token
    renews too, and close() still ends the session."""
    import time as real_time

    from letstalk_rt import client as sdk
    from letstalk_rt.client import AvatarClient

    class OffClock:  # this machine's time of day, `clock_off_s` off; its monotonic clock as it is
        def time(self) -> float:
            return real_time.time() + clock_off_s

        def __getattr__(self, name):
            return getattr(real_time, name)

    monkeypatch.setattr(sdk, "time", OffClock())

    async def main():
        async with running_server(tiny_pipeline, token_ttl_s=4) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            attached = await client.session(session.id, session.token)
            first, first_expiry = session.token, session.expires_at
            assert abs(first_expiry - 4 - real_time.time()) < 2  # (the server's clock)
            await wait_until(lambda: real_time.time() > first_expiry + 0.5, 10, "the first token to expire")
            assert session.token != first and attached.token != first
            assert session.expires_at > real_time.time() and attached.expires_at > real_time.time()
            await attached.close()  # (a viewer's close: the session stays)
            await session.close()
            return srv.manager.sessions

    assert not run(main())  # close() ended it on the server: its token held


def test_a_server_with_a_tls_certificate_serves_https_and_wss(tiny_pipeline, tmp_path, wav_file, astronaut_png):
    """`letstalk serve --tls-cert --tls-key`: the API and the websocket over TLS (https, wss). The SDK trusting the
    server's self-signed certificate (`ssl=` its file) streams a session through it; one trusting only this machine's
    CAs is refused by its own TLS check, and `letstalk generate --server` says how to trust it (SSL_CERT_FILE, with
    which it gets through); the image's health check reads the server over HTTP and HTTPS alike."""
    import json
    import os

    from letstalk_rt.client import AvatarClient
    from letstalk_rt.errors import LetsTalkError
    from server_helpers import self_signed_certificate, stream_one_session
    from test_packaging import _dockerfile
    from without_engine import PRELUDE

    cert, key = self_signed_certificate(tmp_path)
    wav = wav_file(1.0)
    (health,) = [rest for op, rest in _dockerfile() if op == "HEALTHCHECK"]
    probe = json.loads(health[health.index("["):])[-1]  # python -c's code

    def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
        code = PRELUDE + f"import sys; from letstalk_rt.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)

    def probe_health(url: str) -> int:
        port = url.rsplit(":", 1)[1]
        return subprocess.run([sys.executable, "-c", probe.replace("8080", port)], capture_output=True,
                              timeout=60).returncode

    async def main():
        async with running_server(tiny_pipeline, tls_cert=cert, tls_key=key) as srv, \
                running_server(tiny_pipeline) as plain:
            assert srv.url.startswith("https://")
            async with AvatarClient(srv.url, ssl=cert) as client:
                info = await stream_one_session(client, "through a server on TLS")
                assert info["ws_url"].startswith("wss://")
            async with AvatarClient(srv.url) as client:  # this machine's CAs: the self-signed one is not among them
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await client.health()
            async with AvatarClient(srv.url, ssl=False) as client:
                assert (await client.health())["status"] == "ok"
            env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
            base = ["generate", "--server", srv.url, "--portrait", str(astronaut_png), "--audio", str(wav), "--out",
                    str(tmp_path / "out.mp4")]
            untrusted, trusted, healthy = await asyncio.gather(
                asyncio.to_thread(run_cli, env, *base), asyncio.to_thread(run_cli, {**env, "SSL_CERT_FILE": str(cert)},
                                                                          *base),
                asyncio.gather(*(asyncio.to_thread(probe_health, url) for url in (srv.url, plain.url))))
            return untrusted, trusted, healthy

    untrusted, trusted, healthy = run(main())
    assert untrusted.returncode == 2 and "has a TLS certificate this machine does not trust" in untrusted.stderr, \
        untrusted.stderr
    assert "set SSL_CERT_FILE" in untrusted.stderr
    # trusted, it gets to the server, which answers: it keeps no recordings to make the video with
    assert trusted.returncode == 2 and "--recordings-dir" in trusted.stderr, trusted.stderr
    assert healthy == [0, 0]
    with pytest.raises(LetsTalkError, match="no such file"):
        AvatarClient("https://127.0.0.1:1", ssl=tmp_path / "missing.pem")


def test_a_renewed_tls_certificate_is_served_from_the_next_connection_without_a_restart(tiny_pipeline, tmp_path,
                                                                                         monkeypatch, caplog):
    """A certificate renewed under a running server (its files replaced, as certbot's renewal does) is served from the
    next connection on: the SDK trusting only the new one connects, one trusting only the old one is refused, and a
    session open through the old one goes on meanwhile. The new key written before the new certificate (files that
    do not go together for a moment) leaves the old certificate served, with one warning. /metrics says when the
    certificate served expires."""
    import logging
    import shutil

    from letstalk_rt.client import AvatarClient
    from letstalk_rt.server.options import CertificateFiles
    from server_helpers import certificate_der, self_signed_certificate, served_certificate, stream_one_session

    monkeypatch.setattr(CertificateFiles, "CHECK_EVERY_S", 0.0)
    (tmp_path / "old").mkdir(), (tmp_path / "new").mkdir(), (tmp_path / "live").mkdir()
    old_cert, old_key = self_signed_certificate(tmp_path / "old", days=1)
    new_cert, new_key = self_signed_certificate(tmp_path / "new", days=60)
    cert, key = tmp_path / "live" / "cert.pem", tmp_path / "live" / "key.pem"
    shutil.copy(old_cert, cert), shutil.copy(old_key, key)
    caplog.set_level(logging.INFO, logger="letstalk.server")

    async def served() -> bytes:
        return await asyncio.to_thread(served_certificate, srv.url)

    async def expiry() -> float:
        async with AvatarClient(srv.url, ssl=False) as client:
            return (await client.metrics())["letstalk_tls_certificate_expiry_timestamp_seconds"]

    async def main():
        nonlocal srv
        async with running_server(tiny_pipeline, tls_cert=cert, tls_key=key) as srv:
            assert await served() == certificate_der(old_cert)
            assert 0 < await expiry() - time.time() <= 86400
            async with AvatarClient(srv.url, ssl=old_cert) as client:
                session = await client.start_session()
                await session.connect()
                frames, _, readers = collect_media(session)
                await wait_until(lambda: len(frames) >= 5, 20, "frames before the renewal")

                shutil.copy(new_key, key)  # half way: the new key beside the old certificate
                for _ in range(2):
                    assert await served() == certificate_der(old_cert)
                refused = [r for r in caplog.records if "cannot be used" in r.getMessage()]
                assert len(refused) == 1 and "the certificate read before is still served" in refused[0].getMessage()
                shutil.copy(new_cert, cert)
                assert await served() == certificate_der(new_cert)
                assert any("read again, served from the next connection on: valid until" in r.getMessage()
                           for r in caplog.records)
                assert 59 * 86400 < await expiry() - time.time() <= 60 * 86400

                seen = len(frames)  # the session open through the old certificate goes on
                await wait_until(lambda: len(frames) >= seen + 5, 20, "frames after the renewal")
                assert await session.ping() >= 0
                await session.close()
                await asyncio.gather(*readers)
            async with AvatarClient(srv.url, ssl=new_cert) as client:
                await stream_one_session(client, "trusting the renewed certificate")
            async with AvatarClient(srv.url, ssl=old_cert) as client:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await client.health()

    srv = None
    run(main())


def test_behind_caddy_under_a_path_the_sdk_streams_and_the_answers_name_caddy(tiny_pipeline, tmp_path):
    """Caddy in front as docs/server.md's Caddyfile puts it (TLS ending there, the server under /avatar/ with
    handle_path and X-Forwarded-Prefix, Caddy's own X-Forwarded-Proto/-Host), the server on plain HTTP on loopback
    with --behind-proxy: the SDK given https://HOST/avatar streams a session through it (API, websocket), and the
    answer's URLs name Caddy's scheme, host and path."""
    from letstalk_rt.client import AvatarClient
    from server_helpers import caddy_proxy, self_signed_certificate, stream_one_session

    cert, key = self_signed_certificate(tmp_path)

    async def main():
        async with running_server(tiny_pipeline, behind_proxy=True) as srv:
            with caddy_proxy(tmp_path, srv.url, cert, key) as proxied:
                async with AvatarClient(proxied, ssl=cert) as client:
                    assert (await client.health())["status"] == "ok"
                    info = await stream_one_session(client, "of a session made through Caddy")
                return proxied, info, len(srv.manager.sessions)

    proxied, info, left = run(main())
    sid = info["session_id"]
    assert info["offer_url"] == f"{proxied}/v1/sessions/{sid}/offer"
    assert info["ws_url"] == f"{proxied.replace('https', 'wss')}/v1/sessions/{sid}/ws"
    assert left == 0  # its close() reached the server through Caddy


def test_a_rolling_update_behind_a_balancer_moves_the_session_to_the_other_server(tiny_pipeline, second_pipeline,
                                                                                tmp_path):
    """Two servers (`--instance-id a` and `b`) behind nginx as docs/server.md's balancer config puts them: a session's
    requests routed by its id's prefix, new sessions to either, a 503 tried on the other. The server holding the SDK's
    session drains (a rolling update): the SDK moves the session by itself through the balancer's one URL, the new
    session lands on the other server (nginx passing over the stopping one's 503), its offer, websocket and the old
    session's DELETE each reach the right server, frames go on, and the drain ends as soon as the old session is
    deleted."""
    from letstalk_rt.client import AvatarClient
    from server_helpers import nginx_balancer

    async def main():
        async with running_server(tiny_pipeline, instance_id="a", behind_proxy=True) as a, \
                running_server(second_pipeline, instance_id="b", behind_proxy=True) as b:
            with nginx_balancer(tmp_path, {"a": a.url, "b": b.url}) as url:
                async with AvatarClient(url) as client:
                    session = await client.start_session(seed=2)
                    old_id = session.id
                    seen, frames, readers = await _watch(session)
                    holder, other = (a, b) if old_id.startswith("a-") else (b, a)
                    drain = asyncio.ensure_future(holder.manager.drain(30))
                    await _moved(seen, frames, "the other server")
                    drained = await asyncio.wait_for(drain, 10)
                    placed = list(other.manager.sessions)
                    await session.close()
                    await asyncio.gather(*readers)
                    return old_id, session.id, drained, placed, list(other.manager.sessions), seen

    old_id, new_id, drained, placed, left, seen = run(main())
    assert old_id[:2] in ("a-", "b-") and new_id[:2] in ("a-", "b-") and new_id[:2] != old_id[:2]
    assert drained is True and placed == [new_id] and left == []  # close() reached it through nginx too
    assert not [e for e in seen if e["type"] == "error"], seen
    import argparse

    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server.app import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--instance-id", "gpu3"])).instance_id == "gpu3"
    with pytest.raises(LetsTalkError, match="1-16 letters and digits"):
        config_from_args(parser.parse_args(["--instance-id", "gpu-3"]))


def test_a_backend_lists_the_open_sessions_and_ends_one_it_lost_track_of(tiny_pipeline, astronaut_png):
    """GET /v1/sessions (`client.sessions()`, the API key): the sessions open, each with the avatar it was opened on
    (None: an uploaded portrait), its connections and how long it has been idle; `client.end_session(id)` ends one
    another client started (its owner is told why), after which it is not listed and ending it again is
    SessionNotFoundError. Without the API key: AuthenticationError."""
    from letstalk_rt.client import AuthenticationError, AvatarClient, SessionNotFoundError

    async def main():
        async with running_server(tiny_pipeline, api_key="k") as srv, AvatarClient(srv.url, api_key="k") as owner, \
                AvatarClient(srv.url, api_key="k") as backend, AvatarClient(srv.url) as keyless:
            a = await owner.start_session()
            b = await owner.start_session(portrait=astronaut_png)
            await a.ping()  # its websocket open
            listed = {s["session_id"]: s for s in await backend.sessions()}
            await backend.end_session(a.id)
            await wait_until(lambda: a.close_reason is not None, 10, "the owner told its session ended")
            after = await backend.sessions()
            with pytest.raises(SessionNotFoundError):
                await backend.end_session(a.id)
            with pytest.raises(AuthenticationError):
                await keyless.sessions()
            return listed, a, b, after

    listed, a, b, after = run(main())
    assert listed.keys() == {a.id, b.id}
    assert (listed[a.id]["avatar_id"], listed[b.id]["avatar_id"]) == ("default", None)
    assert (listed[a.id]["websocket"], listed[b.id]["websocket"]) == (True, False)
    assert not listed[a.id]["render"] and listed[a.id]["peer_connection"] is None and listed[a.id]["idle_seconds"] < 30
    assert abs(listed[a.id]["created_at"] - time.time()) < 60
    assert a.close_reason == "deleted by the client" and [s["session_id"] for s in after] == [b.id]


def drop_websocket(session) -> None:
    """What a proxy's restart or a network blip does to an SDK session's websocket: its TCP connection ends with no
    websocket close (the SDK reads code 1006)."""
    session._ws._response.connection.transport.abort()


def test_a_lost_websocket_is_opened_again_and_what_is_sent_meanwhile_waits_for_it(tiny_pipeline):
    """connect(reconnect=True): the websocket's connection ends with no close (a proxy restarted) while the media goes
    on. The SDK opens a new websocket, the peer connection left as it is; audio sent at once waits for it and is
    spoken, at its own rate (announced again on the new websocket), and events come on it. Before, the send raised
    "closed by the server (code 1006)" and no event came any more."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            seen: list[dict] = []
            session.on("*", seen.append)
            await session.connect()
            frames, _, readers = collect_media(session)
            await wait_until(lambda: len(frames) >= 25, 20, "a second of frames")
            server_pc = srv.manager.sessions[session.id].pc
            await session.send_audio(np.zeros(800, np.int16), sample_rate=48000)  # the old websocket's format: 48 kHz
            drop_websocket(session)
            await session.send_audio(speechlike(1.0, rate=48000), sample_rate=48000)
            await session.end_speech()
            await wait_until(lambda: any(e["type"] == "speech_stopped" for e in seen), 20, "the speech, spoken")
            # whether or not the message sent into the dying websocket arrived, what was sent is known shown
            await wait_until(lambda: session.audio_shown, 10, "audio_shown")
            ss = srv.manager.sessions[session.id]
            same_pc = ss.pc is server_pc
            assert ss.audio_format == (48000, 1)  # the new websocket was told the audio's rate (it starts at 16 kHz)
            before = len(frames)
            await wait_until(lambda: len(frames) >= before + 10, 10, "frames after it")
            await session.close()
            await asyncio.gather(*readers)
            return seen, same_pc

    seen, same_pc = run(main())
    kinds = [e["type"] for e in seen]
    reconnects = [e for e in seen if e["type"] in ("reconnecting", "reconnected")]
    lost = [e for e in reconnects if e["type"] == "reconnecting" and e["reason"].startswith("websocket lost")]
    assert len(lost) == 1 and "with no close from the server (code 1006" in lost[0]["reason"], reconnects
    back = next(e for e in seen if e["type"] == "reconnected")
    assert back["websocket_only"] and back["after_s"] < 2, reconnects
    assert kinds.index("reconnecting") < kinds.index("reconnected") < kinds.index("speech_started")
    assert "error" not in kinds
    # the media went on, so its peer connection stayed (unless the machine stalled it for 2 s: then it was replaced too)
    assert same_pc or any(e["reason"].startswith("no media") for e in reconnects if e["type"] == "reconnecting"), \
        reconnects


def test_a_client_that_cannot_reach_its_server_again_ends_its_iterators_and_sends_saying_so(tiny_pipeline,
                                                                                            monkeypatch):
    """The server went (its host rebooted, the network to it is down): the SDK tries a new websocket and peer
    connection for RECONNECT_TIMEOUT_S, then an `error` event (reconnect_failed) says why, the media iterators end, the
    event iterator raises it, and a send raises it too (not "closed by the server": the server closed nothing)."""
    from letstalk_rt import client as sdk
    from letstalk_rt.client import AvatarClient

    monkeypatch.setattr(sdk, "RECONNECT_TIMEOUT_S", 3.0)
    with contextlib.closing(socket.socket()) as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"

    async def main():
        async with running_server(tiny_pipeline) as srv, AvatarClient(srv.url) as client:
            session = await client.start_session()
            seen: list[dict] = []
            session.on("*", seen.append)
            await session.connect()
            frames, _, readers = collect_media(session)
            await wait_until(lambda: len(frames) >= 25, 20, "a second of frames")
            alive = srv.url.split("//")[1]
            session.offer_url = session.offer_url.replace(alive, dead)
            session.ws_url = session.ws_url.replace(alive, dead)
            assert cut_network(session.pc) > 0
            drop_websocket(session)
            gone = time.monotonic()
            with pytest.raises(sdk.AvatarClientError, match="reconnect failed: .*Cannot connect") as raised:
                await session.send_audio(speechlike(0.5), sample_rate=16000)
            waited = time.monotonic() - gone
            await asyncio.wait_for(asyncio.gather(*readers), 10)  # the media iterators end
            with pytest.raises(sdk.AvatarClientError, match="reconnect failed"):
                async for _ in session.events():
                    pass
            await session.close()
            return seen, waited, str(raised.value)

    seen, waited, message = run(main())
    assert 3.0 <= waited < 3.0 + 2 * sdk.REOPEN_TRY_S + 2, waited
    assert "closed by the server" not in message
    failed = [e for e in seen if e["type"] == "error"]
    assert [e["code"] for e in failed] == ["reconnect_failed"], failed
    assert "could not reconnect within 3 s" in failed[0]["message"]


def test_ice_servers_and_the_server_url_are_checked_when_the_server_and_client_start(tmp_path):
    from letstalk_rt.client import AvatarClient
    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server import ServerConfig
    from server_helpers import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    with pytest.raises(LetsTalkError, match="give --tls-cert and --tls-key together"):
        ServerConfig(tls_cert=cert)
    with pytest.raises(LetsTalkError, match="--tls-key .*nokey.pem: no such file"):
        ServerConfig(tls_cert=cert, tls_key=tmp_path / "nokey.pem").ssl_context()
    with pytest.raises(LetsTalkError, match="cannot be used .*both PEM"):  # the two swapped
        ServerConfig(tls_cert=key, tls_key=cert).ssl_context()
    assert ServerConfig(tls_cert=cert, tls_key=key).ssl_context() is not None
    from cryptography.hazmat.primitives import serialization

    locked = tmp_path / "locked.pem"  # a key with a pass phrase: said, not asked for on the terminal
    locked.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(LetsTalkError, match="locked.pem: the key is encrypted with a pass phrase.*openssl pkey"):
        ServerConfig(tls_cert=cert, tls_key=locked).ssl_context()
    with pytest.raises(LetsTalkError, match="turn:relay.example.org.*needs a username.*--turn-secret"):
        ServerConfig(ice_servers=["stun:stun.example.org", "turn:relay.example.org"])
    with pytest.raises(LetsTalkError, match="malformed uri"):
        ServerConfig(ice_servers=["relay.example.org:3478"])
    with pytest.raises(LetsTalkError, match="either a shared secret or a username"):
        ServerConfig(ice_servers=["turn:relay.example.org"], turn_secret="s", turn_username="u", turn_credential="c")
    with pytest.raises(LetsTalkError, match="--port 99999: a TCP port is 0-65535"):  # before the model loads
        ServerConfig(port=99999)
    with pytest.raises(LetsTalkError, match="--token-ttl 0: give 1 second or more"):
        ServerConfig(token_ttl_s=0)
    config = ServerConfig(ice_servers=["stun:stun.example.org", "turn:relay.example.org?transport=tcp"],
                          turn_username="u", turn_credential="c")
    assert config.session_ice_servers("abc") == [
        {"urls": ["stun:stun.example.org"]},
        {"urls": ["turn:relay.example.org?transport=tcp"], "username": "u", "credential": "c"}]
    with pytest.raises(ValueError, match="needs a username"):
        AvatarClient("http://127.0.0.1:1", ice_servers=["turns:relay.example.org"])
    for url in ("127.0.0.1:8080", "localhost", "ws://127.0.0.1:8080"):  # what one types for a server: said at once,
        with pytest.raises(LetsTalkError, match=f"server URL '{url}' is not an http"):  # not a traceback at the POST
            AvatarClient(url)
    assert str(AvatarClient("https://x.example/lt").base_url) == "https://x.example/lt/"


def test_sdk_raises_the_servers_errors(tiny_pipeline):
    from letstalk_rt.client import (
        AuthenticationError,
        AvatarClient,
        AvatarClientError,
        RequestError,
        ServerBusyError,
        SessionNotFoundError,
    )

    async def main():
        async with running_server(tiny_pipeline, max_sessions=1, api_key="secret") as srv:
            async with AvatarClient(srv.url) as anonymous:
                with pytest.raises(AuthenticationError, match="API key"):
                    await anonymous.start_session()
            async with AvatarClient(srv.url, api_key="secret") as client:
                with pytest.raises(RequestError, match="not an image") as bad:
                    await client.start_session(portrait=b"plain text, not a picture")
                assert bad.value.status == 415
                with pytest.raises(RequestError, match="unknown avatar_id"):
                    await client.start_session(avatar_id="nobody")
                session = await client.start_session()
                t0 = time.monotonic()
                with pytest.raises(ServerBusyError) as busy:
                    await client.start_session()
                assert busy.value.retry_after == 5 and time.monotonic() - t0 < 1
                # the server closes the websocket on binary garbage; the next call says why
                await session.ping()
                await session._ws.send_bytes(b"\x00")
                await asyncio.sleep(0.5)
                with pytest.raises(AvatarClientError, match="1003"):
                    await session.end_speech()
                with pytest.raises(ValueError):
                    await session.send_audio(b"\x00\x01\x02", sample_rate=16000)  # checked before sending
                await srv.manager.close(srv.manager.sessions[session.id], "test")
                with pytest.raises(SessionNotFoundError):
                    await session.stats()
                await session.close()  # idempotent and quiet about an already-gone session

    run(main())



def test_sdk_says_why_the_server_closed_the_session_whichever_comes_first(tiny_pipeline):
    """A session the server closes (an operator, its time limit): from its `closed` event on, every send and request
    raises SessionClosedError with the server's reason, also before the websocket's own close has come in (a callback
    of the `closed` event sends at once); events() ends with that event."""
    from letstalk_rt.client import AvatarClient, SessionClosedError

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                session = await client.start_session()
                await session.ping()  # the websocket is open
                at_once: list[BaseException] = []

                async def send_at_once(event: dict) -> None:
                    try:
                        await session.send_audio(np.zeros(320, np.int16), 16000)
                    except BaseException as e:
                        at_once.append(e)

                session.on("closed", send_at_once)
                assert session.close_reason is None
                await srv.manager.close(srv.manager.sessions[session.id], "ended by the operator")
                events = [event async for event in session.events()]
                assert events[-1]["type"] == "closed" and session.close_reason == "ended by the operator"
                await wait_until(lambda: at_once, 5, "the send made as the closed event came")
                assert isinstance(at_once[0], SessionClosedError), at_once
                for call in (session.ping(), session.end_speech(), session.send_audio(np.zeros(320, np.int16))):
                    with pytest.raises(SessionClosedError, match="closed by the server: ended by the operator") as e:
                        await call
                    assert e.value.reason == "ended by the operator"

    run(main())


def test_a_client_streaming_audio_is_told_why_the_server_closed_its_session(tiny_pipeline):
    """A client streaming audio (a microphone, `letstalk camera --server`) when the server closes its session still
    gets the `closed` event with the reason, and its websocket's close carries the reason too. The websocket's handler,
    woken by the next audio message, used to return at once: aiohttp closed the socket (1000, no reason) before the
    session's close had sent the event, and the client knew only that its websocket had closed (CI saw it through
    `letstalk camera --server`). Here 2 ms of audio every 2 ms, five sessions in a row: the old handler lost the race
    in every run (3 of 3)."""
    from letstalk_rt.client import AvatarClient, AvatarClientError

    async def one(srv, client) -> tuple[list, str | None, str | None]:
        session = await client.start_session()
        await session.ping()

        async def stream() -> None:
            with contextlib.suppress(AvatarClientError):  # SessionClosedError too, once it is closed
                while True:
                    await session.send_audio(np.full(32, 1000, np.int16), 16000)
                    await asyncio.sleep(0.002)

        sender = asyncio.create_task(stream())
        await asyncio.sleep(0.3)
        await srv.manager.close(srv.manager.sessions[session.id], "ended by the operator")
        events: list = []
        try:
            async for event in session.events():
                events.append(event["type"])
        except AvatarClientError as e:
            events.append(str(e))
        await asyncio.wait_for(sender, 5)
        await wait_until(lambda: session._ws_close is not None, 5, "the websocket's close (it follows the event)")
        return events[-1:], session.close_reason, session._ws_close

    async def main():
        async with running_server(tiny_pipeline) as srv:
            async with AvatarClient(srv.url) as client:
                return [await one(srv, client) for _ in range(5)]

    for last, reason, ws_close in run(main()):
        assert last == ["closed"] and reason == "ended by the operator", (last, reason, ws_close)
        assert ws_close == "closed by the server (code 1000: session closed: ended by the operator)", ws_close


def test_sdk_events_end_when_the_websocket_ends_and_odd_rates_are_sent_whole(tiny_pipeline):
    """events() raises the server's close reason when its websocket ends without a `closed` event (here:
    another client's websocket replaces it) instead of waiting forever; audio at a rate whose half second
    is an odd number of samples (11025 Hz) is still sent as whole PCM16 samples."""
    from letstalk_rt.client import AvatarClient, AvatarClientError

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            async with AvatarClient(srv.url) as client:
                session = await client.start_session()
                ss = srv.manager.sessions[session.id]
                pushed: list[int] = []
                take = ss.audio_message
                ss.audio_message = lambda pcm, rate: pushed.append(0 if pcm is None else len(pcm)) or take(pcm, rate)
                speech = speechlike(1.0, 11025)
                await session.send_audio(speech, sample_rate=11025)  # 5512 samples per message, not 5512.5
                await session.send_audio(np.stack([speech, speech], axis=1), sample_rate=11025)  # and stereo
                interleaved = np.stack([speech, speech], axis=1).reshape(-1)  # flat L R L R ..., as many APIs hold it
                await session.send_audio(interleaved, sample_rate=np.int64(11025), channels=2)
                await session.send_audio((speech * 32767).astype(np.int64), sample_rate=11025.0)  # ints in range
                for bad, said in (((speech * 32767).astype(np.float32), "divide them by 32768"),
                                  (np.full(100, np.nan), "NaN"),
                                  ((speech * 2**31).astype(np.int32), "outside int16's range"),
                                  (np.stack([speech, speech]), r"is \(channels, n\); send its transpose"),
                                  (interleaved[:-1], "not whole frames of 2 channels")):
                    with pytest.raises(ValueError, match=said):  # said, not sent as noise
                        await session.send_audio(bad, sample_rate=11025, channels=2 if "whole" in said else None)
                with pytest.raises(ValueError, match="whole number of Hz"):
                    await session.send_audio(speech, sample_rate=11025.5)
                assert await session.ping() >= 0  # the server kept the websocket: every message was whole
                assert sum(pushed) == 4 * 11025  # the interleaved stereo as 1 s, not 2

                types: list[str] = []

                async def read_events():
                    async for event in session.events():
                        types.append(event["type"])

                reader = asyncio.ensure_future(read_events())
                await asyncio.sleep(0.2)
                other = await http.ws_connect(session.ws_url, headers={"Authorization": f"Bearer {session.token}"})
                with pytest.raises(AvatarClientError, match="replaced by a newer websocket"):
                    await asyncio.wait_for(reader, 10)
                assert "ready" in types and "closed" not in types
                with pytest.raises(AvatarClientError, match="replaced"):  # and again: the stream stays ended
                    async for _ in session.events():
                        pass
                await other.close()

    run(main())


@contextlib.asynccontextmanager
async def _fake_server(delete_handler):
    """A stand-in server: POST /v1/sessions answers like the real one, DELETE as `delete_handler` says."""

    async def create(request: web.Request) -> web.Response:
        return web.json_response({"session_id": "s1", "token": "t", "expires_at": 0,
                                  "offer_url": "/v1/sessions/s1/offer", "ws_url": "/v1/sessions/s1/ws"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/sessions", create)
    app.router.add_delete("/v1/sessions/{id}", delete_handler)
    async with _serving(app) as url:
        yield url


@contextlib.asynccontextmanager
async def _serving(app: web.Application):
    """`app` on 127.0.0.1:<ephemeral>: its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("failure", ["timeout", "500"])
def test_sdk_close_cleans_up_when_the_delete_fails(failure, caplog):
    """A DELETE that times out or gets a 5xx is logged; close() still ends the streams, cancels the
    session's tasks and forgets the session, and does not raise."""
    from letstalk_rt.client import AvatarClient

    async def delete(request: web.Request) -> web.Response:
        if failure == "timeout":
            await asyncio.sleep(5)
        return web.json_response({"error": "internal server error"}, status=500)

    async def main():
        async with _fake_server(delete) as url:
            async with AvatarClient(url, timeout=0.5) as client:
                session = await client.start_session()
                task = session._spawn(asyncio.sleep(60), "background")
                await session.close()
                await asyncio.sleep(0)
                assert task.cancelled()
                assert session not in client._sessions
                assert [event async for event in session.events()] == []  # ended, not waiting
                assert [frame async for frame in session.video_frames()] == []

    run(main())
    assert "DELETE failed" in caplog.text


def _speak_file_module():
    from conftest import client_example

    return client_example("speak_file")


def _speak_args(url, audio, out, full_frame=None):
    import argparse

    return argparse.Namespace(audio=audio, out=out, server=url, api_key=None, portrait=None, avatar="default",
                              tail=0.6, full_frame=full_frame, framing=None, relay=False)


def test_speak_file_example_records_the_reply_and_leaves_nothing_when_the_server_drops_it(tiny_pipeline,
                                                                                           wav_file, tmp_path):
    """client_examples/speak_file.py, as a user runs it: the reply is an mp4 of the speech's length with the
    avatar's sound; when the server closes the session mid-speech it fails and leaves no file (none looking
    complete, no partial one)."""
    from letstalk_rt.client import AvatarClientError
    from letstalk_rt.media import load_audio, read_frames

    speak_file = _speak_file_module()
    speech = wav_file(1.5)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    async def main():
        async with running_server(tiny_pipeline) as srv:
            await speak_file.speak(_speak_args(srv.url, speech, out_dir / "reply.mp4", full_frame=64))
            task = asyncio.ensure_future(speak_file.speak(_speak_args(srv.url, speech, out_dir / "dropped.mp4")))
            # the recording has begun (its partial file is there) when the server drops the session
            await wait_until(lambda: any(p.name.startswith(".dropped.mp4.partial") for p in out_dir.iterdir()),
                             30, "the second reply's recording")
            for ss in list(srv.manager.sessions.values()):
                await srv.manager.close(ss, "closed by the watchdog")
            with pytest.raises(AvatarClientError):
                await task

    run(main())
    assert sorted(p.name for p in out_dir.iterdir()) == ["reply.mp4"]
    frames = list(read_frames(out_dir / "reply.mp4"))
    assert frames[0].shape == (64, 64, 3)  # --full-frame 64: the whole bundled photo (320 px), fit to 64
    # 1.5 s of speech and 0.6 s of tail, give or take the first frame's wait and the close
    assert 1.6 * 25 <= len(frames) <= 3.0 * 25, len(frames)
    audio = load_audio(out_dir / "reply.mp4")
    assert np.sqrt(np.mean(audio ** 2)) > 0.01  # the avatar's speech came back with its frames


def test_speak_file_places_the_audio_by_media_time_not_by_arrival(tmp_path):
    """The SDK hands a frame over once its audio has arrived, so audio of the first frame's time comes before it, and
    packets can be missing: the recording puts each chunk where its media time says, against the first frame's."""
    import av

    from letstalk_rt.client import AudioChunk, TimedFrame
    from letstalk_rt.media import load_audio

    speak_file = _speak_file_module()
    out = tmp_path / "reply.mp4"
    rec = speak_file.Recorder(out)
    rate, n = 48000, 960

    def chunk(t: float, loud: bool) -> AudioChunk:
        pcm = np.full((n, 2), 12000 if loud else 0, np.int16)
        return AudioChunk(pcm=pcm, sample_rate=rate, time=t)

    def frame(t: float) -> TimedFrame:
        return TimedFrame(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24"), t, 0.0)

    for j in range(10):  # 0.40 .. 0.58 s: arrived before the first frame; from 0.48 s on they belong to the recording
        rec.add_audio(chunk(0.40 + j * 0.02, loud=False))
    for i in range(25):
        rec.add_frame(frame(0.48 + i * 0.04))
    for j in range(10, 50):  # 0.60 .. 1.38 s; loud from 0.88 s (0.40 s into the recording); 1.00 s never came
        if j != 30:
            rec.add_audio(chunk(0.40 + j * 0.02, loud=j >= 24))
    rec.close()
    audio = load_audio(out, sample_rate=16000)
    first_loud = int(np.argmax(np.abs(audio) > 0.1))
    assert abs(first_loud / 16000 - 0.40) < 0.01, first_loud / 16000
    level = lambda a, b: float(np.abs(audio[round(a * 16000):round(b * 16000)]).mean())  # noqa: E731
    assert level(0.525, 0.535) < 0.1 < level(0.50, 0.51)  # 1.00-1.02 s of media time: silence in its place


def test_aligned_frames_wait_for_their_audio_but_a_stalled_audio_stream_holds_none_back():
    """`connect(align=True)`: a frame is handed over once the audio of its media time is in; while the audio has not
    moved for ALIGN_MAX_S no frame waits at all, so frames queued behind a stall do not add their waits up."""
    import time

    from letstalk_rt.client import ALIGN_MAX_S, AvatarClient, AvatarSession

    async def main():
        session = AvatarSession(AvatarClient("http://127.0.0.1:9"), {
            "session_id": "s", "token": "t", "expires_at": 0, "offer_url": "/o", "ws_url": "/w"})
        session._audio_until, session._audio_at = 1.0, time.monotonic()  # audio in up to 1.0 s of media time

        async def audio_arrives(after: float, until: float):
            await asyncio.sleep(after)
            session._audio_until, session._audio_at = until, time.monotonic()
            session._audio_moved.set()

        t = time.monotonic()
        await session._wait_audio(0.96)  # its audio is in: no wait
        assert time.monotonic() - t < 0.01
        arrive = asyncio.ensure_future(audio_arrives(0.05, 1.02))
        await session._wait_audio(1.0)  # waits for its audio, 50 ms
        assert 0.04 < time.monotonic() - t < 0.05 + ALIGN_MAX_S / 2
        await arrive
        t = time.monotonic()
        for i in range(10):  # the audio stalls: the first frame waits ALIGN_MAX_S, the ones queued behind it nothing
            await session._wait_audio(1.04 + 0.04 * i)
        assert ALIGN_MAX_S - 0.01 < time.monotonic() - t < ALIGN_MAX_S + 0.1  # not 10 x ALIGN_MAX_S

    asyncio.run(main())


def test_viewers_watch_a_session_beside_its_own_peer_and_leave_without_ending_it(tiny_pipeline):
    """POST /v1/sessions/{id}/viewers: the client that drives a session keeps its own peer connection, while another
    SDK client (attached by id and token, `connect(viewer=True)`) and a raw peer watch it too, its speech coming back
    to each of them. Past --max-viewers a viewer is refused (409); a viewer that leaves (close(), DELETE) leaves the
    session going; the session's end closes its viewers' connections."""
    from letstalk_rt.client import AvatarClient, RequestError
    from server_helpers import Peer

    async def main():
        async with running_server(tiny_pipeline, max_viewers=2) as srv, AvatarClient(srv.url) as owner, \
                AvatarClient(srv.url) as other, aiohttp.ClientSession() as http:
            session = await owner.start_session()
            await session.connect()
            watched = await other.session(session.id, session.token)
            with pytest.raises(ValueError, match="watches only"):
                await watched.connect(viewer=True, websocket=True)
            await watched.connect(viewer=True)
            assert watched._ws is None and watched.viewer_url.startswith(f"{srv.url}/v1/sessions/{session.id}/viewers/")
            raw = Peer()
            sdp = await raw.offer()
            async with http.post(f"{srv.url}/v1/sessions/{session.id}/viewers", data=sdp, headers={
                    "Authorization": f"Bearer {session.token}", "Content-Type": "application/sdp"}) as r:
                assert r.status == 201, await r.text()
                await raw.pc.setRemoteDescription(RTCSessionDescription(sdp=await r.text(), type="answer"))
                raw_url = r.headers["Location"]
            third = await other.session(session.id, session.token)
            with pytest.raises(RequestError, match="HTTP 409.*--max-viewers"):
                await third.connect(viewer=True, reconnect=False)
            owner_media, viewer_media = collect_media(session), collect_media(watched)
            speech = speechlike(1.5)
            for i in range(0, len(speech), 1600):
                await session.send_audio(speech[i:i + 1600], sample_rate=16000)
                await asyncio.sleep(0.1)
            await raw.wait_frames(video=25, audio=25)
            await asyncio.sleep(1.0)
            state = await session.stats()
            engine_session = srv.manager.sessions[session.id].session
            encoders = {mime: (len(e.readers), e.frames_encoded)
                        for mime, e in engine_session.video_encoders.items()}
            shown = engine_session.player.tick
            metrics = await owner.metrics()
            await watched.close()  # frees its viewer only
            await wait_until(lambda: len(srv.manager.sessions[session.id].viewers) == 1, 10, "the viewer gone")
            alive = session.id in srv.manager.sessions and srv.manager.sessions[session.id].pc is not None
            async with http.delete(raw_url, headers={"Authorization": f"Bearer {session.token}"}) as r:
                deleted = r.status
            async with http.delete(raw_url, headers={"Authorization": f"Bearer {session.token}"}) as r:
                again = r.status
            raw2 = Peer()  # the session's end closes a viewer's connection
            sdp = await raw2.offer()
            async with http.post(f"{srv.url}/v1/sessions/{session.id}/viewers", data=sdp, headers={
                    "Authorization": f"Bearer {session.token}", "Content-Type": "application/sdp"}) as r:
                await raw2.pc.setRemoteDescription(RTCSessionDescription(sdp=await r.text(), type="answer"))
            await raw2.wait_frames(video=3)
            await session.close()
            await wait_until(lambda: raw2.pc.connectionState == "closed" or raw2.pc.iceConnectionState in
                             ("closed", "failed", "disconnected"), 20, "the viewer's connection closed")
            for task in owner_media[2] + viewer_media[2]:
                task.cancel()
            await raw.close()
            await raw2.close()
            return owner_media, viewer_media, raw, state, metrics, alive, deleted, again, encoders, shown

    owner_media, viewer_media, raw, state, metrics, alive, deleted, again, encoders, shown = run(main())
    # the three peers' video was encoded once a tick (or less: ticks every peer skipped), not three times
    assert list(encoders) == ["video/vp8"] and encoders["video/vp8"][0] == 3, encoders
    assert shown // 2 <= encoders["video/vp8"][1] <= shown + 1, (encoders, shown)
    for frames, chunks, _ in (owner_media, viewer_media):
        assert len(frames) >= 25 and frames[0].shape == (32, 32, 3)
        assert max(float(np.abs(c.pcm).max()) for c in chunks) > 300  # the owner's speech, back to each
    assert state["viewers"] == 2 and state["peer_connection"] == "connected" and metrics["letstalk_viewers"] == 2
    assert alive and deleted == 204 and again == 404
    assert len(raw.video_frames) >= 25 and max(raw.audio_rms) > 0.01


def test_sdk_tells_a_wrong_url_and_an_older_server_from_a_missing_session(tiny_pipeline):
    """A 404 for a route the SDK uses is ServerMismatchError saying what to fix, not SessionNotFoundError: from a URL
    that is no letstalk-rt server (another web server: check the URL), from a letstalk-rt server under a wrong path
    (its root), or from an older one without the route (a server as new as the SDK). The server names its version in
    every answer and in /health, and the SDK names itself; a session that is gone is still SessionNotFoundError (also
    under a URL that names a live stream), and a missing avatar AvatarNotFoundError, also from a server behind a proxy's
    path prefix: the server's 404s say what is missing (`code`), and an older server's are told by their URL."""
    from letstalk_rt import VERSION_HEADER, __version__
    from letstalk_rt.client import (AvatarClient, AvatarNotFoundError, RequestError, ServerMismatchError,
                                    SessionNotFoundError)

    agents = []

    async def older(request: web.Request) -> web.Response:  # the answer a letstalk-rt 0.0.9 without the route gives
        agents.append(request.headers.get("User-Agent", ""))
        return web.json_response({"error": "Not Found", "code": "no_route"}, status=404,
                                 headers={VERSION_HEADER: "0.0.9"})

    async def no_avatar(request: web.Request) -> web.Response:  # a server's own 404 for a missing avatar
        return web.json_response({"error": "no avatar 'nobody'"}, status=404, headers={VERSION_HEADER: __version__})

    app = web.Application()
    app.router.add_get("/v1/voices", older)
    app.router.add_delete("/lt/v1/avatars/{id}", no_avatar)  # a server behind a proxy's path prefix

    async def main():
        async with _serving(app) as other, AvatarClient(other) as client:
            with pytest.raises(ServerMismatchError, match="which is not a letstalk-rt server .* check the URL") as e:
                await client.health()  # aiohttp's own 404, as any other web server's, says no version
            assert e.value.status == 404 and e.value.server_version is None
            with pytest.raises(ServerMismatchError, match=rf"\(0\.0\.9\) has no such route; this SDK is letstalk-rt "
                                                          rf"{re.escape(__version__)}: use a server as new as the SDK"
                               ) as e:
                await client.voices()
            assert e.value.server_version == "0.0.9"
            assert agents[0].startswith(f"letstalk-rt/{__version__} (Python SDK"), agents
            async with AvatarClient(other + "/lt") as prefixed:
                with pytest.raises(AvatarNotFoundError, match="no avatar 'nobody'"):
                    await prefixed.delete_avatar("nobody")
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/health") as r:
                assert r.headers[VERSION_HEADER] == __version__ and (await r.json())["version"] == __version__
            async with AvatarClient(srv.url + "/api") as client:  # a path the server does not have
                match = rf"at http://127\.0\.0\.1:\d+ \({re.escape(__version__)}\) has no such route; check the URL"
                with pytest.raises(ServerMismatchError, match=match + ": the server's root"):
                    await client.start_session(avatar_id="default")
            async with AvatarClient(srv.url) as client:
                with pytest.raises(AvatarNotFoundError):
                    await client.delete_avatar("nobody")
                session = await client.start_session(avatar_id="default")
                with pytest.raises(RequestError, match="has no live stream running") as e:  # the session is there
                    await session.stop_broadcast()
                assert not isinstance(e.value, SessionNotFoundError)
                await srv.manager.close(srv.manager.sessions[session.id], "test")
                with pytest.raises(SessionNotFoundError):
                    await session.stats()
                with pytest.raises(SessionNotFoundError):  # a URL under /broadcast, but the session is what is missing
                    await session.stop_broadcast()
                await session.close()
            codes = {}  # every 404 of the server names what is missing
            for method, path in (("DELETE", "/v1/avatars/nobody"), ("GET", "/v1/renders/nope"),
                                 ("GET", "/v1/recordings/nope"), ("GET", "/v1/nowhere")):
                async with http.request(method, srv.url + path) as r:
                    codes[path] = (r.status, (await r.json()).get("code"))
            assert codes == {"/v1/avatars/nobody": (404, "avatar_not_found"),
                             "/v1/renders/nope": (404, "render_not_found"),
                             "/v1/recordings/nope": (404, "recording_not_found"), "/v1/nowhere": (404, "no_route")}

    run(main())
