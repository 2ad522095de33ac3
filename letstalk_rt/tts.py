"""Text to speech for the avatar: espeak-ng (the voices the bundled model was trained to follow), a sentence at a time.

    speech = Speech(voice="en-us", rate=175, pitch=50)   # checked at once: InputError names what to give
    for piece in sentences("Hello there. How are you today?"):
        pcm = speech.synthesize(piece)                    # float32 mono 16 kHz, ~40x faster than real time

A session speaks text through `Session.say` (the engine), the server's `say` websocket message, the SDK's
`AvatarSession.say`, or `letstalk generate --text`. The text is cut into sentences so the avatar starts on the first
one while the rest is synthesised. espeak-ng is a Debian package (`apt-get install espeak-ng`), not a pip one; without
it these raise InputError saying so. An application with another TTS (Piper, a cloud API) streams its PCM with
`push_audio` / `send_audio` instead.

espeak-ng facts relied on (1.51-1.52): `--stdout` writes a 22.05 kHz mono s16 WAV whose header gives no length (PyAV
reads it to the end); an unknown language fails with exit status 1, but an unknown `LANG+VARIANT` is spoken with the
language's default voice without a word, so variants are checked against `--voices=variant`; text given on stdin is
never read as options (a text starting with "-" is spoken) and `-b 1` reads it as UTF-8. The voices with breath or
Klatt noise (f2, f3, f5 and the klatt ones among the corpus's) draw it from a random generator: 1.51's starts the same
every run (60 runs of one text, one output), 1.52's differently unless given `-D`, its deterministic mode (the same
text came out two ways in 60 runs, different in nearly every sample). `-D` is passed where `--help` lists it, so a
text is spoken the same every time and the synthetic corpus is a function of its seed on either release.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import InputError, LetsTalkError
from .media import SAMPLE_RATE, decode_audio

INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install espeak-ng)"
DEFAULT_VOICE = "en-us"
RATE_RANGE = (80, 450)  # words per minute (espeak-ng's default 175)
PITCH_RANGE = (0, 99)  # espeak-ng's default 50
MAX_TEXT = 5000  # characters in one call: ~5 minutes of speech
SENTENCE_CHARS = 200  # a longer sentence is cut at its last comma or space before this (~12 s of speech)
TIMEOUT_S = 30.0  # one piece's synthesis; espeak-ng takes ~0.1 s for 200 characters

_SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+|\n\s*")


class SpeechUnavailable(InputError):
    """espeak-ng is not installed where the text would be spoken."""


def espeak_exe() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable(f"text to speech needs espeak-ng, which is not installed here; {INSTALL_HINT}")
    return exe


def installed_languages() -> frozenset[str]:
    """Language codes `espeak-ng --voices` lists on this machine."""
    return frozenset(cols[1] for cols, _ in _voice_rows())


@lru_cache(maxsize=1)
def installed_variants() -> frozenset[str]:
    """Voice variant names (`-v LANG+NAME`) `espeak-ng --voices=variant` lists on this machine: the file
    column's `!v/NAME`."""
    out = subprocess.run([espeak_exe(), "--voices=variant"], capture_output=True, text=True, check=False).stdout
    return frozenset(tok[3:] for line in out.splitlines()[1:] for tok in line.split()[:5] if tok.startswith("!v/"))


@lru_cache(maxsize=1)
def deterministic_flags() -> tuple[str, ...]:
    """`-D` where this espeak-ng has its deterministic mode (1.52 and later; 1.51 is deterministic without it and
    does not know the flag)."""
    usage = subprocess.run([espeak_exe(), "--help"], capture_output=True, text=True, check=False)
    return ("-D",) if re.search(r"^-D\s", usage.stdout + usage.stderr, re.MULTILINE) else ()


@lru_cache(maxsize=1)
def _voice_rows() -> list[tuple[list[str], list[str]]]:
    """`espeak-ng --voices`: each line's columns (Pty, Language, Age/Gender, VoiceName, File) and the other codes it
    answers to (its "(zh 5)(zh-cmn 5)" column)."""
    out = subprocess.run([espeak_exe(), "--voices"], capture_output=True, text=True, check=False).stdout
    return [(line.split()[:5], re.findall(r"\(([\w-]+) \d+\)", line)) for line in out.splitlines()[1:]
            if len(line.split()) > 4]


def voices() -> list[dict[str, str]]:
    """The voices this machine's espeak-ng speaks, [{"id": "en-us", "name": "English_(America)"}, ...]; a variant
    (a timbre: `installed_variants()`) is added to an id after "+", e.g. "en-us+f3"."""
    return [{"id": cols[1], "name": cols[3]} for cols, _ in _voice_rows()]


def _speakable() -> frozenset[str]:
    """What `-v` takes for a language: the listed codes and the shorter ones they also answer to ("fr", "en")."""
    return frozenset(code for cols, others in _voice_rows() for code in [cols[1], *others])


def check_voice(voice: str) -> str:
    """`voice` if this espeak-ng has it ("LANG" or "LANG+VARIANT"), else InputError saying what to give."""
    if not isinstance(voice, str) or not voice:
        raise InputError(f"voice must be a language code such as {DEFAULT_VOICE!r}, got {voice!r}")
    lang, _, variant = voice.partition("+")
    if lang not in _speakable():
        raise InputError(f"voice {voice[:40]!r}: espeak-ng here has no language {lang[:40]!r}; give one of its "
                         f"voices (`espeak-ng --voices`, or GET /v1/voices on a server), e.g. {DEFAULT_VOICE!r}")
    if variant and variant not in installed_variants():
        raise InputError(f"voice {voice[:40]!r}: espeak-ng here has no variant {variant[:40]!r}; give one of "
                         f"`espeak-ng --voices=variant`, e.g. {lang}+f3, or the language alone")
    return voice


def _check_int(value: object, name: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{name} must be an integer {bounds[0]}..{bounds[1]}, got {value!r}")
    return value


def check_text(text: object) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("text to speak must be a non-empty string")
    if len(text) > MAX_TEXT:
        raise InputError(f"text to speak is {len(text)} characters; at most {MAX_TEXT} in one call (send the rest "
                         "in another: calls are spoken one after another)")
    return text


def sentences(text: str, most: int = SENTENCE_CHARS) -> list[str]:
    """`text` cut after each sentence's end (and at line breaks); a sentence longer than `most` characters is cut
    at its last comma, else its last space, before that, so no piece keeps the avatar waiting long for its audio."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > most:
            head = sentence[:most]
            cut = max(head.rfind(", "), head.rfind("; "))
            cut = cut + 1 if cut > 0 else head.rfind(" ")
            cut = cut if cut > 0 else most
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return [p for p in pieces if any(ch.isalnum() for ch in p)]  # punctuation alone says nothing


@dataclass(frozen=True)
class Speech:
    """How text is spoken: an espeak-ng voice, its rate (words/minute) and pitch; checked when made."""

    voice: str = DEFAULT_VOICE
    rate: int = 175
    pitch: int = 50
    word_gap: int = 0  # extra pause between words, in units of 10 ms

    def __post_init__(self) -> None:
        check_voice(self.voice)
        _check_int(self.rate, "rate", RATE_RANGE)
        _check_int(self.pitch, "pitch", PITCH_RANGE)
        _check_int(self.word_gap, "word_gap", (0, 100))

    def synthesize(self, text: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """`text` spoken -> float32 mono at `sample_rate` (blocking: call it off the event loop in a server)."""
        cmd = [espeak_exe(), "-v", self.voice, "-s", str(self.rate), "-p", str(self.pitch), "-g", str(self.word_gap),
               "-b", "1", *deterministic_flags(), "--stdout"]
        try:
            done = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise LetsTalkError(f"espeak-ng took over {TIMEOUT_S:.0f} s for {len(text)} characters") from None
        if done.returncode != 0 or not done.stdout:
            reason = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise LetsTalkError(f"espeak-ng failed for voice {self.voice!r}: {reason}")
        return decode_audio(done.stdout, "espeak-ng's output", sample_rate, format="wav")

    def speak(self, text: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """All of `text`, sentence by sentence, as one float32 mono array (offline: `letstalk generate --text`)."""
        return self.speak_timed(text, sample_rate)[0]

    def speak_timed(self, text: str, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """`speak`, and where each sentence starts in it: [(its first sample, the sentence), ...], for captions."""
        said = sentences(check_text(text))
        pieces = [self.synthesize(p, sample_rate) for p in said]
        if not pieces:
            raise InputError(f"text to speak has no words: {text[:60]!r}")
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        return np.concatenate(pieces), [(int(a), p) for a, p in zip(starts, said)]
