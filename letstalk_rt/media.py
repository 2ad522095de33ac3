"""Every audio and video byte that enters or leaves letstalk-rt goes through here (PyAV; Pillow for stills).

    load_audio(path)        any file PyAV reads (wav, mp3, m4a/aac, ogg/opus, flac, a video's audio track)
                            -> float32 mono in [-1, 1] at 16 kHz
    PcmResampler            the same conversion for a live stream of PCM chunks (int16/float, any rate/channels)
    load_image(path)        any still Pillow reads -> uint8 (H, W, 3) RGB, EXIF rotation applied
    VideoWriter             frames + their audio -> H.264 (yuv420p) + AAC mp4, streamed, renamed into place only
                            when complete
    LiveEncoder, LiveMuxer  a live stream: encoded once (H.264 + AAC packets), sent to each streaming server
    probe(path), read_frames(path)   decode-counted facts and RGB frames of a written video (tests, eval)

Time conventions (config.py): video at FPS = 25, audio at SAMPLE_RATE = 16 kHz, so one frame owns 640 samples.

Every failure a user can cause (missing file, not media, no audio, empty audio, unwritable output) raises
InputError / OutputError with one line saying what is wrong and what to give instead; raw av / PIL
exceptions never escape.

PyAV facts this module relies on (PyAV 18 / FFmpeg 8):
- FFmpeg's default stereo -> mono downmix is 0.707 * (L + R), which clips full-scale stereo; the swr option
  `rematrix_maxval=1` normalises the matrix, so stereo becomes (L + R) / 2 (the average of the channels).
- `av.AudioResampler` refuses a frame whose format/layout/rate differ from its first one; `_MonoConverter`
  flushes and rebuilds it when that happens (mp3 streams can change rate mid-file, live sources can too).
- The AAC encoder's frame size (1024) is known only once the codec is open; its last frame may be short.
  The mp4 edit list records the exact sample count, but decoding still yields the zero-padding of that last
  frame (up to 1023 samples), so readers trim mp4/mov audio to the stream's declared duration.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from .cc608 import RollUp, a53_sei, with_sei
from .errors import InputError, LetsTalkError, OutputError

try:
    import fcntl  # a VideoWriter locks its partial file, so a folder's cleaner can tell a crashed writer's (POSIX)
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

SAMPLE_RATE = 16000  # Hz: every audio path converts to this
FPS = 25  # video frames per second: each frame owns SAMPLE_RATE // FPS = 640 samples

AUDIO_HINT = "give a WAV/MP3/M4A/OGG/FLAC file (or a video with an audio track)"
IMAGE_HINT = "give a PNG/JPEG/HEIC/WEBP/BMP photo"

# What PyAV raises for bad media: FFmpegError and its subclasses (also OSError / ValueError subclasses),
# plus plain Python errors from its frame conversions.
_AV_ERRORS: tuple[type[BaseException], ...] = (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError,
                                               TypeError)
_MOV_FORMATS = ("mov", "mp4", "m4a", "3gp")  # containers whose declared audio duration is sample-exact


def _reason(e: BaseException) -> str:
    """The one-line cause of a library error, without FFmpeg's errno prefix or the file name."""
    text = getattr(e, "strerror", None) if isinstance(e, av.error.FFmpegError) else None
    text = text or str(e) or type(e).__name__
    return " ".join(str(text).split())


def check_readable(path: Path, kind: str, hint: str) -> None:
    """InputError for the mistakes that are not about the content: missing, a directory, unreadable."""
    if not path.exists():
        raise InputError(f"{kind} file '{path}' does not exist; {hint}")
    if path.is_dir():
        raise InputError(f"{kind} file '{path}' is a directory; {hint}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{kind} file '{path}' cannot be read (permission denied); {hint}")


# --------------------------------------------------------------------------------------------------
# Audio in
# --------------------------------------------------------------------------------------------------


class _MonoConverter:
    """AudioFrames of any format, layout and rate -> float32 mono chunks at `rate`.

    Wraps one `av.AudioResampler`, rebuilt (after flushing the old one) whenever the input changes.
    Input pts are rewritten to a continuous sample count so timestamp gaps never make the filter
    graph insert or drop samples: the output length follows the input length only.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._key: tuple[str, int, str, int] | None = None
        self._resampler: av.AudioResampler | None = None
        self._pts = 0  # input samples pushed into the current resampler

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        if frame.samples == 0:
            return []
        if not _named_layout(frame.layout.nb_channels):
            frame = _downmix(frame)  # FFmpeg has no layout for this count (9, 11, 13 ... channels) to convert from
        key = (frame.format.name, frame.layout.nb_channels, frame.layout.name, frame.sample_rate)
        out = self.flush() if key != self._key else []
        if self._resampler is None:
            # rematrix_maxval=1: stereo -> (L + R) / 2 instead of FFmpeg's clipping 0.707 * (L + R)
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.rate,
                                                options={"rematrix_maxval": "1.0"})
            self._key, self._pts = key, 0
        frame.pts = self._pts
        frame.time_base = Fraction(1, frame.sample_rate)
        self._pts += frame.samples
        out += [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]  # packed mono: (1, n)
        return out

    def flush(self) -> list[np.ndarray]:
        """Drain the resampler's filter delay (a few ms) and forget the input format."""
        if self._resampler is None:
            return []
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(None)]
        self._resampler, self._key = None, None
        return out


PCM_RATES = (4000, 384000)  # Hz pushed PCM may have: past these it is a mistake (seconds given for Hz, ...)
FLOAT_PCM_PEAK = 8.0  # float speech reaching this (18 dB over full scale) is not audio in -1..1: int16 values, likely


def float_pcm_problem(pcm: np.ndarray) -> str | None:
    """Why float samples cannot be speech, or None: NaN or infinite samples (pushed once, they would turn a live
    session's picture black for good, as its memory bank carries them from window to window), or int16 values held
    as floats (played, a clipped roar). Integer samples are never a problem here."""
    if pcm.dtype.kind != "f" or not pcm.size:
        return None
    peak = float(np.max(np.abs(pcm)))  # NaN if any sample is NaN
    if not np.isfinite(peak):
        return "the audio holds NaN or infinite samples; give finite samples (float in -1..1, or int16)"
    if peak > FLOAT_PCM_PEAK:
        return (f"float samples must lie in -1..1, these reach {peak:.0f} (int16 values as floats? divide them by "
                "32768, or give them as int16)")
    return None


def pcm16(pcm: np.ndarray) -> np.ndarray:
    """Samples as int16: int16 as they are, floats in -1..1 scaled (clipped to the range first)."""
    if pcm.dtype == np.int16:
        return pcm
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


@functools.lru_cache(maxsize=None)
def _named_layout(channels: int) -> bool:
    """Whether FFmpeg has a channel layout for this many channels (it has none for 9, 11, 13, ...)."""
    try:
        av.AudioLayout(f"{channels}c")
    except ValueError:
        return False
    return True


_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0 ** 31, "s64": 2.0 ** 63, "flt": 1.0, "dbl": 1.0}


def frame_pcm(frame: av.AudioFrame) -> np.ndarray:
    """An audio frame's samples shaped (n, channels): int16 as they are (s16, s16p), any other sample format as
    float32 in -1..1 (u8, s32 and s64 scaled from their integer range; flt and dbl kept), so what a track carries in
    any format can be pushed into a session or resampled."""
    x = frame.to_ndarray()  # planar (channels, n), packed (1, n * channels)
    x = x.T if frame.format.is_planar else x.reshape(-1, frame.layout.nb_channels)  # (n, channels)
    base = frame.format.name.rstrip("p")
    if base == "s16":
        return x
    x = x.astype(np.float64)
    return ((x - 128.0 if base == "u8" else x) / _SCALE.get(base, 1.0)).astype(np.float32)


def _downmix(frame: av.AudioFrame) -> av.AudioFrame:
    """The mean of a frame's channels as a float32 mono frame at its rate (for counts FFmpeg cannot rematrix)."""
    x = frame_pcm(frame)
    x = x / 32768.0 if x.dtype == np.int16 else x
    mono = av.AudioFrame.from_ndarray(x.mean(axis=1, dtype=np.float32)[None], format="flt", layout="mono")
    mono.sample_rate = frame.sample_rate
    return mono


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _declared_samples(container: Any, stream: Any, rate: int) -> int | None:
    """Exact sample count (at `rate`) an mp4/mov stream declares through its edit list, else None."""
    names = container.format.name.split(",")
    if not any(n in _MOV_FORMATS for n in names) or not stream.duration or not stream.time_base:
        return None
    return round(float(stream.duration * stream.time_base) * rate)


def _trim_to_declared(n: int, declared: int | None, rate: int) -> int:
    """Drop the AAC encoder's zero-padding past the declared end (at most 0.1 s, never real audio)."""
    if declared is not None and declared < n <= declared + rate // 10:
        return declared
    return n


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio track of `path` -> float32 mono in [-1, 1] at `sample_rate`.

    Any container and codec PyAV reads, at any rate and channel count (stereo is averaged). Raises
    InputError (one line) for a missing file, a file that is not media, no audio track, or no samples.
    """
    path = Path(path)
    check_readable(path, "audio", AUDIO_HINT)
    return _decode_audio(str(path), f"audio file '{path}'", sample_rate)


def decode_audio(data: bytes, what: str, sample_rate: int = SAMPLE_RATE, format: str | None = None) -> np.ndarray:
    """`load_audio` of media held in memory (`what` names it in errors, e.g. "espeak-ng's output")."""
    return _decode_audio(io.BytesIO(data), what, sample_rate, format)


def _decode_audio(source: str | io.BytesIO, what: str, sample_rate: int, format: str | None = None) -> np.ndarray:
    try:
        with av.open(source, format=format) as container:
            if not container.streams.audio:
                name = container.format.name  # FFmpeg reads a picture as a one-frame video: say it is one
                if container.streams.video and (name in ("image2", "gif") or name.endswith("_pipe")):
                    codec = container.streams.video[0].codec_context.name.replace("mjpeg", "jpeg")
                    raise InputError(f"{what} is an image ({codec.upper()}), not audio; {AUDIO_HINT}")
                kinds = sorted({s.type for s in container.streams}) or ["nothing"]
                raise InputError(f"{what} has no audio stream (it holds {', '.join(kinds)}); {AUDIO_HINT}")
            stream = container.streams.audio[0]
            converter = _MonoConverter(sample_rate)
            chunks: list[np.ndarray] = []
            for frame in container.decode(stream):
                chunks += converter.push(frame)
            chunks += converter.flush()
            declared = _declared_samples(container, stream, sample_rate)
    except LetsTalkError:
        raise
    except _AV_ERRORS as e:
        raise InputError(f"{what} could not be decoded: {_reason(e)}; {AUDIO_HINT}") from e
    audio = _concat(chunks)
    audio = audio[:_trim_to_declared(len(audio), declared, sample_rate)]
    if len(audio) == 0:
        raise InputError(f"{what} decodes to zero samples (it is empty); give a file that contains speech")
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(audio, -1.0, 1.0)  # (n,) float32


class PcmResampler:
    """Streaming conversion of PCM chunks to float32 mono at 16 kHz, for live audio sources.

    `push(samples, rate)` takes int16 or float samples shaped (n,) or (n, channels) and returns the
    converted samples available so far (the resampler holds back ~1 ms of filter delay); `flush()`
    returns the rest at the end of a stream. Concatenated outputs equal offline conversion of the
    whole signal to within a few samples. The input rate or channel count may change between calls.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._converter = _MonoConverter(sample_rate)

    def push(self, samples: np.ndarray, rate: int) -> np.ndarray:
        pcm = np.asarray(samples)
        if pcm.ndim not in (1, 2) or pcm.dtype not in (np.int16, np.float32, np.float64):
            raise InputError(f"PCM must be int16 or float samples shaped (n,) or (n, channels), "
                             f"got {pcm.dtype} {pcm.shape}")
        if int(rate) != rate or not PCM_RATES[0] <= rate <= PCM_RATES[1]:
            raise InputError(f"PCM sample rate must be a whole number of Hz, {PCM_RATES[0]}..{PCM_RATES[1]}, got "
                             f"{rate!r}")
        if problem := float_pcm_problem(pcm):
            raise InputError(problem)
        pcm = pcm[:, None] if pcm.ndim == 1 else pcm  # (n, channels)
        n, channels = pcm.shape
        if n == 0 or channels == 0:
            return np.zeros(0, np.float32)
        if pcm.dtype == np.int16:
            fmt = "s16"
        else:
            fmt, pcm = "flt", pcm.astype(np.float32, copy=False)
        if not _named_layout(channels):  # FFmpeg has no layout for this count: average the channels here
            pcm = pcm.astype(np.float32) / (32768.0 if fmt == "s16" else 1.0)
            fmt, pcm, channels = "flt", pcm.mean(axis=1, keepdims=True, dtype=np.float32), 1
        layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")
        data = np.ascontiguousarray(pcm).reshape(1, n * channels)  # packed: (1, n * channels)
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = int(rate)
        return _concat(self._converter.push(frame))  # (m,) float32

    def flush(self) -> np.ndarray:
        """The samples still inside the resampler; the next push starts a fresh stream."""
        return _concat(self._converter.flush())


class TempoStretcher:
    """Streaming speed-up of float32 mono PCM with FFmpeg's `atempo` filter (WSOLA: pitch and timbre kept).

    `push(samples)` returns the stretched samples available so far (the filter holds back ~30 ms);
    `flush()` returns the rest, and the next push starts a fresh stream. n samples pushed and flushed come
    out as about n / tempo samples. `set_tempo()` changes the speed inside the stream, without a flush,
    so speech can go from faster back to its own pace (1.0) seamlessly. The engine's latency catch-up
    plays speech through it while a session runs behind (`EngineConfig.catch_up_tempo`), as WebRTC's
    jitter buffer accelerates speech.
    """

    def __init__(self, tempo: float, sample_rate: int = SAMPLE_RATE) -> None:
        self.tempo = self._check(tempo)
        self.sample_rate = sample_rate
        self._graph: Any = None
        self._atempo: Any = None
        self._pts = 0
        self._owed = 0.0  # output samples the pushed input will come to, less those already returned

    @staticmethod
    def _check(tempo: float) -> float:
        if not 0.5 <= tempo <= 2.0:
            raise LetsTalkError(f"tempo {tempo}: atempo in one stage takes 0.5 .. 2.0")
        return float(tempo)

    @property
    def pending_samples(self) -> float:
        """About how many output samples the filter still holds (they come with later pushes or flush)."""
        return max(self._owed, 0.0)

    def set_tempo(self, tempo: float) -> None:
        """Change the speed from the next pushed sample on (inside the running stream: no flush)."""
        tempo = self._check(tempo)
        if tempo != self.tempo and self._atempo is not None:
            self._atempo.process_command("tempo", f"{tempo}")
        self.tempo = tempo

    def _open(self) -> Any:
        graph = av.filter.Graph()
        src = graph.add_abuffer(format="flt", sample_rate=self.sample_rate, layout="mono",
                                time_base=f"1/{self.sample_rate}")
        self._atempo = graph.add("atempo", f"{self.tempo}")
        src.link_to(self._atempo)
        self._atempo.link_to(graph.add("abuffersink"))
        graph.configure()
        self._pts, self._owed = 0, 0.0
        return graph

    def _pull(self) -> list[np.ndarray]:
        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.error.BlockingIOError, av.error.EOFError):
                return out

    def push(self, samples: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        if not pcm.shape[1]:
            return np.zeros(0, np.float32)
        if self._graph is None:
            self._graph = self._open()
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, self._pts, Fraction(1, self.sample_rate)
        self._pts += pcm.shape[1]
        self._owed += pcm.shape[1] / self.tempo
        self._graph.push(frame)
        out = _concat(self._pull())
        self._owed -= len(out)
        return out

    def flush(self) -> np.ndarray:
        """The samples still inside the filter; the next push starts a fresh stream."""
        if self._graph is None:
            return np.zeros(0, np.float32)
        self._graph.push(None)
        out = _concat(self._pull())
        self._graph, self._atempo, self._owed = None, None, 0.0
        return out


# --------------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------------


WHITE = (255, 255, 255)


def parse_colour(text: str, name: str) -> tuple[int, int, int]:
    """"RRGGBB" or "#RRGGBB" -> (r, g, b); InputError naming `name` otherwise."""
    hex_ = str(text).strip().removeprefix("#")
    if len(hex_) != 6 or any(c not in "0123456789abcdefABCDEF" for c in hex_):
        raise InputError(f"{name} must be a colour as RRGGBB hex digits, e.g. 00ff00, got {str(text)[:20]!r}")
    return int(hex_[0:2], 16), int(hex_[2:4], 16), int(hex_[4:6], 16)


def _to_rgb(im: Any, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """A Pillow image of any mode -> uint8 (H, W, 3); transparency is composited onto `background` (white)."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit or float grayscale
        gray = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and gray.max() <= 1.0 else (65535.0 if gray.max() > 255 else 255.0)
        gray = np.clip(gray / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        im = Image.alpha_composite(under, rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)


PHOTO_DECODE_SIDE = 2048  # a JPEG photo over twice this on its longest side is decoded scaled down to 1..2x this
# (libjpeg's 1/2, 1/4 or 1/8 as it decodes): a portrait keeps at most framing.MAX_PHOTO_SIDE of it, and a phone's
# 48-200 megapixel photo decoded whole cost seconds and gigabytes (108 MP: 2.8 GB, 10 s for `letstalk generate`)


@functools.cache
def read_heif() -> bool:
    """Let Pillow open HEIF/HEIC photos (an iPhone's; `pi-heif`, libheif's decoder alone), once; False without it."""
    try:
        from pi_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


@contextlib.contextmanager
def open_photo(source: str | Path | io.BytesIO, formats: Iterable[str] | None = None) -> Iterator[Any]:
    """Pillow's `Image.open` for a photo, nothing decoded yet: a large JPEG set to decode scaled down (its `size` then
    says the size it decodes to, PHOTO_DECODE_SIDE); Pillow's warning that a large image may be a decompression bomb
    left out, and its error (over Pillow's MAX_IMAGE_PIXELS x 2) raised only where the size it decodes to is still
    over that (a 200 MP phone photo's is not; a small file claiming a huge size still is)."""
    import warnings

    from PIL import Image, JpegImagePlugin

    read_heif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source, formats=formats)
        except Image.DecompressionBombError as bomb:
            if formats is not None and "JPEG" not in formats:
                raise
            if isinstance(source, io.BytesIO):
                source.seek(0)
            try:
                im = JpegImagePlugin.JpegImageFile(source)  # the same decoder, without the check on the whole size
            except SyntaxError:  # not a JPEG: what Image.open said
                raise bomb from None
    with im:
        w, h = im.size
        if isinstance(im, JpegImagePlugin.JpegImageFile) and max(w, h) >= 2 * PHOTO_DECODE_SIDE:  # (MPO too)
            k = PHOTO_DECODE_SIDE / max(w, h)
            im.draft(None, (max(1, int(w * k)), max(1, int(h * k))))
        if Image.MAX_IMAGE_PIXELS and im.size[0] * im.size[1] > 2 * Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"image size ({im.size[0]}x{im.size[1]} pixels to decode) exceeds the "
                                               f"limit of {2 * Image.MAX_IMAGE_PIXELS} pixels")
        yield im


def upright_image(im: Any, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """A decoded Pillow image -> uint8 (H, W, 3) RGB, upright: its EXIF orientation applied (a phone portrait is
    stored sideways with a tag saying so), then converted as `_to_rgb` converts."""
    from PIL import ImageOps

    return _to_rgb(ImageOps.exif_transpose(im), background)


VIDEO_FRAME_HINT = " (a frame of a video: ffmpeg -i VIDEO -frames:v 1 face.png)"


HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}  # ISO
# 23008-12 / AV1 image file brands, in the `ftyp` box that opens a HEIF (an iPhone's HEIC photo, AVIF)


def _head(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def not_an_image(source: str | io.BytesIO) -> str | None:
    """What a file Pillow could not read holds instead, when FFmpeg knows: "a video (H264)", "audio (OPUS)"; else
    None. For the error that tells someone they gave the wrong file (a clip instead of its still, the speech)."""
    head = source.getvalue()[:12] if isinstance(source, io.BytesIO) else _head(source, 12)
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:  # a photo (FFmpeg calls it a video), corrupt or its
        return None  # decoder not installed (pi-heif)
    try:
        with av.open(source) as container:
            name = container.format.name
            video = container.streams.video
            if video and name not in ("image2", "gif") and not name.endswith("_pipe"):
                return f"a video ({video[0].codec_context.name.upper()})"
            if container.streams.audio:
                codec = container.streams.audio[0].codec_context.name.upper()
                return f"audio ({'PCM' if codec.startswith('PCM_') else codec})"
    except _AV_ERRORS:
        pass
    return None


def load_image(path: str | Path, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Read a still image -> uint8 (H, W, 3) RGB (grayscale, palette, alpha and 16-bit converted; what is transparent
    goes on `background`, white by default: a key colour for an overlay to key out).

    The EXIF orientation is applied, so a phone portrait comes out upright; a large JPEG comes scaled down as it is
    decoded (`open_photo`). InputError for a missing file or a file Pillow cannot decode.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    check_readable(path, "image", IMAGE_HINT)
    try:
        with open_photo(path) as im:
            im.load()
            rgb = upright_image(im, background)
    except UnidentifiedImageError:
        kind = not_an_image(str(path))
        if kind is None:
            raise InputError(f"image file '{path}' is not an image Pillow can read; {IMAGE_HINT}") from None
        tip = VIDEO_FRAME_HINT if kind.startswith("a video") else ""
        raise InputError(f"image file '{path}' is {kind}, not a photo; {IMAGE_HINT}{tip}") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, ...: all mean a bad file here
        raise InputError(f"image file '{path}' could not be decoded: {_reason(e)}; {IMAGE_HINT}") from e
    return rgb  # (H, W, 3) uint8


# --------------------------------------------------------------------------------------------------
# Video out
# --------------------------------------------------------------------------------------------------


_partial_ids = itertools.count()


def check_output_path(path: Path, what: str = "output path", example: str = "out") -> Path:
    """Fail before any work, with the fix, if a file cannot be written at `path` (written whole under a temporary
    name beside it, then renamed onto it): its folder must exist and be writable and `path` must not be a folder.
    Returns the folder. `example`: the file name the error suggests in a folder given instead of a file."""
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"{what} '{path}' is a directory; give a file name such as '{path / example}'")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"{what} '{path}': its folder '{parent}' {state}; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}': its folder '{parent}' is not writable; choose another path")
    return parent


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")  # containers that hold what VideoWriter writes (H.264 + AAC, MP4)


def check_video_path(path: Path, what: str = "output path") -> Path:
    """`check_output_path` for a video VideoWriter writes: also its name must end as an MP4 file's does, so a
    player picks the right format (a `talk.txt` or `talk.webm` holding MP4 data would not). Returns the folder."""
    parent = check_output_path(path, what, example="out.mp4")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise OutputError(f"{what} '{path}': the video is written as MP4 (H.264 + AAC); give a name ending in "
                          f"{' / '.join(VIDEO_SUFFIXES)}, such as '{path.with_suffix('.mp4')}'")
    return parent


def write_file_atomic(path: Path, write: Callable[[Path], None], fix: str = "choose another output path") -> None:
    """write(tmp) to a temporary name beside `path`, then rename it onto `path`: a kill, a full disk or an error
    leaves the old file or the new one, never half of one. OutputError (ending in `fix`) if it cannot be written."""
    tmp = _partial_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too: no partial file is left behind
        tmp.unlink(missing_ok=True)
        from safetensors import SafetensorError  # what safetensors' writers raise for a full disk

        if isinstance(e, (OSError, SafetensorError)):
            raise OutputError(f"cannot write '{path}': {getattr(e, 'strerror', None) or e}; {fix}") from e
        raise


def write_text_atomic(path: Path, text: str, fix: str = "choose another output path") -> None:
    """`path.write_text(text)`, whole or not at all (`write_file_atomic`)."""
    write_file_atomic(path, lambda tmp: tmp.write_text(text), fix)


def _partial_path(path: Path) -> Path:
    """A temporary name beside `path`, unique in this process (and, by the pid, among processes)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{next(_partial_ids)}")


PARTIAL_NAME = re.compile(r"\..+\.partial-\d+-\d+")  # `_partial_path`'s names


def remove_abandoned_partials(directory: Path, min_age_s: float = 60.0, prefix: str = "") -> list[Path]:
    """Delete the partial files in `directory` that no process is writing any more: left by a writer killed before it
    could delete its own (SIGKILL, a crash, a power cut). A VideoWriter holds a lock on its partial file while it
    writes (released by the kernel when its process dies, whichever PID namespace it ran in), so a locked one is
    kept however old; an unlocked one (a `write_file_atomic`'s, written in one go) is kept until it is `min_age_s`
    old. `prefix`: only the names that start with it. Returns what was deleted. Without `fcntl` (Windows) nothing is
    deleted."""
    deleted: list[Path] = []
    if fcntl is None:
        return deleted
    now = time.time()
    for path in directory.iterdir():
        if not path.name.startswith(prefix) or not PARTIAL_NAME.fullmatch(path.name):
            continue
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile (renamed into place, or deleted by its writer)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live writer's; free: nobody writes it
            path.unlink(missing_ok=True)
            deleted.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return deleted


class VideoWriter:
    """Stream RGB frames and mono audio into an H.264 (yuv420p, libx264) + AAC mp4.

    Memory stays flat for any length: frames go straight to the encoders and the muxer interleaves
    packets. The file is written as `.NAME.partial-PID-N` beside `path` and renamed onto `path` only by
    a successful `close()`, so a crash or an error never leaves a half-written file looking complete.
    As a context manager it closes on success and aborts (deleting the partial file) on an exception.

    `size` is the side of square frames or (width, height); both must be even (yuv420p). `remove_stale`: first delete
    what a killed writer of `path` left (`remove_abandoned_partials`: a scan of its folder; False where the folder is
    cleaned elsewhere, off an event loop, as the server's recordings are).
    Feed it a frame and then that frame's `sample_rate // fps` samples, repeatedly; audio chunks of
    any length are re-cut to the AAC frame size, and the stream holds exactly the samples written.
    """

    def __init__(self, path: str | Path, size: int | tuple[int, int], fps: int = FPS,
                 sample_rate: int = SAMPLE_RATE, audio: bool = True, crf: int = 20,
                 preset: str = "medium", *, remove_stale: bool = True) -> None:
        self.path = Path(path)
        self._remove_stale = remove_stale
        width, height = (size, size) if np.ndim(size) == 0 else size  # type: ignore[misc]
        self.width, self.height = int(width), int(height)
        self.fps, self.sample_rate = int(fps), int(sample_rate)
        self.frames_written = 0
        self.samples_written = 0
        self._audio_pts = 0  # samples handed to the AAC encoder so far
        self._state = "init"
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise OutputError(f"video size {self.width}x{self.height} cannot be encoded as yuv420p H.264; "
                              f"use even, positive width and height")
        self._tmp = self._create_partial()
        self._state = "open"
        self._audio_rate = self.audio_stream_rate or self.sample_rate  # what the AAC stream carries
        try:
            self._container = self._open_container()
            self._video = self._container.add_stream("libx264", rate=self.fps, options=self._video_options(crf, preset))
            self._video.width, self._video.height = self.width, self.height
            self._video.pix_fmt = "yuv420p"
            self._audio = None
            if audio:
                self._audio = self._container.add_stream("aac", rate=self._audio_rate, layout="mono")
                self._audio.bit_rate = 48000 if self._audio_rate <= 16000 else 96000
                self._audio.codec_context.open()  # frame_size (1024) is known only once open
                self._fifo = av.AudioFifo()
        except _AV_ERRORS as e:
            self.abort()
            raise OutputError(f"cannot start encoding '{self.name}' ({self.width}x{self.height} @ {self.fps} fps, "
                              f"audio {self.sample_rate} Hz): {_reason(e)}") from e

    _lost = "; nothing was saved"  # what a failure leaves
    _lock_fd: int | None = None  # the partial file, open and locked while it is written
    audio_stream_rate: int | None = None  # the AAC stream's rate (None: the input's; `_to_stream_rate` converts)

    @property
    def name(self) -> str:
        """What messages call the output."""
        return str(self.path)

    def _open_container(self) -> Any:
        return av.open(str(self._tmp), "w", format="mp4", options={"movflags": "+faststart"})

    def _video_options(self, crf: int, preset: str) -> dict[str, str]:
        return {"crf": str(crf), "preset": preset}

    def _create_partial(self) -> Path:
        """Check the destination and create the empty partial file, locked while it is written (a cleaner tells it
        from a crashed writer's: `remove_abandoned_partials`); OutputError with the fix if not possible."""
        path, parent = self.path, check_video_path(self.path)
        if self._remove_stale:
            with contextlib.suppress(OSError):  # a run of this output killed outright (SIGKILL, out of memory)
                remove_abandoned_partials(parent, prefix=f".{path.name}.partial-")
        for _ in range(100):
            tmp = _partial_path(path)
            try:
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                if fcntl is not None:
                    with contextlib.suppress(OSError):  # a filesystem without locks: written unlocked
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd  # closed (the lock released) once the file is renamed into place or deleted
                return tmp
            except FileExistsError:
                continue
            except OSError as e:
                raise OutputError(f"cannot write in '{parent}': {_reason(e)}; choose another output path") from e
        raise OutputError(f"cannot create a temporary file in '{parent}'; remove stale '.{path.name}.partial-*' files")

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"VideoWriter for '{self.name}' is {self._state}; open a new one to write more")

    def _mux(self, stream: Any, frame: Any) -> None:
        for packet in stream.encode(frame):
            self._container.mux(packet)

    def _fail(self, e: BaseException, doing: str) -> OutputError:
        self.abort()
        return OutputError(f"writing '{self.name}' failed while {doing}: {_reason(e)}{self._lost}")

    def write_frame(self, rgb: np.ndarray) -> None:
        """Encode one uint8 (H, W, 3) RGB frame; its presentation time is frames_written / fps."""
        self._check_open()
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"write_frame expects uint8 ({self.height}, {self.width}, 3) RGB, "
                             f"got {rgb.dtype} {rgb.shape}")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = Fraction(1, self.fps)
        try:
            self._mux(self._video, frame)  # PyAV converts rgb24 -> yuv420p for the encoder
        except _AV_ERRORS as e:
            raise self._fail(e, f"encoding video frame {self.frames_written}") from e
        self.frames_written += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """Append float32 mono samples at `sample_rate` (any chunk length, values clipped to [-1, 1])."""
        self._check_open()
        if self._audio is None:
            raise RuntimeError("this VideoWriter was opened with audio=False")
        pcm = np.asarray(samples, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"write_audio expects mono samples shaped (n,), got {pcm.shape}")
        if not len(pcm):
            return
        pcm = np.clip(np.nan_to_num(pcm), -1.0, 1.0)[None]  # (1, n): mono fltp is one plane
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        try:
            for out in self._to_stream_rate(frame):
                self._fifo.write(out)
            self._drain_audio(final=False)
        except _AV_ERRORS as e:
            raise self._fail(e, "encoding audio") from e
        self.samples_written += pcm.shape[1]

    def _to_stream_rate(self, frame: Any) -> list[Any]:
        """`frame` (None: the end) at the AAC stream's rate: itself here (LiveEncoder resamples)."""
        return [] if frame is None else [frame]

    def _drain_audio(self, final: bool) -> None:
        """Encode whole AAC frames from the FIFO; with final=True also the short last one."""
        assert self._audio is not None
        if final:
            for out in self._to_stream_rate(None):
                self._fifo.write(out)
        size = self._audio.codec_context.frame_size or 1024
        while self._fifo.samples >= size or (final and self._fifo.samples):
            frame = self._fifo.read(min(size, self._fifo.samples))
            frame.pts = self._audio_pts
            frame.time_base = Fraction(1, self._audio_rate)
            self._audio_pts += frame.samples
            self._mux(self._audio, frame)

    def close(self) -> None:
        """Flush the encoders, finalise the mp4 and rename it onto `path`. Idempotent."""
        if self._state != "open":
            return
        if self.frames_written == 0:
            self.abort()
            raise OutputError(f"no video frames were written to '{self.name}'{self._lost}")
        try:
            if self._audio is not None:
                self._drain_audio(final=True)
                self._mux(self._audio, None)
            self._mux(self._video, None)
            self._container.close()
        except _AV_ERRORS as e:
            raise self._fail(e, "finalising the file") from e
        try:
            if self._tmp is not None:  # None: a live stream, nothing on disk
                os.replace(self._tmp, self.path)
        except OSError as e:
            raise self._fail(e, "renaming the finished file into place") from e
        self._state = "closed"
        self._unlock()

    def abort(self) -> None:
        """Stop writing and delete the partial file; `path` is left untouched. Idempotent."""
        if self._state != "open":
            return
        self._state = "aborted"
        container = getattr(self, "_container", None)
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away; its trailer does not matter
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close() (e.g. a crashed caller) must not leave its partial file behind.
        try:
            self.abort()
        except Exception:  # noqa: BLE001
            pass


LIVE_FORMATS = {"rtmp": "flv", "rtmps": "flv", "srt": "mpegts", "udp": "mpegts", "tcp": "mpegts"}
LIVE_HINT = ("give an rtmp:// or rtmps:// ingest URL with its stream key (YouTube Live, Twitch, an OBS or nginx-rtmp "
             "server), or srt://, udp:// or tcp:// for MPEG-TS")


def check_live_url(url: str) -> str:
    """The container a live stream to `url` is muxed in (flv for RTMP, mpegts otherwise); InputError for anything
    else (a file path, http://, no host): FFmpeg would open those too, and a live output must not write files."""
    parts = urllib.parse.urlsplit(str(url))
    scheme = parts.scheme.lower()
    if scheme not in LIVE_FORMATS or not parts.hostname:
        raise InputError(f"'{redact_url(url)}' is not a live streaming URL; {LIVE_HINT}")
    return LIVE_FORMATS[scheme]


def redact_url(url: str) -> str:
    """`url` as logs and messages may show it: an RTMP stream key (the path after the application) and any
    password or query (SRT's `passphrase`) hidden."""
    parts = urllib.parse.urlsplit(str(url))
    if not parts.netloc and not parts.path and not parts.query:  # a scheme alone (a --broadcast-to prefix)
        return str(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = parts.path
    if parts.scheme.lower() in ("rtmp", "rtmps"):
        app, _, key = path.lstrip("/").partition("/")
        path = f"/{app}/***" if key else path
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "***" if parts.query else "", ""))


class LiveEncoder(VideoWriter):
    """A live stream's encode, done once however many servers it goes to: frames and their audio -> H.264 for live
    ingest (x264 tuned for zero latency, a keyframe every 2 s or when asked, a capped bitrate) and AAC at 48 kHz (what
    ingest servers take; the frames' audio is resampled), as packets, not a file. `LiveMuxer` sends them to a server.

    `write_tick(frame, audio, key)` encodes one tick and returns the packets that came out (zero latency: the tick's
    own frame among them; AAC lags a frame); `template()` describes the streams (their codecs and headers) for a
    `LiveMuxer` to mux them. A live encode is not flushed at its end (`abort()`): a stream that stops has taken what
    it sends (`stream.recorder.Broadcast.stop`).
    """

    _lost = "; the live stream ended"
    audio_stream_rate = 48000

    def __init__(self, size: int | tuple[int, int], fps: int = FPS, sample_rate: int = SAMPLE_RATE,
                 bitrate_kbps: int = 0, preset: str = "veryfast") -> None:
        width, height = (size, size) if np.ndim(size) == 0 else size  # type: ignore[misc]
        self.bitrate_kbps = live_bitrate_kbps((int(width), int(height)), fps, bitrate_kbps)
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=48000)
        self._packets: list[Any] = []  # what the encoders gave since the last write_tick
        self._key = False
        super().__init__("live stream", size, fps, sample_rate, audio=True, preset=preset)
        try:
            self._container.start_encoding()  # opens the encoders: their headers (SPS/PPS, AAC config) exist now
        except _AV_ERRORS as e:
            raise self._fail(e, "starting the encoders") from e

    @property
    def name(self) -> str:
        return "the live stream"

    def _create_partial(self) -> None:  # type: ignore[override]
        return None

    def _open_container(self) -> Any:
        # NUT with global headers: the encoders keep their headers apart (in `template`), as FLV and MP4 want them;
        # MPEG-TS gets them back in front of each keyframe from its muxer. Nothing is muxed into it.
        return av.open(io.BytesIO(), "w", format="nut")

    def _video_options(self, crf: int, preset: str) -> dict[str, str]:
        rate = f"{self.bitrate_kbps}k"
        return {"preset": preset, "tune": "zerolatency", "g": str(2 * self.fps), "keyint_min": str(2 * self.fps),
                "b": rate, "maxrate": rate, "bufsize": f"{2 * self.bitrate_kbps}k"}

    def _to_stream_rate(self, frame: Any) -> list[Any]:
        return list(self._resampler.resample(frame))

    def _mux(self, stream: Any, frame: Any) -> None:
        if frame is not None and stream is self._video and self._key:
            # x264 makes it an IDR: a server that joins (or comes back) starts here
            frame.pict_type = av.video.frame.PictureType.I
        self._packets.extend(stream.encode(frame))

    def write_tick(self, rgb: np.ndarray, samples: np.ndarray, key: bool = False) -> list[Any]:
        """Encode one tick (a uint8 (H, W, 3) frame and its float32 samples; `key`: its frame a keyframe) and return
        the packets that came out (PyAV packets of `video` or `audio`, in their codec's time base)."""
        self._key = key
        self.write_frame(rgb)
        self.write_audio(samples)
        packets, self._packets = self._packets, []
        return packets

    def template(self) -> bytes:
        """The streams as a small NUT file (their codecs, sizes, rates and headers) that `LiveMuxer` copies its streams
        from. (It holds one packet, an empty access unit: a demuxer wants one.)"""
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="nut") as container:
            video = container.add_stream_from_template(self._video)
            container.add_stream_from_template(self._audio)
            packet = av.Packet(b"\x00\x00\x00\x01\x09\xf0")  # an H.264 access unit delimiter
            packet.pts = packet.dts = 0
            packet.time_base, packet.stream = self._video.codec_context.time_base, video
            container.mux(packet)
        return buffer.getvalue()


def live_bitrate_kbps(size: tuple[int, int], fps: int, bitrate_kbps: int = 0) -> int:
    """A live stream's video bitrate: `bitrate_kbps`, or for 0 ~0.1 bit a pixel at 25 fps: 128x128 -> 300 kb/s (the
    floor), 720x720 -> 1.3 Mb/s."""
    return int(bitrate_kbps) or max(300, size[0] * size[1] * fps // 10_000)


class LiveMuxer:
    """Encoded packets (a `LiveEncoder`'s) pushed live to a streaming server: `rtmp(s)://` (FLV; the ingest of YouTube
    Live, Twitch or an OBS / nginx-rtmp server), `srt://`, `udp://` or `tcp://` (MPEG-TS). Nothing is encoded here and
    nothing touches the disk; the stream starts at the first keyframe given, at time 0, and captions (`caption`) go
    into the video as CEA-608.

    The constructor connects (the header goes out at once): a server that is not there raises OutputError now, not at
    the first packet. PyAV holds the GIL while it connects and has no timeout for it (its interrupt callback does not
    reach `avio_open`), so a server that never answers blocks it for good: `broadcaster.LiveOutput` runs it in a
    process of its own and kills that at its timeout. A connection lost later raises OutputError from `write`;
    `close()` sends the end of the stream.
    """

    def __init__(self, url: str, template: bytes) -> None:
        self.url = str(url)
        self._format = check_live_url(self.url)
        self._cc = RollUp()  # caption() queues, each video frame carries a few of its 608 byte pairs
        self._start: Fraction | None = None  # the stream time (s) of the first keyframe sent: time 0 here
        self._end = Fraction(0)  # ... and of the end of the last frame sent
        self.frames_written = 0
        self._container = None
        try:
            with av.open(io.BytesIO(template), format="nut") as streams:
                # each packet sent as it is muxed, not held in a 32 KB buffer (~1 s at 300 kb/s); flv: no seek back to
                # fill in the duration and size (a live stream has neither)
                options = {"flush_packets": "1", **({"flvflags": "no_duration_filesize"} if self._format == "flv"
                                                     else {})}
                self._container = av.open(self.url, "w", format=self._format, options=options)
                self._video = self._container.add_stream_from_template(streams.streams.video[0])
                self._audio = self._container.add_stream_from_template(streams.streams.audio[0])
            self._container.start_encoding()  # connects and sends the header now
        except _AV_ERRORS as e:
            self.abort()
            raise OutputError(f"cannot stream to '{self.name}': {_reason(e)}; check that the server is there and "
                              "takes this URL (and its stream key)") from e

    @property
    def name(self) -> str:
        return redact_url(self.url)

    def caption(self, text: str) -> None:
        """Show `text` as a caption from the next frame on: CEA-608 roll-up inside the H.264 (`cc608`), what
        YouTube Live, Twitch and OBS read from a stream, shown with a player's CC button."""
        self._cc.add(text)

    def write(self, packets: Iterable[Any], tail: bool = False) -> None:
        """Send encoded packets (`is_video`, `is_keyframe`, `pts`, `dts`, `time_base`, `data`: `LivePacket`s): those
        before the first video keyframe are dropped, and times start at that keyframe. `tail`: the stream's video has
        ended; of these, only the sound until its last frame's end is sent (the audio encoder's last packets)."""
        if self._container is None:
            raise RuntimeError(f"the live stream to '{self.name}' is closed")
        try:
            for p in packets:
                if self._start is None:
                    if not (p.is_video and p.is_keyframe):
                        continue
                    self._start = p.pts * p.time_base
                shift = self._start / p.time_base  # the start in this stream's time base (whole: frames, samples)
                if p.pts < shift or (tail and (p.is_video or p.pts * p.time_base >= self._end)):
                    continue  # sound from before the first frame sent, or after the last
                packet = av.Packet(p.data)
                packet.pts, packet.dts = round(p.pts - shift), round(p.dts - shift)
                packet.time_base, packet.is_keyframe = p.time_base, p.is_keyframe
                packet.stream = self._video if p.is_video else self._audio
                if p.is_video:
                    packet = with_captions(packet, self._cc.take())
                    self.frames_written += 1
                    self._end = (p.pts + 1) * p.time_base  # (its time base is the frame rate's)
                self._container.mux(packet)
        except _AV_ERRORS as e:
            self.abort()
            raise OutputError(f"the live stream to '{self.name}' failed: {_reason(e)}") from e

    def close(self) -> None:
        """Send the end of the stream. Idempotent."""
        container, self._container = self._container, None
        if container is None:
            return
        try:
            container.close()
        except _AV_ERRORS as e:
            raise OutputError(f"ending the live stream to '{self.name}' failed: {_reason(e)}") from e

    def abort(self) -> None:
        """Stop at once (the connection closed without the end of the stream). Idempotent."""
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):  # the stream is being thrown away
                container.close()


@dataclass(frozen=True)
class LivePacket:
    """An encoded packet between a `LiveEncoder` and the `LiveMuxer`s that send it (`broadcaster` carries them from
    process to process): plain values, times in `time_base`."""

    is_video: bool
    is_keyframe: bool
    pts: int
    dts: int
    time_base: Fraction
    data: bytes

    @classmethod
    def of(cls, packet: Any) -> LivePacket:
        """A PyAV packet of a LiveEncoder's (`video` or `audio` stream)."""
        pts = packet.pts if packet.pts is not None else packet.dts
        dts = packet.dts if packet.dts is not None else pts
        return cls(packet.stream.type == "video", bool(packet.is_keyframe), int(pts), int(dts),
                   Fraction(packet.time_base), bytes(packet))


def with_captions(packet: Any, pairs: list[tuple[int, int]]) -> Any:
    """An encoded H.264 frame (a PyAV packet, Annex B) carrying CEA-608 byte `pairs` in an SEI (`cc608`); itself when
    there are none."""
    if not pairs:
        return packet
    captioned = av.Packet(with_sei(bytes(packet), a53_sei(pairs)))
    captioned.pts, captioned.dts, captioned.duration = packet.pts, packet.dts, packet.duration
    captioned.time_base, captioned.stream, captioned.is_keyframe = packet.time_base, packet.stream, packet.is_keyframe
    return captioned


# --------------------------------------------------------------------------------------------------
# Reading videos back (tests, evaluation)
# --------------------------------------------------------------------------------------------------


@dataclass
class MediaInfo:
    """Facts of a media file, counted by decoding (not taken from headers)."""

    video_frames: int  # decoded video frames of the first video stream (0 without video)
    fps: float  # the video stream's average frame rate (0.0 without video)
    width: int  # video frame width in pixels (0 without video)
    height: int  # video frame height in pixels (0 without video)
    audio_seconds: float  # decoded samples of the first audio stream / its rate (mp4 padding trimmed)
    audio_rate: int  # the audio stream's sample rate (0 without audio)


def stream_fps(stream, default: float = 0.0) -> float:
    """A PyAV video stream's frame rate from its headers (average, else guessed), else `default`."""
    return float(stream.average_rate or stream.guessed_rate or default)


def video_fps(path: str | Path) -> float:
    """The frame rate of the first video stream of `path`, without decoding it."""
    path = Path(path)
    check_readable(path, "video", "give an mp4/mkv/webm/mov video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"video file '{path}' has no video stream; give an mp4/mkv/webm/mov video")
            fps = stream_fps(container.streams.video[0])
    except _AV_ERRORS as e:
        raise InputError(f"video file '{path}' could not be read: {_reason(e)}; give an mp4/mkv/webm/mov video") from e
    if fps <= 0:
        raise InputError(f"video file '{path}' declares no frame rate; re-encode it (e.g. ffmpeg -r 25)")
    return fps


def probe(path: str | Path) -> MediaInfo:
    """Decode `path` fully and count its video frames and audio samples."""
    path = Path(path)
    check_readable(path, "media", "give a video or audio file")
    try:
        with av.open(str(path)) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            streams = [s for s in (video, audio) if s is not None]
            if video is not None:
                video.thread_type = "AUTO"
            frames, samples = 0, 0
            for frame in container.decode(*streams):
                if isinstance(frame, av.VideoFrame):
                    frames += 1
                else:
                    samples += frame.samples
            rate = audio.rate if audio is not None else 0
            if audio is not None:
                samples = _trim_to_declared(samples, _declared_samples(container, audio, rate), rate)
            return MediaInfo(
                video_frames=frames,
                fps=stream_fps(video) if video is not None else 0.0,
                width=video.codec_context.width if video is not None else 0,
                height=video.codec_context.height if video is not None else 0,
                audio_seconds=samples / rate if rate else 0.0,
                audio_rate=rate,
            )
    except _AV_ERRORS as e:
        raise InputError(f"media file '{path}' could not be decoded: {_reason(e)}; give a video or audio file") from e


def upright_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded video frame as uint8 (H, W, 3) RGB the way players show it: turned by the stream's display
    matrix (a phone video is stored sideways with a rotation to apply, which `to_ndarray` ignores).

    `frame.rotation` (PyAV >= 14) is the angle the display matrix turns the picture counter-clockwise, so a
    phone clip tagged "rotate=90" (turn 90 degrees clockwise to show) reads -90; rounded to quarter turns,
    mirroring matrices are not undone. Older PyAV has no `rotation`: frames come as stored."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) as stored
    quarters = int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarters)) if quarters else rgb  # np.rot90 turns counter-clockwise


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield the uint8 (H, W, 3) RGB frames of the first video stream of `path`, upright (`upright_rgb`)."""
    path = Path(path)
    check_readable(path, "video", "give an mp4/mkv/webm/mov video")  # eager: fail at the call, not mid-loop

    def frames() -> Iterator[np.ndarray]:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"video file '{path}' has no video stream; give an mp4/mkv/webm/mov video")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    yield upright_rgb(frame)  # (H, W, 3) uint8
        except _AV_ERRORS as e:
            raise InputError(f"video file '{path}' could not be decoded: {_reason(e)}; "
                             f"give an mp4/mkv/webm/mov video") from e

    return frames()
