"""A streaming server for the broadcast tests: FFmpeg (PyAV) listening for one RTMP or MPEG-TS-over-TCP stream, in a
process of its own (as an ingest server is), saving what it received.

    python live_receiver.py URL OUT.npz

writes OUT.npz when the stream ends: `frames` (N, H, W, 3) uint8 RGB, `times` (N,) each frame's presentation time in
seconds, `audio` float32 mono and `rate` its sample rate, `cc` (M, 4) the closed-caption triplets the H.264 carried
(ATSC A/53 cc_data, as FFmpeg's decoder exports them): the frame each came with, and its 3 bytes. `receiving(url)` runs
it from a test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np


def free_port() -> int:
    """A port free now, for a receiver to listen at (it binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port():
    """A port nothing listens at, held while in use: bound, not listening, so a connection there is refused, and no
    other socket takes it meanwhile. A port from free_port() is free only when asked: a server started after it (its
    ephemeral port) or the connection to it (TCP's self-connect, from that same port) could take it, and the stream
    to "nowhere" would connect."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


class Receiver:
    def __init__(self, url: str, out: Path) -> None:
        self.url, self.out = url, out
        self.proc = subprocess.Popen([sys.executable, __file__, url, str(out)])

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until its port is listening (read from /proc/net/tcp: a probing connection would be the one it accepts)."""
        port = f":{urllib.parse.urlsplit(self.url).port:04X}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                rows = []
                with contextlib.suppress(OSError), open(table) as f:
                    rows = [line.split() for line in f.readlines()[1:]]
                if any(row[1].endswith(port) and row[3] == "0A" for row in rows):  # 0A: LISTEN
                    return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listened at {self.url} within {timeout:g} s")

    def result(self, timeout: float = 20.0) -> dict:
        """What it received, once the stream has ended (waits for the process)."""
        self.proc.wait(timeout)
        with np.load(self.out) as got:
            return {k: got[k] for k in got.files}

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def receiving(url: str, out: Path):
    receiver = Receiver(url, out)
    try:
        yield receiver
    finally:
        if receiver.proc.poll() is None:
            receiver.kill()


def _side_data(frame) -> list:
    """A frame's side data. Iterating `frame.side_data` gives the side data themselves in PyAV 18 (whose `values()`
    therefore fails), their types (the mapping's keys) in PyAV 19."""
    return [sd if hasattr(sd, "type") else frame.side_data[sd] for sd in frame.side_data]


def main(url: str, out: str) -> None:
    import av

    frames, times, audio, rate, cc = [], [], [], 0, []
    container = av.open(url, mode="r", options={"listen": "1"}, timeout=(30, 10))
    try:
        for packet in container.demux():
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    cc += [(len(frames), *bytes(sd)[i:i + 3]) for sd in _side_data(frame)
                           if sd.type.name == "A53_CC" for i in range(0, len(bytes(sd)) - 2, 3)]
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(float(frame.time))
                else:
                    audio.append(frame.to_ndarray().reshape(frame.samples, -1).mean(axis=1))
                    rate = frame.sample_rate
    except (av.error.EOFError, OSError):  # the sender closed the connection: the end of the stream
        pass
    tmp = f"{out}.partial.npz"
    np.savez(tmp, frames=np.array(frames, np.uint8), times=np.array(times),
             audio=np.concatenate(audio).astype(np.float32) if audio else np.zeros(0, np.float32), rate=rate,
             cc=np.array(cc, np.int64).reshape(-1, 4))
    os.replace(tmp, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
