"""Speak an audio file through a letstalk-rt server and record what comes back (video + audio) to MP4.

    letstalk serve &                                                   # or: python -m server
    python client_examples/speak_file.py --audio speech.wav --out reply.mp4
    python client_examples/speak_file.py --audio talk.mp3 --portrait face.jpg --server http://gpu-box:8080 \\
        --api-key $LETSTALK_API_KEY --out reply.mp4

The speech is streamed over the session's websocket at real-time pace (as a live source would), the
avatar comes back over WebRTC, and both received tracks are encoded with PyAV (H.264 + AAC). Only the
SDK is used (HTTP, WebRTC, websocket): no model, no torch on this side.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from letstalk_rt.client import AvatarClient, AvatarClientError
from letstalk_rt.errors import LetsTalkError
from letstalk_rt.media import load_audio

FPS = 25


class Recorder:
    """Received RGB frames and audio chunks -> an MP4, timed from the first video frame."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container = None
        self.video = self.audio = None
        self.frames = 0
        self.samples = 0

    def _open(self, size: tuple[int, int], rate: int, channels: int) -> None:
        self.container = av.open(str(self.path), "w")
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width, self.video.height = size[1] + size[1] % 2, size[0] + size[0] % 2
        self.video.pix_fmt = "yuv420p"
        self.audio = self.container.add_stream("aac", rate=rate, layout="stereo" if channels == 2 else "mono")

    def add_frame(self, rgb: np.ndarray, audio_rate: int = 48000, audio_channels: int = 2) -> None:
        if self.container is None:
            self._open(rgb.shape[:2], audio_rate, audio_channels)
        h, w = self.video.height, self.video.width
        rgb = np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames
        frame.time_base = fractions.Fraction(1, FPS)
        self.frames += 1
        self.container.mux(self.video.encode(frame))

    def add_audio(self, pcm: np.ndarray, rate: int) -> None:
        if self.container is None:
            return  # audio before the first frame: not part of the recording
        layout = "stereo" if pcm.shape[1] == 2 else "mono"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        frame.pts = self.samples
        frame.time_base = fractions.Fraction(1, rate)
        self.samples += pcm.shape[0]
        self.container.mux(self.audio.encode(frame))

    def close(self) -> None:
        if self.container is None:
            return
        self.container.mux(self.video.encode(None))
        self.container.mux(self.audio.encode(None))
        self.container.close()


async def speak(args: argparse.Namespace) -> None:
    speech = load_audio(args.audio, 16000)  # float32 mono 16 kHz; InputError with a reason if unreadable
    seconds = len(speech) / 16000
    recorder = Recorder(args.out)
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(portrait=args.portrait) if args.portrait else \
            await client.start_session(avatar_id=args.avatar)
        session.on("speech_started", lambda ev: print(f"  avatar started talking (frame {ev['frame']})"))
        session.on("speech_stopped", lambda ev: print(f"  avatar stopped talking (frame {ev['frame']})"))
        session.on("error", lambda ev: print(f"  server: {ev['message']}", file=sys.stderr))
        await session.connect()
        print(f"session {session.id}: streaming {seconds:.1f} s of speech ...")

        async def record_video():
            async for frame in session.video_frames():
                recorder.add_frame(frame)

        async def record_audio():
            async for chunk in session.audio_frames():
                recorder.add_audio(chunk.pcm, chunk.sample_rate)

        tasks = [asyncio.ensure_future(record_video()), asyncio.ensure_future(record_audio())]
        chunk = 1600  # 100 ms
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(speech), chunk)):  # real-time pace on an absolute schedule
            await asyncio.sleep(max(0.0, start + i * chunk / 16000 - time.monotonic()))
            await session.send_audio(speech[pos:pos + chunk], sample_rate=16000)
        await session.end_speech()
        await asyncio.sleep(args.tail)  # the last frames of the utterance, then a moment of rest
        stats = await session.stats()
        await session.close()
        await asyncio.gather(*tasks)
    recorder.close()
    s = stats["stats"]
    print(f"wrote {args.out}: {recorder.frames} frames ({recorder.frames / FPS:.1f} s); server: first frame "
          f"{(s['first_frame_s'] or 0) * 1000:.0f} ms, speech-to-screen p50 {s['latency_ms_p50'] or 0:.0f} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", type=Path, required=True, help="speech file (wav, mp3, ogg, m4a, flac ...)")
    p.add_argument("--out", type=Path, default=Path("reply.mp4"))
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--portrait", type=Path, default=None, help="a photo to animate (default: the server's avatar)")
    p.add_argument("--avatar", default="default", help="a preloaded avatar id (GET /v1/avatars)")
    p.add_argument("--tail", type=float, default=1.5, help="seconds recorded after the speech ends")
    args = p.parse_args()
    try:
        asyncio.run(speak(args))
    except (LetsTalkError, AvatarClientError) as e:
        print(f"speak_file: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"speak_file: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
