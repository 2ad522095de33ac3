"""Real talking-head videos -> 25 fps face crops + 16 kHz audio shards (`letstalk data prepare`).

    letstalk data prepare --videos ~/talks --out data/real --size 128
    letstalk data prepare --videos ~/talks --out data/real --detect-every 10 --smooth-seconds 1.0

Every video PyAV reads in the folder (recursively: mp4, mov, mkv, webm, avi, m4v) is

1. turned upright by the stream's display matrix (phones store portrait video sideways) and resampled
   to 25 fps by frame timestamps: output frame k (time k / 25 s after the first frame) shows the last
   source frame whose timestamp is <= k / 25, so any rate, and variable frame rates, come out at 25 fps
   with the right timing;
2. searched for a face with `letstalk_rt.face.detect_face` every `--detect-every` output frames; the
   detections (outliers in size dropped) are interpolated to every frame and smoothed with a centred
   moving average of their centre and size over `--smooth-seconds`, so the crop does not jitter;
3. cropped to a square of side face * (1 + 2 * margin) around the smoothed face (the framing
   `face.crop_portrait` gives the model at inference; borders replicated) and resized to `--size`;
4. paired with its first audio track as 16 kHz mono float32, exactly 640 samples per frame, each decoded
   audio frame placed at its own timestamp (a gap in the audio timeline, as dropped packets leave in
   webcam or WebRTC recordings, becomes silence instead of pulling all later audio early).

Output: `shard_XXXX.safetensors` files, each holding `frames` (N, S, S, 3) uint8, `audio` (N * 640,)
float32, `boxes` (N, 3) float32 (crop x0, y0, side in source pixels) and, in the safetensors metadata,
`segments`: a JSON list of the pieces of videos it holds (video, first frame, frame count, offset).
`index.json` lists the shards, every video with its status, a summary, and the `margin` of the framing,
which fixes where the mouth is in every crop (`crop_mouth_box`; the mouth-weighted training losses use it). Videos that cannot be
decoded, have no audio or a silent one, or show no face are skipped with one warning line each and counted.
The whole step decodes every video twice (detection pass, crop pass), so memory stays flat. A re-run
replaces what a previous run wrote in --out: index, shards, `cache_latents` files and the trainer's caches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LetsTalkError, NoFaceError, OutputError, Stopped

FPS = 25
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
MIN_FRAMES = 8  # shorter videos (< 0.32 s) are skipped: too short for a training window
MIN_FACE_SHARE = 0.5  # a video whose sampled frames show a face less often than this is skipped
# Where the mouth sits in the detected face box (`face.detect_face`'s LBP cascade box spans brows to upper
# lip): centre offset (dx, dy) from the box centre and size (w, h), in box sides, covering the lips from
# closed to fully open. Measured: on skimage's astronaut (lips placed by hand, synth.PHOTO_LANDMARKS) the
# closed lips' centre is 0.32 sides below the box centre and 0.42 sides wide, the nose 0.15 and the chin 0.71
# below; on 162 first frames of the synthetic corpus (106 procedural faces, 56 looks of that photograph,
# detected like a video's) the box around the fully open mouth is centred 0.41 +- 0.07 sides below, 0.47 x
# 0.38 sides, its centre 0.00 +- 0.06 sides across. This box spans 0.22-0.58 sides below the centre (nose to
# above the chin) and +-0.32 across (the astronaut's turned face puts a lip corner 0.28 sides left; the
# smoothed track lags a moving face a little).
FACE_MOUTH = (0.0, 0.40, 0.64, 0.36)


def crop_mouth_box(margin: float) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the mouth as fractions of a crop's side, for crops of side face * (1 + 2 margin)
    centred on the face (`crop_frame` here, `face.crop_portrait` at inference); clipped to the crop."""
    dx, dy, w, h = FACE_MOUTH
    k = 1.0 + 2.0 * margin
    x0, y0 = max(0.0, 0.5 + (dx - w / 2) / k), max(0.0, 0.5 + (dy - h / 2) / k)
    x1, y1 = min(1.0, 0.5 + (dx + w / 2) / k), min(1.0, 0.5 + (dy + h / 2) / k)
    return x0, y0, x1 - x0, y1 - y0


SILENT_PEAK = 1e-4  # a track whose peak stays below this (-80 dBFS) is digital silence or dither
SILENT_RMS_DB = -70.0  # or whose RMS is below this: 20 dB under a quiet room's noise floor, far under quiet speech
AUDIO_JITTER = 0.01  # s: audio timestamps this far off the running sample count are rounding, not a gap
AUDIO_MAX_OVERLAP = 0.1  # s: an audio frame starting further back than this means the timeline restarted


class SkipVideo(Exception):
    """A video that cannot be used; the message is the one-line reason, `kind` what the summary counts it as
    (SKIP_KINDS). The kind is carried, not guessed from the message, which can hold the file's own name."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        assert kind in SKIP_KINDS, kind
        self.kind = kind


SKIP_KINDS = ("unreadable", "no audio", "silent audio", "audio timing", "too short", "no face")


# ------------------------------------------------------------------------------------------------
# Decoding at 25 fps
# ------------------------------------------------------------------------------------------------


def frames_at_25fps(path: str | Path, fps: int = FPS) -> Iterator[np.ndarray]:
    """Yield the uint8 (H, W, 3) frames of the first video stream resampled to `fps` by timestamp.

    Output frame k shows the last source frame with timestamp <= k / fps (timestamps relative to the
    first frame); the last source frame lasts one source frame duration. Raises SkipVideo for files
    PyAV cannot decode or without video.
    """
    import av

    from ..media import _reason, stream_fps, upright_rgb

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SkipVideo("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream_fps(stream, fps)
            origin: float | None = None
            prev: np.ndarray | None = None
            t = 0.0
            k = 0
            counted = 0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.pts is not None and frame.time is not None else counted / rate
                counted += 1
                if origin is None:
                    origin = t
                t -= origin
                while prev is not None and k / fps < t - 1e-4:  # output times before this frame show prev
                    yield prev
                    k += 1
                prev = upright_rgb(frame)  # turned by the display matrix: phones store portrait video sideways
            if prev is None:
                raise SkipVideo("no decodable video frames")
            end = t + 1.0 / rate
            while k / fps < end - 1e-4:
                yield prev
                k += 1
    except SkipVideo:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise SkipVideo(f"cannot be decoded ({_reason(e)})") from e  # without the path: the warning names the file


def _first_video_time(path: Path) -> float:
    """Timestamp (s) of the first decoded video frame: time 0 of frames_at_25fps's output."""
    import av

    try:
        with av.open(str(path)) as c:
            for frame in c.decode(c.streams.video[0]):
                return float(frame.time) if frame.time is not None else 0.0
    except Exception:  # noqa: BLE001 - pass 1 decoded this video; an error here surfaces in pass 2
        pass
    return 0.0


def load_track_audio(path: Path, num_frames: int) -> np.ndarray:
    """The first audio track as 16 kHz mono float32 on the video's timeline: exactly num_frames * 640 samples,
    sample 0 at the first video frame.

    Every decoded audio frame goes where its timestamp says, not after the previous one: frames that follow
    each other (within AUDIO_JITTER) are resampled together, and a jump forward in the timeline (packets a
    webcam, WebRTC or OBS recording dropped) is left silent, so the audio after it stays on its frames.
    Raises SkipVideo for no audio track, undecodable audio, a timeline that jumps back more than
    AUDIO_MAX_OVERLAP, or a silent track (peak under SILENT_PEAK or RMS under SILENT_RMS_DB over the video).
    """
    import av

    from ..media import _MonoConverter, _concat, _declared_samples, _reason, _trim_to_declared

    n = num_frames * SAMPLES_PER_FRAME
    out = np.zeros(n, np.float32)
    origin = _first_video_time(path)
    decoded, decoded_end = 0, 0  # decoded_end: the timeline sample after the last one decoded

    def place(start: float, chunks: list[np.ndarray]) -> None:
        nonlocal decoded_end
        pcm = _concat(chunks)
        at = int(round(start * SAMPLE_RATE))  # sample of the video timeline the run starts at
        decoded_end = max(decoded_end, at + len(pcm))
        lo, hi = max(at, 0), min(at + len(pcm), n)
        if hi > lo:
            out[lo:hi] = pcm[lo - at:hi - at]

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise SkipVideo("no audio track", "no audio")
            stream = container.streams.audio[0]
            converter = _MonoConverter(SAMPLE_RATE)
            run_start: float | None = None  # video-timeline seconds where the current continuous run starts
            run_in, run_rate = 0, 0  # input samples in the run so far, at run_rate
            chunks: list[np.ndarray] = []
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                t = float(frame.time) - origin if frame.time is not None else None
                if run_start is not None:
                    expected = run_start + run_in / run_rate
                    t = expected if t is None else t
                    if t < expected - AUDIO_MAX_OVERLAP:
                        raise SkipVideo(f"the audio timeline jumps back {expected - t:.2f} s at {expected:.2f} s "
                                        "(a restarted recording?)", "audio timing")
                    if abs(t - expected) > AUDIO_JITTER or frame.sample_rate != run_rate:
                        place(run_start, chunks + converter.flush())  # a gap (or overlap): a new run at t
                        run_start, chunks = None, []
                if run_start is None:
                    run_start, run_in, run_rate = (0.0 if t is None else t), 0, frame.sample_rate
                chunks += converter.push(frame)
                run_in += frame.samples
                decoded += frame.samples
            if run_start is not None:
                place(run_start, chunks + converter.flush())
            declared = _declared_samples(container, stream, SAMPLE_RATE)
            if declared is not None and stream.start_time is not None:
                # mp4/mov: decoding yields the AAC encoder's zero padding past the declared end; drop it, as
                # load_audio does (at most 0.1 s of it: a declared end further back is wrong, not padding)
                start = int(round((float(stream.start_time * stream.time_base) - origin) * SAMPLE_RATE))
                out[max(0, start + _trim_to_declared(decoded_end - start, declared, SAMPLE_RATE)):] = 0.0
    except SkipVideo:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError, TypeError) as e:
        raise SkipVideo(f"the audio track cannot be decoded ({_reason(e)})", "no audio") from e
    if not decoded:
        raise SkipVideo("the audio track holds no samples", "no audio")
    out = np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    peak, rms = float(np.abs(out).max()), float(np.sqrt(np.mean(np.square(out, dtype=np.float64))))
    if peak < SILENT_PEAK or rms < 10 ** (SILENT_RMS_DB / 20):
        level = f"{20 * np.log10(rms):.0f} dBFS" if rms > 0 else "digital silence"
        raise SkipVideo(f"silent audio track (RMS {level} while the video plays)", "silent audio")
    return out


# ------------------------------------------------------------------------------------------------
# Face track
# ------------------------------------------------------------------------------------------------


def detect_track(path: Path, detect_every: int) -> tuple[int, list[tuple[int, float, float, float]], tuple[int, int]]:
    """Pass 1: count the 25 fps frames and detect the face every `detect_every` frames.

    Returns (num_frames, [(frame, centre x, centre y, side)], (width, height)).
    """
    from ..face import detect_face

    found: list[tuple[int, float, float, float]] = []
    n, tried = 0, 0
    shape = (0, 0)
    for k, frame in enumerate(frames_at_25fps(path)):
        n = k + 1
        shape = (frame.shape[1], frame.shape[0])
        if k % detect_every:
            continue
        tried += 1
        try:
            x, y, w, h = detect_face(frame)
        except NoFaceError:
            continue
        found.append((k, x + w / 2, y + h / 2, float(max(w, h))))
    if not found:
        raise SkipVideo(f"no face found in {tried} sampled frame{'s' if tried != 1 else ''}", "no face")
    if len(found) < MIN_FACE_SHARE * tried:
        raise SkipVideo(f"a face was found in only {len(found)} of {tried} sampled frames", "no face")
    return n, found, shape


def smooth_boxes(found: list[tuple[int, float, float, float]], num_frames: int, window: int) -> np.ndarray:
    """Per-frame (centre x, centre y, side) from sparse detections: outliers dropped, interpolated,
    then a centred moving average over `window` frames (edges replicated). Returns (num_frames, 3)."""
    det = np.array(found, np.float64)  # (m, 4): frame, cx, cy, side
    med = np.median(det[:, 3])
    keep = np.abs(det[:, 3] / med - 1) < 0.4  # a detection 40% off the median size is a false hit
    det = det[keep] if keep.any() else det
    frames = np.arange(num_frames)
    track = np.stack([np.interp(frames, det[:, 0], det[:, i]) for i in (1, 2, 3)], axis=1)  # (N, 3)
    window = max(1, int(window) | 1)  # odd
    if window > 1 and num_frames > 1:
        r = window // 2
        padded = np.pad(track, ((r, r), (0, 0)), mode="edge")
        kernel = np.ones(window) / window
        track = np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(3)], axis=1)
    return track


def crop_frame(frame: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Square crop of `side` px centred on (cx, cy), borders replicated, resized to (size, size, 3)."""
    from PIL import Image

    h, w = frame.shape[:2]
    x0, y0 = cx - side / 2, cy - side / 2
    pad = int(np.ceil(max(0.0, -x0, -y0, x0 + side - w, y0 + side - h))) + 1
    if pad > 1:
        frame = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        x0, y0 = x0 + pad, y0 + pad
    else:
        pad = 0
    im = Image.fromarray(frame).resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side),
                                       reducing_gap=2.0)
    return np.asarray(im, np.uint8)


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


@dataclass
class _ShardWriter:
    out_dir: Path
    shard_frames: int
    size: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _frames: list[np.ndarray] = field(default_factory=list)
    _audio: list[np.ndarray] = field(default_factory=list)
    _boxes: list[np.ndarray] = field(default_factory=list)
    _segments: list[dict[str, Any]] = field(default_factory=list)
    _count: int = 0

    @property
    def room(self) -> int:
        return self.shard_frames - self._count

    def add(self, video: str, start: int, frames: np.ndarray, audio: np.ndarray, boxes: np.ndarray) -> None:
        self._segments.append({"video": video, "start_frame": start, "num_frames": len(frames), "offset": self._count})
        self._frames.append(frames)
        self._audio.append(audio)
        self._boxes.append(boxes)
        self._count += len(frames)
        if self.room <= 0:
            self.flush()

    def flush(self) -> None:
        from .data import write_safetensors_atomic

        if not self._count:
            return
        name = f"shard_{len(self.shards):04d}.safetensors"
        path = self.out_dir / name
        tensors = {"frames": np.ascontiguousarray(np.concatenate(self._frames)),  # (N, S, S, 3) uint8
                   "audio": np.ascontiguousarray(np.concatenate(self._audio)),  # (N * 640,) float32
                   "boxes": np.ascontiguousarray(np.concatenate(self._boxes).astype(np.float32))}  # (N, 3)
        digest = hashlib.sha1()  # of the content: the trainer's caches of this shard are keyed by it (train.data)
        for t in tensors.values():
            digest.update(memoryview(t).cast("B"))
        meta = {"fps": str(FPS), "sample_rate": str(SAMPLE_RATE), "size": str(self.size),
                "segments": json.dumps(self._segments), "digest": digest.hexdigest()[:16]}
        write_safetensors_atomic(path, tensors, meta, "free disk space or choose another --out")
        self.shards.append({"file": name, "num_frames": self._count, "segments": self._segments})
        self._frames, self._audio, self._boxes, self._segments, self._count = [], [], [], [], 0


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(frames (N, S, S, 3) uint8, audio (N * 640,) float32, boxes (N, 3), segments) of one shard."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        segments = json.loads(f.metadata()["segments"])
        return f.get_tensor("frames"), f.get_tensor("audio"), f.get_tensor("boxes"), segments


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------


@dataclass
class PrepareSummary:
    videos: int = 0  # video files found
    prepared: int = 0  # videos written to shards
    frames: int = 0  # 25 fps frames written
    shards: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason kind -> count

    @property
    def seconds(self) -> float:
        return self.frames / FPS

    def line(self) -> str:
        skipped = sum(self.skipped.values())
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return (f"prepared {self.prepared} of {self.videos} videos ({self.frames} frames, {self.seconds:.1f} s) "
                f"into {self.shards} shard{'s' if self.shards != 1 else ''}; skipped {skipped}"
                + (f" ({kinds})" if kinds else ""))


def find_videos(videos_dir: Path) -> list[Path]:
    return sorted(p for p in videos_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier run wrote in `out` (a killed one's unfinished files too): a re-run replaces it. The
    clip names (shard_0000_000000 ...) come back with other content, so the trainer's caches of the old shards
    (`.letstalk_cache/`) and `cache_latents`'s files go too, and index.json first: a run stopped part-way leaves no
    index that describes shards it has not written."""
    import shutil

    from ..media import remove_abandoned_partials
    from .data import CACHE_DIR

    try:
        (out / "index.json").unlink(missing_ok=True)
        for stale in [*out.glob("shard_*.safetensors"), *out.glob("latents_*.safetensors")]:
            stale.unlink()
        remove_abandoned_partials(out, min_age_s=0)  # a shard (or index) a killed run was writing
        if (out / CACHE_DIR).is_dir():
            shutil.rmtree(out / CACHE_DIR)
    except OSError as e:
        raise OutputError(f"cannot clear the previous run in '{out}': {e.strerror or e}; "
                          "make it writable or choose another --out") from e


def prepare_videos(videos_dir: str | Path, out_dir: str | Path, size: int = 128, margin: float = 0.6,
                   detect_every: int = 5, smooth_seconds: float = 0.5, shard_frames: int = 2500,
                   progress: bool = True) -> PrepareSummary:
    """Turn every talking-head video under videos_dir into shards in out_dir; returns the summary."""
    from tqdm import tqdm

    videos_dir, out = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise InputError(f"--videos '{videos_dir}' is not a directory; give a folder of mp4/mov/mkv/webm videos")
    if size < 8 or size % 2:
        raise InputError(f"--size {size}: give an even frame side >= 8")
    if detect_every < 1 or shard_frames < 1 or margin < 0 or smooth_seconds < 0:
        raise InputError("--detect-every and --shard-frames must be >= 1, --margin and --smooth-seconds >= 0")
    videos = find_videos(videos_dir)
    if not videos:
        raise InputError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found under '{videos_dir}'")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create '{out}': {e.strerror or e}; choose another --out") from e
    _clear_previous_run(out)
    writer = _ShardWriter(out, shard_frames, size)
    summary = PrepareSummary(videos=len(videos))
    records: list[dict[str, Any]] = []
    window = int(round(smooth_seconds * FPS))
    try:  # Ctrl-C or a `kill` while a video is read or a shard written: the shards so far have no index, so
        # nothing reads them
        for path in tqdm(videos, desc="prepare videos", unit="video", disable=not progress):
            rel = str(path.relative_to(videos_dir))
            try:
                n = _prepare_one(path, rel, writer, size, margin, detect_every, window)
            except SkipVideo as e:
                reason = str(e)
                print(f"letstalk: warning: skipping '{rel}': {reason}", file=sys.stderr)
                summary.skipped[e.kind] = summary.skipped.get(e.kind, 0) + 1
                records.append({"video": rel, "status": "skipped", "reason": reason})
                continue
            summary.prepared += 1
            summary.frames += n
            records.append({"video": rel, "status": "ok", "num_frames": n, "seconds": n / FPS})
        writer.flush()
    except KeyboardInterrupt:
        raise Stopped(f"stopped after {len(records)} of {len(videos)} videos: '{out}' has no index.json, so "
                      "nothing reads its shards; the same command starts over") from None
    summary.shards = len(writer.shards)
    index = {"format": "letstalk-prepared", "fps": FPS, "sample_rate": SAMPLE_RATE, "size": size, "margin": margin,
             "detect_every": detect_every, "smooth_seconds": smooth_seconds, "shards": writer.shards,
             "videos": records, "summary": {"videos": summary.videos, "prepared": summary.prepared,
                                            "frames": summary.frames, "shards": summary.shards,
                                            "skipped": summary.skipped}}
    from ..media import write_text_atomic

    write_text_atomic(out / "index.json", json.dumps(index, indent=1), "free disk space or choose another --out")
    return summary


def _prepare_one(path: Path, rel: str, writer: _ShardWriter, size: int, margin: float, detect_every: int,
                 window: int) -> int:
    """Both passes for one video; returns the frames written."""
    n, found, _ = detect_track(path, detect_every)
    if n < MIN_FRAMES:
        raise SkipVideo(f"too short ({n} frames at 25 fps)", "too short")
    audio = load_track_audio(path, n)  # before pass 2: a video without audio is skipped cheaply
    track = smooth_boxes(found, n, window)
    sides = track[:, 2] * (1 + 2 * margin)
    frames: list[np.ndarray] = []
    start = 0
    for k, frame in enumerate(frames_at_25fps(path)):
        if k >= n:
            break
        frames.append(crop_frame(frame, track[k, 0], track[k, 1], sides[k], size))
        if len(frames) >= writer.room:  # a long video continues in the next shard
            _emit(writer, rel, start, frames, audio, track, sides)
            start += len(frames)
            frames = []
    if frames:
        _emit(writer, rel, start, frames, audio, track, sides)
    return n


def _emit(writer: _ShardWriter, rel: str, start: int, frames: list[np.ndarray], audio: np.ndarray,
          track: np.ndarray, sides: np.ndarray) -> None:
    stop = start + len(frames)
    boxes = np.stack([track[start:stop, 0] - sides[start:stop] / 2, track[start:stop, 1] - sides[start:stop] / 2,
                      sides[start:stop]], axis=1)
    writer.add(rel, start, np.stack(frames), audio[start * SAMPLES_PER_FRAME:stop * SAMPLES_PER_FRAME], boxes)


# ------------------------------------------------------------------------------------------------
# Latent cache
# ------------------------------------------------------------------------------------------------


def cache_latents(shards_dir: str | Path, model_dir: str | Path | None = None, batch_size: int = 32,
                  device: str = "cpu", progress: bool = True) -> list[Path]:
    """Encode every shard's frames with a model's autoencoder: `latents_XXXX.safetensors` beside
    `shard_XXXX.safetensors`, holding `latents` (N, C, h, w) float16 (scaled, as the transformer sees
    them). The shard size must equal the model's image size. Audio features are not cached: the
    model's audio encoder computes them from the shard audio on the fly. Returns the written paths.
    """
    import torch
    from tqdm import tqdm

    from ..checkpoint import load_model
    from .data import write_safetensors_atomic

    shards_dir = Path(shards_dir)
    shards = sorted(shards_dir.glob("shard_*.safetensors"))
    if not shards:
        raise InputError(f"no shard_*.safetensors in '{shards_dir}'; run `letstalk data prepare` first")
    components = load_model(model_dir)
    ae = components.autoencoder.to(device).eval()
    image_size = components.config.image_size
    written = []
    for shard in tqdm(shards, desc="cache latents", unit="shard", disable=not progress):
        frames, _, _, _ = load_shard(shard)
        if frames.shape[1] != image_size:
            raise InputError(f"'{shard.name}' holds {frames.shape[1]} px frames but the model expects {image_size} px; "
                             f"run `letstalk data prepare --size {image_size}`")
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(frames), batch_size):
                x = torch.from_numpy(frames[i:i + batch_size]).to(device)  # (B, S, S, 3) uint8
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
                chunks.append(ae.encode(x).to(torch.float16).cpu().numpy())  # (B, C, h, w)
        path = shard.with_name(shard.name.replace("shard_", "latents_"))
        write_safetensors_atomic(path, {"latents": np.concatenate(chunks)},  # (N, C, h, w) float16
                                 {"model": str(model_dir or "default"), "shard": shard.name},
                                 "free disk space or make the shards' folder writable")
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# CLI: `letstalk data prepare`
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=Path, required=True, help="folder of talking-head videos (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shard_XXXX.safetensors + index.json")
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels, the model's resolution (default 128)")
    parser.add_argument("--margin", type=float, default=0.6,
                        help="crop side = face * (1 + 2 * margin), as the inference crop (default 0.6)")
    parser.add_argument("--detect-every", type=int, default=5, help="run face detection every N frames (default 5)")
    parser.add_argument("--smooth-seconds", type=float, default=0.5,
                        help="moving-average window of the crop box in seconds (default 0.5)")
    parser.add_argument("--shard-frames", type=int, default=2500, help="frames per shard (default 2500 = 100 s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    summary = prepare_videos(args.videos, args.out, args.size, args.margin, args.detect_every, args.smooth_seconds,
                             args.shard_frames, progress=not args.quiet)
    print(f"{summary.line()}; wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="letstalk data prepare", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        main(p.parse_args())
    except LetsTalkError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        sys.exit(2)
