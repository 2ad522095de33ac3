"""A synthetic talking-head corpus: espeak-ng speech + faces whose mouths follow it (`letstalk data synth`).

No real talking-head data can be downloaded, so the default model learns from clips this module makes.
Each clip pairs speech synthesised by espeak-ng (many languages, voice variants, rates, pitches, with
silences between phrases) with a face whose mouth opens with the loudness of each 40 ms frame, widens
or rounds with the spectrum ("ee" widens, "oo" rounds), blinks every 2-6 s and moves the head a little.
Faces are either drawn procedurally with Pillow (shape, skin tone, eyes, brows, nose, hair, glasses,
background, lighting all varied) or real photographs shipped inside scikit-image (the astronaut,
Eileen Collins), animated by warping the lips apart and painting the mouth interior.

    letstalk data synth --out data/synth --clips 2000 --seconds 3 8 --size 128 --seed 0
    letstalk data synth --out data/synth --clips 4000 --workers 2      # resumes: the first 2000 are kept

    from letstalk_rt.train.synth import make_clip_specs, render_clip, synthesize_corpus
    specs = make_clip_specs(10, seconds_range=(1, 2), size=64, seed=0)
    frames, audio, meta = render_clip(specs[0])        # (N, 64, 64, 3) uint8, (n,) float32 16 kHz, dict
    synthesize_corpus("data/synth", 100)               # -> data/synth/manifest.json

Everything is a function of (seed, clip index): clip i's spec does not depend on how many clips are
asked for, so growing a corpus keeps the clips it has. Splits have disjoint identities (identity ids
carry their split; real photos are train-only because the package ships one usable person) and
disjoint espeak voices (the voice variants, i.e. the timbres, are partitioned by the seed).

Timing: frame i of a clip owns audio samples [640 i, 640 (i + 1)) at 16 kHz / 25 fps; a clip of n
samples has ceil(n / 640) frames, and every per-frame parameter is computed from that frame's own
samples with zero-phase smoothing, so the mouth neither leads nor lags the sound.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LetsTalkError, OutputError, Stopped
from ..media import remove_abandoned_partials
from ..tts import Speech
from ..tts import installed_languages as _installed_languages
from ..tts import installed_variants as _installed_variants

SAMPLE_RATE = 16000  # Hz, config.AudioConfig.sample_rate
FPS = 25  # config.AudioConfig.fps
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
SPLITS = ("train", "validation", "test")
SPLIT_PROBS = (0.90, 0.05, 0.05)  # clip i >= 3 lands in a split with these probabilities
VOICE_SPLIT = (0.80, 0.10, 0.10)  # share of the voice variants (timbres) each split owns
CLIPS_PER_IDENTITY = 2  # consecutive procedural clips of a split share a face (same face, new voice)
PHOTO_VARIANTS = 12  # augmented looks per real photo (crop, flip, colour)
GENERATOR_VERSION = 1  # bump when rendering changes: resumed corpora then re-render their clips

# ------------------------------------------------------------------------------------------------
# Voices and text
# ------------------------------------------------------------------------------------------------

# Latin-script languages only: the sentences are written in Latin letters, which each voice then reads
# with its own letter-to-sound rules. The number is the language's sampling weight (English ~35%).
LANGUAGES: dict[str, float] = {
    "en-us": 3.0, "en-gb": 2.0, "en-gb-scotland": 1.0, "en-gb-x-rp": 1.0, "en-029": 1.0, "en-us-nyc": 1.0,
    "de": 1.0, "es": 1.0, "es-419": 1.0, "fr-fr": 1.0, "fr-be": 0.5, "it": 1.0, "pt": 0.5, "pt-br": 1.0,
    "nl": 1.0, "pl": 0.5, "sv": 0.5, "da": 0.5, "nb": 0.5, "fi": 0.5, "cs": 0.5, "sk": 0.5, "hr": 0.5,
    "tr": 0.5, "id": 0.5, "ms": 0.5, "sw": 0.5, "ro": 0.5, "hu": 0.5, "ca": 0.5, "af": 0.5, "et": 0.5,
    "eo": 0.5,
}
# espeak-ng voice variants (`espeak-ng --voices=variant`): human-sounding male and female timbres;
# "" is the language's default voice. Whisper, robot and effect voices are left out.
VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "Alicia", "Andrea", "Annie", "anika", "belinda", "linda",
    "steph", "adam", "Alex", "Andy", "david", "ed", "john", "max", "Michael", "paul", "rob", "robert",
    "grandma", "grandpa", "iven", "quincy", "travis", "victor",
)

_EN_WORDS = """
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community
name president team minute idea kid body information back parent face others level office door health
person art war history party result change morning reason research girl guy moment air teacher force
education foot boy age policy music market sense nation plan college interest death experience effect
say make go know take see come think look want give use find tell ask seem feel try leave call good new
first last long great little own other old big high different small large next early young important
few public bad same able blue green yellow purple orange happy quiet loud soft bright dark simple open
moon sun river mountain ocean window garden coffee bread apple banana tomato pizza rain snow summer
winter autumn spring yesterday today tomorrow always never often maybe really very quite almost
""".split()
_WORDS: dict[str, list[str]] = {
    "en": _EN_WORDS,
    "de": """haus zeit jahr mensch kind frau mann tag welt leben hand auge stadt land wasser arbeit schule
             freund frage morgen abend immer heute gestern gut neu alt gross klein schnell langsam schoen
             sprechen gehen kommen sehen machen sagen wissen denken finden nehmen geben""".split(),
    "es": """casa tiempo ano persona nino mujer hombre dia mundo vida mano ojo ciudad pais agua trabajo
             escuela amigo pregunta manana noche siempre hoy ayer bueno nuevo viejo grande pequeno rapido
             lento bonito hablar ir venir ver hacer decir saber pensar encontrar tomar dar""".split(),
    "fr": """maison temps annee personne enfant femme homme jour monde vie main oeil ville pays eau travail
             ecole ami question matin soir toujours aujourdhui hier bon nouveau vieux grand petit rapide
             lent beau parler aller venir voir faire dire savoir penser trouver prendre donner""".split(),
    "it": """casa tempo anno persona bambino donna uomo giorno mondo vita mano occhio citta paese acqua
             lavoro scuola amico domanda mattina sera sempre oggi ieri buono nuovo vecchio grande piccolo
             veloce lento bello parlare andare venire vedere fare dire sapere pensare trovare""".split(),
    "pt": """casa tempo ano pessoa crianca mulher homem dia mundo vida mao olho cidade pais agua trabalho
             escola amigo pergunta manha noite sempre hoje ontem bom novo velho grande pequeno rapido
             lento bonito falar ir vir ver fazer dizer saber pensar encontrar tomar dar""".split(),
    "nl": """huis tijd jaar mens kind vrouw man dag wereld leven hand oog stad land water werk school vriend
             vraag morgen avond altijd vandaag gisteren goed nieuw oud groot klein snel langzaam mooi
             praten gaan komen zien maken zeggen weten denken vinden nemen geven""".split(),
}
_ONSETS = "b d f g h j k l m n p r s t v z ch sh tr pl kr br st gr".split()
_VOWELS = "a e i o u a e i o u ai ou ei ee oo".split()
_CODAS = ["", "", "", "n", "m", "s", "t", "r", "l", "k"]


def _word_list(language: str) -> list[str] | None:
    return _WORDS.get(language.split("-")[0])


def _pseudo_word(rng: np.random.Generator) -> str:
    """A pronounceable CV(C) pseudo-word any Latin-script voice can read."""
    syllables = int(rng.integers(1, 4))
    return "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS))
                   for _ in range(syllables))


def make_sentence(language: str, num_words: int, rng: np.random.Generator) -> str:
    """A deterministic pseudo-sentence: real words for languages with a list, pseudo-words otherwise."""
    words = _word_list(language)
    out = [str(rng.choice(words)) if words else _pseudo_word(rng) for _ in range(num_words)]
    if num_words >= 4 and rng.random() < 0.3:  # a comma: espeak pauses briefly inside the phrase
        k = int(rng.integers(2, num_words - 1))
        out[k - 1] += ","
    end = "?" if rng.random() < 0.2 else ("!" if rng.random() < 0.1 else ".")
    return " ".join(out).capitalize() + end


def voice_pool() -> list[tuple[str, str]]:
    """Every (language, variant) pair the corpus draws voices from, in a fixed order.

    Languages and variants this espeak-ng lacks are left out (with a warning once), so a corpus is
    reproducible on machines with the same espeak-ng data. A variant must be checked: espeak-ng speaks an
    unknown `LANG+VARIANT` with the language's default voice without a word, so a split would hear the
    default timbre, which another split owns.
    """
    installed = _installed_languages()
    missing = [lang for lang in LANGUAGES if lang not in installed]
    if missing:
        _warn_once(f"espeak-ng here lacks voices {missing}; the corpus leaves them out")
    have = _installed_variants()
    variants = [var for var in VARIANTS if not var or var in have]  # "": the default voice, always there
    if len(variants) < len(VARIANTS):
        _warn_once(f"espeak-ng here lacks voice variants {[v for v in VARIANTS if v not in variants]}; "
                   "the corpus leaves them out")
    if len(variants) < len(SPLITS):
        raise InputError(f"espeak-ng here has {len(variants)} of the corpus's voice variants, fewer than one per "
                         f"split; install the full espeak-ng data (Debian/Ubuntu: apt-get install espeak-ng-data)")
    return [(lang, var) for lang in LANGUAGES if lang in installed for var in variants]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"letstalk: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Clip specs: everything a clip is, decided from (seed, index) before any rendering
# ------------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent generator for (seed, keys...); strings are hashed with crc32 (stable across runs)."""
    ints = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF
                                       for k in keys]
    return np.random.default_rng(ints)


@dataclass
class ClipSpec:
    """One clip, fully determined before rendering; JSON-serialisable with `dataclasses.asdict`."""

    index: int  # position in the corpus; the file stem is clip_{index:05d}
    split: str  # train / validation / test
    seed: int  # corpus seed; with index it drives every random choice of the clip
    size: int  # frame side in pixels (even)
    seconds: float  # exact clip duration: round(seconds * 16000) samples
    identity: dict[str, Any]  # {"id", "kind": "procedural"|"photo", "seed"} or photo name + augmentation
    voice: dict[str, Any]  # {"name", "language", "variant", "rate", "pitch", "word_gap", "gain", "noise_db"}
    phrases: list[str]  # candidate sentences, spoken in order while they fit in `seconds`
    pauses: list[float]  # seconds of silence after each phrase (index 0: leading silence)
    motion_scale: float = 1.0  # head motion amplitude multiplier (0 = still head; tests use it)
    blinks: bool = True  # False: eyes never blink (tests)

    @property
    def name(self) -> str:
        return f"clip_{self.index:05d}"

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * SAMPLE_RATE))

    @property
    def num_frames(self) -> int:
        return -(-self.num_samples // SAMPLES_PER_FRAME)  # ceil(samples / 640)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the spec and the generator version: a finished clip is reused only if it matches."""
        blob = json.dumps({"v": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _split_of(seed: int, index: int) -> str:
    if index < len(SPLITS):  # the first three clips cover every split, so tiny corpora have all of them
        return SPLITS[index]
    return str(_rng(seed, "split", index).choice(SPLITS, p=SPLIT_PROBS))


def split_voices(seed: int) -> dict[str, list[tuple[str, str]]]:
    """Partition the voice pool between the splits (disjoint, seeded, independent of the clip count).

    The variants (the speaker timbres) are partitioned, so a validation or test voice is not only a
    new (language, variant) pair but a timbre the training split never hears; every split speaks
    every language.
    """
    pool = voice_pool()
    variants = sorted({var for _, var in pool}, key=VARIANTS.index)
    order = _rng(seed, "voices").permutation(len(variants))
    n_val = max(1, round(VOICE_SPLIT[1] * len(variants)))
    n_test = max(1, round(VOICE_SPLIT[2] * len(variants)))
    parts = {"train": order[n_val + n_test:], "validation": order[:n_val], "test": order[n_val:n_val + n_test]}
    own = {split: {variants[i] for i in idx} for split, idx in parts.items()}
    return {split: [(lang, var) for lang, var in pool if var in own[split]] for split in parts}


def _pick_voice(pool: list[tuple[str, str]], rng: np.random.Generator) -> dict[str, Any]:
    weights = np.array([LANGUAGES[lang] for lang, _ in pool])
    lang, variant = pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
    return {
        "name": f"{lang}+{variant}" if variant else lang,
        "language": lang,
        "variant": variant,
        "rate": int(rng.integers(130, 211)),  # words per minute (espeak default 175)
        "pitch": int(rng.integers(20, 81)),  # 0-99 (espeak default 50)
        "word_gap": int(rng.choice([0, 0, 0, 1, 2, 4])),  # extra pause between words, 10 ms units
        "gain": round(float(rng.uniform(0.3, 0.95)), 3),  # peak level of the speech
        "noise_db": round(float(rng.uniform(-72, -52)), 1),  # background noise floor, dBFS rms
    }


def _photo_augmentation(seed: int, photo: str, variant: int) -> dict[str, Any]:
    """Crop, flip and colour of one augmented look of a real photo."""
    rng = _rng(seed, "photo", photo, variant)
    return {
        "margin": round(float(rng.uniform(0.5, 0.72)), 3),  # crop side = face box * (1 + 2 margin), as face.py
        "shift": [round(float(v), 3) for v in rng.uniform(-0.05, 0.05, 2)],  # crop centre offset, x crop side
        "flip": bool(variant % 2),
        "brightness": round(float(rng.uniform(0.8, 1.2)), 3),
        "contrast": round(float(rng.uniform(0.8, 1.2)), 3),
        "saturation": round(float(rng.uniform(0.5, 1.3)), 3),
        "gains": [round(float(v), 3) for v in rng.uniform(0.9, 1.1, 3)],  # white balance, per channel
        "gamma": round(float(rng.uniform(0.85, 1.15)), 3),
        "grayscale": bool(rng.random() < 0.1),
    }


def make_clip_specs(num_clips: int, seconds_range: tuple[float, float] = (3, 8), size: int = 128,
                    seed: int = 0, real_photo_fraction: float = 0.3) -> list[ClipSpec]:
    """The specs of clips 0..num_clips-1; clip i is the same whatever num_clips is."""
    lo, hi = float(seconds_range[0]), float(seconds_range[1])
    if not 0.2 <= lo <= hi:
        raise InputError(f"--seconds {lo} {hi}: give 0.2 <= MIN <= MAX")
    if size < 32 or size % 2:
        raise InputError(f"--size {size}: give an even frame side >= 32 (H.264 yuv420p needs even sizes)")
    if not 0.0 <= real_photo_fraction <= 1.0:
        raise InputError(f"--real-photo-fraction {real_photo_fraction}: give a value in [0, 1]")
    voices = split_voices(seed)
    photos = real_photos()
    per_split = {s: 0 for s in SPLITS}  # procedural clips so far in each split (identity counter)
    specs = []
    for index in range(num_clips):
        split = _split_of(seed, index)
        rng = _rng(seed, "clip", index)
        seconds = round(float(rng.uniform(lo, hi)), 3)
        # Real photos are train-only: one person cannot be in two splits with disjoint identities.
        if split == "train" and photos and rng.random() < real_photo_fraction:
            photo = str(rng.choice(photos))
            variant = int(rng.integers(PHOTO_VARIANTS))
            identity = {"id": f"photo-{photo}-v{variant:02d}", "kind": "photo", "photo": photo,
                        "variant": variant, "augment": _photo_augmentation(seed, photo, variant)}
        else:
            m = per_split[split] // CLIPS_PER_IDENTITY
            per_split[split] += 1
            identity = {"id": f"proc-{split}-{m:05d}", "kind": "procedural",
                        "seed": int(_rng(seed, "identity", split, m).integers(2**31))}
        voice = _pick_voice(voices[split], rng)
        n_phrases = int(math.ceil(seconds / 0.8)) + 2  # more than can fit; rendering stops when full
        phrases = [make_sentence(voice["language"], int(rng.integers(2, 9)), rng) for _ in range(n_phrases)]
        pauses = [round(float(rng.uniform(0.1, 0.6)), 3)] + \
                 [round(float(rng.uniform(0.15, 0.9)), 3) for _ in range(n_phrases)]
        specs.append(ClipSpec(index=index, split=split, seed=seed, size=size, seconds=seconds,
                              identity=identity, voice=voice, phrases=phrases, pauses=pauses))
    return specs


# ------------------------------------------------------------------------------------------------
# Speech: espeak-ng phrases laid out on the clip's timeline
# ------------------------------------------------------------------------------------------------


def espeak(text: str, voice: dict[str, Any]) -> np.ndarray:
    """Synthesise one phrase -> float32 mono at 16 kHz, leading/trailing silence trimmed."""
    pcm = Speech(voice["name"], voice["rate"], voice["pitch"], voice["word_gap"]).synthesize(text)
    loud = np.flatnonzero(np.abs(pcm) > 0.01 * max(1e-6, float(np.abs(pcm).max())))
    if len(loud) == 0:
        return np.zeros(0, np.float32)
    return pcm[max(0, loud[0] - 80):loud[-1] + 160]  # keep 5 ms before / 10 ms after


def synthesize_speech(spec: ClipSpec) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The clip's audio (exactly spec.num_samples float32 samples) and the phrases it holds.

    Phrases are spoken in order, each followed by its pause, while they fit; a phrase too long for the
    remaining time loses words from its end; a one-word phrase that still does not fit ends the clip
    (if nothing fits at all, the first word is cut with a 20 ms fade). Returns phrase dicts with text,
    start and end in seconds.
    """
    total = spec.num_samples
    audio = np.zeros(total, np.float32)
    placed: list[dict[str, Any]] = []
    pos = int(spec.pauses[0] * SAMPLE_RATE)
    for k, text in enumerate(spec.phrases):
        words = text.split()
        tail = int(0.1 * SAMPLE_RATE)  # at least 100 ms of silence after the last phrase
        pcm = None
        while words:
            said = " ".join(words)
            pcm = espeak(said, spec.voice)
            if pos + len(pcm) + tail <= total:
                break
            words, pcm = words[:-1], None
        if pcm is None:
            if placed:
                break
            # Nothing fits (very short clip): speak the first word, cut it to the room left.
            said = spec.phrases[0].split()[0]
            room = max(0, total - pos - tail)
            pcm = espeak(said, spec.voice)[:room].copy()
            fade = min(len(pcm), int(0.02 * SAMPLE_RATE))
            if fade:
                pcm[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
        if len(pcm):
            audio[pos:pos + len(pcm)] = pcm
            placed.append({"text": said, "start": round(pos / SAMPLE_RATE, 4),
                           "end": round((pos + len(pcm)) / SAMPLE_RATE, 4)})
        pos += len(pcm) + int(spec.pauses[k + 1] * SAMPLE_RATE)
        if pos >= total - tail:
            break
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio *= spec.voice["gain"] / peak
    noise = _rng(spec.seed, "noise", spec.index).standard_normal(total).astype(np.float32)
    audio += noise * np.float32(10 ** (spec.voice["noise_db"] / 20))
    return np.clip(audio, -1, 1).astype(np.float32), placed


# ------------------------------------------------------------------------------------------------
# Per-frame motion parameters from the audio
# ------------------------------------------------------------------------------------------------


def _smooth(x: np.ndarray, taps: list[float]) -> np.ndarray:
    """Zero-phase (symmetric, odd-length) FIR smoothing with edge replication: adds no delay."""
    k = np.asarray(taps, np.float64)
    k /= k.sum()
    r = len(k) // 2
    padded = np.pad(np.asarray(x, np.float64), r, mode="edge")
    return np.convolve(padded, k, mode="valid")


def frame_rms(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """RMS of each frame's own 640 samples (the last frame zero-padded): (num_frames,) float64."""
    pcm = np.zeros(num_frames * SAMPLES_PER_FRAME, np.float64)
    pcm[:min(len(audio), len(pcm))] = audio[:len(pcm)]
    return np.sqrt(np.mean(pcm.reshape(num_frames, SAMPLES_PER_FRAME) ** 2, axis=1))


def mouth_parameters(audio: np.ndarray, num_frames: int, phrases: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-frame speech flag, mouth opening, width and rounding, all in [0, 1].

    - speech: the frame lies mostly inside a spoken phrase and its RMS is within 30 dB of the clip's
      speech level (so stop closures inside words close the mouth too).
    - opening: (rms / speech level) ** 0.6, smoothed with a zero-phase 3-tap filter, 0 where not speech.
    - width / rounding: from the spectrum of a 64 ms Hann window centred on the frame: the spectral
      centroid over 250-4000 Hz (high for "ee" and "s" -> wide) and the share of energy below 600 Hz
      (high with a low centroid for "oo" -> round), standardised over the clip's speech frames. In
      silence they relax to neutral (width 0.5, rounding 0).
    """
    n = num_frames
    rms = frame_rms(audio, n)
    in_phrase = np.zeros(n * SAMPLES_PER_FRAME, bool)
    for p in phrases:
        in_phrase[int(p["start"] * SAMPLE_RATE):int(p["end"] * SAMPLE_RATE)] = True
    phrase_frac = in_phrase.reshape(n, SAMPLES_PER_FRAME).mean(axis=1)
    voiced_rms = rms[phrase_frac > 0.5]
    level = float(np.percentile(voiced_rms, 95)) if len(voiced_rms) else 1.0
    speech = (phrase_frac > 0.5) & (rms > level * 10 ** (-30 / 20))

    opening = np.where(speech, np.clip(rms / max(level, 1e-8), 0, 1) ** 0.6, 0.0)
    opening = np.where(speech, _smooth(opening, [1, 2, 1]), 0.0)

    # Spectral shape per frame.
    win = 1024
    pcm = np.zeros(n * SAMPLES_PER_FRAME + win, np.float64)
    pcm[win // 2:win // 2 + min(len(audio), n * SAMPLES_PER_FRAME)] = audio[:n * SAMPLES_PER_FRAME]
    starts = np.arange(n) * SAMPLES_PER_FRAME + SAMPLES_PER_FRAME // 2  # window centred on frame centre
    idx = starts[:, None] + np.arange(win)[None, :]  # (n, win) into the half-window-padded signal
    spec = np.abs(np.fft.rfft(pcm[idx] * np.hanning(win), axis=1)) ** 2  # (n, win/2+1)
    freqs = np.fft.rfftfreq(win, 1 / SAMPLE_RATE)
    band = (freqs >= 250) & (freqs <= 4000)
    e_band = spec[:, band].sum(axis=1) + 1e-12
    centroid = np.log((spec[:, band] * freqs[band]).sum(axis=1) / e_band)
    low_share = spec[:, (freqs >= 150) & (freqs < 600)].sum(axis=1) / e_band

    def standardise(v: np.ndarray) -> np.ndarray:
        ref = v[speech] if speech.sum() >= 3 else v
        return (v - np.median(ref)) / (np.std(ref) + 1e-6)

    z_c, z_l = standardise(centroid), standardise(low_share)
    talk = _smooth(speech.astype(np.float64), [1, 2, 1])  # fades width/rounding to neutral at pauses
    width = 0.5 + 0.4 * np.tanh(0.8 * z_c) * talk
    rounding = np.clip(0.3 * (z_l - z_c) - 0.15, 0, 1) * talk
    width = _smooth(width, [1, 2, 3, 2, 1])
    rounding = _smooth(rounding, [1, 2, 3, 2, 1])
    return {"speech": speech, "opening": opening, "width": np.clip(width, 0, 1),
            "rounding": np.clip(rounding, 0, 1), "rms": rms}


def blink_track(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure per frame in [0, 1]: blinks every 2-6 s, each 120-200 ms, closing and reopening."""
    t = np.arange(num_frames) / FPS
    closure = np.zeros(num_frames)
    start = float(rng.uniform(0.3, 3.0))
    end = num_frames / FPS
    while start < end:
        dur = float(rng.uniform(0.12, 0.2))
        u = (t - start) / dur
        inside = (u >= 0) & (u <= 1)
        closure[inside] = np.maximum(closure[inside], np.sin(np.pi * u[inside]))
        start += dur + float(rng.uniform(2.0, 6.0))
    return closure


def head_track(num_frames: int, size: int, rng: np.random.Generator, opening: np.ndarray,
               scale: float = 1.0) -> np.ndarray:
    """Smooth head pose per frame: (tx px, ty px, roll degrees, zoom) as (num_frames, 4) float64.

    A sum of three slow sinusoids per axis (0.05-0.6 Hz), at most +-2 % of the frame, +-3 degrees and
    +-1.5 % zoom, scaled by `scale` and an amplitude (0.3-1) drawn per clip, plus a small nod (up to
    1.5 % of the frame) that follows the speech energy over ~0.5 s.
    """
    t = np.arange(num_frames) / FPS
    amp = float(rng.uniform(0.3, 1.0)) * scale
    limits = np.array([0.02 * size, 0.02 * size, 3.0, 0.015])  # px, px, degrees, zoom fraction
    pose = np.zeros((num_frames, 4))
    for axis in range(4):
        amps = rng.uniform(0.2, 1.0, 3)
        for a in amps:
            f, phase = rng.uniform(0.05, 0.6), rng.uniform(0, 2 * np.pi)
            pose[:, axis] += a * np.sin(2 * np.pi * f * t + phase) / amps.sum()  # |sum| <= 1
    pose *= limits * amp  # at most the limits
    if num_frames:
        nod = _smooth(opening, [1] * 13) if num_frames >= 13 else opening  # ~0.5 s moving average
        pose[:, 1] += 0.015 * size * amp * nod
    pose[:, 3] += 1.0
    return pose


# ------------------------------------------------------------------------------------------------
# Warping helpers shared by both face kinds
# ------------------------------------------------------------------------------------------------


def _bilinear(img: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample img (H, W, C) float32 at float coords (sx, sy) (same shape), edges replicated."""
    h, w = img.shape[:2]
    sx = np.clip(sx, 0, w - 1.001)
    sy = np.clip(sy, 0, h - 1.001)
    x0, y0 = sx.astype(np.int32), sy.astype(np.int32)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    a, b = img[y0, x0], img[y0, x0 + 1]
    c, d = img[y0 + 1, x0], img[y0 + 1, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _lens(dx: np.ndarray, half: float, power: float = 0.75) -> np.ndarray:
    """1 at dx = 0 falling to 0 at |dx| = half: (1 - (dx/half)^2)_+ ** power."""
    return np.clip(1 - (dx / max(half, 1e-6)) ** 2, 0, None) ** power


def _fall(d: np.ndarray, reach: float) -> np.ndarray:
    """Raised-cosine falloff: 1 at d <= 0, 0 at d >= reach."""
    u = np.clip(d / max(reach, 1e-6), 0, 1)
    return 0.5 * (1 + np.cos(np.pi * u))


@dataclass
class MouthGeometry:
    """Where a face's mouth is and how it moves, in pixels of the render canvas."""

    cx: float  # mouth centre x
    seam: float  # y of the line where the lips meet
    width: float  # corner-to-corner width
    max_gap: float  # lip separation at opening = 1
    up_share: float  # share of the gap taken by the upper lip moving up (the rest is the jaw dropping)
    reach_up: float  # how far above the upper lip its motion fades out (px)
    reach_down: float  # how far below the lower lip the jaw motion fades out (chin and beyond)
    jaw_half: float  # half-width of the region the jaw drop moves (>= width / 2)


def mouth_map(X: np.ndarray, Y: np.ndarray, m: MouthGeometry, opening: float, width: float,
              rounding: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward map that opens the lips and drops the jaw: destination (X, Y) -> source (SX, SY).

    Returns (SX, SY, interior, depth): `interior` in [0, 1] marks destination pixels between the
    parted lips (to be painted as the mouth's inside, 1 px feathered); `depth` in [0, 1] is the
    position from the upper (0) to the lower (1) inner lip, for teeth and tongue.
    Continuity: above the upper lip the shift fades out over `reach_up`, below the lower lip over
    `reach_down`; beside the lips (jaw profile wider than the lips) upper and lower move together, so
    nothing tears at the mouth corners.
    """
    dx = X - m.cx
    gap_total = opening * m.max_gap
    lips = _lens(dx, m.width / 2)  # lip-separation profile, 0 at the corners
    jaw = np.maximum(lips, _lens(dx, m.jaw_half, 1.0))  # jaw-drop profile, wider, >= lips
    up = m.up_share * gap_total * lips  # upper inner lip lift
    low = (1 - m.up_share) * gap_total * lips  # lower inner lip drop
    drop = (1 - m.up_share) * gap_total * jaw  # jaw drop
    extra = drop - low  # beside the lips both sides move down by this much
    SY = Y.astype(np.float32).copy()
    above = Y <= m.seam - up
    below = Y >= m.seam + low
    SY = np.where(above, Y + (up - extra) * _fall(m.seam - up - Y, m.reach_up), SY)
    SY = np.where(below, Y - drop * _fall(Y - m.seam - low, m.reach_down), SY)
    gap = ~above & ~below
    SY = np.where(gap, m.seam - extra, SY)
    # Width: stretch the lips sideways around the mouth (rounding narrows them).
    k = 0.16 * (width - 0.5) * 2 - 0.14 * rounding
    bump = np.exp(-(dx / (0.6 * m.width)) ** 2 - ((Y - m.seam) / (0.45 * m.width)) ** 2)
    SX = m.cx + dx / (1 + k * bump)
    # Interior coverage with a 1 px soft edge, and depth inside the opening.
    inner = np.minimum(Y - (m.seam - up), (m.seam + low) - Y)
    interior = np.clip(inner + 0.5, 0, 1) * (lips > 0) * (up + low > 0.5)
    depth = np.clip((Y - (m.seam - up)) / np.maximum(up + low, 1e-3), 0, 1)
    return SX.astype(np.float32), SY.astype(np.float32), interior.astype(np.float32), depth.astype(np.float32)


def paint_interior(rgb: np.ndarray, interior: np.ndarray, depth: np.ndarray, X: np.ndarray,
                   m: MouthGeometry, opening: float, teeth: tuple[int, int, int] | None = (226, 220, 206)
                   ) -> np.ndarray:
    """Paint the inside of the open mouth onto rgb (H, W, 3) float32: upper teeth, dark cavity, tongue.

    `teeth=None` paints no teeth (a photo whose own teeth already move apart with the lips).
    """
    if not interior.any():
        return rgb
    gap_px = opening * m.max_gap
    teeth_depth = min(0.45, 0.22 * m.width / max(gap_px, 1e-3) * 0.35)  # teeth band of ~8% mouth width
    across = np.abs(X - m.cx) / (m.width / 2)
    cavity = np.array([52, 18, 24], np.float32) * (0.7 + 0.6 * depth[..., None])
    tongue = np.array([150, 62, 70], np.float32)
    colour = cavity
    colour = np.where(((depth > 0.72) & (gap_px > 0.12 * m.width))[..., None], tongue * 0.8, colour)
    if teeth is not None:
        colour = np.where(((depth < teeth_depth) & (across < 0.75))[..., None],
                          np.array(teeth, np.float32) * (1 - 0.25 * across[..., None]), colour)
    a = interior[..., None]
    return rgb * (1 - a) + colour * a


# ------------------------------------------------------------------------------------------------
# Procedural faces
# ------------------------------------------------------------------------------------------------

# Skin tones from very light to very dark (sRGB), sampled by interpolation between neighbours.
SKIN_TONES = np.array([(255, 228, 206), (241, 204, 170), (226, 180, 140), (204, 150, 108),
                       (170, 115, 78), (132, 84, 54), (96, 60, 40), (70, 44, 32)], np.float64)
HAIR_COLOURS = {  # name: (rgb, weight)
    "black": ((22, 18, 16), 3.0), "dark_brown": ((52, 34, 24), 3.0), "brown": ((96, 64, 40), 2.0),
    "auburn": ((128, 58, 30), 0.7), "blonde": ((206, 172, 110), 1.0), "dark_blonde": ((150, 116, 70), 1.0),
    "red": ((160, 70, 36), 0.4), "gray": ((150, 148, 146), 0.8), "white": ((226, 224, 220), 0.4),
    "dyed_blue": ((50, 80, 170), 0.15), "dyed_pink": ((210, 110, 160), 0.15),
}
HAIR_STYLES = {"bald": 0.6, "buzz": 0.8, "short": 2.5, "side_part": 1.5, "fringe": 1.0, "bob": 1.2,
               "long": 2.0, "bun": 0.6, "curly": 0.8, "afro": 0.5}
IRIS_COLOURS = {"dark_brown": ((60, 36, 22), 4.0), "brown": ((102, 64, 34), 3.0), "hazel": ((120, 98, 52), 1.2),
                "green": ((74, 112, 70), 0.8), "blue": ((70, 110, 160), 1.2), "gray": ((110, 120, 128), 0.6)}


def _weighted(rng: np.random.Generator, table: dict[str, Any]) -> str:
    names = list(table)
    w = np.array([v[1] if isinstance(v, tuple) else v for v in table.values()], np.float64)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


@dataclass
class FaceParams:
    """A procedural identity. Lengths are fractions of the frame side; colours are sRGB tuples."""

    cx: float  # head centre x
    cy: float  # head centre y (head ellipse centre; eyes sit slightly above it)
    a: float  # head half-width
    b: float  # head half-height
    top_power: float  # superellipse exponent of the skull (2 = ellipse, higher = squarer)
    chin_power: float  # superellipse exponent of the jaw (lower = pointier chin)
    jaw_taper: float  # how much the jaw narrows towards the chin
    skin: tuple[int, int, int]
    skin_tone: float  # 0 (lightest) .. 1 (darkest), for the record
    eye_y: float  # eye centre height, relative to cy in units of b (negative = above)
    eye_dx: float  # eye centre offset from the midline, units of a
    eye_w: float  # eye width, units of a
    eye_h: float  # eye height / eye width
    iris: tuple[int, int, int]
    iris_size: float  # iris radius / eye height
    lid_rest: float  # resting upper-lid coverage of the eye
    gaze: tuple[float, float]  # iris offset, fraction of eye width/height
    brow_raise: float  # brow height above the eye, units of eye height
    brow_thickness: float  # units of b
    brow_tilt: float  # outer-end rise, units of eye height
    brow_colour: tuple[int, int, int]
    nose_len: float  # nose tip below the eyes, units of b
    nose_w: float  # nose width, units of a
    mouth_y: float  # lip seam below cy, units of b
    mouth_w: float  # mouth width, units of a
    lip_colour: tuple[int, int, int]
    lip_upper: float  # upper-lip thickness / mouth width
    lip_lower: float  # lower-lip thickness / mouth width
    smile: float  # corner lift (negative = down-turned)
    gap_max: float  # lip separation at full opening / mouth width
    hair_style: str
    hair_colour: tuple[int, int, int]
    hairline: float  # hairline height above cy, units of b
    hair_volume: float  # how far hair stands off the skull, units of a
    hair_length: float  # long styles: lower end below cy, units of b
    glasses: bool
    glasses_colour: tuple[int, int, int]
    clothes: tuple[int, int, int]
    shoulder_w: float  # half-width of the shoulders, fraction of the frame
    background: str  # solid / vgrad / hgrad / radial / texture / blobs
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_seed: int
    light_angle: float  # radians, direction the light comes from
    light_strength: float  # shading gradient amplitude
    blush: float  # cheek redness


def _clr(v: Any) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(float(c)), 0, 255)) for c in v)  # type: ignore[return-value]


def sample_face(seed: int) -> FaceParams:
    """A random but plausible face for an identity seed."""
    rng = np.random.default_rng(seed)
    tone = float(rng.beta(1.3, 1.3))
    pos = tone * (len(SKIN_TONES) - 1)
    i = min(int(pos), len(SKIN_TONES) - 2)
    skin = SKIN_TONES[i] * (1 - (pos - i)) + SKIN_TONES[i + 1] * (pos - i)
    skin = skin * rng.uniform(0.95, 1.05) + rng.normal(0, 5, 3) + np.array([rng.normal(4, 4), 0, rng.normal(-3, 4)])
    hair_name = _weighted(rng, HAIR_COLOURS)
    if tone > 0.6 and hair_name in ("blonde", "red", "auburn") and rng.random() < 0.7:
        hair_name = "black"
    hair = np.array(HAIR_COLOURS[hair_name][0]) * rng.uniform(0.85, 1.15)
    iris_name = _weighted(rng, IRIS_COLOURS) if tone < 0.5 else ("dark_brown" if rng.random() < 0.85 else "brown")
    lip = skin * rng.uniform(0.62, 0.8) + np.array([rng.uniform(15, 45), -5, 0])
    if rng.random() < 0.15:  # lipstick
        lip = np.array([rng.uniform(140, 200), rng.uniform(20, 60), rng.uniform(40, 80)])
    style = _weighted(rng, HAIR_STYLES)
    bg_kind = str(rng.choice(["solid", "vgrad", "hgrad", "radial", "texture", "blobs"], p=[.2, .2, .1, .2, .15, .15]))
    grey = rng.uniform(40, 225)
    bg1 = grey + (rng.uniform(30, 235, 3) - grey) * rng.uniform(0.1, 0.7)  # muted colours, as in real rooms
    bg2 = np.clip(bg1 + rng.normal(0, 40, 3), 0, 255)
    a = float(rng.uniform(0.19, 0.235))
    return FaceParams(
        cx=float(0.5 + rng.normal(0, 0.012)), cy=float(0.46 + rng.normal(0, 0.012)), a=a,
        b=a * float(rng.uniform(1.22, 1.42)), top_power=float(rng.uniform(2.0, 2.5)),
        chin_power=float(rng.uniform(1.7, 2.5)), jaw_taper=float(rng.uniform(0.0, 0.25)),
        skin=_clr(skin), skin_tone=round(tone, 3),
        eye_y=float(rng.uniform(-0.16, -0.04)), eye_dx=float(rng.uniform(0.38, 0.48)),
        eye_w=float(rng.uniform(0.27, 0.35)), eye_h=float(rng.uniform(0.42, 0.58)),
        iris=_clr(np.array(IRIS_COLOURS[iris_name][0]) * rng.uniform(0.85, 1.15)),
        iris_size=float(rng.uniform(0.42, 0.52)), lid_rest=float(rng.uniform(0.05, 0.3)),
        gaze=(float(rng.normal(0, 0.05)), float(rng.normal(0, 0.04))),
        brow_raise=float(rng.uniform(1.0, 1.7)), brow_thickness=float(rng.uniform(0.03, 0.06)),
        brow_tilt=float(rng.uniform(-0.25, 0.35)), brow_colour=_clr(hair * 0.8 if hair_name not in ("gray", "white")
                                                                   else hair * 0.7),
        nose_len=float(rng.uniform(0.32, 0.42)), nose_w=float(rng.uniform(0.22, 0.32)),
        mouth_y=float(rng.uniform(0.5, 0.6)), mouth_w=float(rng.uniform(0.62, 0.85)),
        lip_colour=_clr(lip), lip_upper=float(rng.uniform(0.08, 0.13)), lip_lower=float(rng.uniform(0.11, 0.17)),
        smile=float(rng.uniform(-0.08, 0.25)), gap_max=float(rng.uniform(0.4, 0.55)),
        hair_style=style, hair_colour=_clr(hair), hairline=float(rng.uniform(0.42, 0.62)),
        hair_volume=float(rng.uniform(0.04, 0.16)), hair_length=float(rng.uniform(0.9, 1.8)),
        glasses=bool(rng.random() < 0.15), glasses_colour=_clr(rng.choice([20, 60, 120, 180], 3)),
        clothes=_clr(rng.uniform(15, 230, 3)), shoulder_w=float(rng.uniform(0.36, 0.5)),
        background=bg_kind, bg_colours=(_clr(bg1), _clr(bg2)), bg_seed=int(rng.integers(2**31)),
        light_angle=float(rng.uniform(0, 2 * np.pi)), light_strength=float(rng.uniform(0.05, 0.22)),
        blush=float(rng.uniform(0, 0.35)),
    )


def _background(p: FaceParams, R: int) -> np.ndarray:
    """(R, R, 3) float32 background."""
    rng = np.random.default_rng(p.bg_seed)
    c1, c2 = np.array(p.bg_colours[0], np.float32), np.array(p.bg_colours[1], np.float32)
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32) / R
    if p.background == "solid":
        t = np.zeros_like(xx)
    elif p.background == "vgrad":
        t = yy
    elif p.background == "hgrad":
        t = xx
    elif p.background == "radial":
        t = np.clip(np.hypot(xx - 0.5, yy - 0.4) * 1.6, 0, 1)
    elif p.background == "texture":
        from skimage import data

        tex = [data.brick, data.grass, data.gravel][int(rng.integers(3))]()  # (512, 512) uint8 textures
        y0, x0 = rng.integers(0, 512 - 256, 2)
        from PIL import Image, ImageFilter

        im = Image.fromarray(tex[y0:y0 + 256, x0:x0 + 256]).resize((R, R), Image.BILINEAR)
        im = im.filter(ImageFilter.GaussianBlur(R / 128 * float(rng.uniform(0.5, 2.5))))  # out of focus
        t = (np.asarray(im, np.float32) / 255 - 0.5) * float(rng.uniform(0.4, 1.0)) + 0.5
    else:  # blobs: out-of-focus lights
        t = np.zeros_like(xx)
        for _ in range(int(rng.integers(5, 14))):
            bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            t += float(rng.uniform(0.3, 1.0)) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * br ** 2))
        t = np.clip(t, 0, 1)
    bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
    bg += rng.normal(0, 1.5, bg.shape).astype(np.float32)  # sensor grain, fixed per clip
    return bg


class ProceduralFace:
    """Draws one procedural identity; `frame(...)` renders one video frame at `size`."""

    def __init__(self, params: FaceParams, size: int) -> None:
        from PIL import Image

        self.p = p = params
        self.size = size
        self.R = R = 2 * size  # supersampled canvas, downsampled once per frame
        self.ss = R  # fractions -> canvas pixels
        self.background = self._draw_body(_background(p, R))  # (R, R, 3) uint8: background, neck, shoulders
        head = self._draw_head()  # (R, R, 4) uint8, no mouth and no eyelid motion
        self.head = Image.fromarray(head, "RGBA")
        a, b = p.a * R, p.b * R
        cx, cy = p.cx * R, p.cy * R
        self.mouth = MouthGeometry(cx=cx, seam=cy + p.mouth_y * b, width=p.mouth_w * a, max_gap=p.gap_max * p.mouth_w * a,
                                   up_share=0.3, reach_up=0.25 * b, reach_down=1.2 * (b - p.mouth_y * b),
                                   jaw_half=0.8 * a)
        # The jaw warp only touches rows below the mouth and columns within the jaw: cache that window.
        m = self.mouth
        self._jaw_rows = (int(max(0, m.seam - m.reach_up - 2)), R)
        self._jaw_cols = (int(max(0, cx - m.jaw_half - 2)), int(min(R, cx + m.jaw_half + 2)))
        self.shade_mouth = self._shade_at(cx, m.seam)
        self.shade_eyes = self._shade_at(cx, cy + p.eye_y * b)

    # -- static layers ----------------------------------------------------------------------------

    def _shade_at(self, x: float, y: float) -> float:
        p, R = self.p, self.R
        u, v = (x - p.cx * R) / (p.a * R), (y - p.cy * R) / (p.b * R)
        s = 1 + p.light_strength * (u * math.cos(p.light_angle) + v * math.sin(p.light_angle))
        return float(np.clip(s - 0.18 * (u * u + v * v) ** 2, 0.55, 1.25))

    def _outline(self, grow: float = 0.0, n: int = 160) -> list[tuple[float, float]]:
        """Head outline polygon (superellipse skull, tapered jaw) in canvas pixels."""
        p, R = self.p, self.R
        a, b = (p.a + grow) * R, (p.b + grow) * R
        pts = []
        for th in np.linspace(0, 2 * np.pi, n, endpoint=False):
            c, s = math.cos(th), math.sin(th)
            power = p.chin_power if s > 0 else p.top_power
            x = math.copysign(abs(c) ** (2 / power), c)
            y = math.copysign(abs(s) ** (2 / power), s)
            if y > 0:
                x *= 1 - p.jaw_taper * y * y
            pts.append((p.cx * R + a * x, p.cy * R + b * y))
        return pts

    def _draw_body(self, bg: np.ndarray) -> np.ndarray:
        from PIL import Image, ImageDraw

        p, R = self.p, self.R
        im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        d = ImageDraw.Draw(im)
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        neck = tuple(int(c * 0.82) for c in p.skin)
        if p.hair_style in ("long", "bob", "afro", "curly"):
            self._draw_back_hair(d)
        d.ellipse((cx - p.shoulder_w * R, cy + 0.95 * b, cx + p.shoulder_w * R, cy + 0.95 * b + 0.7 * R), fill=p.clothes)
        d.rectangle((cx - 0.55 * a, cy, cx + 0.55 * a, cy + 1.25 * b), fill=neck)  # reaches up behind the head
        d.pieslice((cx - 0.55 * a, cy + 0.8 * b, cx + 0.55 * a, cy + 1.45 * b), 0, 180, fill=neck)  # neckline
        return np.asarray(im, np.uint8)

    def _draw_back_hair(self, d: Any) -> None:
        p, R = self.p, self.R
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        v = p.hair_volume * R
        if p.hair_style in ("long", "bob"):
            # The skull's outline grown by the hair volume, then straight down (slightly flared) to the ends.
            grow = p.hair_volume * 1.6
            outline = self._outline(grow, n=160)
            top = outline[80:] + outline[:1]  # angles pi..2pi: left ear, over the crown, right ear
            end = cy + (p.hair_length if p.hair_style == "long" else 0.55) * b
            half = (a + grow * R) * (1.12 if p.hair_style == "long" else 1.0)
            ends = [(cx + half * math.cos(t), end + 0.08 * b * math.sin(t)) for t in np.linspace(0, np.pi, 12)]
            d.polygon(top + ends, fill=p.hair_colour)  # crown left -> right, then the ends right -> left
        elif p.hair_style == "afro":
            r = a + 3 * v + 0.05 * R
            d.ellipse((cx - r, cy - 0.25 * b - r, cx + r, cy - 0.25 * b + r * 1.05), fill=p.hair_colour)
        elif p.hair_style == "curly":
            rng = np.random.default_rng(p.bg_seed + 1)
            for _ in range(40):
                ang = rng.uniform(np.pi * 0.9, np.pi * 2.1)
                rr = rng.uniform(0.9, 1.1)
                x, y = cx + (a + v) * rr * math.cos(ang), cy - 0.05 * b + (b + v) * rr * math.sin(ang)
                r = rng.uniform(0.25, 0.45) * a
                d.ellipse((x - r, y - r, x + r, y + r), fill=p.hair_colour)

    def _draw_head(self) -> np.ndarray:
        from PIL import Image, ImageDraw, ImageFilter

        p, R = self.p, self.R
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        im = Image.new("RGBA", (R, R), (0, 0, 0, 0))
        d = ImageDraw.Draw(im)
        ear_col = tuple(int(c * 0.9) for c in p.skin) + (255,)
        ey = cy + p.eye_y * b
        for side in (-1, 1):  # ears, behind the head outline
            ex = cx + side * 0.96 * a
            d.ellipse((ex - 0.16 * a, ey - 0.05 * b, ex + 0.16 * a, ey + 0.35 * b), fill=ear_col)
        d.polygon(self._outline(), fill=p.skin + (255,))
        if p.hair_style == "bun":
            r = 0.4 * a
            d.ellipse((cx - r, cy - b - 1.4 * r, cx + r, cy - b + 0.4 * r), fill=p.hair_colour + (255,))
        # Cheek blush (soft) and skin grain.
        arr = np.asarray(im, np.float32).copy()
        yy, xx = np.mgrid[0:R, 0:R].astype(np.float32)
        for side in (-1, 1):
            g = np.exp(-(((xx - cx - side * 0.55 * a) / (0.22 * a)) ** 2 + ((yy - cy - 0.25 * b) / (0.16 * b)) ** 2))
            arr[..., :3] += (p.blush * g)[..., None] * (np.array([200, 60, 60], np.float32) - arr[..., :3]) * 0.35
        arr[..., :3] += np.random.default_rng(p.bg_seed + 2).normal(0, 2.0, (R, R, 1)).astype(np.float32)
        self._draw_front_hair(arr, xx, yy)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")
        d = ImageDraw.Draw(im)
        self._draw_eyes_static(d)
        self._draw_brows_nose(d)
        if p.glasses:
            self._draw_glasses(d)
        arr = np.asarray(im, np.float32).copy()
        # Lighting: a directional gradient plus darker edges (a rounded head), over everything drawn.
        u, v = (xx - cx) / a, (yy - cy) / b
        shade = 1 + p.light_strength * (u * math.cos(p.light_angle) + v * math.sin(p.light_angle))
        shade = np.clip(shade - 0.18 * (u * u + v * v) ** 2, 0.55, 1.25)
        arr[..., :3] *= shade[..., None]
        soft = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA").filter(ImageFilter.SMOOTH)
        return np.asarray(soft, np.uint8)

    def _draw_front_hair(self, arr: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
        p, R = self.p, self.R
        if p.hair_style == "bald":
            return
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        v = p.hair_volume * a * 2
        u = (xx - cx) / a
        cap = ((xx - cx) / (a + v)) ** 2 + ((yy - cy + 0.02 * b) / (b + 0.6 * v)) ** 2 < 1
        line = cy - p.hairline * b + 0.35 * b * u ** 2  # hairline, lower at the temples
        if p.hair_style == "fringe":
            line = cy - 0.32 * b + 0.03 * b * np.sin(u * 14) + 0.25 * b * u ** 4
        elif p.hair_style == "side_part":
            line = line + 0.1 * b * u
        elif p.hair_style in ("long", "bob"):
            line = np.where(np.abs(u) > 0.78, cy + 0.35 * b, line)  # hair falls beside the face
        mask = cap & (yy < line)
        if p.hair_style in ("long", "bob", "afro", "curly"):
            mask |= cap & (np.abs(u) > 0.86) & (yy < cy + 0.45 * b)
        alpha = 0.55 if p.hair_style == "buzz" else 1.0
        colour = np.array(p.hair_colour, np.float32)
        strands = 1 + 0.08 * np.sin(xx * 0.9 + 3 * np.sin(yy * 0.05)) * (p.hair_style != "buzz")
        hair = colour * strands[..., None]
        m = mask[..., None] * alpha
        arr[..., :3] = arr[..., :3] * (1 - m) + hair * m
        arr[..., 3] = np.maximum(arr[..., 3], mask * 255)

    def _eye_boxes(self) -> list[tuple[float, float, float, float]]:
        p, R = self.p, self.R
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        ew, eh = p.eye_w * a, p.eye_w * a * p.eye_h
        ey = cy + p.eye_y * b
        return [(cx + s * p.eye_dx * a - ew / 2, ey - eh / 2, cx + s * p.eye_dx * a + ew / 2, ey + eh / 2) for s in (-1, 1)]

    def _draw_eyes_static(self, d: Any) -> None:
        p = self.p
        for x0, y0, x1, y1 in self._eye_boxes():
            ex, ey, ew, eh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            d.ellipse((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=tuple(int(c * 0.75) for c in p.skin))  # socket
            d.ellipse((x0, y0, x1, y1), fill=(238, 236, 230))
            ir = p.iris_size * eh
            ix, iy = ex + p.gaze[0] * ew, ey + p.gaze[1] * eh
            d.ellipse((ix - ir, iy - ir, ix + ir, iy + ir), fill=p.iris)
            d.ellipse((ix - ir * 0.45, iy - ir * 0.45, ix + ir * 0.45, iy + ir * 0.45), fill=(12, 10, 10))
            hl = max(1.0, ir * 0.22)
            d.ellipse((ix + ir * 0.2, iy - ir * 0.5, ix + ir * 0.2 + hl, iy - ir * 0.5 + hl), fill=(250, 250, 250))
            d.arc((x0, y0, x1, y1), 200, 340, fill=(30, 22, 20), width=max(1, round(self.R / 160)))  # upper lash

    def _draw_brows_nose(self, d: Any) -> None:
        p, R = self.p, self.R
        cx, cy, a, b = p.cx * R, p.cy * R, p.a * R, p.b * R
        for s, (x0, y0, x1, y1) in zip((-1, 1), self._eye_boxes()):
            eh = y1 - y0
            inner_x, outer_x = (x1, x0) if s < 0 else (x0, x1)
            base = (y0 + y1) / 2 - p.brow_raise * eh
            pts = [(inner_x + s * -0.05 * (x1 - x0), base + 0.1 * eh),
                   ((x0 + x1) / 2, base - 0.25 * eh),
                   (outer_x + s * 0.12 * (x1 - x0), base - p.brow_tilt * eh)]
            d.line(pts, fill=p.brow_colour, width=max(1, round(p.brow_thickness * b)), joint="curve")
        ey = cy + p.eye_y * b
        tip = ey + p.nose_len * b
        nw = p.nose_w * a
        dark = tuple(int(c * 0.72) for c in p.skin)
        mid = tuple(int(c * 0.86) for c in p.skin)
        d.line([(cx - 0.12 * nw, ey + 0.15 * b), (cx - 0.3 * nw, tip - 0.05 * b)], fill=mid, width=max(1, round(R / 128)))
        d.ellipse((cx - 0.5 * nw, tip - 0.1 * b, cx + 0.5 * nw, tip + 0.06 * b), fill=mid)
        d.ellipse((cx - 0.32 * nw, tip - 0.12 * b, cx + 0.32 * nw, tip + 0.03 * b), fill=p.skin)
        for s in (-1, 1):
            d.ellipse((cx + s * 0.28 * nw - 0.1 * nw, tip - 0.01 * b, cx + s * 0.28 * nw + 0.1 * nw, tip + 0.04 * b), fill=dark)

    def _draw_glasses(self, d: Any) -> None:
        p = self.p
        boxes = self._eye_boxes()
        w = max(1, round(self.R / 110))
        for x0, y0, x1, y1 in boxes:
            ex, ey, ew = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
            r = 0.75 * ew
            d.rounded_rectangle((ex - r, ey - 0.55 * r, ex + r, ey + 0.6 * r), radius=0.3 * r,
                                outline=p.glasses_colour, width=w)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
        d.line([(ax1 + 0.25 * (ax1 - ax0), (ay0 + ay1) / 2 - 0.1 * (ax1 - ax0)),
                (bx0 - 0.25 * (bx1 - bx0), (by0 + by1) / 2 - 0.1 * (bx1 - bx0))], fill=p.glasses_colour, width=w)

    # -- per frame --------------------------------------------------------------------------------

    def _jaw(self, head: np.ndarray, opening: float) -> np.ndarray:
        """Drop the jaw (chin and lower face) for this opening: warps a window of the head layer."""
        if opening <= 0.01:
            return head
        r0, r1 = self._jaw_rows
        c0, c1 = self._jaw_cols
        Y, X = np.mgrid[r0:r1, c0:c1].astype(np.float32)
        SX, SY, _, _ = mouth_map(X, Y, self.mouth, opening, 0.5, 0.0)
        out = head.copy()
        out[r0:r1, c0:c1] = _bilinear(head, SX, SY)
        return out

    def _draw_mouth(self, d: Any, opening: float, width: float, rounding: float) -> None:
        p, m = self.p, self.mouth
        shade = self.shade_mouth
        lip = tuple(int(c * shade) for c in p.lip_colour)
        w = m.width * (0.88 + 0.24 * width - 0.3 * rounding)
        gap = opening * m.max_gap
        tu = p.lip_upper * m.width * (1 + 0.5 * rounding)
        tl = p.lip_lower * m.width * (1 + 0.5 * rounding)
        s = np.linspace(-1, 1, 25)
        env = (1 - s ** 2) ** 0.6
        yc = m.seam - p.smile * m.width * 0.12 * (s ** 2 - 0.3)
        xs = m.cx + s * w / 2
        bow = 1 - 0.25 * np.exp(-(s / 0.15) ** 2)  # cupid's bow dip in the upper lip
        upper_out = yc - (m.up_share * gap * env + tu * env * bow)
        upper_in = yc - m.up_share * gap * env
        lower_in = yc + (1 - m.up_share) * gap * env
        lower_out = yc + (1 - m.up_share) * gap * env + tl * env
        d.polygon(list(zip(xs, upper_out)) + list(zip(xs[::-1], lower_out[::-1])), fill=lip)
        if gap > 0.6:
            inner_x = m.cx + s * w / 2 * 0.92
            d.polygon(list(zip(inner_x, upper_in)) + list(zip(inner_x[::-1], lower_in[::-1])),
                      fill=tuple(int(c * shade) for c in (58, 20, 26)))
            tooth_h = min(0.4 * gap, 0.1 * m.width)
            sel = np.abs(s) <= 0.7
            d.polygon(list(zip(inner_x[sel], upper_in[sel])) +
                      list(zip(inner_x[sel][::-1], np.minimum(upper_in[sel] + tooth_h, lower_in[sel])[::-1])),
                      fill=tuple(int(c * shade) for c in (228, 222, 210)))
            if gap > 0.2 * m.width:
                tongue_top = lower_in - 0.25 * gap * env
                d.polygon(list(zip(inner_x[sel], tongue_top[sel])) + list(zip(inner_x[sel][::-1], lower_in[sel][::-1])),
                          fill=tuple(int(c * shade) for c in (160, 66, 74)))
        else:
            d.line(list(zip(xs, yc)), fill=tuple(int(c * 0.55) for c in lip), width=max(1, round(self.R / 170)))

    def _draw_lids(self, d: Any, blink: float) -> None:
        p = self.p
        lid = tuple(int(c * 0.93 * self.shade_eyes) for c in p.skin)
        cover = p.lid_rest + (1 - p.lid_rest) * blink  # 0 = lid at the top of the eye, 1 = closed
        for x0, y0, x1, y1 in self._eye_boxes():
            s = float(np.clip(2 * cover - 1, -1, 1))  # lid line height within the ellipse, -1 top .. 1 bottom
            ang = math.degrees(math.asin(s))
            d.chord((x0, y0, x1, y1), 180 - ang, 360 + ang, fill=lid)
            ly = (y0 + y1) / 2 + s * (y1 - y0) / 2
            half = (x1 - x0) / 2 * math.sqrt(max(0.0, 1 - s * s))
            ex = (x0 + x1) / 2
            d.line([(ex - half, ly), (ex + half, ly)], fill=(30, 22, 20), width=max(1, round(self.R / 160)))

    def frame(self, opening: float, width: float, rounding: float, blink: float, pose: np.ndarray) -> np.ndarray:
        """One (size, size, 3) uint8 frame."""
        from PIL import Image, ImageDraw

        head = np.asarray(self.head, np.float32)
        head = self._jaw(head, opening)
        im = Image.fromarray(np.clip(head, 0, 255).astype(np.uint8), "RGBA")
        d = ImageDraw.Draw(im)
        self._draw_mouth(d, opening, width, rounding)
        self._draw_lids(d, blink)
        im = im.transform(im.size, Image.AFFINE, _inverse_affine(pose, self.p.cx * self.R,
                                                                 (self.p.cy + 0.6 * self.p.b) * self.R, self.R / self.size),
                          resample=Image.BICUBIC)
        bg = Image.fromarray(self.background, "RGB").convert("RGBA")
        out = Image.alpha_composite(bg, im).convert("RGB").resize((self.size, self.size), Image.BOX)
        return np.asarray(out, np.uint8)

    def boxes(self) -> tuple[list[int], list[int]]:
        """Rest-pose (face box, mouth box) as [x, y, w, h] in output pixels."""
        p, k = self.p, self.size
        fx, fy = (p.cx - p.a) * k, (p.cy - p.b * 0.75) * k
        face = [fx, fy, 2 * p.a * k, 1.75 * p.b * k]
        m, f = self.mouth, self.size / self.R
        mouth = [(m.cx - 0.6 * m.width) * f, (m.seam - 0.25 * m.width) * f, 1.2 * m.width * f,
                 (0.5 * m.width + m.max_gap) * f]
        return [round(v) for v in face], [round(v) for v in mouth]


def _inverse_affine(pose: np.ndarray, px: float, py: float, px_per_unit: float) -> tuple[float, ...]:
    """Pillow AFFINE data (output -> input) for rotation `roll` and zoom about (px, py), then translation."""
    tx, ty, roll, zoom = (float(v) for v in pose)
    tx, ty = tx * px_per_unit, ty * px_per_unit
    th = math.radians(roll)
    c, s = math.cos(th) / zoom, math.sin(th) / zoom
    # forward: q = P + zoom * Rot(th) (p - P) + t ;  inverse: p = P + Rot(-th)/zoom (q - P - t)
    a, b, d, e = c, s, -s, c
    ox, oy = px + tx, py + ty
    return (a, b, px - a * ox - b * oy, d, e, py - d * ox - e * oy)


# ------------------------------------------------------------------------------------------------
# Real photographs
# ------------------------------------------------------------------------------------------------

# Landmarks measured by hand on the original photo, in its pixels: mouth centre and lip seam, mouth
# width, chin; eye centres with eye width and height. Only photos whose face face.detect_face finds
# are listed (see docs/data.md for what else scikit-image ships and why it is not used).
PHOTO_LANDMARKS: dict[str, dict[str, Any]] = {
    "astronaut": {  # skimage.data.astronaut(): Eileen Collins, NASA portrait, public domain
        "mouth": (224.0, 147.5), "mouth_width": 42.0, "chin_y": 186.0, "nose_y": 130.0,
        "eyes": [(204.0, 100.0), (247.0, 103.5)], "eye_size": (15.0, 7.0),
    },
}


def real_photos() -> list[str]:
    """Names of the real photos the corpus animates."""
    return sorted(PHOTO_LANDMARKS)


@lru_cache(maxsize=4)
def _load_photo(name: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The photo (H, W, 3) uint8 and its detected face box; InputError if the face is not found."""
    from skimage import data

    from ..face import detect_face

    image = np.ascontiguousarray(getattr(data, name)())
    return image, detect_face(image, name=f"skimage.data.{name}")


class PhotoFace:
    """Animates a real photo: crop + augmentation, lip parting and jaw drop by warping, eyelid slide."""

    def __init__(self, identity: dict[str, Any], size: int) -> None:
        from PIL import Image

        aug = identity["augment"]
        self.aug = aug
        self.size = size
        self.R = R = 2 * size
        image, (x, y, w, h) = _load_photo(identity["photo"])
        lm = PHOTO_LANDMARKS[identity["photo"]]
        side = max(w, h) * (1 + 2 * aug["margin"])
        cx0 = x + w / 2 + aug["shift"][0] * side
        cy0 = y + h / 2 + aug["shift"][1] * side
        x0, y0 = cx0 - side / 2, cy0 - side / 2
        scale = R / side
        # Crop with replicated borders, resampled straight to the canvas.
        pad = int(side)
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        box = (x0 + pad, y0 + pad, x0 + pad + side, y0 + pad + side)
        crop = np.asarray(Image.fromarray(padded).resize((R, R), Image.LANCZOS, box=box), np.float32)
        flip = aug["flip"]
        if flip:
            crop = crop[:, ::-1].copy()

        def to_canvas(px: float, py: float) -> tuple[float, float]:
            cx_, cy_ = (px - x0) * scale, (py - y0) * scale
            return (R - 1 - cx_ if flip else cx_), cy_

        self.image = crop  # (R, R, 3) float32
        mx, my = to_canvas(*lm["mouth"])
        mw = lm["mouth_width"] * scale
        chin = (lm["chin_y"] - lm["mouth"][1]) * scale
        nose = (lm["mouth"][1] - lm["nose_y"]) * scale
        self.mouth = MouthGeometry(cx=mx, seam=my, width=mw, max_gap=0.42 * mw, up_share=0.3,
                                   reach_up=0.8 * nose, reach_down=1.3 * chin, jaw_half=0.9 * mw)
        self.eyes = [to_canvas(*e) for e in lm["eyes"]]
        self.eye_size = (lm["eye_size"][0] * scale, lm["eye_size"][1] * scale)
        fx, fy = to_canvas(x + w / 2, y + h / 2)
        self.face_centre = (fx, fy)
        self.face_side = max(w, h) * scale
        Y, X = np.mgrid[0:R, 0:R].astype(np.float32)
        self.X, self.Y = X, Y
        # Head-motion weight: 1 over the head, fading out to the background and the shoulders.
        hx, hy = fx, fy - 0.1 * self.face_side
        r = np.hypot((X - hx) / (0.85 * self.face_side), (Y - hy) / (1.0 * self.face_side))
        self.head_weight = _fall(r - 0.7, 0.6).astype(np.float32)
        self.pivot = (fx, fy + 0.6 * self.face_side)
        self.colour = self._colour_transform()

    def _colour_transform(self) -> tuple[np.ndarray, np.ndarray]:
        """Augmentation as rgb' = (rgb @ M.T + c), then gamma; returns (M, c)."""
        a = self.aug
        lum = np.array([0.299, 0.587, 0.114])
        sat = a["saturation"] if not a["grayscale"] else 0.0
        M = sat * np.eye(3) + (1 - sat) * np.tile(lum, (3, 1))  # saturation about luminance
        M = np.diag(a["gains"]) @ M * a["contrast"] * a["brightness"]
        c = np.full(3, 128.0 * (1 - a["contrast"]) * a["brightness"])
        return M.astype(np.float32), c.astype(np.float32)

    def frame(self, opening: float, width: float, rounding: float, blink: float, pose: np.ndarray) -> np.ndarray:
        from PIL import Image

        X, Y, R = self.X, self.Y, self.R
        # 1. head motion: undo the pose where the head is (backward map, weighted), keep the background.
        tx, ty, roll, zoom = (float(v) for v in pose)
        k = R / self.size
        px, py = self.pivot
        th = math.radians(roll)
        c, s = math.cos(th) / zoom, math.sin(th) / zoom
        qx, qy = X - px - tx * k, Y - py - ty * k
        HX = px + c * qx + s * qy
        HY = py - s * qx + c * qy
        wgt = self.head_weight
        X1 = X + wgt * (HX - X)
        Y1 = Y + wgt * (HY - Y)
        # 2. lips and jaw, in the face's own coordinates.
        SX, SY, interior, depth = mouth_map(X1, Y1, self.mouth, opening, width, rounding)
        # 3. eyelids slide down over the eyes.
        ew, eh = self.eye_size
        for ex, ey in self.eyes:
            if blink <= 0.02:
                break
            prof = _lens(X1 - ex, 0.6 * ew, 0.5)
            top = ey - 0.5 * eh
            lid = top + blink * eh * prof
            sel = (Y1 < lid) & (prof > 0)
            SY = np.where(sel, SY - blink * eh * prof * _fall(lid - Y1, 1.5 * eh), SY)
        rgb = _bilinear(self.image, SX, SY)
        if blink > 0.1:  # lash line along the lid edge
            for ex, ey in self.eyes:
                prof = _lens(X1 - ex, 0.55 * ew, 0.5)
                lid = ey - 0.5 * eh + blink * eh * prof
                dark = 0.45 * blink * prof * np.exp(-((Y1 - lid) / (0.12 * eh + 0.6)) ** 2)
                rgb *= (1 - dark)[..., None]
        rgb = paint_interior(rgb, interior, depth, X1, self.mouth, opening, teeth=None)
        small = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((self.size, self.size), Image.BOX)
        M, cvec = self.colour
        out = np.asarray(small, np.float32) @ M.T + cvec
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** self.aug["gamma"]
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def boxes(self) -> tuple[list[int], list[int]]:
        f = self.size / self.R
        fx, fy = self.face_centre
        s = self.face_side
        face = [(fx - s / 2) * f, (fy - s / 2) * f, s * f, s * f]
        m = self.mouth
        mouth = [(m.cx - 0.6 * m.width) * f, (m.seam - 0.25 * m.width) * f, 1.2 * m.width * f,
                 (0.5 * m.width + m.max_gap) * f]
        return [round(v) for v in face], [round(v) for v in mouth]


# ------------------------------------------------------------------------------------------------
# One clip
# ------------------------------------------------------------------------------------------------


def render_clip(spec: ClipSpec) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one clip: frames (N, S, S, 3) uint8, audio (n,) float32 at 16 kHz, metadata dict.

    N = ceil(n / 640); frame i shows the mouth for audio samples [640 i, 640 (i + 1)).
    """
    audio, phrases = synthesize_speech(spec)
    n = spec.num_frames
    params = mouth_parameters(audio, n, phrases)
    rng = _rng(spec.seed, "motion", spec.index)
    blink = blink_track(n, rng) if spec.blinks else np.zeros(n)
    pose = head_track(n, spec.size, rng, params["opening"], spec.motion_scale)
    identity = dict(spec.identity)
    if identity["kind"] == "procedural":
        face_params = sample_face(identity["seed"])
        face: ProceduralFace | PhotoFace = ProceduralFace(face_params, spec.size)
        identity["params"] = dataclasses.asdict(face_params)
    else:
        face = PhotoFace(identity, spec.size)
    frames = np.empty((n, spec.size, spec.size, 3), np.uint8)
    for i in range(n):
        frames[i] = face.frame(float(params["opening"][i]), float(params["width"][i]),
                               float(params["rounding"][i]), float(blink[i]), pose[i])
    face_box, mouth_box = face.boxes()

    def r3(v: np.ndarray) -> list[float]:
        return [round(float(x), 3) for x in v]

    meta = {
        "clip": spec.name,
        "split": spec.split,
        "spec_digest": spec.digest(),
        "generator_version": GENERATOR_VERSION,
        "identity": identity,
        "voice": spec.voice,
        "language": spec.voice["language"],
        "text": " ".join(p["text"] for p in phrases),
        "phrases": phrases,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "size": spec.size,
        "num_frames": n,
        "num_samples": len(audio),
        "seconds": round(len(audio) / SAMPLE_RATE, 4),
        "face_box": face_box,  # [x, y, w, h] output pixels, rest pose
        "mouth_box": mouth_box,  # [x, y, w, h] output pixels, rest pose, covers the fully open mouth
        "frames": {
            "speech": [int(v) for v in params["speech"]],
            "opening": r3(params["opening"]),
            "width": r3(params["width"]),
            "rounding": r3(params["rounding"]),
            "blink": r3(blink),
            "head_pose": [[round(float(v), 3) for v in row] for row in pose],  # tx px, ty px, roll deg, zoom
        },
        "spec": spec.to_dict(),
    }
    return frames, audio, meta


def _clip_done(spec: ClipSpec, out_dir: Path) -> dict[str, Any] | None:
    """The clip's metadata if its mp4 and json exist and were made from this exact spec."""
    js, mp4 = out_dir / f"{spec.name}.json", out_dir / f"{spec.name}.mp4"
    if not (js.exists() and mp4.exists()):
        return None
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("spec_digest") == spec.digest() else None


def write_clip(spec: ClipSpec, out_dir: str | Path) -> dict[str, Any]:
    """Render and write clip_XXXXX.mp4 + clip_XXXXX.json (skipped when already complete); returns meta."""
    from ..media import VideoWriter

    out_dir = Path(out_dir)
    done = _clip_done(spec, out_dir)
    if done is not None:
        return done
    frames, audio, meta = render_clip(spec)
    with VideoWriter(out_dir / f"{spec.name}.mp4", spec.size, fps=FPS, sample_rate=SAMPLE_RATE, preset="fast") as w:
        for i, frame in enumerate(frames):
            w.write_frame(frame)
            w.write_audio(audio[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME])
    _write_json_atomic(out_dir / f"{spec.name}.json", meta)  # written last: its presence marks completion
    return meta


def _write_json_atomic(path: Path, obj: Any) -> None:
    from ..media import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=1), "choose another output directory")


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------


def _write_clip_job(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
    spec_dict, out_dir = job
    return write_clip(ClipSpec(**spec_dict), out_dir)


def synthesize_corpus(out_dir: str | Path, num_clips: int, seconds_range: tuple[float, float] = (3, 8),
                      size: int = 128, seed: int = 0, real_photo_fraction: float = 0.3, workers: int = 1,
                      progress: bool = True, only: dict[str, int | None] | None = None) -> Path:
    """Write num_clips clips and manifest.json into out_dir; returns the manifest's path.

    Resumable: clips whose mp4 + json already exist for the same spec are kept. `workers` > 1 renders
    clips in that many processes. `only` {split: most clips or None for all} writes just those clips of the
    num_clips planned (each the clip the whole corpus would hold) and a manifest of them: e.g. a held-aside test
    set, with a few train clips for the eval's mouth probe, without rendering the rest.
    """
    from tqdm import tqdm

    if num_clips < 1:
        raise InputError(f"--clips {num_clips}: give at least 1")
    if workers < 1:
        raise InputError(f"--workers {workers}: give at least 1")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create '{out}': {e.strerror or e}; choose another output directory") from e
    remove_abandoned_partials(out)  # what a killed run was writing (its clips are made again below)
    specs = make_clip_specs(num_clips, seconds_range, size, seed, real_photo_fraction)
    if only is not None:
        unknown = set(only) - set(SPLITS)
        if unknown:
            raise InputError(f"--only {', '.join(sorted(unknown))}: the splits are {', '.join(SPLITS)}")
        chosen = []
        for split, most in only.items():
            chosen += [c for c in specs if c.split == split][:most]
        specs = sorted(chosen, key=lambda c: c.index)
        if not specs:
            raise InputError(f"--only {', '.join(only)}: none of the {num_clips} clips planned is in those splits; "
                             "plan more with --clips")
        _refuse_to_shrink(out / "manifest.json", {c.name for c in specs})
    for name in {s.identity.get("photo") for s in specs} - {None}:
        _load_photo(name)  # fail early (and once) if a real photo's face is not found
    metas: dict[int, dict[str, Any]] = {}
    todo = []
    for s in specs:
        done = _clip_done(s, out)
        if done is not None:
            metas[s.index] = done
        else:
            todo.append(s)
    bar = tqdm(total=len(specs), initial=len(metas), desc="synth clips", unit="clip", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for s in todo:
                metas[s.index] = write_clip(s, out)
                bar.update(1)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                jobs = [(s.to_dict(), str(out)) for s in todo]
                for meta in pool.imap_unordered(_write_clip_job, jobs):
                    metas[meta["spec"]["index"]] = meta
                    bar.update(1)
    except KeyboardInterrupt:  # Ctrl-C or a `kill`: the clips finished are whole, and a rerun goes on from them
        raise Stopped(f"stopped with {len(metas)} of {len(specs)} clips written to '{out}' (no manifest.json yet); "
                      "the same command goes on from them") from None
    finally:
        bar.close()
    manifest = build_manifest(specs, metas, seconds_range, size, seed, real_photo_fraction)
    path = out / "manifest.json"
    _write_json_atomic(path, manifest)
    return path


def _refuse_to_shrink(manifest: Path, names: set[str]) -> None:
    """InputError when `manifest` (a corpus already in the folder) lists clips outside `names`: writing a manifest
    of `names` alone (--only) would drop them from the corpus its training runs read."""
    try:
        listed = {c["name"] for c in json.loads(manifest.read_text())["clips"]}
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"'{manifest}' is not a corpus manifest ({type(e).__name__}: {e}); give --only an empty "
                         "or new folder") from None
    dropped = listed - names
    if dropped:
        raise InputError(f"'{manifest.parent}' already holds a corpus of {len(listed)} clips; --only would drop "
                         f"{len(dropped)} of them from its manifest: write the selection to a new folder")


def build_manifest(specs: list[ClipSpec], metas: dict[int, dict[str, Any]], seconds_range: tuple[float, float],
                   size: int, seed: int, real_photo_fraction: float) -> dict[str, Any]:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    identities: dict[str, set[str]] = {s: set() for s in SPLITS}
    voices: dict[str, set[str]] = {s: set() for s in SPLITS}
    clips = []
    for spec in specs:
        meta = metas[spec.index]
        splits[spec.split].append(spec.name)
        identities[spec.split].add(spec.identity["id"])
        voices[spec.split].add(spec.voice["name"])
        clips.append({"name": spec.name, "split": spec.split, "video": f"{spec.name}.mp4",
                      "meta": f"{spec.name}.json", "identity": spec.identity["id"], "kind": spec.identity["kind"],
                      "voice": spec.voice["name"], "language": spec.voice["language"],
                      "num_frames": meta["num_frames"], "seconds": meta["seconds"],
                      "spec_digest": spec.digest()})  # the reader checks each clip's json against it
    return {
        "format": "letstalk-synth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "num_clips": len(specs),
        "seconds_range": list(seconds_range),
        "real_photo_fraction": real_photo_fraction,
        "real_photos": [f"skimage.data.{n}" for n in real_photos()],
        "total_seconds": round(sum(c["seconds"] for c in clips), 2),
        "splits": splits,
        "identities": {s: sorted(v) for s, v in identities.items()},
        "voices": {s: sorted(v) for s, v in voices.items()},
        "voice_pool": {s: [f"{lang}+{var}" if var else lang for lang, var in pool]
                       for s, pool in split_voices(seed).items()},
        "clips": clips,
    }


# ------------------------------------------------------------------------------------------------
# CLI: `letstalk data synth`
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (created; resumable)")
    parser.add_argument("--clips", type=int, default=1000, help="number of clips (default 1000)")
    parser.add_argument("--seconds", type=float, nargs=2, default=(3.0, 8.0), metavar=("MIN", "MAX"),
                        help="clip duration range in seconds (default 3 8)")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels, even (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed; the same seed gives the same corpus")
    parser.add_argument("--real-photo-fraction", type=float, default=0.3,
                        help="share of training clips animating a real photo instead of a drawn face (default 0.3)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering clips (default 1)")
    parser.add_argument("--only", action="append", type=_only, metavar="SPLIT[:N]",
                        help="write only this split's clips of the --clips planned (at most N of them); repeat for "
                             "more splits, e.g. a held-aside test set: --seed 1 --only test --only train:120 (the "
                             "eval's mouth probe is fitted on train clips)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _only(text: str) -> tuple[str, int | None]:
    split, _, most = text.partition(":")
    if split not in SPLITS or (most and not (most.isdigit() and int(most) > 0)):
        raise argparse.ArgumentTypeError(f"{text!r}: give SPLIT or SPLIT:N, SPLIT one of {', '.join(SPLITS)}, N >= 1")
    return split, int(most) if most else None


def main(args: argparse.Namespace) -> None:
    import time

    start = time.perf_counter()
    path = synthesize_corpus(args.out, args.clips, tuple(args.seconds), args.size, args.seed,
                             args.real_photo_fraction, args.workers, progress=not args.quiet,
                             only=dict(args.only) if args.only else None)
    manifest = json.loads(path.read_text())
    counts = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
    print(f"wrote {manifest['num_clips']} clips ({counts}; {manifest['total_seconds'] / 60:.1f} min of video) "
          f"to {path.parent} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="letstalk data synth", description=__doc__.split("\n")[0])
    add_arguments(p)
    try:
        main(p.parse_args())
    except LetsTalkError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        sys.exit(2)
