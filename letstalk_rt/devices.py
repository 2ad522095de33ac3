"""The avatar as a webcam and a microphone, for video calls (Zoom, Meet, Teams) and OBS (`letstalk camera`).

    camera = VirtualCamera(session.frame_size, fps=25, size=512)   # pyvirtualcam: v4l2loopback (Linux), OBS's
                                                                    # Virtual Camera (Windows, macOS)
    voice = AudioOutput("letstalk", session.sample_rate)           # sounddevice: any output device
    await show_on_devices(session, camera, voice)                   # each tick's frame and its sound, together

Why the voice goes out here too: the avatar shows speech a few hundred ms after it was said (the audio it waits for
and a window's generation). A call app that took the person's own microphone would send each word before the lips
move. `AudioOutput` plays the speech each frame shows, queued when the frame is, so a call app whose camera is the
virtual camera and whose microphone is this output's loopback (a PulseAudio / PipeWire null sink's monitor on Linux,
BlackHole on macOS, VB-Cable on Windows) sends lips and voice together.

Each device is written by a thread of its own from a bounded queue: a device that blocks or falls behind loses its
oldest ticks (counted in `dropped`) and never holds up the session's clock or the event loop. The voice is kept in
step with the camera over hours: sound that keeps waiting a frame or more (a sound card whose clock runs slower than
the session's) is caught up by skipping pauses (`AudioOutput.skipped_s`). This module imports no
torch: an application that receives the avatar from a server through the SDK (`client_examples/microphone.py`) shows
it on the same devices.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, OutputError

if TYPE_CHECKING:
    from .stream.engine import Session

log = logging.getLogger(__name__)

QUEUED_TICKS = 25  # a device this many ticks (1 s) behind loses its oldest
# The voice kept in step with the camera (AudioOutput): sound that waited at least LATE_S all through a LATE_CHECK_S
# span is that late, and is caught up by skipping quiet sound (or, LOUD_LATE_S late, whatever comes next).
LATE_CHECK_S = 0.5
LATE_S = 0.04  # a frame at 25 fps
LOUD_LATE_S = 0.2
QUIET = 0.1  # sound this far below the loudest of the last seconds is quiet (RMS)
QUIET_FLOOR = 1e-3  # and sound below this, always
# The speaker's buffer, and the silence kept ahead in it (AudioOutput): the voice plays CUSHION_S after it is queued,
# and an event loop up to that late leaves the device never dry (a click). Both far below the ~125 ms a voice may lag
# its lips unnoticed (ITU-R BT.1359).
BUFFER_S = 0.08
CUSHION_S = 0.04
TOP_UP_S = 0.002  # the least silence a pause tops the cushion up with (no writes of a few samples)


class _Writer:
    """A thread that hands what the event loop queues to `write`, at most `most` waiting (the oldest dropped). A write
    that raises ends it: `error` says why, and later puts are ignored. `waited`: how long the item being written had
    waited in the queue."""

    def __init__(self, name: str, write: Callable[[Any], None], most: int = QUEUED_TICKS) -> None:
        self._write = write
        self._items: collections.deque = collections.deque()  # (time.monotonic() when queued, item)
        self._most = most
        self.waited = 0.0
        self._ready = threading.Condition()
        self._closing = False
        self.dropped = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        with self._ready:
            if self._closing or self.error is not None:
                return
            if len(self._items) >= self._most:
                self._items.popleft()
                self.dropped += 1
            self._items.append((time.monotonic(), item))
            self._ready.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (for up to `timeout_s`), then end."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._items and not self._closing:
                    self._ready.wait()
                if not self._items:
                    return
                queued_at, item = self._items.popleft()
            self.waited = time.monotonic() - queued_at
            try:
                self._write(item)
            except Exception as e:  # noqa: BLE001 - the device's own errors: said, the session goes on
                self.error = f"{type(e).__name__}: {e}"
                log.error("%s failed: %s", self._thread.name, self.error)
                return


class _Device:
    """A device written by a thread of its own (`_Writer`): the ticks it lost falling behind, and why it failed."""

    _writer: _Writer

    @property
    def dropped(self) -> int:
        return self._writer.dropped

    @property
    def error(self) -> str | None:
        return self._writer.error


def check_camera_size(size: int) -> int:
    """`size` (the camera's longer side, pixels), or InputError for one no camera takes."""
    if not 16 <= size <= 1920:
        raise InputError(f"camera size {size}: choose 16..1920 pixels")
    return size


def camera_size(frame_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The camera's (width, height): the frames' shape scaled to `size` on their longer side, even (video formats)."""
    check_camera_size(size)
    width, height = frame_size
    scale = size / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


class VirtualCamera(_Device):
    """A virtual webcam (pyvirtualcam) showing frames of `frame_size`, scaled to `size` pixels on their longer side
    (call apps want 320 or more; the bundled model's crop is 128). `device`: which one (e.g. /dev/video2 on Linux;
    None: the first free). `backend`: an object with `send(rgb)`, `close()` and `device` instead of pyvirtualcam's
    camera. InputError, saying how to get one, when there is no virtual camera."""

    def __init__(self, frame_size: tuple[int, int], fps: int, size: int = 512, device: str | None = None,
                 backend: Any = None) -> None:
        self.width, self.height = camera_size(frame_size, size)
        if backend is None:
            backend = _open_camera(self.width, self.height, fps, device)
        self._camera = backend
        self.device = str(getattr(backend, "device", device))
        self._writer = _Writer(f"camera-{self.device}", self._show)

    def send(self, rgb: np.ndarray) -> None:
        """Queue one frame, uint8 (H, W, 3) (the event loop: never blocks)."""
        self._writer.put(rgb)

    def _show(self, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != (self.height, self.width):  # bilinear, by FFmpeg's swscale: 2.6 ms 128 -> 512, PIL's 4.2
            import av

            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                width=self.width, height=self.height, interpolation="BILINEAR").to_ndarray()
        self._camera.send(np.ascontiguousarray(rgb))

    def close(self) -> None:
        self._writer.close()
        self._camera.close()


def _open_camera(width: int, height: int, fps: int, device: str | None):
    try:
        import pyvirtualcam
    except ImportError:
        raise InputError("the virtual camera needs pyvirtualcam: pip install 'letstalk-rt[devices]'") from None
    try:
        return pyvirtualcam.Camera(width=width, height=height, fps=fps, device=device)
    except RuntimeError as e:  # no backend has a device: v4l2loopback not loaded, OBS's camera not installed
        raise InputError(f"no virtual camera to show the avatar on ({e}). Linux: `sudo modprobe v4l2loopback "
                         "exclusive_caps=1 card_label=letstalk` (package v4l2loopback-dkms); Windows and macOS: "
                         "install OBS Studio and start its Virtual Camera once") from None


def load_sounddevice():
    try:
        import sounddevice
    except (ImportError, OSError) as e:  # OSError: PortAudio itself is missing
        raise InputError(f"audio devices need sounddevice and PortAudio: pip install 'letstalk-rt[devices]' "
                         f"(Linux: and apt install libportaudio2) ({e})") from None
    return sounddevice


def audio_devices() -> str:
    """The audio devices PortAudio sees, one a line: what `--mic` and `--speaker` take (a name or its number)."""
    listed = str(load_sounddevice().query_devices())
    return listed or "none: PortAudio sees no audio device (no sound card, nor a PulseAudio / PipeWire server)"


def device_name(kind: str, device: int | str | None) -> str:
    """A microphone or speaker (`kind`) as the user named it: "the microphone 'USB'", "the system's default ..."."""
    return f"the system's default {kind}" if device is None else f"the {kind} {device!r}"


def unusable_device(kind: str, device: int | str | None, error: Exception) -> InputError:
    """InputError for a microphone or speaker (`kind`) that cannot be opened: why, and the devices there are."""
    return InputError(f"cannot open {device_name(kind, device)}: {error}; the audio devices:\n{audio_devices()}")


class AudioOutput(_Device):
    """Sound to an output device (sounddevice / PortAudio), `sample_rate` mono float32 in, played at the device's
    `rate` (None: its default), resampled with PyAV. `device`: a name (or part of one) or a number
    (`audio_devices()`), None the system's default. InputError naming the devices when it cannot be opened.

    `latency`: the device's buffer, seconds or PortAudio's "low" / "high" (`self.latency`: what the device gave), of
    which CUSHION_S is kept filled ahead: the stream starts with that much silence, and pauses top it up (`_top_up`).
    Without it, a blocking write leaves the buffer just full when it returns, so the device runs dry whenever the next
    tick is later than the last was: in "low" (8.6 ms on ALSA), ticks 0-6 ms late clicked 4-5 times in 100, one click
    a second (tests/test_devices.py, a device modelled on the clock)."""

    def __init__(self, device: int | str | None, sample_rate: int, rate: int | None = None,
                 latency: float | str = BUFFER_S) -> None:
        sd = load_sounddevice()
        try:
            info = sd.query_devices(device, "output")
            self.rate = int(rate or info["default_samplerate"])
            self._stream = sd.OutputStream(samplerate=self.rate, channels=1, dtype="float32", device=device,
                                           latency=latency)
            self._stream.start()
        except (ValueError, sd.PortAudioError) as e:
            raise unusable_device("speaker", device, e) from None
        self.name = info["name"]
        self.latency = float(self._stream.latency)
        self._room = self._stream.write_available  # frames the empty buffer takes: what is in it is the rest
        self.sample_rate = sample_rate
        self._resampler = None
        if self.rate != sample_rate:
            import av

            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
        self.underflows = 0  # times the device ran dry (a click): the event loop late, or its clock fast
        self.skipped_s = 0.0  # quiet sound skipped to catch up with the camera
        self.topped_up_s = 0.0  # silence written into pauses to keep the cushion (the start's included)
        self._in_time = False  # the device was seen holding sound in its buffer (it plays in time)
        self._started = False  # the first sound was written (the cushion with it)
        self._least, self._checked_s, self._loud, self._catching_up = math.inf, 0.0, 0.0, False
        self._writer = _Writer(f"speaker-{self.name}", self._play)

    def play(self, pcm: np.ndarray) -> None:
        """Queue float32 mono samples at `sample_rate` (the event loop: never blocks)."""
        self._writer.put(pcm)

    def _quiet(self, pcm: np.ndarray, seconds: float) -> bool:
        """Whether `pcm` is quiet: far below the loudest sound of the last seconds (a pause), or silent."""
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float32)))) if len(pcm) else 0.0
        self._loud = max(rms, self._loud * 0.9 ** seconds)  # the loudest, fading by 10% a second
        return rms <= max(QUIET_FLOOR, QUIET * self._loud)

    def _catch_up(self, seconds: float, quiet: bool, late: float) -> bool:
        """Whether to skip this sound (the writer's thread, before playing it). `late`: how much later than the
        cushion's delay it will play after the frame it was queued with: what it waited in the queue, and what is in
        the device's buffer past the cushion (a slow device fills its buffer first: a blocking write returns once it
        fits). A device whose clock runs slower than the session's (100 ppm: a frame every 7 minutes), or sound that
        came in a burst after a network stall, leaves the voice late for good; a write that was slow now and then does
        not. So once sound was at least LATE_S late all through LATE_CHECK_S, quiet sound (a pause: nobody hears it)
        is skipped until it is less; so is any sound while it is LOUD_LATE_S late (speech with no pause)."""
        self._least, self._checked_s = min(self._least, late), self._checked_s + seconds
        if self._checked_s >= LATE_CHECK_S:
            self._catching_up |= self._least >= LATE_S
            self._least, self._checked_s = math.inf, 0.0
        if self._catching_up and late < max(LATE_S, seconds):
            self._catching_up = False
        if not self._catching_up or (not quiet and late < LOUD_LATE_S):
            return False
        self.skipped_s += seconds
        self._least, self._checked_s = math.inf, 0.0  # what waited before this skip says nothing of after
        return True

    def _play(self, pcm: np.ndarray) -> None:
        seconds = len(pcm) / self.sample_rate
        quiet = self._quiet(pcm, seconds)
        ahead = max(0, self._room - self._stream.write_available) / self.rate  # in the device's buffer, to play
        if self._catch_up(seconds, quiet, self._writer.waited + max(0.0, ahead - CUSHION_S)):
            return
        if self._resampler is not None:
            import av

            frame = av.AudioFrame.from_ndarray(pcm.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)] or
                                 [np.zeros(0, np.float32)])
        self._in_time |= ahead > 0  # it holds what was written: it plays in time (a file, say, would not)
        if not self._started or (quiet and self._in_time):  # the start (nothing plays yet to break), or a pause
            self._top_up(ahead)
            self._started = True
        if len(pcm) and self._stream.write(np.ascontiguousarray(pcm, np.float32).reshape(-1, 1)):
            self.underflows += 1

    def _top_up(self, ahead: float) -> None:
        """Fill the cushion up with silence where less than all of it is left in the device's buffer (by at least
        TOP_UP_S). What is left wanders down even on a device that keeps time: a tick later than the last takes from
        it, and an earlier one cannot give back past a full buffer; a device whose clock runs fast takes the rest (at
        100 ppm, 40 ms in ~7 minutes). Topped up in pauses, it never runs dry; one that did (a click) gets it back at
        the next pause. Filled only once below half (as it was), 0.8 s of speech on a device 3% fast left 4 ms of it,
        and one write a little late under load clicked (a CI run); filled at each pause tick, 13 ms are left."""
        if ahead < CUSHION_S - TOP_UP_S and (missing := round((CUSHION_S - ahead) * self.rate)):
            self._stream.write(np.zeros((missing, 1), np.float32))
            self.topped_up_s += missing / self.rate

    def close(self) -> None:
        self._writer.close()
        self._stream.stop()
        self._stream.close()


def device_failure(*devices: _Device | None) -> OutputError | None:
    """An OutputError naming the first of `devices` that failed (and why), or None."""
    for device in devices:
        if device is not None and device.error is not None:
            return OutputError(f"{type(device).__name__} failed: {device.error}")
    return None


async def show_on_devices(session: Session, camera: VirtualCamera | None = None, audio: AudioOutput | None = None,
                          ticks: int | None = None) -> int:
    """Show `session` on the devices from one read of its clock (`Session.frames()`): each tick's frame to `camera`
    and the sound that plays with it to `audio`, queued together, so lips and voice leave together. Until the session
    closes or `ticks` have gone; returns the ticks shown. OutputError when a device failed (why)."""
    return await show_frames(((frame.video, frame.audio) async for frame in session.frames()), camera, audio, ticks)


async def show_frames(frames: AsyncIterable[tuple[np.ndarray, np.ndarray | None]], camera: VirtualCamera | None = None,
                      audio: AudioOutput | None = None, ticks: int | None = None) -> int:
    """Each (frame, its sound or None) of `frames` to the devices, the two queued together; until `frames` ends or
    `ticks` have gone; returns the frames shown. OutputError when a device failed (why), checked after every frame,
    a device whose sound comes another way (None here) included."""
    shown = 0
    async for video, sound in frames:
        if camera is not None:
            camera.send(video)
        if audio is not None and sound is not None:
            audio.play(sound)
        shown += 1
        failed = device_failure(camera, audio)
        if failed is not None:
            raise failed
        if ticks is not None and shown >= ticks:
            break
    return shown
