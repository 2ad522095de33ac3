"""A live stream's encoder and network connection in a process of its own (`Session.broadcast`).

PyAV holds Python's GIL while it connects and sends a stream's header (`avio_open`, `avformat_write_header`) and its
trailer: an RTMP handshake took ~270 ms on a loopback, a remote ingest takes round trips more, and a host that never
answers takes the whole timeout. In the server's process that would stop every session's engine, decoding and event
loop for as long. So the stream's `media.LiveWriter` runs in a child process (`python -m letstalk_rt.broadcaster`),
fed each tick's raw frame and audio through a pipe, and the parent (`LiveOutput`) only ever writes to that pipe,
never waiting on the network with the GIL. A server that stalls makes the pipe fill and the broadcast fall behind
(its queue's limit); a broadcast that fails or is stopped can always be ended by killing the child.

Each tick on the pipe is its frame's bytes, its sound's (float32), and the captions that start in it (UTF-8, one a
line, after their length as 4 bytes); the child shows them in the video as CEA-608 (`cc608`).

The child answers on its stdout with one JSON line when it has connected (`{"ok": true}` or `{"error": ...}`) and one
when the stream ended (`{"frames": n}` or `{"error": ...}`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import OutputError
from .media import LiveWriter, check_live_url, redact_url

CLOSE_TIMEOUT_S = 5.0  # the child's last packets and the end of the stream; then it is killed


class LiveOutput:
    """The parent's side: made, it starts the child; `connect()` waits for it to reach the server (call it, and the
    rest, off the event loop); `write(video, audio)` a tick at a time (each call may block while the child catches
    up), `close()` to end the stream well, `abort()` (any thread) to end it at once, a `connect()` in progress
    included. OutputError, saying why, when the child cannot connect or its stream failed."""

    def __init__(self, url: str, size: tuple[int, int], fps: int, sample_rate: int, bitrate_kbps: int = 0) -> None:
        check_live_url(url)
        self.url = url
        self.name = redact_url(url)
        self.width, self.height = size
        self.fps, self.sample_rate, self.bitrate_kbps = fps, sample_rate, bitrate_kbps
        self.samples_per_frame = sample_rate // fps
        self.frames_written = 0
        # this package wherever it was imported from (an install, a checkout on sys.path), for the child to find
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "letstalk_rt.broadcaster", str(self.width), str(self.height), str(fps),
             str(sample_rate), str(int(bitrate_kbps))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self._proc.stdin is not None
        self._proc.stdin.write(url.encode() + b"\n")  # not in argv: a stream key must not show in `ps`
        self._proc.stdin.flush()

    def again(self) -> LiveOutput:
        """A new child for the same stream (not connected yet): a reconnection's."""
        return LiveOutput(self.url, (self.width, self.height), self.fps, self.sample_rate, self.bitrate_kbps)

    def connect(self, timeout_s: float = 10.0) -> None:
        """Wait until the child has connected to the server and sent the stream's header (blocks up to `timeout_s`)."""
        # PyAV connects without a timeout (its interrupt callback does not reach avio_open): a server that accepts the
        # connection and never answers would keep the child waiting for good, so it is killed at `timeout_s`
        timed_out = threading.Event()

        def give_up() -> None:
            timed_out.set()
            self._proc.kill()

        watchdog = threading.Timer(timeout_s, give_up)
        watchdog.start()
        try:
            answer = self._answer()
        finally:
            watchdog.cancel()
        if "error" in answer:
            self.abort()
            raise OutputError(f"cannot stream to '{self.name}': it did not answer within {timeout_s:g} s; check the "
                              "URL and that the server is up and takes streams there" if timed_out.is_set()
                              else answer["error"])

    def _answer(self) -> dict:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        try:
            return json.loads(line)
        except ValueError:
            code = self._proc.poll()
            return {"error": f"the live stream to '{self.name}' ended: its process exited"
                             + (f" with status {code}" if code is not None else "")}

    def write(self, video: np.ndarray, audio: np.ndarray, captions: Sequence[str] = ()) -> None:
        """One tick: a uint8 (H, W, 3) frame, its samples_per_frame float32 samples, and the captions that start in it
        (shown in the stream as CEA-608: `LiveWriter.caption`)."""
        if video.shape != (self.height, self.width, 3) or len(audio) != self.samples_per_frame:
            raise ValueError(f"a tick is a ({self.height}, {self.width}, 3) frame and {self.samples_per_frame} "
                             f"samples, got {video.shape} and {len(audio)}")
        text = "\n".join(" ".join(caption.split()) for caption in captions).encode()
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(np.ascontiguousarray(video, np.uint8).tobytes())
            self._proc.stdin.write(np.ascontiguousarray(audio, np.float32).tobytes())
            self._proc.stdin.write(len(text).to_bytes(4, "little") + text)
            self._proc.stdin.flush()  # the tick's sound too, now: not with the next tick's frame, 40 ms later
        except (OSError, ValueError):  # BrokenPipeError: the child is gone; ValueError: abort() closed the pipe
            raise OutputError(self._ended()) from None
        self.frames_written += 1

    def _ended(self) -> str:
        """Why the child is gone (what it said, or how it exited)."""
        try:
            self._proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        return self._answer().get("error") or f"the live stream to '{self.name}' ended"

    def close(self) -> None:
        """Send the rest and end the stream (the child flushes its encoders and says goodbye to the server)."""
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        except OSError:  # the child is gone: its answer says why
            pass
        try:
            self._proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a server that takes nothing more: the stream is over anyway
            self._proc.kill()
            self._proc.wait()
            raise OutputError(f"the live stream to '{self.name}' did not end within {CLOSE_TIMEOUT_S:g} s (the "
                              "server took nothing more); it was cut") from None
        answer = self._answer()
        if "error" in answer:
            raise OutputError(answer["error"])

    def abort(self) -> None:
        """End the stream now (any thread)."""
        self._proc.kill()
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        except OSError:  # a write of the recording thread's was cut off: the pipe is gone anyway
            pass


def main(argv: list[str]) -> int:
    width, height, fps, rate, bitrate = (int(x) for x in argv[:5])
    stdin, stdout = sys.stdin.buffer, sys.stdout

    def say(message: dict) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    url = stdin.readline().decode().strip()
    if hasattr(os, "nice"):  # the live sessions' windows first: this stream has seconds of queue to wait in
        os.nice(5)
    try:
        writer = LiveWriter(url, (width, height), fps, rate, bitrate_kbps=bitrate)
    except OutputError as e:
        say({"error": str(e)})
        return 1
    say({"ok": True})
    video_bytes, audio_bytes = width * height * 3, rate // fps * 4
    try:
        while True:  # a tick: its frame, its sound, and its captions (their length first)
            video = stdin.read(video_bytes)
            audio = stdin.read(audio_bytes)
            length = stdin.read(4)
            text = stdin.read(int.from_bytes(length, "little")) if len(length) == 4 else b""
            if len(video) < video_bytes or len(audio) < audio_bytes or len(length) < 4:  # the parent closed the pipe
                break
            for caption in filter(None, text.decode(errors="replace").split("\n")):
                writer.caption(caption)
            writer.write_frame(np.frombuffer(video, np.uint8).reshape(height, width, 3))
            writer.write_audio(np.frombuffer(audio, np.float32))
        frames = writer.frames_written
        writer.close()
    except OutputError as e:
        writer.abort()
        say({"error": str(e)})
        return 1
    say({"frames": frames})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
