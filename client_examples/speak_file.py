"""Speak an audio file through a letstalk-rt server and record what comes back (video + audio) to MP4.

    letstalk serve &                                                   # or: python -m letstalk_rt.server
    python client_examples/speak_file.py --audio speech.wav --out reply.mp4
    python client_examples/speak_file.py --audio talk.mp3 --portrait face.jpg --server http://gpu-box:8080 \\
        --api-key $LETSTALK_API_KEY --out reply.mp4

The speech is streamed over the session's websocket at real-time pace (as a live source would), the
avatar comes back over WebRTC, and both received tracks are encoded with PyAV (H.264 + AAC). Only the
SDK is used (HTTP, WebRTC, websocket): no model, no torch on this side. (To have the server make the MP4 itself and
download it when done, with nothing streamed: `AvatarClient.render`, POST /v1/renders.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from letstalk_rt.aio import stop_on_sigterm
from letstalk_rt.client import AudioChunk, AvatarClient, AvatarClientError, TimedFrame
from letstalk_rt.errors import LetsTalkError
from letstalk_rt.media import VideoWriter, check_video_path, load_audio

FPS = 25
OPUS_RATE = 48000  # what the received audio track decodes to


class Recorder:
    """Received frames and audio chunks -> an MP4 (media.VideoWriter: written under a temporary name and renamed into
    place by `close()`, so a server that vanishes mid-stream leaves no half-written reply.mp4), from the first video
    frame on. Each audio chunk goes where its media time puts it against the first frame's (`AudioChunk.time`,
    `TimedFrame.time`), not where it happened to arrive: lips and sound in the file are as the server sent them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: VideoWriter | None = None
        self.start = 0.0  # the first frame's media time
        self.early: list[AudioChunk] = []  # audio that arrived before the first frame

    def add_frame(self, frame: TimedFrame) -> None:
        rgb = frame.rgb
        if self.writer is None:  # yuv420p needs even sides: pad an odd one by a row / column
            h, w = rgb.shape[0] + rgb.shape[0] % 2, rgb.shape[1] + rgb.shape[1] % 2
            self.writer = VideoWriter(self.path, (w, h), fps=FPS, sample_rate=OPUS_RATE, preset="veryfast")
            self.start = frame.time
            for chunk in self.early:
                self.add_audio(chunk)
            self.early.clear()
        w, h = self.writer.width, self.writer.height
        self.writer.write_frame(np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge"))

    def add_audio(self, chunk: AudioChunk) -> None:
        """The avatar speaks in mono: the received channels are averaged."""
        if chunk.sample_rate != OPUS_RATE:
            raise LetsTalkError(f"received audio at {chunk.sample_rate} Hz; WebRTC's Opus decodes to {OPUS_RATE}")
        if self.writer is None:
            self.early = [*self.early[-49:], chunk]  # the last second before the first frame: it may belong to it
            return
        at = round((chunk.time - self.start) * OPUS_RATE)  # the sample of the recording where it belongs
        if at > self.writer.samples_written:  # packets that never came: silence in their place
            self.writer.write_audio(np.zeros(at - self.writer.samples_written, np.float32))
        # what lies before the recording, or was already written, is left out
        self.writer.write_audio(chunk.mono_float()[self.writer.samples_written - at:])

    @property
    def frames(self) -> int:
        return self.writer.frames_written if self.writer is not None else 0

    def close(self) -> None:
        """Finish the file and rename it onto `path`."""
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        """Delete what was written: `path` is left as it was."""
        if self.writer is not None:
            self.writer.abort()


async def speak(args: argparse.Namespace) -> None:
    speech = load_audio(args.audio, 16000)  # float32 mono 16 kHz; InputError with a reason if unreadable
    check_video_path(args.out, "--out")  # before connecting, not after the whole speech
    recorder = Recorder(args.out)
    try:
        await _stream(args, speech, recorder)
    except BaseException:
        recorder.abort()
        raise
    if recorder.writer is None:
        raise LetsTalkError("no video frame arrived from the server; nothing was recorded")
    recorder.close()
    print(f"wrote {args.out}: {recorder.frames} frames ({recorder.frames / FPS:.1f} s)")


async def _stream(args: argparse.Namespace, speech: np.ndarray, recorder: Recorder) -> None:
    seconds = len(speech) / 16000
    async with AvatarClient(args.server, api_key=args.api_key, relay_only=args.relay) as client:
        shape = {"full_frame": args.full_frame, "framing": args.framing}
        session = await client.start_session(portrait=args.portrait, **shape) if args.portrait \
            else await client.start_session(avatar_id=args.avatar, **shape)
        session.on("speech_started", lambda ev: print(f"  avatar started talking (frame {ev['frame']})"))
        session.on("speech_stopped", lambda ev: print(f"  avatar stopped talking (frame {ev['frame']})"))
        session.on("error", lambda ev: print(f"  server: {ev['message']}", file=sys.stderr))
        await session.connect()
        route = session.route() or {}
        print(f"session {session.id}: connected ({route.get('local')} to {route.get('remote')}), streaming "
              f"{seconds:.1f} s of speech ...")

        async def record_video():
            async for frame in session.timed_video_frames():
                recorder.add_frame(frame)

        async def record_audio():
            async for chunk in session.audio_frames():
                recorder.add_audio(chunk)

        tasks = [asyncio.ensure_future(record_video()), asyncio.ensure_future(record_audio())]
        try:
            chunk = 1600  # 100 ms
            start = time.monotonic()
            for i, pos in enumerate(range(0, len(speech), chunk)):  # real-time pace on an absolute schedule
                await asyncio.sleep(max(0.0, start + i * chunk / 16000 - time.monotonic()))
                await session.send_audio(speech[pos:pos + chunk], sample_rate=16000)
            await session.end_speech()
            await asyncio.sleep(args.tail)  # the last frames of the utterance, then a moment of rest
            stats = await session.stats()
            await session.close()
            await asyncio.gather(*tasks)  # the readers end with the connection, or raise what failed them
        finally:  # on a failure: no reader writes on into the recording, which the caller throws away
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    s = stats["stats"]
    route = stats.get("route") or {}  # None from a server older than this example
    print(f"server: first frame {(s['first_frame_s'] or 0) * 1000:.0f} ms, speech-to-screen p50 "
          f"{s['latency_ms_p50'] or 0:.0f} ms; its side connected {route.get('local')} to {route.get('remote')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", type=Path, required=True, help="speech file (wav, mp3, ogg, m4a, flac ...)")
    p.add_argument("--out", type=Path, default=Path("reply.mp4"))
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--portrait", type=Path, default=None, help="a photo to animate (default: the server's avatar)")
    p.add_argument("--avatar", default="default", help="a preloaded avatar id (GET /v1/avatars)")
    p.add_argument("--full-frame", type=int, default=None, metavar="PX",
                   help="the whole photo talks, fit to PX (e.g. 512); default: the face crop")
    p.add_argument("--framing", type=float, default=None, metavar="K",
                   help="with --full-frame: a small face is shown with at most K sides of its square on the frames' "
                        "shorter side (the server's default 3); 0: the whole photo")
    p.add_argument("--relay", action="store_true", help="connect only through the server's TURN relay")
    p.add_argument("--tail", type=float, default=1.5, help="seconds recorded after the speech ends")
    args = p.parse_args()
    try:
        with stop_on_sigterm():  # `kill` stops it as Ctrl-C does: the server's session closed, nothing half-written
            asyncio.run(speak(args))
    except (LetsTalkError, AvatarClientError) as e:
        print(f"speak_file: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"speak_file: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or a `kill`: the session was closed on the way out
        print("speak_file: stopped; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
