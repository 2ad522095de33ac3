"""A session's live streams in processes of their own (`Session.broadcast`): one encodes, one per server sends.

PyAV holds Python's GIL while it connects and sends a stream's header (`avio_open`, `avformat_write_header`) and its
trailer: an RTMP handshake took ~270 ms on a loopback, a remote ingest takes round trips more, and a host that never
answers takes the whole timeout. In the server's process that would stop every session's engine, decoding and event
loop for as long; in one process with the other servers of the same stream, it would stop those. So each server's
connection (`media.LiveMuxer`) runs in a child process of its own (`python -m letstalk_rt.broadcaster send`), and the
parent (`LiveOutput`) only ever writes to its pipe, never waiting on the network with the GIL. A server that stalls
makes its pipe fill and its stream fall behind (its queue's limit); a stream that fails or is stopped can always be
ended by killing its child.

The encode is done once for all of a session's servers (YouTube and Twitch at once cost one x264, not two): a child
of its own (`python -m letstalk_rt.broadcaster encode`, `media.LiveEncoder`; `LiveEncoding` is the parent's side) is
fed each tick's raw frame and audio (float32) and a byte asking for a keyframe (a server that joins or comes back
starts at one), and answers with framed messages: `M` the streams' template (at once), then `T` for each tick (a
byte saying whether it holds a keyframe, then its packets, `pack`ed). The parent hands each tick's packets to each
server's child with the captions that start in it (UTF-8, one a line), which that child shows in the video as CEA-608
(`cc608`): the captions, like the connection, are each server's own; and after a stream's last tick, a tick or two
more marked as its tail, of which only the sound of the last frame is sent (the AAC encoder holds ~2048 samples).

A sending child is given the URL (a line), then messages the same way: `M` the template, then `T` for each tick
(its captions' length, its captions, then its packets; `L` for a tail's). It answers on its stdout with one JSON line
when it has connected (`{"ok": true}` or `{"error": ...}`) and one when the stream ended (`{"frames": n}` or
`{"error": ...}`); the encoding child says `E` (its error) if it cannot go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np

from .errors import OutputError
from .media import LiveEncoder, LiveMuxer, LivePacket, check_live_url, redact_url

CLOSE_TIMEOUT_S = 5.0  # a child's last packets and the end of the stream; then it is killed
_PACKET = struct.Struct("<??qqIII")  # is_video, is_keyframe, pts, dts, time base (numerator, denominator), size
_FRAME = struct.Struct("<cI")  # a message's kind and its payload's size
_SIZE = struct.Struct("<I")


def pack(packets: Iterable[LivePacket]) -> bytes:
    """Packets as bytes for a pipe (`unpack` reads them back)."""
    return b"".join(_PACKET.pack(p.is_video, p.is_keyframe, p.pts, p.dts, p.time_base.numerator,
                                 p.time_base.denominator, len(p.data)) + p.data for p in packets)


def unpack(data: bytes) -> list[LivePacket]:
    packets, at = [], 0
    while at < len(data):
        is_video, is_keyframe, pts, dts, num, den, size = _PACKET.unpack_from(data, at)
        at += _PACKET.size
        packets.append(LivePacket(is_video, is_keyframe, pts, dts, Fraction(num, den), data[at:at + size]))
        at += size
    return packets


def _send_message(stream: IO[bytes], kind: bytes, payload: bytes) -> None:
    stream.write(_FRAME.pack(kind, len(payload)) + payload)
    stream.flush()


def _read_message(stream: IO[bytes]) -> tuple[bytes, bytes]:
    """A message's kind and payload; (b"", b"") at the end of the stream."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return b"", b""
    kind, size = _FRAME.unpack(head)
    payload = stream.read(size)
    return (kind, payload) if len(payload) == size else (b"", b"")


def _child(*args: object) -> subprocess.Popen:
    # this package wherever it was imported from (an install, a checkout on sys.path), for the child to find
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "letstalk_rt.broadcaster", *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def _stop(proc: subprocess.Popen) -> None:
    """Kill a child (any thread) and close its pipe in."""
    proc.kill()
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:  # a write of another thread's was cut off: the pipe is gone anyway
        pass


class LiveEncoding:
    """The parent's side of a session's live encode (one for all its servers at one bitrate): made, it starts the
    child; `write(video, audio, key)` a tick at a time (it may block while the child catches up), `read()` its
    messages (another thread), `abort()` (any thread) to end it. OutputError, saying why, when the child is gone."""

    def __init__(self, size: tuple[int, int], fps: int, sample_rate: int, bitrate_kbps: int = 0) -> None:
        self.width, self.height = size
        self.fps, self.sample_rate, self.bitrate_kbps = fps, sample_rate, bitrate_kbps
        self.samples_per_frame = sample_rate // fps
        self._proc = _child("encode", self.width, self.height, fps, sample_rate, int(bitrate_kbps))

    def write(self, video: np.ndarray, audio: np.ndarray, key: bool = False) -> None:
        """One tick: a uint8 (H, W, 3) frame, its samples_per_frame float32 samples; `key`: make it a keyframe."""
        if video.shape != (self.height, self.width, 3) or len(audio) != self.samples_per_frame:
            raise ValueError(f"a tick is a ({self.height}, {self.width}, 3) frame and {self.samples_per_frame} "
                             f"samples, got {video.shape} and {len(audio)}")
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"\x01" if key else b"\x00")
            self._proc.stdin.write(np.ascontiguousarray(video, np.uint8).tobytes())
            self._proc.stdin.write(np.ascontiguousarray(audio, np.float32).tobytes())
            self._proc.stdin.flush()
        except (OSError, ValueError):  # BrokenPipeError: the child is gone; ValueError: abort() closed the pipe
            raise OutputError(self._why()) from None

    def read(self) -> tuple[bytes, bytes]:
        """The child's next message (kind, payload); (b"E", why) once it is gone."""
        assert self._proc.stdout is not None
        kind, payload = _read_message(self._proc.stdout)
        return (kind, payload) if kind else (b"E", self._why().encode())

    def _why(self) -> str:
        code = self._proc.poll()
        return ("the live stream's encoder stopped" + (f" (exit status {code})" if code not in (None, 0, -9) else "")
                + "; the live streams of this session end")

    def abort(self) -> None:
        """End the encode now (any thread)."""
        _stop(self._proc)


class LiveOutput:
    """The parent's side of one server's live stream: made, it starts the child; `connect()` waits for it to reach
    the server (call it, and the rest, off the event loop); `write(packets, captions)` a tick at a time (each call may
    block while the child catches up), `close()` to end the stream well, `abort()` (any thread) to end it at once, a
    `connect()` in progress included. OutputError, saying why, when the child cannot connect or its stream failed."""

    def __init__(self, url: str, template: bytes) -> None:
        check_live_url(url)
        self.url = url
        self.name = redact_url(url)
        self.template = template  # the encode's streams (`LiveEncoder.template`)
        self.frames_written = 0
        self._proc = _child("send")
        assert self._proc.stdin is not None
        self._proc.stdin.write(url.encode() + b"\n")  # not in argv: a stream key must not show in `ps`
        _send_message(self._proc.stdin, b"M", template)

    def again(self) -> LiveOutput:
        """A new child for the same stream (not connected yet): a reconnection's."""
        return LiveOutput(self.url, self.template)

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

    def write(self, packets: bytes, captions: Sequence[str] = (), tail: bool = False) -> None:
        """One tick: its encoded packets (`pack`ed) and the captions that start in it (shown in the stream as
        CEA-608: `LiveMuxer.caption`); `tail`: a tick after the last one sent, for the sound of that one only."""
        text = "\n".join(" ".join(caption.split()) for caption in captions).encode()
        try:
            assert self._proc.stdin is not None  # (flushed: the tick now, not with the next one, 40 ms later)
            _send_message(self._proc.stdin, b"L" if tail else b"T", _SIZE.pack(len(text)) + text + packets)
        except (OSError, ValueError):  # BrokenPipeError: the child is gone; ValueError: abort() closed the pipe
            raise OutputError(self._ended()) from None
        self.frames_written += 1

    def _ended(self) -> str:
        """Why the child is gone (what it said, or how it exited); our end of its pipe in is closed."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(CLOSE_TIMEOUT_S)
        # killed if it still runs, and the pipe closed now, not when this object is collected (a reconnection drops
        # it): what the pipe still holds can go nowhere, and Python 3.14 reports the failed flush of a finalizer
        _stop(self._proc)
        return self._answer().get("error") or f"the live stream to '{self.name}' ended"

    def close(self) -> None:
        """Send the rest and end the stream (the child says goodbye to the server)."""
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
        _stop(self._proc)


def _encode(argv: list[str]) -> int:
    """The encoding child: raw ticks in, messages out (the module's docstring)."""
    width, height, fps, rate, bitrate = (int(x) for x in argv[:5])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    try:
        encoder = LiveEncoder((width, height), fps, rate, bitrate_kbps=bitrate)
    except OutputError as e:
        _send_message(stdout, b"E", str(e).encode())
        return 1
    video_bytes, audio_bytes = width * height * 3, rate // fps * 4
    try:
        _send_message(stdout, b"M", encoder.template())
        while True:
            key, video, audio = stdin.read(1), stdin.read(video_bytes), stdin.read(audio_bytes)
            if len(audio) < audio_bytes or len(video) < video_bytes or not key:  # the parent closed the pipe
                break
            encoded = encoder.write_tick(np.frombuffer(video, np.uint8).reshape(height, width, 3),
                                         np.frombuffer(audio, np.float32), key=key == b"\x01")
            packets = [LivePacket.of(p) for p in encoded]
            keyframe = any(p.is_video and p.is_keyframe for p in packets)
            _send_message(stdout, b"T", (b"\x01" if keyframe else b"\x00") + pack(packets))
    except OutputError as e:
        encoder.abort()
        _send_message(stdout, b"E", str(e).encode())
        return 1
    except BrokenPipeError:  # the parent is gone
        encoder.abort()
        return 0
    encoder.abort()  # the streams took what they wanted: nothing waits for the encoders' tail
    return 0


def _send(argv: list[str]) -> int:
    """A sending child: packets in, a server's stream out (the module's docstring)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout

    def say(message: dict) -> None:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()

    url = stdin.readline().decode().strip()
    _, template = _read_message(stdin)  # M
    try:
        muxer = LiveMuxer(url, template)
    except OutputError as e:
        say({"error": str(e)})
        return 1
    say({"ok": True})
    try:
        while True:  # a tick (T, or L for a tail's): its captions (after their length), then its packets
            kind, payload = _read_message(stdin)
            if not kind:  # the parent closed the pipe
                break
            (size,) = _SIZE.unpack_from(payload)
            text, packets = payload[_SIZE.size:_SIZE.size + size], payload[_SIZE.size + size:]
            for caption in filter(None, text.decode(errors="replace").split("\n")):
                muxer.caption(caption)
            muxer.write(unpack(packets), tail=kind == b"L")
        frames = muxer.frames_written
        muxer.close()
    except OutputError as e:
        muxer.abort()
        say({"error": str(e)})
        return 1
    say({"frames": frames})
    return 0


def main(argv: list[str]) -> int:
    if hasattr(os, "nice"):  # the live sessions' windows first: a stream has seconds of queue to wait in
        os.nice(5)
    mode, rest = (argv[0], argv[1:]) if argv else ("", [])
    if mode == "encode":
        return _encode(rest)
    if mode == "send":
        return _send(rest)
    print("usage: python -m letstalk_rt.broadcaster encode W H FPS RATE KBPS | send (a session's live streams: "
          "Session.broadcast starts these)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
