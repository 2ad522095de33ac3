"""Captions inside a live stream's video: CEA-608 carried in H.264 as ATSC A/53 cc_data (an SEI NAL unit).

This is how live TV and live-streaming platforms take captions in the stream itself: YouTube Live, Twitch and OBS read
608 captions from the H.264 of an RTMP stream, and a viewer turns them on with the player's CC button. FFmpeg's
libx264 wrapper writes them from a frame's A53_CC side data, which PyAV cannot set; so `LiveMuxer` adds the SEI to
each encoded packet itself (`with_sei`), before the packet's first slice, as the encoder would have.

    RollUp              text -> 608 byte pairs for caption channel 1, roll-up over 2 rows (live captioning's
                        style: each new line pushes the last one up), 32 characters a row, erased after 4 s
                        without a new one
    a53_sei(pairs)      the SEI NAL unit (Annex B) that carries some pairs in one frame
    with_sei(data, nal) an encoded frame (Annex B) with the NAL unit put before its first slice

608 carries 30 byte pairs a second in its field 1 (2 characters each); `PAIRS_PER_FRAME` a frame at 25 fps keeps up with
speech (a 60-character sentence and its control codes take ~0.8 s). 608's own accented letters (its special and
extended sets: French, Spanish, Portuguese, German, Italian, Dutch, Danish) are kept; other letters lose their accents,
where they have one, and what 608 has no form for (other scripts) is left out.
"""

from __future__ import annotations

import collections
import textwrap
import unicodedata

PAIRS_PER_FRAME = 2
CLEAR_AFTER_FRAMES = 100  # 4 s at 25 fps without a new caption: the rows are erased, as live captioning does
ROW_CHARS = 32  # a 608 row
MAX_QUEUED = 750  # pairs waiting (~15 s of them): past it the backlog is dropped for the newest caption

RU2 = (0x14, 0x25)  # roll-up captions, 2 rows
CR = (0x14, 0x2D)  # carriage return: the rows roll up, the cursor to the base row's start
PAC_ROW15 = (0x14, 0x60)  # preamble address code: row 15 (the base row), column 0, white
EDM = (0x14, 0x2C)  # erase displayed memory: the rows shown go
# letters 608 puts at these ASCII codes (its basic set is ASCII with these swapped in)
SPECIAL = {"á": 0x2A, "é": 0x5C, "í": 0x5E, "ó": 0x5F, "ú": 0x60, "ç": 0x7B, "÷": 0x7C, "Ñ": 0x7D, "ñ": 0x7E}
_SWAPPED = {chr(code) for code in SPECIAL.values()}
# letters and signs sent as a code pair of their own (sent twice, as control codes are: a receiver ignores the
# repeat): the special set (0x11), and the two extended sets (0x12: Spanish, French; 0x13: Portuguese, German, Danish),
# whose codes replace the character before them, so a receiver without them shows the plain letter sent first
CODED = {
    **{ch: (0x11, 0x30 + i) for i, ch in enumerate("®°½¿™¢£♪à") },
    **{ch: (0x11, 0x3A + i) for i, ch in enumerate("èâêîôû")},
    **{ch: (0x12, 0x20 + i) for i, ch in enumerate("ÁÉÓÚÜü")},
    "¡": (0x12, 0x27), "©": (0x12, 0x2B), "«": (0x12, 0x3E), "»": (0x12, 0x3F),
    **{ch: (0x12, 0x30 + i) for i, ch in enumerate("ÀÂÇÈÊËëÎÏïÔÙùÛ")},
    **{ch: (0x13, 0x20 + i) for i, ch in enumerate("ÃãÍÌìÒòÕõ")},
    **{ch: (0x13, 0x30 + i) for i, ch in enumerate("ÄäÖöß")},
    **{ch: (0x13, 0x38 + i) for i, ch in enumerate("ÅåØø")},
}
# typography 608 has no code for, as its plain ASCII
PLAIN = {"‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"', "–": "-", "—": "-", "…": "..."}
# what an extended character replaces, where it is not its letter without the accent
FALLBACK = {"Ø": "O", "ø": "o", "ß": "s", "¡": "!", "©": "c", "«": '"', "»": '"'}


def odd_parity(byte: int) -> int:
    """608 sends 7 bits and an odd parity bit."""
    byte &= 0x7F
    return byte | (0x80 if bin(byte).count("1") % 2 == 0 else 0)


def shown_text(text: str) -> str:
    """`text` as 608 can show it: its own letters kept (accented ones included), typographic quotes and dashes as
    ASCII, other letters without their accents, and what has no form in 608 (other scripts, emoji) left out."""
    out = []
    for ch in text:
        if ch in SPECIAL or ch in CODED:
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        elif " " <= ch < "\x7f" and ch not in _SWAPPED:
            out.append(ch)
        else:  # "ō" -> "o", "…" -> "...", "中" -> nothing
            plain = PLAIN.get(ch) or unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
            out.append("".join(c for c in plain if " " <= c < "\x7f" and c not in _SWAPPED))
    return " ".join("".join(out).split())  # (and no run of spaces where a character was left out)


def row_pairs(row: str) -> list[tuple[int, int]]:
    """A row of `shown_text` as 608 byte pairs: two basic characters a pair, and each coded one a pair of its own,
    twice; an extended one after the plain letter it replaces."""
    pairs: list[tuple[int, int]] = []
    waiting: list[int] = []  # a basic character without its pair yet
    for ch in row:
        code = CODED.get(ch)
        if code is None:
            waiting.append(SPECIAL.get(ch) or ord(ch))
        elif code[0] != 0x11:  # extended: the plain letter first
            waiting.append(ord(FALLBACK.get(ch) or unicodedata.normalize("NFKD", ch)[0]))
        if len(waiting) == 2 or (code is not None and waiting):
            pairs.append((waiting[0], waiting[1] if len(waiting) == 2 else 0))
            waiting = []
        if code is not None:
            pairs += [code, code]
    if waiting:
        pairs.append((waiting[0], 0))
    return pairs


class RollUp:
    """Captions queued as 608 byte pairs, taken a few a frame (`take`)."""

    def __init__(self, clear_after: int = CLEAR_AFTER_FRAMES) -> None:
        self._pairs: collections.deque[tuple[int, int]] = collections.deque()
        self.dropped = 0  # captions of a backlog dropped for a newer one
        self.clear_after = clear_after
        self._idle: int | None = None  # frames since the last pair went out while rows are shown (None: none are)

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, text: str) -> None:
        """Show `text` (a sentence or a few), wrapped into 608 rows, once the pairs before it have gone out."""
        rows = textwrap.wrap(shown_text(text), ROW_CHARS)
        if not rows:
            return
        pairs = [RU2, RU2]  # (control codes are sent twice: a receiver that lost one still gets it)
        for row in rows:
            pairs += [CR, CR, PAC_ROW15, PAC_ROW15, *row_pairs(row)]
        if len(self._pairs) + len(pairs) > MAX_QUEUED:  # captions come faster than 608 carries them: skip ahead
            self.dropped += 1
            self._pairs.clear()
        self._pairs.extend(pairs)

    def take(self, most: int = PAIRS_PER_FRAME) -> list[tuple[int, int]]:
        """The next pairs for one frame, called for every frame: none once all have gone out, then, `clear_after`
        frames after the last caption, the code that erases it (a caption does not stay up through the silence
        after its speech)."""
        if self._pairs:
            self._idle = 0
            return [self._pairs.popleft() for _ in range(min(most, len(self._pairs)))]
        if self._idle is not None:
            self._idle += 1
            if self._idle >= self.clear_after:
                self._idle = None
                return [EDM, EDM]
        return []


def a53_sei(pairs: list[tuple[int, int]]) -> bytes:
    """An H.264 SEI NAL unit (Annex B) carrying `pairs` for 608 field 1 as ATSC A/53 cc_data (what FFmpeg's a53cc
    writes): user_data_registered_itu_t_t35, country USA (0xB5), provider ATSC (0x0031), "GA94", cc_data."""
    cc = bytes([0x40 | len(pairs), 0xFF])  # process_cc_data_flag, cc_count; em_data
    cc += b"".join(bytes([0xFC, odd_parity(a), odd_parity(b)]) for a, b in pairs)  # cc_valid, type 0: field 1
    payload = b"\xb5\x00\x31GA94\x03" + cc + b"\xff"
    rbsp = bytes([4, len(payload)]) + payload + b"\x80"  # payload type 4, its size; the stop bit
    escaped, zeros = bytearray(), 0
    for byte in rbsp:  # emulation prevention: no 00 00 0x (x <= 3) inside a NAL unit
        if zeros >= 2 and byte <= 3:
            escaped.append(3)
            zeros = 0
        escaped.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return b"\x00\x00\x00\x01\x06" + bytes(escaped)


def with_sei(data: bytes, nal: bytes) -> bytes:
    """An encoded frame in Annex B with `nal` put before its first slice (after its SPS, PPS and SEIs)."""
    at = data.find(b"\x00\x00\x01")
    while at >= 0 and at + 3 < len(data):
        if data[at + 3] & 0x1F in (1, 5):  # a slice (coded picture) NAL unit
            start = at - 1 if at > 0 and data[at - 1] == 0 else at  # its 4-byte start code
            return data[:start] + nal + data[start:]
        at = data.find(b"\x00\x00\x01", at + 3)
    return nal + data
