"""Training data: clips of 25 fps frames + 16 kHz audio, sample plans, audio windows, latent caches.

    dataset = open_dataset("data/synth", image_size=128, split="train")   # or a prepared-shards dir
    clip = dataset.clips[0]          # Clip: frames (N, S, S, 3) uint8 and audio (N * 640,) float32, memory-mapped
    plan = plan_windows(dataset, seed=0, step=7, batch=8, num_frames=8, num_memory=2)   # 8 WindowPlans

Two on-disk formats are read (docs/data.md):

  * a synthetic corpus (`letstalk data synth`): manifest.json + clip_XXXXX.mp4 + clip_XXXXX.json. Decoding
    mp4 every step is far too slow, so each clip of the chosen split is decoded once into
    `DATA/.letstalk_cache/frames-S/clip_XXXXX.safetensors` (frames resized to the model's S if the corpus
    size differs, audio padded/trimmed to exactly 640 samples per frame) and memory-mapped from there;
  * prepared shards (`letstalk data prepare`): index.json + shard_XXXX.safetensors; each video segment of
    a shard is one clip. Shards at the model's size are memory-mapped in place, others are resized once
    into the cache folder.

Everything random about *which* samples a step sees is a pure function of (seed, step, sample index):
`plan_frames` / `plan_windows` draw from `numpy.random.default_rng([seed, step, index])`, and the torch
noise of a sample comes from `sample_generator(seed, step, index)`. So a resumed run sees exactly the
samples the uninterrupted run would have, and a step's global batch is the same set of samples whatever
the number of DDP ranks that split it.

`LatentCache` holds every frame's autoencoder latent (fp16, one safetensors per clip) for the
transformer stages, keyed by a fingerprint of the autoencoder weights so retraining the AE invalidates it.

Clip names outlive their content: `letstalk data prepare` re-run on other videos, or `letstalk data synth`
re-run with another seed into the same folder, writes new shard_0000_000000 / clip_00000 clips. So every
cache entry (frames, latents, audio features) stores its clip's content key (`Clip.key`: a synth clip's
spec digest, a prepared clip's shard digest and segment; else the files' size and modification time) and
is rebuilt when the clip's key differs; a cache folder's name only says which model computed it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, OutputError

CACHE_DIR = ".letstalk_cache"  # created inside the data directory
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
SKIN_TONE_BINS = 5  # bands of the synth skin tone that --balance-skin-tone gives equal shares
STREAM_START_PROB = 0.1  # share of windows forced to start at frame 0 (the empty-memory stream start)


# --------------------------------------------------------------------------------------------------
# Memory-mapped safetensors
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {"U8": np.uint8, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64}


def read_safetensors_mmap(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as a read-only np.memmap (nothing is read until indexed),
    plus the file's string metadata."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    return out, meta


def write_safetensors_atomic(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                             fix: str = "free disk space or make the data directory writable") -> None:
    """safetensors.numpy.save_file under a temporary name, renamed when complete (its folder made first)."""
    from safetensors.numpy import save_file

    from ..media import write_file_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder '{path.parent}': {e.strerror or e}; {fix}") from e
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    write_file_atomic(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata), fix)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (Lanczos, as the pipeline's portrait crop)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return np.ascontiguousarray(frames)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.asarray(f)).resize((size, size), Image.LANCZOS))
                     for f in frames])


# --------------------------------------------------------------------------------------------------
# Clips and datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """One continuous take: frame i owns audio samples [640 i, 640 (i + 1))."""

    name: str  # unique within the dataset, safe as a file name
    frames: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    audio: np.ndarray  # (N * 640,) float32, memory-mapped
    mouth_box: tuple[int, int, int, int] | None = None  # (x, y, w, h) at size S: synth clips' own, shards' fixed
    mouth: np.ndarray | None = None  # (N, 3) ground-truth opening, width, rounding per frame, synth clips only
    skin_tone: float | None = None  # procedural synth faces: 0 lightest .. 1 darkest; None: photos, real video
    weight: float = 1.0  # sampling weight per frame relative to other clips (`balance_skin_tone`)
    source: str = ""  # prepared shards: the video the clip was cut from (its path under --videos)
    key: str = ""  # the content's key (`_content_key`): every cache entry of the clip stores it, rebuilt on a change
    recoloured_from: "Clip | None" = None  # `with_recoloured_copies`: the clip this one recolours (same audio)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class ClipDataset:
    root: Path
    kind: str  # "synth" or "prepared"
    split: str | None  # the synth split used; None for prepared shards (they have no splits)
    image_size: int
    clips: list[Clip]

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def num_frames(self) -> int:
        return sum(c.num_frames for c in self.clips)

    def describe(self) -> str:
        what = f"synthetic corpus, {self.split} split" if self.kind == "synth" else "prepared shards"
        balanced = ", balanced by skin tone" if any(c.weight != 1.0 for c in self.clips) else ""
        recoloured = sum(c.recoloured_from is not None for c in self.clips)
        recoloured_text = f", {recoloured} of them recoloured copies" if recoloured else ""
        return (f"{self.root.name} ({what}: {len(self.clips)} clips{recoloured_text}, "
                f"{self.num_frames / 25 / 60:.1f} min{balanced})")

    def balance_skin_tone(self, bins: int = SKIN_TONE_BINS) -> "ClipDataset":
        """The same clips weighted so that every skin-tone band (`bins` equal bands of 0..1, plus the faces
        without a recorded tone, the photographs) gets the same share of the training samples.

        The synth corpus draws tones from Beta(1.3, 1.3), so the ends are thin: in the default corpus's
        train split 36 of 534 clips have a tone >= 0.83, and those are the faces the default animates worst
        (docs/eval.md). InputError when no clip has a recorded tone (prepared real-video shards)."""
        groups = [-1 if c.skin_tone is None else min(int(c.skin_tone * bins), bins - 1) for c in self.clips]
        if all(g == -1 for g in groups):
            raise InputError(f"--balance-skin-tone needs clips with a recorded skin tone (a synthetic corpus's "
                             f"procedural faces); '{self.root}' has none")
        frames: dict[int, int] = {}
        for g, c in zip(groups, self.clips):
            frames[g] = frames.get(g, 0) + c.num_frames
        mean = self.num_frames / len(frames)  # every band gets the frames an average band has
        clips = [replace(c, weight=mean / frames[g]) for g, c in zip(groups, self.clips)]
        return ClipDataset(self.root, self.kind, self.split, self.image_size, clips)

    def with_recoloured_copies(self, copies: int) -> "ClipDataset":
        """The clips, each followed by `copies` recoloured copies of itself (`Recolour.draw`: brightness, white
        balance and saturation, one draw per copy for the whole clip, its portrait frames included).

        A synthetic corpus's faces cover only the skin and lip colours its generator drew, and a real-video
        corpus only its people and cameras: a test face outside them is a face the model never saw (the
        shipped default's one failing face, docs/eval.md). The copies share their source's memory-mapped
        frames and audio (`RecolouredFrames` recolours what is read), its sampling weight and skin-tone band,
        and get their own name and content key, so the latent cache keeps them apart; the audio feature
        cache reads their source's rows."""
        clips = []
        for c in self.clips:
            clips.append(c)
            for k in range(1, copies + 1):
                recolour = Recolour.draw(np.random.default_rng([k, int(_content_key(c.name)[:12], 16)]))
                clips.append(replace(c, name=f"{c.name}.rc{k}", frames=RecolouredFrames(c.frames, recolour),
                                     key=_content_key(c.key, "recolour-v1", recolour), recoloured_from=c))
        return ClipDataset(self.root, self.kind, self.split, self.image_size, clips)

    def with_min_frames(self, n: int) -> "ClipDataset":
        """The clips with at least n frames; InputError when none is that long."""
        keep = [c for c in self.clips if c.num_frames >= n]
        if not keep:
            longest = max(c.num_frames for c in self.clips)
            raise InputError(f"no clip in '{self.root}' has the {n} frames a training window needs "
                             f"(longest: {longest}); use longer clips")
        return ClipDataset(self.root, self.kind, self.split, self.image_size, keep)


@dataclass(frozen=True)
class Recolour:
    """A colour transform of RGB frames: saturation about each pixel's grey, then per-channel gains (white
    balance times brightness). Drawn log-normally around the identity, wide enough to carry a corpus's
    dark faces past its darkest, most saturated one (a red-brown skin with little green)."""

    gains: tuple[float, float, float]
    saturation: float

    BRIGHTNESS_STD = 0.2  # log-normal stds of the draw
    WHITE_BALANCE_STD = 0.1
    SATURATION_STD = 0.3

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Recolour":
        brightness = float(np.exp(np.clip(rng.normal(0, cls.BRIGHTNESS_STD), -0.5, 0.4)))
        balance = np.exp(np.clip(rng.normal(0, cls.WHITE_BALANCE_STD, 3), -0.25, 0.25))
        saturation = float(np.exp(np.clip(rng.normal(0, cls.SATURATION_STD), -0.6, 0.6)))
        gains = tuple(round(float(g) * brightness, 4) for g in balance)
        return cls(gains, round(saturation, 4))  # type: ignore[arg-type]

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 -> (..., 3) uint8."""
        x = frames.astype(np.float32)
        grey = x.mean(-1, keepdims=True)
        x = (grey + self.saturation * (x - grey)) * np.asarray(self.gains, np.float32)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class RecolouredFrames:
    """A clip's (N, S, S, 3) uint8 frames seen through a `Recolour`: indexing reads the frames it selects
    from the (memory-mapped) source and recolours only those."""

    def __init__(self, frames: np.ndarray, recolour: Recolour) -> None:
        self.source = frames
        self.recolour = recolour
        self.shape = frames.shape

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.recolour(np.asarray(self.source[index]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.recolour(np.asarray(self.source))
        return out if dtype is None else out.astype(dtype)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _file_stamp(path: Path) -> str:
    """Byte size and modification time (ns) of a file: both change when it is written again."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _content_key(*parts: Any) -> str:
    """16 hex digits over what a clip's frames and audio are made from (the `Clip.key` of cache entries)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _entry_key(path: Path) -> str | None:
    """The content key a cache file was made from (its safetensors metadata), None for no file or none."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return (json.loads(f.read(n)).get("__metadata__") or {}).get("key")
    except (OSError, ValueError, struct.error):
        return None  # a damaged entry is rebuilt like a stale one


def open_dataset(root: str | Path, image_size: int, split: str = "train", build_cache: bool = True,
                 progress: bool = True) -> ClipDataset:
    """Open a synth corpus or a prepared-shards dir; decode/resize into the frame cache on first use.

    build_cache=False (the non-zero DDP ranks, after rank 0 built it) only opens what is there.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--data '{root}' does not exist or is not a directory; make a corpus with "
                         "`letstalk data synth --out DIR` or shards with `letstalk data prepare`")
    if (root / "manifest.json").is_file():
        return _open_synth(root, image_size, split, build_cache, progress)
    if (root / "index.json").is_file():
        return _open_prepared(root, image_size, build_cache, progress)
    raise InputError(f"--data '{root}' is neither a synthetic corpus (manifest.json) nor prepared shards "
                     "(index.json + shard_XXXX.safetensors); make one with `letstalk data synth` or "
                     "`letstalk data prepare`")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"'{path}' is not readable JSON ({e.__class__.__name__}); re-create the data directory") from None
    if not isinstance(data, dict):
        raise InputError(f"'{path}' must hold a JSON object")
    return data


def _open_synth(root: Path, size: int, split: str, build: bool, progress: bool) -> ClipDataset:
    from tqdm import tqdm

    manifest = _read_json(root / "manifest.json")
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise InputError(f"--split {split!r} is not in '{root / 'manifest.json'}'; choose one of {sorted(splits)}")
    names = list(splits[split])
    if not names:
        raise InputError(f"the {split!r} split of '{root}' has no clips")
    rows = {c.get("name"): c for c in manifest.get("clips") or [] if isinstance(c, dict)}
    cache = root / CACHE_DIR / f"frames-{size}"
    clips = []
    for name in tqdm(names, desc=f"frame cache ({split})", unit="clip", disable=not progress, leave=False):
        video, meta_file = root / f"{name}.mp4", root / f"{name}.json"
        meta = _read_json(meta_file) if meta_file.is_file() else {}
        _check_synth_clip(root, manifest, rows.get(name) or {}, meta, meta_file, split)
        # The spec digest names what was rendered (it survives copying the corpus; the mp4's size catches an
        # mp4 replaced without its json); corpora without one fall back on the files' size and mtime.
        if isinstance(meta.get("spec_digest"), str):
            key = _content_key("synth", meta["spec_digest"], video.stat().st_size if video.is_file() else "missing")
        else:
            key = _content_key("synth", _file_stamp(video), _file_stamp(meta_file))
        file = cache / f"{_safe_name(name)}.safetensors"
        tensors, tmeta = read_safetensors_mmap(file) if file.is_file() else ({}, {})
        if tmeta.get("key") != key:
            if not build:
                raise InputError(f"frame cache '{file}' is missing or stale; rank 0 should have built it")
            frames, audio = _decode_clip(video, size)
            write_safetensors_atomic(file, {"frames": frames, "audio": audio}, {"source": video.name, "key": key})
            tensors, _ = read_safetensors_mmap(file)
        box = None
        if "mouth_box" in meta and meta.get("size"):
            s = size / float(meta["size"])
            x, y, w, h = meta["mouth_box"]
            box = (int(round(x * s)), int(round(y * s)), max(1, int(round(w * s))), max(1, int(round(h * s))))
        clips.append(Clip(name, tensors["frames"], tensors["audio"], box, _mouth_states(meta, len(tensors["frames"])),
                          skin_tone_of(meta), key=key))
    return ClipDataset(root, "synth", split, size, clips)


def _check_synth_clip(root: Path, manifest: dict[str, Any], row: dict[str, Any], meta: dict[str, Any],
                      meta_file: Path, split: str) -> None:
    """InputError when a clip's json was not made for the corpus manifest.json describes.

    `letstalk data synth` writes manifest.json last, so a run with another seed (or generator) stopped part-way
    leaves the old manifest beside re-rendered clips: its split lists would then put clips whose identity and
    voice belong to another split into this one. Only what both sides record is compared (older corpora and
    hand-made ones have fewer fields)."""
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    why = None
    if meta.get("split") not in (None, split):
        why = f"its split is {meta['split']!r}, the manifest lists it in {split!r}"
    elif "seed" in spec and "seed" in manifest and spec["seed"] != manifest["seed"]:
        why = f"it was made with seed {spec['seed']}, the manifest's corpus with seed {manifest['seed']}"
    elif row.get("spec_digest") and meta.get("spec_digest") and row["spec_digest"] != meta["spec_digest"]:
        why = "its spec digest is not the one the manifest lists"
    if why:
        raise InputError(f"'{meta_file}' does not belong to the corpus '{root / 'manifest.json'}' describes ({why}): "
                         "a `letstalk data synth` run with other settings into this folder stopped part-way; "
                         "re-run `letstalk data synth` into an empty folder")


def skin_tone_of(meta: dict[str, Any]) -> float | None:
    """A synth clip's procedural `skin_tone` (0 lightest .. 1 darkest); None for photographs or older corpora."""
    ident = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
    tone = (ident.get("params") or {}).get("skin_tone")
    return float(tone) if isinstance(tone, (int, float)) else None


MOUTH_STATES = ("opening", "width", "rounding")  # the synth corpus's per-frame mouth ground truth


def _mouth_states(meta: dict[str, Any], n: int) -> np.ndarray | None:
    """(n, 3) float32 per-frame MOUTH_STATES from a synth clip's json, or None where it has none."""
    per_frame = meta.get("frames") or {}
    if not all(isinstance(per_frame.get(k), list) and len(per_frame[k]) >= n for k in MOUTH_STATES):
        return None
    return np.stack([np.asarray(per_frame[k][:n], dtype=np.float32) for k in MOUTH_STATES], axis=1)


def _decode_clip(video: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """mp4 -> frames (N, size, size, 3) uint8 and audio (N * 640,) float32 (padded or trimmed)."""
    from ..media import load_audio, read_frames

    frames = _resize(np.stack(list(read_frames(video))), size)  # (N, S, S, 3)
    audio = load_audio(video)  # (n,) 16 kHz
    n = frames.shape[0] * SAMPLES_PER_FRAME
    audio = np.pad(audio[:n], (0, max(0, n - len(audio)))).astype(np.float32)  # (N * 640,)
    return frames, audio


def prepared_mouth_box(index: dict[str, Any], size: int) -> tuple[int, int, int, int]:
    """The mouth's (x, y, w, h) at `size` in every crop of a prepared-shards dir: fixed by the framing, so
    derived from the index's `margin` (`prepare.crop_mouth_box`)."""
    from .prepare import crop_mouth_box

    fx, fy, fw, fh = crop_mouth_box(float(index.get("margin", 0.6)))
    x, y = int(round(fx * size)), int(round(fy * size))
    return x, y, max(1, min(size - x, int(round(fw * size)))), max(1, min(size - y, int(round(fh * size))))


def _open_prepared(root: Path, size: int, build: bool, progress: bool) -> ClipDataset:
    index = _read_json(root / "index.json")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise InputError(f"'{root / 'index.json'}' lists no shards; re-run `letstalk data prepare`")
    box = prepared_mouth_box(index, size)
    clips = []
    for shard in shards:
        file = root / shard["file"]
        if not file.is_file():
            raise InputError(f"'{file}' listed in index.json is missing; re-run `letstalk data prepare`")
        tensors, smeta = read_safetensors_mmap(file)
        # The digest `prepare` stores of the shard's content (it survives copying); older shards: size and mtime.
        shard_key = _content_key("shard", smeta.get("digest") or _file_stamp(file))
        frames, audio = tensors["frames"], tensors["audio"]
        if frames.shape[1] != size:
            cached = root / CACHE_DIR / f"frames-{size}" / file.name
            ctensors, cmeta = read_safetensors_mmap(cached) if cached.is_file() else ({}, {})
            if cmeta.get("key") != shard_key:
                if not build:
                    raise InputError(f"frame cache '{cached}' is missing or stale; rank 0 should have built it")
                resized = np.concatenate([_resize(frames[i:i + 256], size) for i in range(0, len(frames), 256)])
                write_safetensors_atomic(cached, {"frames": resized}, {"key": shard_key})
                ctensors, _ = read_safetensors_mmap(cached)
            frames = ctensors["frames"]
        stem = Path(shard["file"]).stem
        for seg in shard.get("segments") or [{"offset": 0, "num_frames": len(frames)}]:
            o, n = int(seg["offset"]), int(seg["num_frames"])
            clips.append(Clip(f"{stem}_{o:06d}", frames[o:o + n],
                              audio[o * SAMPLES_PER_FRAME:(o + n) * SAMPLES_PER_FRAME], box,
                              source=str(seg.get("video", "")), key=_content_key(shard_key, seg)))
    if not clips:
        raise InputError(f"'{root}' holds no frames; re-run `letstalk data prepare` on a folder with videos")
    return ClipDataset(root, "prepared", None, size, clips)


# --------------------------------------------------------------------------------------------------
# Sample plans: pure functions of (seed, step, index)
# --------------------------------------------------------------------------------------------------


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The numpy generator that picks sample `index` of step `step`."""
    return np.random.default_rng([seed, step, index])


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The torch CPU generator for sample `index` of step `step`'s noise (independent of sample_rng)."""
    state = np.random.SeedSequence([seed, step, index, 1]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class FramePlan:
    clip: int
    frame: int


@dataclass(frozen=True)
class WindowPlan:
    clip: int
    start: int  # window = frames [start, start + T); memory = frames [start - K, start) (those >= 0)
    ref: int  # the reference (portrait) frame, outside the window when the clip allows


def plan_frames(dataset: ClipDataset, seed: int, step: int, indices: range) -> list[FramePlan]:
    """Random frames (clips weighted by length times their `weight`: by default every frame is equally likely)."""
    lengths = np.array([c.num_frames * c.weight for c in dataset.clips], dtype=np.float64)
    p = lengths / lengths.sum()
    out = []
    for i in indices:
        rng = sample_rng(seed, step, i)
        c = int(rng.choice(len(p), p=p))
        out.append(FramePlan(c, int(rng.integers(dataset.clips[c].num_frames))))
    return out


def plan_windows(dataset: ClipDataset, seed: int, step: int, indices: range, num_frames: int) -> list[WindowPlan]:
    """Random windows of `num_frames` frames (clips weighted by their number of windows times their `weight`).

    STREAM_START_PROB of the windows start at frame 0, so the stream start (empty memory) is trained
    as often as it matters at inference, not 1 / (N - T + 1) of the time.
    """
    counts = np.array([max(0, c.num_frames - num_frames + 1) * c.weight for c in dataset.clips], dtype=np.float64)
    p = counts / counts.sum()
    out = []
    for i in indices:
        rng = sample_rng(seed, step, i)
        c = int(rng.choice(len(p), p=p))
        n = dataset.clips[c].num_frames
        start = 0 if rng.random() < STREAM_START_PROB else int(rng.integers(n - num_frames + 1))
        outside = n - num_frames
        if outside > 0:
            r = int(rng.integers(outside))
            ref = r if r < start else r + num_frames  # skip the window's frames
        else:
            ref = int(rng.integers(n))
        out.append(WindowPlan(c, start, ref))
    return out


def window_frame_indices(plan: WindowPlan, num_frames: int, num_memory: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of memory + window (K + T,), memory ones clamped to 0, and the memory's
    availability (K,) float: 0 for slots before the clip's start (masked, as MemoryBank.condition does)."""
    idx = np.arange(plan.start - num_memory, plan.start + num_frames)  # (K + T,)
    avail = (idx[:num_memory] >= 0).astype(np.float32)  # (K,)
    return np.maximum(idx, 0), avail


# --------------------------------------------------------------------------------------------------
# Audio windows: exactly what inference feeds the encoder and projector for these frames
# --------------------------------------------------------------------------------------------------


def audio_window(audio: np.ndarray, start: int, num_frames: int, margin: int, left_samples: int,
                 right_samples: int, samples_per_frame: int = SAMPLES_PER_FRAME) -> tuple[np.ndarray, np.ndarray]:
    """The samples a block-size-1 encoder needs for frames [start - margin, start + T + margin), and the
    per-token feature index that reproduces the projector's edge padding.

    Inference (`LetsTalkPipeline.audio_tokens`) encodes the whole signal zero-padded on both sides
    (frame f's features come from samples [640 f - left, 640 (f + 1) + right)), then the projector gives
    frame i the features of frames i - m .. i + m, edge-replicating frames 0 and F - 1. Here:
    samples (left + (T + 2m) * 640 + right,) cut from the zero-padded signal, and feat_index (T + 2m,)
    into the T + 2m encoded frames, with out-of-clip frames pointing at frame 0 / frame F - 1.
    """
    total = len(audio) // samples_per_frame  # F: frames of the clip
    first, last = start - margin, start + num_frames + margin  # encoded frames [first, last)
    lo, hi = first * samples_per_frame - left_samples, last * samples_per_frame + right_samples
    seg = np.zeros(hi - lo, dtype=np.float32)  # (left + (T + 2m) * 640 + right,)
    a, b = max(lo, 0), min(hi, len(audio))
    if b > a:
        seg[a - lo:b - lo] = audio[a:b]
    index = np.clip(np.arange(first, last), 0, total - 1) - first  # (T + 2m,)
    return seg, index


# --------------------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------------------


def module_fingerprint(module: torch.nn.Module) -> str:
    """16 hex digits over a module's config and weights: the key of a cache of what it computes (for the
    autoencoder the scaling factor is in its config, for wav2vec2 the chunk and context lengths)."""
    from ..checkpoint import weights_digest

    return hashlib.sha256(f"{module.config!r}:{weights_digest(module)}".encode()).hexdigest()[:16]


class _ClipRowCache:
    """One fp16 safetensors file per clip holding a row per frame (tensor `KEY`), memory-mapped; built by
    `_fill`, which encodes only the clips not cached yet (resumable) and writes each file atomically.

    Each file stores its clip's content key (`Clip.key`) and counts as cached only while the clip's key is
    the same: a clip name re-used for other content (re-prepared shards, a re-synthesised corpus) is encoded
    again instead of pairing the old clip's rows with the new clip's audio."""

    KEY = ""
    WHAT = "cache"

    @staticmethod
    def _owner(clip: Clip) -> Clip:
        """The clip whose file holds this clip's rows (itself; the audio cache: a recoloured copy's source)."""
        return clip

    def __init__(self, directory: Path, dataset: ClipDataset) -> None:
        self.directory = directory
        self.rows = []  # (N, ...) float16 each
        for c in map(self._owner, dataset.clips):
            file = directory / f"{_safe_name(c.name)}.safetensors"
            tensors, meta = read_safetensors_mmap(file) if file.is_file() else ({}, {})
            if self.KEY not in tensors or meta.get("key") != c.key:
                raise InputError(f"{self.WHAT} '{file}' is missing or was made from other data than clip "
                                 f"{c.name!r}; build it first ({type(self).__name__}.build, rank 0 in training)")
            self.rows.append(tensors[self.KEY])

    def get(self, clip: int, frames: np.ndarray) -> Tensor:
        return torch.from_numpy(np.array(self.rows[clip][frames], dtype=np.float32))  # (n, ...)

    @classmethod
    def _fill(cls, directory: Path, dataset: ClipDataset, encode, desc: str, progress: bool) -> None:
        """encode(clip) -> (N, ...) tensor for every clip without a file yet."""
        from tqdm import tqdm

        owners = {c.name: c for c in map(cls._owner, dataset.clips)}
        todo = [c for c in owners.values() if _entry_key(directory / f"{_safe_name(c.name)}.safetensors") != c.key]
        for clip in tqdm(todo, desc=desc, unit="clip", disable=not progress, leave=False):
            write_safetensors_atomic(directory / f"{_safe_name(clip.name)}.safetensors",
                                     {cls.KEY: encode(clip).float().cpu().half().numpy()},
                                     {"clip": clip.name, "key": clip.key})


class LatentCache(_ClipRowCache):
    """Every frame's scaled latent (fp16) per clip, in `DATA/.letstalk_cache/latents-S-FINGERPRINT/`.

    `noise_std` is the latent-space stand-in for the paper's pixel noise on memory and reference frames:
    the measured per-element std of E(x + sigma n) - E(x) with sigma = train_pixel_noise, so adding
    Gaussian noise of that std to a cached latent perturbs it as much as pixel noise would (isotropic,
    where the true perturbation is shaped by the encoder's Jacobian: the documented approximation).
    """

    KEY = "latents"
    WHAT = "latent cache"

    def __init__(self, directory: Path, dataset: ClipDataset, pixel_noise: float | None = None) -> None:
        """pixel_noise: the run's train_pixel_noise, checked against the one meta.json's noise_std was measured
        for (None: not checked; `build` makes them agree)."""
        super().__init__(directory, dataset)
        meta = json.loads((directory / "meta.json").read_text())
        if pixel_noise is not None and meta.get("pixel_noise") != pixel_noise:
            raise InputError(f"'{directory / 'meta.json'}' was measured for train_pixel_noise "
                             f"{meta.get('pixel_noise')}, not {pixel_noise}; build the cache first "
                             "(LatentCache.build, rank 0 in training)")
        self.noise_std = float(meta["noise_std"])

    @staticmethod
    def path_for(dataset: ClipDataset, ae: torch.nn.Module) -> Path:
        return dataset.cache_dir / f"latents-{dataset.image_size}-{module_fingerprint(ae)}"

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: ClipDataset, ae: torch.nn.Module, pixel_noise: float, device: torch.device,
              batch_size: int = 64, progress: bool = True) -> "LatentCache":
        """Encode the clips not yet cached (resumable: finished clips are kept); returns the cache."""
        from ..models.autoencoder import encode_frames

        directory = cls.path_for(dataset, ae)
        ae = ae.to(device).eval()
        cls._fill(directory, dataset, lambda clip: torch.cat([
            encode_frames(ae, np.array(clip.frames[i:i + batch_size]))
            for i in range(0, clip.num_frames, batch_size)]), "latent cache", progress)  # (N, C, h, w) a clip
        if cls._meta_stale(directory / "meta.json", dataset, pixel_noise):
            first = dataset.clips[0]
            frames = np.array(first.frames[:min(16, first.num_frames)])  # (n, S, S, 3)
            x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, S, S)
            g = torch.Generator().manual_seed(0)
            noisy = x + pixel_noise * torch.randn(x.shape, generator=g).to(device)  # (n, 3, S, S)
            delta = ae.encode(noisy) - ae.encode(x)  # (n, C, h, w)
            meta = {"noise_std": float(delta.float().std()), "pixel_noise": pixel_noise,
                    "fingerprint": directory.name, "measured_on": {"clip": first.name, "key": first.key}}
            from ..media import write_text_atomic

            directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(directory / "meta.json", json.dumps(meta, indent=1),
                              "free disk space or make the data directory writable")
        return cls(directory, dataset, pixel_noise)

    @staticmethod
    def _meta_stale(path: Path, dataset: ClipDataset, pixel_noise: float) -> bool:
        """Whether meta.json's noise_std must be measured again: missing, measured for another pixel noise, or
        on frames that have changed since (a clip of this dataset with the same name and another key). The
        latents themselves do not depend on the pixel noise, so they are kept."""
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return True
        measured = meta.get("measured_on")
        if meta.get("pixel_noise") != pixel_noise or not isinstance(measured, dict) or "noise_std" not in meta:
            return True
        keys = {c.name: c.key for c in dataset.clips}
        return measured.get("clip") in keys and keys[measured.get("clip")] != measured.get("key")


# --------------------------------------------------------------------------------------------------
# Audio feature cache (frozen chunked encoders: wav2vec2)
# --------------------------------------------------------------------------------------------------


class AudioFeatureCache(_ClipRowCache):
    """Every frame's audio features (F, L, D), fp16, per clip, in `DATA/.letstalk_cache/audio-FINGERPRINT/`.

    For an encoder that works on chunks of many frames (wav2vec2: 2 s chunks with 1 s of left context),
    a training window cannot be encoded on its own the way inference encodes it: a frame's features depend
    on where its chunk starts, and chunks start at the stream's first sample. The encoder is frozen, so
    each clip is encoded once, whole, exactly as `LetsTalkPipeline.audio_tokens` does at inference (the
    chunk grid starting at the clip's first frame, zeros after its end), and a window reads its frames'
    rows. Keyed by a fingerprint of the encoder's weights and config (chunk and context lengths included).
    """

    KEY = "features"
    WHAT = "audio feature cache"

    @staticmethod
    def _owner(clip: Clip) -> Clip:
        return clip.recoloured_from or clip  # a recoloured copy's audio is its source's

    @staticmethod
    def path_for(dataset: ClipDataset, encoder: torch.nn.Module) -> Path:
        return dataset.cache_dir / f"audio-{module_fingerprint(encoder)}"

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: ClipDataset, encoder: torch.nn.Module, device: torch.device,
              progress: bool = True) -> "AudioFeatureCache":
        """Encode the clips not yet cached (resumable: finished clips are kept); returns the cache."""
        directory = cls.path_for(dataset, encoder)
        encoder = encoder.to(device).eval()

        def encode(clip: Clip) -> Tensor:
            wav = torch.from_numpy(np.array(clip.audio, dtype=np.float32)).to(device)[None]  # (1, N * 640)
            return encoder(wav)[0][:clip.num_frames]  # (N, L, D)

        cls._fill(directory, dataset, encode, "audio feature cache", progress)
        encoder.to("cpu")
        return cls(directory, dataset)
