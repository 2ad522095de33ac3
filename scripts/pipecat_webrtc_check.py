"""The Pipecat video service through a real network transport: the bundled speech as a Pipecat TTS's output ->
`LetsTalkVideoService` (the bundled model, this CPU) -> Pipecat's SmallWebRTCTransport -> an aiortc peer in this
process, whose received media is written as an MP4 laid out by arrival time (each 40 ms shows the last frame that had
arrived by then; the audio as it arrived), then scored by `letstalk sync-check` (speech to mouth, label-free).

    pip install 'pipecat-ai[webrtc]'        # SmallWebRTC needs aiortc (here already) and opencv-python-headless
    python scripts/pipecat_webrtc_check.py [OUT.mp4] [--server]

`--server`: the service in its remote mode (`server=`), on a LetsTalk server run in this process on the same engine:
the speech goes to it over the SDK's websocket and the frames and speech come back over a second WebRTC hop first.

Prints what arrived and two sync-check lines: lip sync at offset 0 and the offset where it peaks (negative: the video
arrives early), with the audio as the peer's recv() handed it over and as it came off the wire (aiortc's receiver holds
its audio ~60 ms longer than its video). docs/benchmarks.md, "The Pipecat service through SmallWebRTC", has runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

from letstalk_rt.eval import sync_check
from letstalk_rt.integrations.pipecat import LetsTalkVideoService
from letstalk_rt.media import VideoWriter, frame_pcm, load_audio, pcm16
from letstalk_rt.pipeline import LetsTalkPipeline
from letstalk_rt.stream import StreamEngine

ASSETS = Path(__file__).resolve().parents[1] / "letstalk_rt" / "assets"
SIZE = 128  # the bundled model's frames
AUDIO_PREFETCH_MS = 60  # what aiortc's audio jitter buffer holds back beyond the first 20 ms packet itself


async def receive(client: RTCPeerConnection, video: list, audio: list) -> None:
    @client.on("track")
    def on_track(track) -> None:
        async def read() -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:  # the track ended
                    return
                now = time.monotonic()
                if track.kind == "video":
                    video.append((now, frame.to_ndarray(format="rgb24")))
                else:
                    pcm = frame_pcm(frame)
                    pcm = pcm.astype(np.float32) / 32768 if pcm.dtype == np.int16 else pcm.astype(np.float32)
                    audio.append((now, pcm.mean(axis=1), frame.sample_rate))
        asyncio.ensure_future(read())


async def main(out: Path, remote: bool = False) -> None:
    engine = await StreamEngine(LetsTalkPipeline.from_pretrained()).start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.stop)  # after the server's end
        if remote:
            from letstalk_rt.bench_webrtc import local_server

            url, _ = await stack.enter_async_context(local_server(engine))
            avatar = LetsTalkVideoService(server=url, portrait=ASSETS / "portrait.png")
        else:
            avatar = LetsTalkVideoService(engine=engine, portrait=ASSETS / "portrait.png")
        await check(engine, avatar, out)


async def check(engine: StreamEngine, avatar: LetsTalkVideoService, out: Path) -> None:
    speech = np.asarray(load_audio(ASSETS / "speech.ogg"))  # 16 kHz float
    samples = pcm16(speech)
    tts = [TTSStartedFrame(), *[TTSAudioRawFrame(samples[i:i + 8000].tobytes(), 16000, 1)  # 0.5 s chunks, at once
                               for i in range(0, len(samples), 8000)], TTSStoppedFrame()]
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="sendrecv")
    client.addTransceiver("video", direction="sendrecv")
    client.createDataChannel("pipecat")
    video: list = []
    audio: list = []
    await receive(client, video, audio)
    await client.setLocalDescription(await client.createOffer())
    connection = SmallWebRTCConnection()
    await connection.initialize(sdp=client.localDescription.sdp, type="offer")
    answer = connection.get_answer()
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    params = TransportParams(audio_out_enabled=True, video_out_enabled=True, video_out_width=SIZE,
                             video_out_height=SIZE, video_out_framerate=25)
    transport = SmallWebRTCTransport(webrtc_connection=connection, params=params)
    t0 = time.monotonic()
    try:
        await run_test(Pipeline([avatar, transport.output()]), start_timeout=30,
                       frames_to_send=[SleepFrame(sleep=3.0), *tts, SleepFrame(sleep=len(speech) / 16000 + 3)])
    finally:
        await client.close()
    seconds = sum(len(a[1]) / a[2] for a in audio)
    print(f"received {len(video)} video frames and {seconds:.1f} s of audio in {time.monotonic() - t0:.1f} s")
    rate = audio[0][2]
    pcm = np.concatenate([a[1] for a in audio])
    pcm = pcm[::rate // 16000] if rate % 16000 == 0 else pcm  # Opus decodes to 48 kHz
    times = np.array([t for t, _ in video])
    # aiortc's receiver holds 4 audio packets (JitterBuffer prefetch=4, 80 ms) before it hands over the first and
    # every later one as late; its video buffer holds none: by recv() time the sound is ~60 ms later than on the wire
    for held_ms in (0, AUDIO_PREFETCH_MS):
        start = audio[0][0] - len(audio[0][1]) / rate - held_ms / 1000  # when the first packet's sound began
        path = out if not held_ms else out.with_name(f"{out.stem}_wire{out.suffix}")
        with VideoWriter(path, SIZE, sample_rate=16000) as writer:
            for k in range(len(pcm) // 640):
                i = max(0, int(np.searchsorted(times, start + k / 25, side="right")) - 1)
                writer.write_frame(video[i][1])
                writer.write_audio(pcm[k * 640:(k + 1) * 640])
        r = sync_check(path, ASSETS / "portrait.png")
        print(f"{path} (audio {'as recv() gave it' if not held_ms else f'{held_ms} ms earlier: as it came'}): speech "
              f"to mouth r = {r['speech_sync']:.3f} at offset 0, peak {r['peak_sync']:.3f} at {r['speech_offset']:+d} "
              "frames (negative: the video arrived early)")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--server"]
    asyncio.run(main(Path(args[0]) if args else Path("pipecat_webrtc.mp4"), remote="--server" in sys.argv[1:]))
