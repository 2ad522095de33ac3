"""`letstalk eval`: lip sync, identity, temporal quality and long-run drift of models on a synth corpus.

    letstalk eval --data data/synth --model models/mine --clips 8 --out eval_report
    letstalk eval --data data/synth --model models/direct --model models/symbiotic --steps-list 1,2,4,8

Every figure compares generated video with the corpus's ground truth (`letstalk data synth`, docs/data.md),
at the model's own frame size (ground-truth frames and boxes are resized to it):

- lip sync: a mouth-state probe (ridge regression on mouth-crop pixels, `MouthProbe`) is fitted on
  ground-truth frames of the TRAIN split only, checked on ground-truth frames of the evaluated split,
  frozen, then run on generated frames. The metric is the correlation over time between its opening and
  the ground-truth opening, and the lag (-5..+5 frames) where that correlation peaks;
- identity: PSNR and SSIM outside the (padded) mouth box, against the ground truth and the portrait;
- temporal quality: mean absolute frame-to-frame change outside the mouth box (flicker);
- long duration: minutes of concatenated test speech on one portrait, PSNR against the portrait over the
  first and the last 10 s, with the memory bank on and off (`LetsTalkPipeline(use_memory=False)`).

Real talking-head videos are scored too (`--data` a folder `letstalk data prepare` wrote, or a folder of
videos, prepared first into REPORT_DIR/prepared): identity, flicker and drift as above; there are no mouth
labels, so no probe, and lip sync is replaced by the label-free mouth agreement (`MouthPath`), with the
lip-sync target left unjudged.

Generated clips animate the clip's first rest frame (mouth closed, eyes open) with the clip's audio; the
corpus frames already are the face crop, so the portrait is prepared with a centre crop (detect=False)
and the generated video is framed like the ground truth. Outputs: REPORT_DIR/report.md, report.json and
PNG plots (drawn with Pillow, no plotting library needed). See docs/eval.md.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import check_noise_draws
from .errors import InputError, LetsTalkError

# Targets printed beside the figures (DESIGN: lips in sync, identity kept, no drift over minutes).
SYNC_MIN = 0.8  # correlation of the probe's opening on generated frames with the ground truth, at offset 0
PROBE_MIN = 0.9  # the probe's own correlation on ground-truth test frames; below it lip sync is not measurable
PSNR_MIN = 28.0  # dB, generated vs ground truth outside the mouth box
DRIFT_MAX = 10.0  # %, PSNR vs portrait over the last 10 s below the first 10 s of the long run (memory on)
MAX_LAG = 5  # frames searched either way for the audio/video offset

MOUTH_PAD = 0.25  # the mouth box grows by this share of its size on each side (head motion, jaw drop)
PROBE_CROP = (24, 16)  # (width, height) the mouth crop is resized to for the probe
MIN_OVERLAP = 8  # frames a lag's correlation needs (fewer correlate at about +-1 by chance)
MIN_CLIP_FRAMES = 2 * MAX_LAG + MIN_OVERLAP  # a clip with MIN_OVERLAP frames at every lag up to MAX_LAG
INTERIOR_TOLERANCE = 6.0  # CIELAB units of colour change (compression, shading) the mouth interior reading ignores
PROBE_RIDGES = (1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried; the best on held-out train clips wins
EDGE_SECONDS = 10.0  # the long run's first and last windows
MAX_SEEDS = 16  # noise seeds per clip (--seeds): one seed moves the mean lip sync of 12 clips by ~0.03


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """One ground-truth clip at the evaluation size."""

    name: str
    frames: np.ndarray  # (N, S, S, 3) uint8, resized to the evaluation size
    audio: np.ndarray  # (n,) float32 mono at 16 kHz
    opening: np.ndarray  # (N,) ground-truth mouth opening in [0, 1]
    box: tuple[int, int, int, int]  # padded mouth box (x0, y0, x1, y1) at the evaluation size
    rest: int  # index of the frame used as portrait: mouth closed, eyes open
    identity: str = ""  # the corpus identity (a face appears in several clips); "" when the metadata has none
    skin_tone: float | None = None  # procedural faces: 0 (lightest) .. 1 (darkest); None for photographs
    # Real videos (no labels): the clip's own MouthPath. `opening` is then the real frames' path along it, and
    # generated frames are read along it too, in place of the probe's opening.
    path: "MouthPath | None" = None

    @property
    def portrait(self) -> np.ndarray:
        return self.frames[self.rest]

    @functools.cached_property
    def real_mouth(self) -> tuple[np.ndarray, np.ndarray]:
        """The real frames' `mouth_features` (N, F) and `mouth_interior` (N,), read once: every model, seed and
        autoencoder row of a clip is compared with them."""
        return mouth_features(self.frames, self.box), mouth_interior(self.frames, self.portrait, self.box)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3), with the resampling `prepare_portrait` uses (Lanczos)."""
    from PIL import Image

    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.LANCZOS)) for f in frames])


def mouth_region(box: list[float], frame_size: int, size: int, pad: float = MOUTH_PAD) -> tuple[int, int, int, int]:
    """A clip's `mouth_box` [x, y, w, h] at `frame_size` -> padded (x0, y0, x1, y1) at `size`, clipped."""
    x, y, w, h = (float(v) * size / frame_size for v in box)
    px, py = max(1.0, pad * w), max(1.0, pad * h)
    x0, y0 = max(0, math.floor(x - px)), max(0, math.floor(y - py))
    x1, y1 = min(size, math.ceil(x + w + px)), min(size, math.ceil(y + h + py))
    return x0, y0, x1, y1


def identity_of(meta: dict[str, Any]) -> dict[str, Any]:
    """A clip's `identity` id and its procedural `skin_tone` (None for photographs or older corpora)."""
    from .train.data import skin_tone_of

    ident = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    return {"identity": str(ident.get("id", "")), "skin_tone": skin_tone_of(meta)}


class Corpus:
    """A `letstalk data synth` folder: manifest.json plus clip_XXXXX.mp4 / .json per clip."""

    kind = "synth"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not self.root.is_dir():
            raise InputError(f"corpus folder '{self.root}' does not exist; make one with "
                             f"`letstalk data synth --out {self.root}`")
        if not path.is_file():
            raise InputError(f"'{self.root}' has no manifest.json; give a corpus written by `letstalk data synth` "
                             f"(an unfinished one gets its manifest only at the end)")
        try:
            self.manifest = json.loads(path.read_text())
            self.splits: dict[str, list[str]] = {k: list(v) for k, v in self.manifest["splits"].items()}
            self.frame_size = int(self.manifest["size"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"'{path}' is not a corpus manifest ({type(e).__name__}: {e}); "
                             f"remake it with `letstalk data synth`") from None

    def names(self, split: str) -> list[str]:
        """The clip names of a split; InputError naming the splits there are when it is missing or empty."""
        names = self.splits.get(split) or []
        if not names:
            have = ", ".join(f"{k} ({len(v)} clips)" for k, v in self.splits.items()) or "none"
            raise InputError(f"corpus '{self.root}' has no clips in split '{split}'; it has: {have}")
        return sorted(names)

    def meta(self, name: str) -> dict[str, Any]:
        path = self.root / f"{name}.json"
        try:
            meta = json.loads(path.read_text())
            missing = [k for k in ("mouth_box", "frames") if k not in meta]
            missing += [] if missing or "opening" in meta["frames"] else ["frames.opening"]
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"clip metadata '{path}' cannot be read ({type(e).__name__}: {e}); "
                             f"remake the corpus with `letstalk data synth`") from None
        if missing:
            raise InputError(f"clip metadata '{path}' lacks {', '.join(missing)}; remake the corpus with "
                             f"`letstalk data synth`")
        return meta

    def audio(self, name: str) -> np.ndarray:
        from .media import load_audio

        return load_audio(self.root / f"{name}.mp4")

    def clip(self, name: str, size: int) -> Clip:
        """Load a clip with its frames resized to `size` (the model's frame side)."""
        from .media import read_frames

        meta = self.meta(name)
        decoded = list(read_frames(self.root / f"{name}.mp4"))
        if not decoded:
            raise InputError(f"'{self.root / (name + '.mp4')}' has no video frames that can be decoded; re-run "
                             "`letstalk data synth`")
        frames = np.stack(decoded)  # (N', H, W, 3)
        opening = np.asarray(meta["frames"]["opening"], dtype=np.float32)
        n = min(len(frames), len(opening))
        blink = np.asarray(meta["frames"].get("blink", [0.0] * n), dtype=np.float32)[:n]
        rest = np.flatnonzero((opening[:n] == 0) & (blink == 0))
        return Clip(
            name=name,
            frames=_resize(frames[:n], size),
            audio=self.audio(name),
            opening=opening[:n],
            box=mouth_region(meta["mouth_box"], frames.shape[1], size),
            rest=int(rest[0]) if len(rest) else 0,
            **identity_of(meta),
        )


class PreparedVideos:
    """Real talking-head videos prepared by `letstalk data prepare` (index.json + shards): face crops and
    audio, but no splits and no mouth labels. Every piece of a video in a shard is a clip; the mouth box is
    the one the framing fixes (`train.data.prepared_mouth_box`); the portrait, which is also the closed-mouth
    reference of the mouth interior, is the frame at the quietest moment of the clip's speech (`quietest_frame`), and
    lip sync is read label-free along the real mouth's own path (`MouthPath`)."""

    kind = "prepared"

    def __init__(self, root: str | Path, progress: bool = False) -> None:
        from .train.data import _read_json

        self.root = Path(root)
        self.frame_size = int(_read_json(self.root / "index.json").get("size", 0))
        self.progress = progress
        self._warned = False
        self._clips: dict[int, dict[str, Any]] = {}  # frame size -> clip name -> train.data.Clip

    def _at(self, size: int) -> dict[str, Any]:
        from .train.data import open_dataset

        if size not in self._clips:  # resized once into the folder's frame cache, like training does
            self._clips[size] = {c.name: c for c in open_dataset(self.root, size, progress=self.progress).clips}
        return self._clips[size]

    def names(self, split: str) -> list[str]:
        """Every clip long enough to read a lip-sync lag from (prepared videos have no splits; `split` is ignored):
        `letstalk data prepare` cuts a video where a shard fills, so a piece can be a few frames long."""
        clips = self._at(self.frame_size)
        names = [n for n, c in clips.items() if c.num_frames >= MIN_CLIP_FRAMES]
        short = [n for n, c in clips.items() if c.num_frames < MIN_CLIP_FRAMES]
        if short and not self._warned:
            self._warned = True
            print(f"letstalk eval: skipping {len(short)} piece(s) under {MIN_CLIP_FRAMES} frames (too short to read a "
                  f"lip-sync lag): {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}", file=sys.stderr)
        if not names:
            raise InputError(f"'{self.root}' has no clip of {MIN_CLIP_FRAMES} frames or more to evaluate")
        return names

    def audio(self, name: str) -> np.ndarray:
        return np.asarray(self._at(self.frame_size)[name].audio, np.float32)

    def clip(self, name: str, size: int) -> Clip:
        c = self._at(size)[name]
        frames = np.array(c.frames)  # a writable copy of the memory-mapped shard (torch warns on read-only arrays)
        x, y, w, h = c.mouth_box
        box = (max(0, x), max(0, y), min(size, x + w), min(size, y + h))
        features = mouth_features(frames, box)
        path = MouthPath.fit(features)
        audio = np.asarray(c.audio, np.float32)
        return Clip(name=name, frames=frames, audio=audio, opening=path.read(features), box=box,
                    rest=quietest_frame(audio, len(frames)), identity=c.source, path=path)


def open_corpus(data: str | Path, out: Path, size: int, progress: bool) -> "Corpus | PreparedVideos":
    """--data as a synth corpus (manifest.json), prepared real videos (index.json), or a folder of videos,
    prepared here first into OUT/prepared at `size` (the largest evaluated model's frame side)."""
    from .train.prepare import find_videos, prepare_videos

    root = Path(data)
    if (root / "index.json").is_file():
        return PreparedVideos(root, progress)
    if root.is_dir() and not (root / "manifest.json").is_file() and find_videos(root):
        target = out / "prepared"
        summary = prepare_videos(root, target, size=size, progress=progress)
        print(f"letstalk eval: {summary.line()} (into {target})", file=sys.stderr)
        if not summary.prepared:
            raise InputError(f"none of the videos under '{root}' could be prepared (see the warnings above)")
        return PreparedVideos(target, progress)
    return Corpus(root)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def outside_mask(size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """(S, S) bool: True everywhere except the mouth region."""
    x0, y0, x1, y1 = box
    mask = np.ones((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = False
    return mask


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of two uint8 (S, S, 3) frames over the pixels where mask is True; inf when equal there."""
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(a[mask], b[mask], data_range=255))


def ssim_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM of two uint8 (S, S, 3) frames over the pixels where mask is True (7x7 windows)."""
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(a, b, data_range=255, channel_axis=2, full=True)  # full: (S, S, 3)
    return float(full[mask].mean())


def mse_outside(frames: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) frames against one (S, S, 3) or N frames -> (N,) mean squared error outside the mouth."""
    diff = frames[:, mask].astype(np.float32) - ref[..., mask, :].astype(np.float32)  # (N, P, 3)
    return (diff ** 2).mean(axis=(1, 2))


def psnr_of_mse(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def flicker(frames: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute frame-to-frame change (0..255) outside the mouth: (N, S, S, 3) -> float."""
    if len(frames) < 2:
        return 0.0
    x = frames[:, mask].astype(np.float32)  # (N, P, 3)
    return float(np.abs(np.diff(x, axis=0)).mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two series; 0 when either is (nearly) constant, where it is undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-9 * max(len(a), 1) else 0.0


def lag_correlations(pred: np.ndarray, truth: np.ndarray, max_lag: int = MAX_LAG) -> np.ndarray:
    """Correlation of pred[t + lag] with truth[t] for lag = -max_lag..max_lag -> (2 max_lag + 1,).

    A positive lag means the video is late: frame t + lag shows the mouth for the audio of frame t.
    A lag whose overlap is under MIN_OVERLAP frames is NaN: two or three samples correlate at about +-1 whatever
    they hold, and would win the peak.
    """
    n = min(len(pred), len(truth))
    out = np.zeros(2 * max_lag + 1)
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        if n - abs(lag) < MIN_OVERLAP:
            out[i] = np.nan
        elif lag >= 0:
            out[i] = pearson(pred[lag:n], truth[:n - lag])
        else:
            out[i] = pearson(pred[:n + lag], truth[-lag:n])
    return out


def best_offset(curve: np.ndarray) -> int:
    """The lag (frames) where a `lag_correlations` curve peaks; 0 for a curve without a peak (flat: a still
    mouth correlates with nothing at every lag; or no lag with enough overlap)."""
    c = np.asarray(curve, np.float64)
    if not np.isfinite(c).any() or np.nanmax(c) - np.nanmin(c) < 1e-9:
        return 0
    return int(np.nanargmax(c)) - (len(c) - 1) // 2


# --------------------------------------------------------------------------------------------------
# The mouth-state probe
# --------------------------------------------------------------------------------------------------


def mouth_features(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(N, S, S, 3) frames -> (N, F) probe features of the mouth crop.

    The crop is made grey and small, then described four ways: its pixels standardised per crop
    (shape, independent of skin tone and lighting); the sorted standardised and raw intensities (how
    much of the crop is dark mouth interior, wherever the head moved it); and the vertical edge
    strength per row (lip edges, which move apart as the mouth opens).
    """
    from PIL import Image

    x0, y0, x1, y1 = box
    crops = np.stack([
        np.asarray(Image.fromarray(f[y0:y1, x0:x1]).convert("L").resize(PROBE_CROP, Image.BILINEAR), np.float32)
        for f in frames
    ]) / 255.0  # (N, h, w)
    flat = crops.reshape(len(frames), -1)  # (N, P)
    std = flat.std(1, keepdims=True) + 1e-3  # (N, 1)
    z = (flat - flat.mean(1, keepdims=True)) / std  # (N, P)
    edges = np.abs(np.diff(crops, axis=1)).mean(2) / std  # (N, h - 1)
    return np.concatenate([z, np.sort(z, axis=1)[:, ::8], np.sort(flat, axis=1)[:, ::8], edges], axis=1)  # (N, F)


@dataclass
class MouthPath:
    """The main direction in which a real mouth changes: the first principal component of its
    `mouth_features`, standardised on them. Label-free: the path of real frames along it stands in for a
    ground-truth opening where there is none (real videos), and generated frames read along the same axis
    show whether their mouth changes the way and at the moments the real one does."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    axis: np.ndarray  # (F,) unit vector

    @classmethod
    def fit(cls, features: np.ndarray) -> "MouthPath":
        x = np.asarray(features, np.float64)  # float32 rounding would read a still mouth as a moving one
        mean, scale = x.mean(0), x.std(0) + 1e-6
        return cls(mean, scale, np.linalg.svd((x - mean) / scale, full_matrices=False)[2][0])

    def read(self, features: np.ndarray) -> np.ndarray:
        """`mouth_features` (N, F) -> (N,) position along the path."""
        return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.axis


def mouth_direction(fr: np.ndarray, fg: np.ndarray) -> float:
    """Does the generated mouth change the way the real one does? `mouth_features` (N, F) of the real and
    the generated frames -> the correlation over time of their paths along the real mouth's `MouthPath`.
    Near 1 when the generation brightens and darkens the mouth where the truth does, negative when it runs
    it backwards (a mouth drawn darker where the real one shows teeth), whatever a probe makes of either."""
    path = MouthPath.fit(fr)
    real_path, gen_path = path.read(fr), path.read(fg)  # (N,) each
    if np.ptp(gen_path) <= 1e-6 * np.ptp(real_path):  # a still mouth (up to float rounding) follows nothing
        return 0.0
    return pearson(gen_path, real_path)


def mouth_interior(frames: np.ndarray, closed: np.ndarray, box: tuple[int, int, int, int],
                   tolerance: float = INTERIOR_TOLERANCE) -> np.ndarray:
    """How much of its inside the mouth shows: (N, S, S, 3) frames and a real frame of the same face with the
    mouth closed -> (N,), the mean over the mouth box of how far (CIELAB units, less `tolerance`) each
    pixel's colour lies from the nearest colour in the closed mouth's box.

    The closed box holds the skin, the lips and their blended edges; teeth, the dark cavity and the tongue
    are colours it does not have, and count by how far they are from it. No probe and no labels: on the 42
    synthetic test clips the real frames' reading follows the true opening at r = 0.96, at least 0.90 on
    every clip, dark faces included (docs/eval.md). A smear of colours near the face's own (a blur where
    teeth and cavity average into about the skin's value; lips parting over nothing) counts little or
    nothing, though the probe may read either as an opening; where the head moved the mouth does not count."""
    from scipy.spatial import cKDTree
    from skimage.color import rgb2lab

    x0, y0, x1, y1 = box

    def lab(f: np.ndarray) -> np.ndarray:
        return rgb2lab(f[..., y0:y1, x0:x1, :].astype(np.float32) / 255.0).reshape(-1, 3)  # (n P, 3)

    dist, _ = cKDTree(np.unique(lab(closed), axis=0)).query(lab(frames))  # (N P,): to the nearest closed colour
    return np.clip(dist - tolerance, 0, None).reshape(len(frames), -1).mean(1)  # (N,)


def speech_energy(audio: np.ndarray, frames: int, fps: float = 25.0, sample_rate: int = 16000) -> np.ndarray:
    """Mono speech at `sample_rate` -> (frames,) its loudness per video frame at `fps` (frame i holds the samples
    from i / fps to (i + 1) / fps): log RMS in dB, floored at -60 (a pause)."""
    edges = np.round(np.arange(frames + 1) * sample_rate / fps).astype(int)  # (frames + 1,)
    pcm = np.zeros(edges[-1], np.float64)
    a = np.asarray(audio, np.float64)[:len(pcm)]
    pcm[:len(a)] = a
    rms = np.sqrt(np.add.reduceat(pcm ** 2, edges[:-1]) / np.diff(edges))  # (frames,)
    return 20 * np.log10(np.maximum(rms, 1e-3))


def video_speech(video: str | Path, frames: int, fps: float) -> np.ndarray:
    """A video's own audio track, 16 kHz mono, on the video's timeline for its `frames` at `fps`: sample 0 at the first
    frame, each packet where its timestamp puts it (a track that starts after the video, or packets a recording
    dropped, leave silence), as `letstalk data prepare` reads real videos. Decoded from its first sample, a track that
    starts 0.4 s late would put all the speech 10 frames early."""
    from .train.prepare import FPS, SkipVideo, load_track_audio

    try:  # load_track_audio counts in frames of 25 fps; cover the video's duration at its own rate
        return load_track_audio(Path(video), math.ceil(frames * FPS / fps - 1e-6))
    except SkipVideo as e:
        raise InputError(f"'{video}': {e}") from None


def _own_speech(video: str | Path, fallback: np.ndarray, frames: int, fps: float) -> np.ndarray:
    """A video's own speech (`video_speech`); `fallback` when it has none (a silent video scored against other
    speech)."""
    try:
        return video_speech(video, frames, fps)
    except InputError:
        return fallback


def quietest_frame(audio: np.ndarray, frames: int, fps: float = 25.0, skip_s: float = 0.2) -> int:
    """The frame (of `frames` at `fps`) at the quietest moment of the speech after its first `skip_s`: where a
    talking face's mouth is most likely closed, the closed-mouth reference of a video that has no labels."""
    skip = min(frames - 1, round(skip_s * fps))
    return skip + int(np.argmin(speech_energy(audio, frames, fps)[skip:]))


def speech_mouth_curve(interior: np.ndarray, audio: np.ndarray, fps: float = 25.0) -> np.ndarray:
    """Label-free lip sync: a video's `mouth_interior` (N,) against the loudness of its speech per frame, at
    lags -MAX_LAG..+MAX_LAG (`lag_correlations`; positive = video late). A mouth that shows its inside while
    the speech is loud and closes in the pauses correlates; a still mouth, or one moving out of step, does not.
    It needs no ground truth (any photograph, any speech, any language) but reads speech only through its
    loudness, so even a real speaker scores well below 1 (the report gives the real frames' figure beside it)."""
    return lag_correlations(np.asarray(interior, np.float64), speech_energy(audio, len(interior), fps))


def sync_check(video: str | Path, closed: str | Path | None = None, audio: str | Path | None = None,
               margin: float = 0.6) -> dict[str, Any]:
    """Label-free lip sync of any talking-face video with its own audio track (`letstalk sync-check`), e.g. what
    `letstalk generate` wrote for a photograph and speech of any language: `speech_mouth_curve` on the mouth box
    that a face crop of `margin` fixes (`train.data.prepared_mouth_box`, as real-video clips are read). `closed`: an
    image of the same face with its mouth closed (a photograph is face-cropped as `generate` does); without it, the frame
    at the quietest moment of the speech after the first 0.2 s stands in. `audio`: score against this speech
    instead of the video's own track (a control: a video scored against speech it was not made from reads ~0)."""
    from .face import crop_portrait
    from .media import load_audio, load_image, read_frames, video_fps

    fps = video_fps(video)  # lags are in its frames, loudness is read per frame at its rate
    frames = list(read_frames(video))
    if not frames:
        raise InputError(f"'{video}' has no video frames that can be decoded")
    frames = np.stack(frames)  # (N, H, W, 3)
    n, (h, w) = len(frames), frames.shape[1:3]
    speech = load_audio(audio) if audio is not None else video_speech(video, n, fps)
    if n < MIN_CLIP_FRAMES:
        raise InputError(f"'{video}' has {n} frames; lip sync needs at least {MIN_CLIP_FRAMES} (about 0.7 s)")
    if h != w:
        raise InputError(f"'{video}' is {w}x{h}; give a square face crop such as `letstalk generate` writes")
    if closed is not None:  # a photograph is face-cropped as `generate` crops it; a crop of the frames' size is used as is
        image = load_image(closed)
        ref = image if image.shape[:2] == (w, w) else crop_portrait(image, w, margin, name=str(closed))
        reference = f"'{closed}'"
    else:
        own = speech if audio is None else _own_speech(video, speech, n, fps)  # the closed frame: the video's own quiet
        quiet = quietest_frame(own, n, fps)
        ref, reference = frames[quiet], f"frame {quiet} (the quietest of its own speech)"
    return {"video": str(video), "audio": str(audio or video), "frames": n, "fps": round(fps, 3),
            "seconds": round(n / fps, 2), "closed_mouth": reference, **sync_of_frames(frames, speech, ref, fps, margin)}


def sync_of_frames(frames: np.ndarray, speech: np.ndarray, closed: np.ndarray, fps: float = 25.0,
                   margin: float = 0.6) -> dict[str, Any]:
    """`sync_check` on frames in memory: (N, S, S, 3) uint8 face crops of `margin`, their speech (16 kHz mono, sample 0
    at frame 0) and a frame of the same face with its mouth closed -> the lip sync at offset 0, the best offset
    (frames, positive = video late), the peak and the whole lag curve."""
    from .train.data import prepared_mouth_box

    x, y, bw, bh = prepared_mouth_box({"margin": margin}, frames.shape[2])  # the box real-video clips are read in
    curve = speech_mouth_curve(mouth_interior(frames, closed, (x, y, x + bw, y + bh)), speech, fps)
    return {"speech_sync": float(curve[MAX_LAG]), "speech_offset": best_offset(curve), "peak_sync": float(curve.max()),
            "lag_curve": [float(v) for v in curve]}


@dataclass
class MouthProbe:
    """Linear ridge regression from `mouth_features` to the mouth opening; fitted on ground truth only."""

    mean: np.ndarray  # (F,) feature means of the training frames
    scale: np.ndarray  # (F,) feature standard deviations
    weights: np.ndarray  # (F,)
    bias: float  # mean training opening
    ridge: float  # the ridge strength chosen on held-out training clips
    train_frames: int
    train_clips: int

    def predict(self, frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """(N, S, S, 3) uint8 frames -> (N,) predicted opening."""
        return self.read(mouth_features(frames, box))

    def read(self, features: np.ndarray) -> np.ndarray:
        """`mouth_features` (N, F) -> (N,) predicted opening."""
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    @classmethod
    def fit(cls, features: list[np.ndarray], openings: list[np.ndarray]) -> "MouthProbe":
        """Fit on per-clip features (N_i, F) and openings (N_i,). The ridge strength is the one whose
        fit on the first ~85 % of the clips best predicts the rest (mean per-clip correlation); the
        final probe is then refitted on every clip. Closed form, so deterministic."""
        if not features:
            raise InputError("no training clips to fit the mouth probe on; the corpus needs a train split")
        cut = max(1, len(features) - max(1, len(features) // 7)) if len(features) > 1 else 1
        held = list(zip(features[cut:], openings[cut:])) or list(zip(features, openings))

        def solve(xs: list[np.ndarray], ys: list[np.ndarray], ridge: float) -> "MouthProbe":
            x, y = np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)  # (N, F), (N,)
            mean, scale = x.mean(0), x.std(0) + 1e-6
            a = (x - mean) / scale  # (N, F)
            w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ (y - y.mean()))  # (F,)
            return cls(mean, scale, w, float(y.mean()), ridge, len(y), len(xs))

        def score(p: "MouthProbe") -> float:
            return float(np.mean([pearson(((x - p.mean) / p.scale) @ p.weights, y) for x, y in held]))

        best = max(PROBE_RIDGES, key=lambda r: score(solve(features[:cut], openings[:cut], r)))
        return solve(features, openings, best)


def train_probe(corpus: Corpus, size: int, max_clips: int, progress: bool = False,
                exclude: list[str] | tuple[str, ...] = ()) -> MouthProbe:
    """Fit the probe on ground-truth frames of up to `max_clips` train clips, resized to `size`; never on the
    clips in `exclude` (the scored ones, when --split train scores train clips)."""
    from tqdm import tqdm

    names = [n for n in corpus.names("train") if n not in set(exclude)][:max_clips]
    feats, opens = [], []
    for name in tqdm(names, desc=f"mouth probe ({size} px)", unit="clip", disable=not progress, dynamic_ncols=True):
        clip = corpus.clip(name, size)
        feats.append(mouth_features(clip.frames, clip.box))
        opens.append(clip.opening)
    return MouthProbe.fit(feats, opens)


# --------------------------------------------------------------------------------------------------
# Scoring generated clips
# --------------------------------------------------------------------------------------------------


def score_clip(clip: Clip, generated: np.ndarray, portrait: np.ndarray, probe: MouthProbe | None,
               full: bool = True) -> dict[str, Any]:
    """Every per-clip figure for generated frames (N, S, S, 3) of `clip` animated from `portrait`.

    full=False computes lip sync and PSNR vs ground truth only (the quality-vs-steps table).
    """
    n = min(len(generated), len(clip.frames))
    gen, gt = generated[:n], clip.frames[:n]
    mask = outside_mask(gt.shape[1], clip.box)
    feats = mouth_features(gen, clip.box)  # (n, F): read by the probe and by mouth_direction
    pred = (clip.path or probe).read(feats)  # (n,): the probe's opening, or (real videos) the real mouth's path
    curve = lag_correlations(pred, clip.opening[:n])
    out: dict[str, Any] = {
        "clip": clip.name,
        "identity": clip.identity,
        "skin_tone": clip.skin_tone,
        "frames": n,
        "sync_correlation": float(curve[MAX_LAG]),
        "sync_offset": best_offset(curve),
        "lag_curve": [float(v) for v in curve],
        "psnr_gt": psnr_of_mse(float(mse_outside(gen, gt, mask).mean())),
    }
    if full:
        step = max(1, n // 25)  # SSIM on ~25 frames per clip: it is the slow metric
        real_feats, real_interior = (a[:n] for a in clip.real_mouth)  # (n, F), (n,)
        real_pred = (clip.path or probe).read(real_feats)  # (n,): the same reading of the real frames
        gen_interior = mouth_interior(gen, clip.portrait, clip.box)  # (n,)
        out.update({
            "probe_opening": [float(v) for v in pred],
            # how far the mouth moves against the real one (1 = as far): lip sync's correlation is blind to scale
            "opening_spread": _ratio(float(np.std(pred)), float(np.std(real_pred))),
            "mouth_direction": mouth_direction(real_feats, feats),
            **interior_figures(real_interior, gen_interior),
            "ssim_gt": float(np.mean([ssim_outside(gen[i], gt[i], mask) for i in range(0, n, step)])),
            "psnr_portrait": psnr_of_mse(float(mse_outside(gen, portrait, mask).mean())),
            "ssim_portrait": float(np.mean([ssim_outside(gen[i], portrait, mask) for i in range(0, n, step)])),
            "flicker": flicker(gen, mask),
            "flicker_gt": flicker(gt, mask),
        })
        speech = speech_mouth_curve(gen_interior, clip.audio)
        out.update({"speech_sync": float(speech[MAX_LAG]), "speech_offset": best_offset(speech),
                    "speech_curve": [float(v) for v in speech]})
    return out


def interior_figures(real: np.ndarray, gen: np.ndarray) -> dict[str, float]:
    """`mouth_interior` of the real and the generated frames -> `interior_sync`, their correlation over time
    (does the inside of the mouth show when the real one's does), and `interior_spread`, the generated
    reading's standard deviation over the real one's (does as much of it show: 1 = as much)."""
    return {"interior_sync": pearson(gen, real),
            "interior_spread": _ratio(float(np.std(gen)), float(np.std(real)))}


# per-clip figures averaged over seeds and clips: always scored, then only by a full score_clip
MEANED = ("sync_correlation", "psnr_gt", "ssim_gt", "psnr_portrait", "ssim_portrait", "flicker", "flicker_gt",
          "mouth_direction", "opening_spread", "interior_sync", "interior_spread", "speech_sync")


def mean_over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One clip's figures from several noise seeds -> their mean (lag curve too; the offset is where the mean
    curve peaks), with each seed's lip sync kept in `sync_by_seed`. The probe curve shown is the first seed's."""
    out = dict(rows[0])
    if len(rows) == 1:
        return out
    for key in MEANED:
        if key in out:
            out[key] = float(np.mean([r[key] for r in rows]))
    curve = np.mean([r["lag_curve"] for r in rows], axis=0)
    out["lag_curve"], out["sync_offset"] = [float(v) for v in curve], best_offset(curve)
    if "speech_curve" in out:
        speech = np.mean([r["speech_curve"] for r in rows], axis=0)
        out["speech_curve"], out["speech_offset"] = [float(v) for v in speech], best_offset(speech)
    out["sync_by_seed"] = [r["sync_correlation"] for r in rows]
    return out


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where b is ~0: a spread against a reference that does not move has no meaning (1e-6 in its
    place made one still clip's ratio ~1e5, which swamped the mean over clips)."""
    return a / b if b > 1e-6 else math.nan


def _mean(values: list[float]) -> float:
    """Mean over the clips that have the figure (NaN ones left out); NaN when none has it."""
    v = np.asarray(values, np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else math.nan


def summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean figures over clips; the offset is where the mean lag curve peaks. With several seeds,
    `sync_by_seed` is the clip-mean lip sync each seed alone would have given and `sync_seed_std` its spread."""
    curve = np.mean([s["lag_curve"] for s in scores], axis=0)
    out: dict[str, Any] = {
        "sync_correlation": float(np.mean([s["sync_correlation"] for s in scores])),
        "sync_offset": best_offset(curve),
        "lag_curve": [float(v) for v in curve],
        "psnr_gt": float(np.mean([s["psnr_gt"] for s in scores])),
    }
    if "sync_by_seed" in scores[0]:
        by_seed = np.mean([s["sync_by_seed"] for s in scores], axis=0)  # (seeds,)
        out["sync_by_seed"], out["sync_seed_std"] = [float(v) for v in by_seed], float(by_seed.std())
    for key in MEANED[2:]:  # the full-score figures, when scored
        if key in scores[0]:
            out[key] = _mean([s[key] for s in scores]) if key.endswith("_spread") else \
                float(np.mean([s[key] for s in scores]))
    if "flicker" in out:
        out["flicker_ratio"] = _ratio(out["flicker"], out["flicker_gt"])
    if "speech_curve" in scores[0]:
        speech = np.mean([s["speech_curve"] for s in scores], axis=0)
        out["speech_curve"], out["speech_offset"] = [float(v) for v in speech], best_offset(speech)
    return out


# skin-tone groups of procedural faces (synth `skin_tone`: 0 lightest .. 1 darkest), by upper bound; faces
# without a tone (photographs) are "unrecorded"
SKIN_GROUPS = (("light", 1 / 3), ("medium", 2 / 3), ("dark", math.inf))


def by_skin_tone(scores: list[dict[str, Any]], probe_per_clip: dict[str, float]) -> list[dict[str, Any]]:
    """Per-clip scores -> one row per skin-tone group present: clips, identities, mean lip sync and PSNR, the
    group's worst identity (its clips' mean lip sync), and the probe's own r on the group's ground truth
    (`probe_per_clip`: clip -> r; a group whose real frames the probe misreads has no meaningful lip sync).
    A model that animates some faces far worse than others shows it here, not in the overall mean."""
    groups: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in SKIN_GROUPS}
    groups["unrecorded"] = []
    for s in scores:
        tone = s["skin_tone"]
        groups["unrecorded" if tone is None else next(n for n, top in SKIN_GROUPS if tone < top)].append(s)
    rows = []
    for name, members in groups.items():
        if not members:
            continue
        faces: dict[str, list[float]] = {}
        for s in members:
            faces.setdefault(s["identity"] or s["clip"], []).append(s["sync_correlation"])
        worst = min(faces, key=lambda k: float(np.mean(faces[k])))
        rows.append({"group": name, "clips": len(members), "identities": len(faces),
                     "sync_correlation": float(np.mean([s["sync_correlation"] for s in members])),
                     "probe_correlation": float(np.mean([probe_per_clip[s["clip"]] for s in members])),
                     "psnr_gt": float(np.mean([s["psnr_gt"] for s in members])),
                     **{k: float(np.mean([s.get(k, math.nan) for s in members]))
                        for k in ("mouth_direction", "interior_sync")},
                     "interior_spread": _mean([s.get("interior_spread", math.nan) for s in members]),
                     "worst_identity": worst, "worst_sync": float(np.mean(faces[worst]))})
    return rows


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, frames: np.ndarray, device: str, dtype: torch.dtype,
                batch: int = 64) -> np.ndarray:
    """Ground-truth frames (N, S, S, 3) uint8 through the model's autoencoder (encode, decode) -> uint8.

    Scored like a generation, they show what the latents keep of the mouth (lip sync: the most any
    transformer on this autoencoder can reach) and of the face (PSNR; detail transfer can beat it)."""
    from .models.autoencoder import decode_to_uint8, encode_frames

    ae = ae.to(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        return np.concatenate([decode_to_uint8(ae, encode_frames(ae, frames[i:i + batch]))
                               for i in range(0, len(frames), batch)])


def generate_frames(pipe: Any, portrait: np.ndarray, audio: np.ndarray, seed: int, bar: Any = None) -> np.ndarray:
    """Animate a corpus frame (already the face crop) with audio -> (N, S, S, 3) uint8 at the model's size."""
    prepared = pipe.prepare_portrait(portrait, detect=False)
    frames = []
    for frame in pipe.generate(prepared, audio, seed=seed):
        frames.append(frame)
        if bar is not None:
            bar.update(1)
    return np.stack(frames)


def long_run(pipe: Any, clip: Clip, audio: np.ndarray, seed: int, bar: Any = None) -> dict[str, Any]:
    """Animate `clip`'s portrait with long `audio`; PSNR vs the portrait outside the mouth, per second
    and over the first and last EDGE_SECONDS (shorter runs use halves). Frames are scored as they come."""
    prepared = pipe.prepare_portrait(clip.portrait, detect=False)
    mask = outside_mask(prepared.image.shape[0], clip.box)
    mse = []
    for frame in pipe.generate(prepared, audio, seed=seed):
        mse.append(float(mse_outside(frame[None], prepared.image, mask)[0]))
        if bar is not None:
            bar.update(1)
    mse_a = np.asarray(mse)
    fps = pipe.fps
    edge = max(1, min(int(EDGE_SECONDS * fps), len(mse_a) // 2))
    first, last = psnr_of_mse(float(mse_a[:edge].mean())), psnr_of_mse(float(mse_a[-edge:].mean()))
    per_second = [psnr_of_mse(float(mse_a[i:i + fps].mean())) for i in range(0, len(mse_a), fps)]
    if math.isfinite(first) and first > 0:
        drift = 100.0 * (first - last) / first
    else:  # the first window identical to the portrait (inf): no drift only if the last one is too
        drift = 0.0 if first == last else math.inf
    return {"seconds": len(mse_a) / fps, "edge_seconds": edge / fps, "psnr_first": first, "psnr_last": last,
            "drift_percent": drift, "psnr_per_second": per_second}


def long_audio(corpus: Corpus, names: list[str], seconds: float, rate: int = 16000) -> np.ndarray:
    """`seconds` of speech: the clips' audio concatenated in order, cycling if they are too short."""
    need = int(seconds * rate)
    parts, have = [], 0
    while have < need:
        for name in names:
            a = corpus.audio(name)
            parts.append(a)
            have += len(a)
            if have >= need:
                break
    return np.concatenate(parts)[:need]


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------


def judge(model: dict[str, Any], probe_valid: bool, real: bool = False) -> dict[str, dict[str, Any]]:
    """Pass/fail per target, each with the figure and a one-line reason. Real videos have no mouth labels,
    so their lip-sync target is not judged (pass None) and the label-free mouth agreement is given instead."""
    s = model["summary"]
    sync_ok: bool | None = probe_valid and s["sync_correlation"] >= SYNC_MIN and s["sync_offset"] == 0
    sync_note = (f"r = {s['sync_correlation']:.3f}, offset {s['sync_offset']:+d} frames"
                 + ("" if probe_valid else "; the probe is not accurate enough to measure lip sync"))
    if real:
        sync_ok = None
        sync_note = (f"not measured: real videos have no mouth labels; mouth agreement r = "
                     f"{s['sync_correlation']:.3f}, offset {s['sync_offset']:+d} frames")
    psnr_ok = s["psnr_gt"] >= PSNR_MIN
    out = {
        "lip_sync": {"pass": sync_ok, "target": f"r >= {SYNC_MIN} at offset 0", "value": sync_note},
        "identity": {"pass": psnr_ok, "target": f"PSNR outside mouth >= {PSNR_MIN:g} dB",
                     "value": f"{s['psnr_gt']:.2f} dB"},
    }
    long = model.get("long")
    if long is None:
        out["drift"] = {"pass": None, "target": f"drift <= {DRIFT_MAX:g} %", "value": "not run (--long-seconds 0)"}
    else:
        d = long["memory_on"]["drift_percent"]
        ok = d <= DRIFT_MAX and psnr_ok
        note = f"{d:+.1f} % over {long['memory_on']['seconds']:.0f} s (memory on)"
        if d <= DRIFT_MAX and not psnr_ok:
            note += "; not counted: the identity target fails, so there is no identity to keep"
        out["drift"] = {"pass": ok, "target": f"drift <= {DRIFT_MAX:g} %", "value": note}
    return out


# --------------------------------------------------------------------------------------------------
# Plots (Pillow only)
# --------------------------------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def line_plot(path: Path, panels: list[dict[str, Any]], xlabel: str, x_scale: float = 1.0) -> Path:
    """Stacked line-plot panels into a PNG: each panel {"title", "series": [(label, values), ...]}.

    x is the index times `x_scale`; non-finite values are left out. Deliberately plain: axes, min/max
    ticks, a legend. matplotlib is not needed.
    """
    from PIL import Image, ImageDraw

    w, ph, left, right, top, bottom = 720, 210, 56, 12, 24, 30
    img = Image.new("RGB", (w, ph * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for k, panel in enumerate(panels):
        oy = k * ph
        x0, x1, y0, y1 = left, w - right, oy + top, oy + ph - bottom
        values = [np.asarray(v, np.float64) for _, v in panel["series"]]
        finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(0)])
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(max((len(v) for v in values), default=1), 2)
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, oy + 6), panel["title"], fill=(0, 0, 0))
        d.text((4, y0), f"{hi:.3g}", fill=(0, 0, 0))
        d.text((4, y1 - 10), f"{lo:.3g}", fill=(0, 0, 0))
        d.text((x0, y1 + 4), "0", fill=(0, 0, 0))
        d.text((x1 - 40, y1 + 4), f"{(n - 1) * x_scale:.3g}", fill=(0, 0, 0))
        d.text(((x0 + x1) // 2 - 20, y1 + 4), xlabel, fill=(0, 0, 0))
        for j, v in enumerate(values):
            pts = [(x0 + (x1 - x0) * i / (n - 1), y1 - (y1 - y0) * (val - lo) / (hi - lo))
                   for i, val in enumerate(v) if math.isfinite(val)]
            if len(pts) > 1:
                d.line(pts, fill=COLOURS[j % len(COLOURS)], width=2)
        d.rectangle([x1 - 200, y0 + 2, x1 - 2, y0 + 6 + 12 * len(values)], fill="white", outline=(160, 160, 160))
        for j, (label, _) in enumerate(panel["series"]):
            d.text((x1 - 194, y0 + 4 + 12 * j), f"-- {label}", fill=COLOURS[j % len(COLOURS)])
    from .media import write_file_atomic

    write_file_atomic(path, lambda tmp: img.save(tmp, format="PNG"))  # whole, as the report files are
    return path


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _labels(paths: list[Path]) -> list[str]:
    """Short unique labels: the directory name, or the path when names repeat."""
    names = [p.name for p in paths]
    return [str(p) if names.count(n) > 1 else n for n, p in zip(names, paths)]


def _json_safe(x: Any) -> Any:
    """Numbers and containers for JSON: numpy scalars to Python, inf/nan to null (standard JSON has none)."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def check_probe(probe: MouthProbe | None, test: list[Clip]) -> dict[str, Any]:
    """The probe's accuracy on the evaluated clips' ground-truth frames, and the ground truth scored as if
    generated (the best any model can reach on these clips). No probe (real videos): not checked, not valid."""
    truth = summarise([score_clip(c, c.frames, c.portrait, probe) for c in test])
    if probe is None:
        return {"size": test[0].frames.shape[1], "per_clip": {c.name: math.nan for c in test}, "correlation": None,
                "valid": False, "ground_truth": truth}
    checks = [pearson(probe.read(c.real_mouth[0]), c.opening) for c in test]
    return {
        "size": test[0].frames.shape[1], "ridge": probe.ridge, "train_clips": probe.train_clips,
        "train_frames": probe.train_frames, "per_clip": {c.name: r for c, r in zip(test, checks)},
        "correlation": float(np.mean(checks)), "valid": float(np.mean(checks)) >= PROBE_MIN,
        "ground_truth": truth,
    }


def evaluate_model(components: Any, label: str, test: list[Clip], probe: MouthProbe | None, steps: int | None,
                   steps_list: list[int], speech: np.ndarray | None, settings: dict[str, Any]) -> dict[str, Any]:
    """Generate and score one model: the test clips, optionally at other step counts, and the long run
    on `speech` with the memory bank on and off. `settings`: device, dtype, seed, progress."""
    from tqdm import tqdm

    from .pipeline import LetsTalkPipeline

    config, seeds = components.config, settings["seeds"]

    def pipeline(num_steps: int | None, use_memory: bool = True) -> LetsTalkPipeline:
        return LetsTalkPipeline(components, device=settings["device"], dtype=settings["dtype"],
                                num_steps=num_steps, use_memory=use_memory, window=settings["window"],
                                detail_transfer=settings["detail_transfer"], start_time=settings["start_time"],
                                noise_hold=settings["noise_hold"], audio_guidance=settings["audio_guidance"],
                                noise_draws=settings["noise_draws"], audio_guidance_box=settings["audio_guidance_box"],
                                audio_lookahead=settings["audio_lookahead"])

    def bar(total: int, what: str) -> Any:
        return tqdm(total=total, desc=f"{label}: {what}", unit="frame", disable=not settings["progress"],
                    dynamic_ncols=True)

    pipe = pipeline(steps)
    model: dict[str, Any] = {
        "label": label, "description": config.description, "trained": config.trained, "size": config.image_size,
        "num_steps": pipe.num_steps, "window": pipe.window, "num_memory": config.transformer.num_memory,
        "detail_transfer": pipe.detail_transfer, "start_time": pipe.start_time, "noise_hold": pipe.noise_hold,
        "noise_draws": pipe.noise_draws, "audio_guidance": pipe.audio_guidance, "audio_lookahead": pipe.audio_lookahead,
        "audio_margin": config.audio.margin,
        "audio_guidance_box": pipe.audio_guidance_box,
        "fusion": f"portrait {config.transformer.portrait_fusion}, audio {config.transformer.audio_fusion}",
    }
    def score(p: LetsTalkPipeline, clip: Clip, b: Any, full: bool = True) -> dict[str, Any]:
        return mean_over_seeds([score_clip(clip, generate_frames(p, clip.portrait, clip.audio, seed, b),
                                           clip.portrait, probe, full=full) for seed in seeds])

    total = sum(math.ceil(len(c.audio) / pipe.samples_per_frame) for c in test) * len(seeds)
    with bar(total, f"{len(test)} clips x {len(seeds)} seed{'s' * (len(seeds) > 1)}") as b:
        scores = [score(pipe, c, b) for c in test]
    model["clips"], model["summary"] = scores, summarise(scores)
    recon = [score_clip(c, reconstruct(components.autoencoder, c.frames, settings["device"], settings["dtype"]),
                        c.portrait, probe) for c in test]
    model["autoencoder"] = {"clips": recon, "summary": summarise(recon)}

    model["steps"] = []
    for s in steps_list:
        if s == pipe.num_steps:  # already generated
            row = {k: v for k, v in model["summary"].items()
                   if k in ("sync_correlation", "sync_offset", "psnr_gt", "sync_by_seed", "sync_seed_std")}
        else:
            p2 = pipeline(s)
            with bar(total, f"{s} steps") as b:
                rows = [score(p2, c, b, full=False) for c in test]
            row = {k: v for k, v in summarise(rows).items() if k != "lag_curve"}
        model["steps"].append({"steps": s, **row})

    model["long"] = None
    if speech is not None:
        frames = math.ceil(len(speech) / pipe.samples_per_frame)
        model["long"] = {}
        for key, use_memory in (("memory_on", True), ("memory_off", False)):
            with bar(frames, f"{len(speech) / config.audio.sample_rate:g} s, {key.replace('_', ' ')}") as b:
                model["long"][key] = long_run(pipeline(steps, use_memory), test[0], speech, seeds[0], b)
    return model


def evaluate(
    data: str | Path,
    models: list[Path | None],
    out: str | Path,
    split: str = "test",
    clips: int = 8,
    steps: int | None = None,
    steps_list: list[int] | None = None,
    long_seconds: float = 180.0,
    probe_clips: int = 128,
    window: int | None = None,
    detail_transfer: float | None = None,
    start_time: float | None = None,
    noise_hold: float | None = None,
    audio_guidance: float | None = None,
    audio_guidance_box: tuple[float, float, float, float] | str | None = None,
    noise_draws: int | None = None,
    audio_lookahead: int | None = None,
    seed: int = 0,
    seeds: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every model directory (None = the bundled model) and write REPORT_DIR = `out`.

    Returns the report (what report.json holds). Cheap checks (corpus, split, model directories,
    step counts) come first, so a typo fails before any work.
    """
    from .checkpoint import DEFAULT_MODEL_DIR, load_model, read_config

    start = time.perf_counter()
    if clips < 1:
        raise InputError(f"--clips {clips}: evaluate at least 1 clip")
    if not (long_seconds == 0 or 2 <= long_seconds < math.inf):
        raise InputError(f"--long-seconds {long_seconds:g}: give 0 (skip) or 2 seconds or more (the drift compares "
                         "the run's first and last stretch)")
    if probe_clips < 1:
        raise InputError(f"--probe-clips {probe_clips}: fit the probe on at least 1 train clip")
    for s in [steps, *(steps_list or [])]:
        if s is not None and not 1 <= s <= 50:
            raise InputError(f"sampling steps {s}: choose 1..50")
    if start_time is not None and not 0 < start_time <= 1:
        raise InputError(f"--start-time {start_time:g}: choose a flow time in (0, 1] (1 = pure noise)")
    if noise_hold is not None and not 0 <= noise_hold <= 1:
        raise InputError(f"--noise-hold {noise_hold:g}: choose 0..1 (0 = fresh noise every frame)")
    if noise_draws is not None:
        check_noise_draws(noise_draws, "--noise-draws")
    if not 1 <= seeds <= MAX_SEEDS:
        raise InputError(f"--seeds {seeds}: choose 1..{MAX_SEEDS} noise seeds per clip")
    paths = [Path(p) if p is not None else DEFAULT_MODEL_DIR for p in models]
    configs = [read_config(p) for p in paths]  # ModelError, one line
    for p, c in zip(paths, configs):
        if window is not None and not 1 <= window <= c.transformer.num_frames:
            raise InputError(f"--window {window}: model '{p}' generates 1..{c.transformer.num_frames} frames per window")
    out = Path(out)
    corpus = open_corpus(data, out, max(c.image_size for c in configs), progress)
    real = isinstance(corpus, PreparedVideos)
    names = corpus.names(split)[:clips]
    if not real:
        corpus.names("train")  # the probe needs ground truth it is not scored on
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LetsTalkError(f"cannot create report folder '{out}': {e.strerror}; choose another --out") from None

    probes: dict[int, MouthProbe | None] = {}
    probe_checks: dict[int, dict[str, Any]] = {}
    clips_at: dict[int, list[Clip]] = {}
    speech = long_audio(corpus, corpus.names(split), long_seconds) if long_seconds > 0 else None
    results = []
    for path, label, config in zip(paths, _labels(paths), configs):
        size = config.image_size
        if size not in probes:  # one probe per frame size, fitted on ground truth only (none for real videos)
            probes[size] = None if real else train_probe(corpus, size, probe_clips, progress,  # type: ignore[arg-type]
                                                         exclude=names)
            clips_at[size] = [corpus.clip(n, size) for n in names]
            probe_checks[size] = check_probe(probes[size], clips_at[size])
        settings = dict(device=device, dtype=dtype, seeds=list(range(seed, seed + seeds)), progress=progress, window=window,
                        detail_transfer=detail_transfer, start_time=start_time, noise_hold=noise_hold,
                        audio_guidance=audio_guidance, audio_guidance_box=audio_guidance_box, noise_draws=noise_draws,
                        audio_lookahead=audio_lookahead)
        model = evaluate_model(load_model(path), label, clips_at[size], probes[size], steps, steps_list or [],
                               speech, settings)
        model["path"] = str(path)
        model["by_skin_tone"] = by_skin_tone(model["clips"], probe_checks[size]["per_clip"])
        model["autoencoder"]["by_skin_tone"] = by_skin_tone(model["autoencoder"]["clips"],
                                                            probe_checks[size]["per_clip"])
        model["targets"] = judge(model, probe_checks[size]["valid"], real)
        results.append(model)

    # the plots and the report are written together at the end: a run stopped part way (Ctrl-C, a `kill`) leaves
    # an earlier run's report in --out beside its own plots, not beside some of this run's
    for i, (model, config) in enumerate(zip(results, configs)):
        model["plots"] = _plots(out, f"{i + 1}_{_slug(model['label'])}", model, clips_at[config.image_size])

    report = {
        "corpus": str(corpus.root), "kind": corpus.kind, "split": "all" if real else split, "clips": names, "seed": seed, "seeds": seeds, "device": str(device),
        "long_seconds": long_seconds, "steps_list": list(steps_list or []),
        "probe": {str(k): v for k, v in probe_checks.items()},
        "probe_plots": [] if real else [_probe_plot(out, probes[k], clips_at[k]) for k in probes],
        "targets": {"sync_min": SYNC_MIN, "probe_min": PROBE_MIN, "psnr_min": PSNR_MIN, "drift_max_percent": DRIFT_MAX},
        "models": results,
        "runtime_s": time.perf_counter() - start,
    }
    from .media import write_text_atomic

    write_text_atomic(out / "report.json", json.dumps(_json_safe(report), indent=1) + "\n")  # each whole or the old
    write_text_atomic(out / "report.md", render_markdown(report))
    return report


def _plots(out: Path, slug: str, model: dict[str, Any], test: list[Clip]) -> list[str]:
    what, truth, gen = (("mouth path", "real", "generated") if test[0].path is not None else
                        ("mouth opening", "ground truth", "probe on generated"))
    panels = [{"title": f"{s['clip']}: {what} (r = {s['sync_correlation']:.2f})",
               "series": [(truth, c.opening[:s["frames"]]), (gen, s["probe_opening"])]}
              for s, c in list(zip(model["clips"], test))[:3]]
    files = [line_plot(out / f"sync_{slug}.png", panels, "frame").name]
    if model["long"]:
        series = [(k.replace("_", " "), v["psnr_per_second"]) for k, v in model["long"].items()]
        files.append(line_plot(out / f"long_{slug}.png",
                               [{"title": "PSNR vs portrait outside the mouth (dB), per second", "series": series}],
                               "seconds").name)
    return files


def _probe_plot(out: Path, probe: MouthProbe, test: list[Clip]) -> str:
    size = test[0].frames.shape[1]
    panels = [{"title": f"{c.name}: probe on ground-truth frames ({size} px)",
               "series": [("ground truth", c.opening), ("probe on ground truth", probe.predict(c.frames, c.box))]}
              for c in test[:3]]
    return line_plot(out / f"probe_{size}px.png", panels, "frame").name


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return "inf" if x == float("inf") else f"{x:.{digits}f}"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _seeds_text(report: dict[str, Any]) -> str:
    n, first = report.get("seeds", 1), report["seed"]
    if n == 1:
        return f"seed {first}"
    return f"seeds {first}-{first + n - 1} (every per-clip figure is their mean)"


def _sync_cell(s: dict[str, Any]) -> str:
    """Lip sync, with the spread of the per-seed means when several seeds were run."""
    if "sync_seed_std" not in s:
        return _f(s["sync_correlation"], 3)
    return f"{_f(s['sync_correlation'], 3)} +- {_f(s['sync_seed_std'], 3)}"


def render_markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    real = report.get("kind") == "prepared"
    if real:
        intro = [f"Real videos `{report['corpus']}` (face crops and audio made by `letstalk data prepare`), "
                 f"{len(report['clips'])} clips ({', '.join(report['clips'])}), {_seeds_text(report)}, device "
                 f"{report['device']}; took {report['runtime_s']:.0f} s.", "",
                 "Frames are compared at each model's own size; the mouth region is the box the crop's framing "
                 "fixes (`train.data.prepared_mouth_box`). Portrait = the clip's frame at the quietest moment of "
                 "its speech (already the face crop; the closed-mouth reference too), audio = the clip's audio. **Real videos carry no mouth labels**, so there is no probe and no "
                 "lip-sync figure in the synthetic corpus's sense: `sync r` below is the label-free *mouth "
                 "agreement* (see its section), and the lip-sync target is not judged.", ""]
    else:
        intro = [f"Corpus `{report['corpus']}`, split `{report['split']}`, {len(report['clips'])} clips "
                 f"({', '.join(report['clips'])}), {_seeds_text(report)}, device {report['device']}; "
                 f"took {report['runtime_s']:.0f} s.", "",
                 "Frames are compared at each model's own size; the mouth region is the clip's `mouth_box` grown by "
                 f"{MOUTH_PAD:.0%} on each side. Portrait = the clip's first rest frame (mouth closed, eyes open), "
                 "centre-cropped (the corpus frame already is the face crop), audio = the clip's audio.", ""]
    lines = ["# letstalk eval report", "", *intro]
    untrained = [m["label"] for m in models if not m["trained"]]
    if untrained:
        lines += [f"**Untrained models** (random weights; their figures are a floor, not a result): "
                  f"{', '.join(untrained)}.", ""]

    lines += ["## Targets", ""]
    rows = []
    for m in models:
        for key, t in m["targets"].items():
            rows.append([m["label"], key.replace("_", " "), t["target"], t["value"], _mark(t["pass"])])
    lines += _table(["model", "target", "goal", "measured", "result"], rows) + [""]

    lines += ["## Comparison", "",
              "One row per model; `ground truth` rows score the real frames as if generated (the ceiling: the "
              "probe's own accuracy, and how far the real head moves from the portrait); each model's `its "
              "autoencoder` row scores the ground truth encoded and decoded by that model's autoencoder: what the "
              "latents keep of the mouth (its lip sync is the most the transformer can reach) and of the face (detail "
              "transfer puts the portrait's fine detail back, so a generation can beat its PSNR where the head "
              "stays still).", ""]
    rows = []
    for size, p in report["probe"].items():
        s = p["ground_truth"]
        rows.append([f"ground truth ({size} px)", "reference", "-", "-", "-", _f(s["sync_correlation"], 3),
                     f"{s['sync_offset']:+d}", "inf", _f(s["ssim_gt"], 3), _f(s["psnr_portrait"]), "1.00",
                     "-", "-", "-"])
    for m in models:
        s, lg = m["summary"], m["long"] or {}
        on, off = lg.get("memory_on"), lg.get("memory_off")
        rows.append([m["label"], m["description"] or "-", m["fusion"], f"{m['num_steps']} / {m['window']} / {m['start_time']:g}"
                     + (f", noise hold {m['noise_hold']:g}" if m.get("noise_hold") else "")
                     + (f", mean of {m['noise_draws']} noise draws" if m.get("noise_draws", 1) > 1 else "")
                     + (f", audio lookahead {m['audio_lookahead']} frames" if m.get("audio_lookahead") is not None
                        and m["audio_lookahead"] != m.get("audio_margin", 2) else "")
                     + (f", audio guidance {m['audio_guidance']:g}" if m.get("audio_guidance", 1) != 1 else "")
                     + (" on " + ",".join(f"{v:g}" for v in m["audio_guidance_box"])
                        if m.get("audio_guidance", 1) != 1 and m.get("audio_guidance_box") else ""),
                     _f(m["detail_transfer"], 0) if m["detail_transfer"] else "off",
                     _sync_cell(s), f"{s['sync_offset']:+d}", _f(s["psnr_gt"]), _f(s["ssim_gt"], 3),
                     _f(s["psnr_portrait"]), _f(s["flicker_ratio"]),
                     _f(on["drift_percent"], 1) if on else "-", _f(off["drift_percent"], 1) if off else "-",
                     f"{sum(t['pass'] is True for t in m['targets'].values())}/"
                     f"{sum(t['pass'] is not None for t in m['targets'].values())}"])
        a = m["autoencoder"]["summary"]
        rows.append([f"{m['label']}: its autoencoder", "ground truth encoded and decoded", "-", "-", "-",
                     _f(a["sync_correlation"], 3), f"{a['sync_offset']:+d}", _f(a["psnr_gt"]), _f(a["ssim_gt"], 3),
                     _f(a["psnr_portrait"]), _f(a["flicker_ratio"]), "-", "-", "-"])
    lines += _table(["model", "description", "fusion", "steps / window / start", "detail transfer", "sync r", "offset", "PSNR gt (dB)", "SSIM gt",
                     "PSNR portrait (dB)", "flicker vs gt", "drift mem on (%)", "drift mem off (%)", "targets"],
                    rows) + [""]

    lines += ["## Mouth-state probe (is the lip-sync metric meaningful?)", ""]
    if real:
        lines += ["None: the probe is fitted on ground-truth mouth openings, which real videos do not have.", ""]
    for size, p in report["probe"].items():
        if real:
            continue
        lines += [
            f"Ridge regression (strength {p['ridge']:g}) on {PROBE_CROP[0]}x{PROBE_CROP[1]} grey mouth crops at "
            f"{size} px, fitted on {p['train_frames']} ground-truth frames of {p['train_clips']} train clips only. "
            f"On the ground-truth frames of the evaluated clips its opening correlates with the true opening at "
            f"**r = {p['correlation']:.3f}** (needs >= {PROBE_MIN}: "
            + ("met, so the lip-sync figures below measure the mouth)." if p["valid"] else
               "NOT met, so the lip-sync figures below are NOT meaningful; train the probe on more clips "
               "(--probe-clips) or check the corpus)."),
            "", "Per clip: " + ", ".join(f"{k} {v:.3f}" for k, v in p["per_clip"].items()), "",
        ]
    lines += [f"![probe]({name})" for name in report["probe_plots"]] + [""]

    if real:
        lines += ["## Lip sync (mouth agreement with the real video)", "",
                  "Label-free. Each clip's real mouth crops give its main direction of change (`MouthPath`: the "
                  "first principal component of their probe features); `r` is the correlation over time between "
                  "the real and the generated frames' paths along it, and the offset the lag in "
                  f"-{MAX_LAG}..+{MAX_LAG} frames where the clip-averaged cross-correlation peaks (positive = video "
                  "late). It rewards a mouth that changes when and the way the real one does, but it is not the "
                  "probe's lip sync: on the synthetic test clips it did not rank models the way the probe does "
                  "(docs/eval.md), so read it beside the videos, not as the target.", ""]
    else:
        lines += ["## Lip sync", "",
                  f"Correlation over time between the frozen probe's opening on generated frames and the ground-truth "
                  f"opening (target >= {SYNC_MIN}), and the offset: the lag in -{MAX_LAG}..+{MAX_LAG} frames where the "
                  "clip-averaged cross-correlation peaks (positive = video late; target 0).", ""]
    if report.get("seeds", 1) > 1:
        lines += ["With several seeds, `+-` is the standard deviation of the clip-mean lip sync between seeds (how "
                  "far one seed alone could have moved the headline), and each clip lists every seed's r.", ""]
    for m in models:
        many = "sync_by_seed" in m["summary"]
        rows = [[c["clip"], str(c["frames"]), _f(c["sync_correlation"], 3), f"{c['sync_offset']:+d}"]
                + ([" / ".join(_f(v) for v in c["sync_by_seed"])] if many else []) for c in m["clips"]]
        rows.append(["**mean**", "", _sync_cell(m["summary"]), f"{m['summary']['sync_offset']:+d}"]
                    + ([" / ".join(_f(v, 3) for v in m["summary"]["sync_by_seed"])] if many else []))
        lines += [f"### {m['label']}", ""] + _table(["clip", "frames", "r", "offset"] + (["r per seed"] if many else []),
                                                   rows) + [""]
        if "opening_spread" in m["summary"]:
            lines += [f"Mouth opening spread: {_f(m['summary']['opening_spread'], 2)} (per clip, the standard deviation over "
                      "time of the generated frames' opening as read above, over the same of the real frames; 1 = the "
                      "mouth moves as far as the real one. The correlation `r` does not see how far it moves).", ""]
        if "interior_sync" in m["summary"]:
            lines += [f"Mouth interior: sync {_f(m['summary']['interior_sync'], 3)}, spread "
                      f"{_f(m['summary']['interior_spread'], 2)} (the mean CIELAB distance, less "
                      f"{INTERIOR_TOLERANCE:g} units, of the mouth box's colours from the nearest colour of the real closed "
                      "mouth -- teeth, cavity, tongue show -- correlated over time with the real frames' reading, and its "
                      "standard deviation over theirs. A blur where the teeth should be, which the probe can read as "
                      "an opening, does not count here).", ""]
        if "speech_sync" in m["summary"]:
            truth = report["probe"].get(str(m["size"]), {}).get("ground_truth", {})
            real_text = (f"; the real frames: r = {_f(truth['speech_sync'], 3)}, peak at {truth['speech_offset']:+d}"
                         if "speech_sync" in truth else "")
            lines += [f"Speech to mouth, label-free: r = {_f(m['summary']['speech_sync'], 3)} at offset 0, peak at "
                      f"{m['summary']['speech_offset']:+d}{real_text} (the mouth interior reading above, correlated "
                      "over time with the speech's loudness per frame: it needs no labels, so it also scores a "
                      "photograph with speech of any language (`letstalk sync-check`); loudness is a rough stand-in "
                      "for the opening, so even real frames score well below 1).", ""]
        lines += [f"![sync {m['label']}]({m['plots'][0]})", ""]

    lines += ["## By skin tone", "",
              "The clips grouped by their face's skin tone (procedural faces: light < 1/3 <= medium < 2/3 <= dark; "
              "faces without a recorded tone, the photographs, as unrecorded), with each group's worst face (the "
              "mean over its clips). A face the model animates far worse than the rest hides in the overall "
              "mean and shows here. `probe on truth`: the probe's r on the group's real frames (the group's "
              "ceiling; a low one means its lip sync is not measured well); `probe through autoencoder` and "
              "`autoencoder PSNR gt`: the group's real frames encoded and decoded by the model's autoencoder (a "
              "low lip sync there is lost in the latents, before the transformer). `mouth direction`: the "
              "correlation over time between the generated and the real mouth along the real mouth's main change "
              "(first principal component of its probe features; no probe or labels involved): near 1 when the "
              "generated mouth brightens and darkens where the real one does, negative when it runs backwards. "
              "`interior sync` / `interior spread`: how much of the mouth box shows colours the real closed mouth "
              "does not have (teeth, cavity, tongue; no probe or labels), generated against real, as a "
              "correlation over time and as a ratio of standard deviations (1 = the inside shows as much).", ""]
    if real:
        lines += ["Real faces have no recorded tone: one `unrecorded` row, whose worst face is the worst video.", ""]
    rows = []
    for m in models:
        through = {g["group"]: g for g in m["autoencoder"]["by_skin_tone"]}
        rows += [[m["label"], g["group"], str(g["clips"]), str(g["identities"]), _f(g["sync_correlation"], 3),
                  _f(g["probe_correlation"], 3), _f(through[g["group"]]["sync_correlation"], 3),
                  _f(g["mouth_direction"]), _f(through[g["group"]]["mouth_direction"]), _f(g["interior_sync"]),
                  _f(through[g["group"]]["interior_sync"]), _f(g["interior_spread"]), _f(g["psnr_gt"]),
                  _f(through[g["group"]]["psnr_gt"]), f"{g['worst_identity']} ({_f(g['worst_sync'], 3)})"]
                 for g in m["by_skin_tone"]]
    lines += _table(["model", "skin tone", "clips", "faces", "sync r", "probe on truth", "probe through autoencoder",
                     "mouth direction", "through autoencoder", "interior sync", "through autoencoder",
                     "interior spread", "PSNR gt (dB)", "autoencoder PSNR gt (dB)",
                     "worst face (sync r)"], rows) + [""]

    lines += ["## Identity", "",
              f"PSNR and SSIM outside the mouth region, against the ground-truth frames (target PSNR >= "
              f"{PSNR_MIN:g} dB) and against the portrait (the ground truth moves its head and blinks, so even it "
              "is not identical to the portrait).", ""]
    rows = [[m["label"], c["clip"], _f(c["psnr_gt"]), _f(c["ssim_gt"], 3), _f(c["psnr_portrait"]),
             _f(c["ssim_portrait"], 3)] for m in models for c in m["clips"]]
    lines += _table(["model", "clip", "PSNR gt (dB)", "SSIM gt", "PSNR portrait (dB)", "SSIM portrait"], rows) + [""]

    lines += ["## Temporal quality", "",
              "Flicker: mean absolute frame-to-frame change (0..255) outside the mouth region, generated vs "
              "ground truth (a ratio near 1 moves as much as the real thing; far above 1 flickers).", ""]
    rows = [[m["label"], c["clip"], _f(c["flicker"]), _f(c["flicker_gt"]),
             _f(c["flicker"] / max(c["flicker_gt"], 1e-6))] for m in models for c in m["clips"]]
    lines += _table(["model", "clip", "flicker generated", "flicker gt", "ratio"], rows) + [""]

    lines += ["## Long duration", ""]
    if report["long_seconds"] <= 0:
        lines += ["Not run (--long-seconds 0).", ""]
    else:
        lines += [f"{report['long_seconds']:g} s of the split's speech concatenated, one portrait (the first "
                  f"evaluated clip's). PSNR against the portrait outside the mouth over the first and the last "
                  f"{EDGE_SECONDS:g} s (half the run when it is shorter); drift = relative drop (target <= "
                  f"{DRIFT_MAX:g} % with the memory bank on).", ""]
        rows = []
        for m in models:
            for key, r in (m["long"] or {}).items():
                rows.append([m["label"], key.replace("_", " "), _f(r["seconds"], 1), _f(r["edge_seconds"], 1),
                             _f(r["psnr_first"]), _f(r["psnr_last"]), _f(r["drift_percent"], 1)])
        lines += _table(["model", "memory bank", "seconds", "window (s)", "PSNR first (dB)", "PSNR last (dB)",
                         "drift (%)"], rows) + [""]
        lines += [f"![long {m['label']}]({m['plots'][1]})" for m in models if len(m["plots"]) > 1] + [""]

    lines += ["## Quality vs sampling steps", ""]
    if not report["steps_list"]:
        lines += ["Not run (give --steps-list 1,2,4,8).", ""]
    else:
        rows = [[m["label"], str(r["steps"]), _sync_cell(r), f"{r['sync_offset']:+d}",
                 _f(r["psnr_gt"])] for m in models for r in m["steps"]]
        lines += _table(["model", "steps", "sync r", "offset", "PSNR gt (dB)"], rows) + [""]
    return "\n".join(lines)
