"""aiortc helpers shared by the server and the SDK (no torch)."""

from __future__ import annotations

import asyncio
import copy
import fractions
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.sdp import SessionDescription
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)

JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # aiortc's receiver keeps it in a private field
OPUS_RATE = 48000  # what aiortc's Opus encoder encodes (stereo s16, 960 samples per 20 ms packet)
OPUS_PACKET = 960
OPUS_EXPECTED_LOSS = 5  # %: what libopus is told to expect (`opus_encoder`): with it > 0 it sends in-band FEC


class OpusFramer:
    """Audio frames of any rate, layout, sample format and size in (`push`), out (`pop`) as aiortc's Opus encoder
    encodes them without delay: 48 kHz stereo s16, 960 samples (20 ms) a frame.

    Given another rate, the encoder resamples itself into 20 ms frames, and its resampler's lead (1 ms at 16 kHz)
    leaves each frame short until the next has come in: every packet went onto the wire one packet (20 ms) after its
    audio was there (`letstalk bench --webrtc` measured the picture 18 ms ahead of its sound on the wire). Resampled
    here, with that lead filled with silence once at the start, a frame is out as soon as its 20 ms are in. The
    encoder also takes only s16 mono or stereo (float or 5.1 audio fails an assertion inside aiortc); here any format
    and layout PyAV reads is converted. Each frame's pts is its first sample's in the source's time (a source that
    skips ahead skips here too), in 1 / 48000."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE)
        self._pending = np.zeros((0, 2), np.int16)  # resampled, not yet out: (n, 2)
        self._pending_pts = 0  # the source time of _pending's first sample, in 1 / OPUS_RATE
        self._started = False

    def push(self, frame: av.AudioFrame) -> None:
        if frame.pts is not None and frame.time_base:  # what is pending goes right before it
            self._pending_pts = int(frame.pts * frame.time_base * OPUS_RATE) - len(self._pending)
        pcm = np.concatenate([self._pending] + [f.to_ndarray().reshape(-1, 2)
                                                for f in self._resampler.resample(frame)])
        if not self._started:  # the resampler's lead: silence once, so every later frame is whole at once
            self._started = True
            lead = round(frame.samples * OPUS_RATE / frame.sample_rate) - len(pcm)
            pcm = np.concatenate([np.zeros((max(0, lead), 2), np.int16), pcm])
        self._pending = pcm

    def pop(self) -> av.AudioFrame | None:
        """The next 20 ms, or None until they are all in."""
        if len(self._pending) < OPUS_PACKET:
            return None
        out_pcm, self._pending = self._pending[:OPUS_PACKET], self._pending[OPUS_PACKET:]
        out = av.AudioFrame.from_ndarray(np.ascontiguousarray(out_pcm).reshape(1, -1), format="s16", layout="stereo")
        out.sample_rate = OPUS_RATE
        out.pts = self._pending_pts
        out.time_base = fractions.Fraction(1, OPUS_RATE)
        self._pending_pts += OPUS_PACKET
        return out


def opus_encoder():
    """aiortc's Opus encoder (its bitrate, 96 kbps, and application, voip) with libopus's in-band FEC on: each packet
    also carries a coarser copy of the one before it (LBRR, RFC 6716 2.1.7), from which a receiver that lost that one
    decodes it (Chrome, Firefox, Safari do, when the next packet has come) instead of concealing it. aiortc's own
    encodes in CELT mode, which has no such copy. With FEC, libopus codes the speech in hybrid mode (SILK for the
    band up to 8 kHz, where all of the session's 16 kHz sound is), at about the same bitrate: as clean without loss
    (PESQ wide-band of the bundled speech 4.59, CELT 4.59) and far better with it: at 2 / 5 / 10 % of the packets
    lost 4.52 / 4.52 / 4.00 decoded with the FEC, where CELT's concealment read 3.46 / 2.82 / 2.01, and a receiver
    that only conceals (aiortc's own decoder) 3.71 / 3.28 / 2.33 (scripts/opus_loss.py, docs/benchmarks.md).
    ~0.1 ms more a packet to encode."""
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    encoder.codec.options = {**encoder.codec.options, "fec": "1", "packet_loss": str(OPUS_EXPECTED_LOSS)}
    return encoder


class OpusAudioTrack(MediaStreamTrack):
    """An audio track of any rate, layout, sample format and frame size as aiortc's Opus encoder sends it without
    delay (`OpusFramer`). The SDK sends an application's microphone or player through it (`connect(audio_track=...)`);
    the server's peers get a session's audio encoded once for all (`stream.tracks.SharedAudioEncoder`). Bound to Opus
    (`bind`, once the answer says the sender sends it) it encodes each 20 ms itself, with in-band FEC
    (`opus_encoder`), and the sender only packs the packets: aiortc's sender would encode without it."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self._framer = OpusFramer()
        self._encoder = None

    def bind(self, mime: str | None) -> bool:
        """The codec the sender sends with (`sent_codec` of the answer): Opus is encoded here from now on (True);
        another (G.711) gets frames, as before, for the sender to encode."""
        self._encoder = opus_encoder() if (mime or "").lower() == "audio/opus" else None
        return self._encoder is not None

    async def recv(self) -> av.AudioFrame | av.Packet:  # type: ignore[override]
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            while (out := self._framer.pop()) is None:
                self._framer.push(await self.source.recv())
            if self._encoder is None:
                return out
            payloads, _ = self._encoder.encode(out)
            if payloads:  # (one packet for each 20 ms, at once)
                packet = av.Packet(payloads[0])
                packet.pts, packet.time_base = out.pts, out.time_base
                return packet

    def stop(self) -> None:
        super().stop()
        self.source.stop()


class _Vp8Bitstream(Vp8Encoder):
    def _packetize(self, buffer: bytes, picture_id: int) -> list[bytes]:  # type: ignore[override]
        return [buffer] if buffer else []


class _H264Bitstream(H264Encoder):
    def _packetize(self, packages: Iterable[bytes]) -> list[bytes]:  # type: ignore[override]
        data = b"".join(b"\x00\x00\x00\x01" + nal for nal in packages)  # H264Encoder.pack splits it again
        return [data] if data else []


# (an aiortc whose senders cannot send encoded frames, `Encoder.pack`, has none: each sender encodes)
BITSTREAM_ENCODERS = {mime: cls for mime, cls in (("video/vp8", _Vp8Bitstream), ("video/h264", _H264Bitstream))
                      if hasattr(cls, "pack")}


def bitstream_encoder(mime: str) -> Vp8Encoder | H264Encoder | None:
    """aiortc's own encoder for the video codec `mime` (its settings, bitrate and keyframe handling), except that
    `encode(frame, force_keyframe)` gives one frame's whole bitstream, `([data], timestamp)` (`[]`: nothing), instead of
    RTP payloads. As an `av.Packet` it goes to any number of aiortc senders of that codec, each of which packs it
    (`Encoder.pack`) for its peer: one encode for many peers. None for a codec it does not know."""
    cls = BITSTREAM_ENCODERS.get(mime.lower())
    return cls() if cls is not None else None


def is_keyframe(mime: str, data: bytes) -> bool:
    """`data` (what `bitstream_encoder(mime)` gave) decodes on its own: a VP8 key frame, an H.264 IDR picture."""
    if mime.lower() == "video/vp8":
        return bool(data) and not data[0] & 1  # the frame tag's first bit: 0 for a key frame (RFC 6386, 9.1)
    return any(nal and nal[0] & 0x1F == 5 for nal in H264Encoder._split_bitstream(data))


def sent_codec(sdp: str, kind: str) -> str | None:
    """The codec the `kind` ("audio", "video") section of a local description `sdp` sends with (aiortc's sender takes
    the first it lists): "video/VP8", "audio/opus" ...; None without such a section."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == kind and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType
    return None


def is_rtp(data: bytes) -> bool:
    """A datagram that is an RTP packet (SRTP leaves its header in the clear), not RTCP, STUN or DTLS on the same
    socket (RFC 7983, and RFC 5761 for RTCP's packet types 192-223): what a link impaired in tests loses."""
    return len(data) >= 12 and 128 <= data[0] < 192 and not 192 <= data[1] <= 223


def asking_opus_fec(sdp: str) -> str:
    """`sdp` (an answer) with `useinbandfec=1` on its Opus payload types: the peer's sender (a browser's) then adds
    in-band FEC to its sound, which this process's receivers decode where a packet was lost (`FecOpusDecoder`). A
    signal to the peer alone (RFC 7587 6.1): aiortc does not read it back."""
    lines = sdp.split("\r\n")

    def payload_type(line: str, attribute: str) -> str | None:
        return line[len(attribute):].split(" ", 1)[0] if line.startswith(attribute) else None

    opus = {payload_type(line, "a=rtpmap:") for line in lines
            if line.startswith("a=rtpmap:") and line.split(" ", 1)[-1].lower().startswith("opus/")}
    with_fmtp = {payload_type(line, "a=fmtp:") for line in lines if line.startswith("a=fmtp:")}
    out = []
    for line in lines:
        fmtp = payload_type(line, "a=fmtp:")
        if fmtp in opus and "useinbandfec" not in line:
            line += ";useinbandfec=1" if " " in line else " useinbandfec=1"
        out.append(line)
        rtpmap = payload_type(line, "a=rtpmap:")
        if rtpmap in opus and rtpmap not in with_fmtp:
            out.append(f"a=fmtp:{rtpmap} useinbandfec=1")
    return "\r\n".join(out)


class FecFrame(JitterFrame):
    """A lost Opus packet, to be decoded from the in-band FEC that `data` (the packet after it) carries: `samples` of
    it, at `timestamp` (FecOpusDecoder; where that packet has none, libopus conceals them)."""

    def __init__(self, data: bytes, timestamp: int, samples: int) -> None:
        super().__init__(data=data, timestamp=timestamp)
        self.samples = samples


_LIBOPUS: list = []  # [the loaded library, or None], once looked for


def libopus():
    """libopus, to call directly (ctypes): the copy PyAV's wheel carries (the one its decoder already runs), else the
    system's; None where neither loads (`FecOpusDecoder` is then not used: receivers conceal lost packets only)."""
    if _LIBOPUS:
        return _LIBOPUS[0]
    import ctypes
    import ctypes.util

    here = Path(av.__file__).resolve().parent
    found = [str(p) for pattern in ("libopus*.so*", "libopus*.dylib", "opus*.dll")
             for p in sorted([*(here.parent / "av.libs").glob(pattern), *(here / ".dylibs").glob(pattern)])]
    lib = None
    for name in [*found, ctypes.util.find_library("opus")]:
        try:
            candidate = ctypes.CDLL(name) if name else None
            if candidate is not None and candidate.opus_get_version_string():
                lib = candidate
                break
        except (OSError, AttributeError):
            continue
    if lib is not None:
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int16),
                                    ctypes.c_int, ctypes.c_int]
        lib.opus_decode.restype = ctypes.c_int
        if hasattr(lib, "opus_packet_has_lbrr"):  # (libopus 1.5)
            lib.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    _LIBOPUS.append(lib)
    return lib


class FecOpusDecoder:
    """What aiortc's Opus decoder does (each packet to 48 kHz stereo s16 frames, the RTP timestamp their pts), through
    libopus called directly, which also decodes a lost packet from the in-band FEC of the one after it (a `FecFrame`,
    from `FrameAtOnceJitterBuffer`): FFmpeg's libopus decoder, aiortc's, never asks libopus for it. A packet libopus
    cannot decode gives nothing, as FFmpeg's gives an error aiortc logs and skips. `recovered`: lost packets decoded
    from FEC (where the next packet had none, libopus concealed them instead, and libopus 1.5 tells the two apart)."""

    MAX_SAMPLES = 5760  # the longest Opus packet, 120 ms at 48 kHz

    recovered = 0  # lost packets decoded from FEC, in this process (all threads)

    def __init__(self, lib=None) -> None:
        import ctypes

        self._lib = lib or libopus()
        error = ctypes.c_int()
        self._decoder = self._lib.opus_decoder_create(OPUS_RATE, 2, ctypes.byref(error))
        if not self._decoder or error.value:
            raise RuntimeError(f"libopus could not create a decoder (error {error.value})")
        self._pcm = (ctypes.c_int16 * (self.MAX_SAMPLES * 2))()

    def decode(self, encoded_frame: JitterFrame) -> list[av.AudioFrame]:
        fec = isinstance(encoded_frame, FecFrame)
        data = encoded_frame.data
        if not data:  # (libopus would conceal MAX_SAMPLES of it)
            return []
        samples = encoded_frame.samples if fec else self.MAX_SAMPLES
        n = self._lib.opus_decode(self._decoder, data, len(data), self._pcm, samples, int(fec))
        if n <= 0:
            return []
        if fec:
            has_fec = getattr(self._lib, "opus_packet_has_lbrr", None)
            FecOpusDecoder.recovered += has_fec is None or has_fec(data, len(data)) > 0
        pcm = np.frombuffer(self._pcm, np.int16, n * 2).reshape(1, -1)  # (copied into the frame)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = OPUS_RATE
        frame.pts = encoded_frame.timestamp
        frame.time_base = fractions.Fraction(1, OPUS_RATE)
        return [frame]

    def __del__(self) -> None:
        if getattr(self, "_decoder", None):
            self._lib.opus_decoder_destroy(self._decoder)
            self._decoder = None


AUDIO_REORDER = 2  # a lost audio packet is given up once the packet this many after it has come (a packet reordered
# past the next one is rare; each one waited for is 20 ms of latency)
VIDEO_GAP_S = 0.5  # a lost video packet is given up after this long (its retransmission, asked for by NACK, did not
# come: the sender no longer had it, or it was lost too), and a key frame asked for (PLI)
NACK_AGAIN_S = 0.1  # meanwhile the packets still missing are asked for again this often (aiortc asks once, when the
# gap shows, and again only when a new gap shows: a lost retransmission otherwise waited out VIDEO_GAP_S)
CONCEALED_S = 0.5  # a run of lost audio packets up to this long is concealed (Opus: libopus's own concealment)


def opus_frame_samples(toc: int) -> int:
    """The samples at 48 kHz in one frame of an Opus packet whose first byte (its TOC, RFC 6716 3.1) is `toc`."""
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        return (480, 960, 1920, 2880)[config % 4]
    if config < 16:  # hybrid: 10, 20 ms
        return (480, 960)[config % 2]
    return (120, 240, 480, 960)[config % 4]  # CELT: 2.5, 5, 10, 20 ms


class FrameAtOnceJitterBuffer(JitterBuffer):
    """aiortc's jitter buffer, handing each frame over as soon as its last packet is in, and giving a lost packet up.

    aiortc's own knows a frame is whole only once the first packet of the next one arrives, which holds every frame
    back one frame interval (40 ms of video at 25 fps, 20 ms of audio), and its audio buffer waits for 4 whole frames
    (80 ms in all). It plays nothing out by time, so the waits buy no smoothing: packets come out in order either way,
    reordered ones are put back in order either way. Here an audio packet is a whole frame (one RTP packet per Opus
    frame) and a video frame ends with the packet carrying the RTP marker bit (RFC 7741 for VP8, RFC 6184 for H.264;
    aiortc's sender and browsers set it); a frame whose marker never came is handed over when the next one starts, as
    aiortc does.

    A lost packet: aiortc's waits for it until the buffer overflows, 16 packets of audio (320 ms), 512 of video
    (seconds), and then hands over one frame per packet that arrives, so the frames queued behind the loss stay queued:
    one lost audio packet left every later one 300 ms late for the rest of the call (a microphone's speech reached the
    avatar later, and the SDK's audio, with the frames that wait for it, fell behind). Here a lost audio packet is given
    up once AUDIO_REORDER packets after it have come, a video packet after VIDEO_GAP_S (the frame it was in is dropped
    and a key frame asked for), and `deliver` (the receiver's decoder queue, `release_frames_at_once`) takes the frames
    that were waiting behind it at once. Without `deliver` one frame goes per packet, as in aiortc: a lost audio packet
    then leaves the later ones AUDIO_REORDER - 1 packets late (20 ms).

    Lost Opus audio (`conceal` says which payload types are Opus) goes to the decoder as packets of a lone TOC byte, one
    per frame lost, at the lost frames' timestamps: libopus conceals a frame of no data (RFC 6716 4.4) from the speech
    before it, so the decoder's sound goes on at its time, where aiortc's left the lost 20 ms out (a click, and the
    audio after it 20 ms early against its RTP time). With `fec` (the decoder is a FecOpusDecoder) the last packet
    lost goes as a FecFrame instead: decoded from the in-band FEC of the packet that came after it, where it has one.

    While a video packet is waited for, `nack` asks the sender for the packets still missing again each NACK_AGAIN_S:
    aiortc's receiver asks once, as the gap shows, and again only when another gap shows, so a retransmission lost
    too froze the video for VIDEO_GAP_S and cost a key frame."""

    def __init__(self, capacity: int, is_video: bool = False, deliver=None, conceal=None, nack=None,
                 fec: bool = False) -> None:
        super().__init__(capacity, is_video=is_video)
        self._deliver = deliver  # (frame, payload type): hands a whole frame to the decoder, in order
        self._conceal = conceal  # (payload type) -> whether lost frames of it are concealed (Opus)
        self._fec = fec  # the decoder decodes a FecFrame (FecOpusDecoder): the packet before one that came, from it
        self._nack = nack  # (media SSRC, sequence numbers): asks the sender for them again (RTCP NACK)
        self._gap_since: float | None = None  # video: when a packet after a missing one at the origin first came
        self._nacked_at = 0.0  # video: when the missing packets were last asked for
        self._last: tuple[int, int] | None = None  # audio: the last packet handed over (sequence number, timestamp)

    def add(self, packet):  # type: ignore[override]
        pli, frame = super().add(packet)
        if frame is None and self._origin is not None and self._packets[self._origin % self.capacity] is None:
            ahead = uint16_add(packet.sequence_number, -self._origin)  # the packet that came, past the gap
            if 0 < ahead < self.capacity and self._packets[packet.sequence_number % self.capacity] is packet:
                if self._gave_up(packet, ahead):
                    concealed = self._concealment(packet.payload_type)
                    self._skip_gap(packet.sequence_number)
                    pli = pli or self._is_video
                    frame = self._remove_frame(packet.sequence_number)
                    for lost in concealed:
                        self._deliver(lost, packet.payload_type)
        else:
            self._gap_since = None
        if frame is None or self._deliver is None:
            return pli, frame
        while frame is not None:  # after a gap several may be whole: all of them now
            self._deliver(frame, packet.payload_type)
            frame = self._remove_frame(packet.sequence_number)
        return pli, None

    def _gave_up(self, packet, ahead: int) -> bool:
        if not self._is_video:
            return ahead >= AUDIO_REORDER
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = self._nacked_at = now  # (the receiver's first NACK goes now)
        if now - self._gap_since >= VIDEO_GAP_S:
            return True
        if self._nack is not None and now - self._nacked_at >= NACK_AGAIN_S:
            self._nacked_at = now
            missing = [uint16_add(self._origin, i) for i in range(ahead)
                       if self._packets[(self._origin + i) % self.capacity] is None]
            self._nack(packet.ssrc, missing)
        return False

    def _concealment(self, payload_type: int) -> list[JitterFrame]:
        """Audio, the gap at the origin about to be given up: a TOC-only Opus packet for each frame it lost, at its
        timestamp (from the packets either side, evenly spaced). No packet where the payload is not Opus, no packet came
        before, or the timestamps do not fit whole frames (a sender that paused in between, DTX)."""
        if self._is_video or self._deliver is None or self._last is None or not (
                self._conceal and self._conceal(payload_type)):
            return []
        seq, timestamp = self._last
        if uint16_add(seq, 1) != self._origin:  # the gap does not start right after the last packet handed over
            return []
        for count in range(2, self.capacity):  # the first packet after the gap (the origin is missing)
            after = self._packets[uint16_add(seq, count) % self.capacity]
            if after is not None:
                break
        else:
            return []
        if not after._data:
            return []
        frame = opus_frame_samples(after._data[0])
        span = (after.timestamp - timestamp) % (1 << 32)  # the lost packets' samples and the one before's
        if span % count or (span // count) % frame or span > CONCEALED_S * OPUS_RATE:
            return []
        toc = bytes([after._data[0] & 0xFC])  # one frame (code 0) of the configuration the speech goes on in
        per_packet = span // count
        fec = per_packet if self._fec else 0  # the last lost packet: from the FEC of the one that came
        lost = [JitterFrame(data=toc, timestamp=(timestamp + at) % (1 << 32))
                for at in range(per_packet, span - fec, frame)]
        return lost + ([FecFrame(after._data, (timestamp + span - fec) % (1 << 32), fec)] if fec else [])

    def _skip_gap(self, newest: int) -> None:
        """Drop the missing packets at the origin, up to packet `newest` at most; video, also the rest of the frame a
        packet after a missing one belongs to, and so on past any other gap (frames until the key frame asked for
        do not decode anyway: they refer to the one lost)."""
        self._gap_since = None
        broken: int | None = None  # video: the timestamp of the frame being dropped
        after_gap = False
        while self._origin != uint16_add(newest, 1):
            packet = self._packets[self._origin % self.capacity]
            if packet is None:
                after_gap = True
            elif not self._is_video:
                break
            elif after_gap:
                broken, after_gap = packet.timestamp, False
            elif packet.timestamp != broken:
                break
            self.remove(1)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:  # the frame is not whole yet
                return None
            if packets and packet.timestamp != packets[0].timestamp:  # its marker never came: the next frame started
                break
            packets.append(packet)
            if packet.marker or not self._is_video:
                break
        else:
            return None
        self.remove(len(packets))
        if not self._is_video:
            self._last = packets[-1].sequence_number, packets[-1].timestamp
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)


def _decoder_of(receiver, fec: bool = False):
    """What aiortc's receiver does with a whole frame its jitter buffer hands over (the frame's RTP timestamp mapped
    to its track's, the frame put on the decoder thread's queue), as a function of (frame, payload type) that the
    buffer calls itself, for the frames a lost packet held back (`FrameAtOnceJitterBuffer`); None where the receiver's
    private fields are not as this aiortc's. `fec`: Opus goes to a FecOpusDecoder (its codec marked for
    `_get_decoder`)."""
    fields = [getattr(receiver, f"_RTCRtpReceiver__{name}", None) for name in ("decoder_queue", "timestamp_mapper",
                                                                              "codecs")]
    queue, mapper, codecs = fields
    if not (hasattr(queue, "put") and hasattr(mapper, "map") and isinstance(codecs, dict)):
        return None
    marked: dict = {}  # payload type -> its codec, marked to be decoded by a FecOpusDecoder

    def deliver(frame: JitterFrame, payload_type: int) -> None:
        codec = codecs.get(payload_type)
        if codec is not None and getattr(receiver, "_RTCRtpReceiver__decoder_thread", None) is not None:
            if fec and codec.mimeType.lower() == "audio/opus":
                if payload_type not in marked:
                    marked[payload_type] = copy.copy(codec)
                    marked[payload_type].fec_decoder = True
                codec = marked[payload_type]
            frame.timestamp = mapper.map(frame.timestamp)
            queue.put((codec, frame))

    return deliver


def _get_decoder(codec):
    """aiortc's `get_decoder`, but a FecOpusDecoder for a codec `_decoder_of` marked (no other receiver's changes)."""
    if getattr(codec, "fec_decoder", False):
        return FecOpusDecoder()
    return _aiortc_get_decoder(codec)


def decodes_opus_fec() -> bool:
    """Whether this process's receivers can decode Opus FEC: libopus loads, and aiortc's receiver looks its decoders
    up by `get_decoder` (then made `_get_decoder`, once)."""
    import aiortc.rtcrtpreceiver as receivers

    global _aiortc_get_decoder
    if libopus() is None or not callable(getattr(receivers, "get_decoder", None)):
        return False
    if receivers.get_decoder is not _get_decoder:
        _aiortc_get_decoder, receivers.get_decoder = receivers.get_decoder, _get_decoder
    return True


_aiortc_get_decoder = None


def _nack_of(receiver):
    """(media SSRC, sequence numbers) -> `receiver` asks its sender for those packets again (an RTCP NACK, as aiortc's
    receiver sends when it sees a gap); None where this aiortc's receiver has no such method."""
    send = getattr(receiver, "_send_rtcp_nack", None)
    if not callable(send):
        return None

    def nack(ssrc: int, missing: list[int]) -> None:
        task = asyncio.ensure_future(send(ssrc, missing))  # (the buffer runs in the receiver's packet handler)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a closed transport: nothing to ask
    return nack


def _is_opus_of(receiver):
    """(payload type) -> whether `receiver` decodes it as Opus (its codecs are known once it receives, not before)."""
    def is_opus(payload_type: int) -> bool:
        codecs = getattr(receiver, "_RTCRtpReceiver__codecs", None)
        codec = codecs.get(payload_type) if isinstance(codecs, dict) else None
        return getattr(codec, "mimeType", "").lower() == "audio/opus"

    return is_opus


def release_frames_at_once(pc: RTCPeerConnection, track) -> bool:
    """Let the receiver of `track` (a track `pc` receives, before its first packet) hand each frame over as soon as it
    is whole (`FrameAtOnceJitterBuffer`): 80 ms less on every audio packet, 40 ms on every video frame (`letstalk bench
    --webrtc` measured both); and a lost packet held the rest back no more than AUDIO_REORDER packets of audio,
    VIDEO_GAP_S of video (asked for again meanwhile), lost Opus audio decoded from the next packet's in-band FEC where
    it has one (`FecOpusDecoder`, where libopus loads), else concealed by libopus. The server's engine keeps
    its own pace and deadlines; an application that plays the SDK's media has its own output buffer. aiortc has no
    setting for it: this replaces the receiver's private buffer, and where a version has none (or it already holds
    packets) leaves the receiver as it is (False)."""
    for receiver in pc.getReceivers():
        if track is not None and receiver.track is track:
            buffer = getattr(receiver, JITTER_BUFFER, None)
            if (type(buffer) is JitterBuffer and getattr(buffer, "_origin", 0) is None
                    and isinstance(getattr(buffer, "_is_video", None), bool)):
                fec = not buffer._is_video and decodes_opus_fec()
                deliver = _decoder_of(receiver, fec=fec)
                setattr(receiver, JITTER_BUFFER, FrameAtOnceJitterBuffer(
                    capacity=buffer.capacity, is_video=buffer._is_video, deliver=deliver,
                    conceal=_is_opus_of(receiver), nack=_nack_of(receiver), fec=fec and deliver is not None))
                return True
    return False


def ice_servers(servers: Iterable[str | Mapping]) -> list[dict]:
    """STUN/TURN servers as W3C `RTCIceServer` dicts (`{"urls": [...], "username": ..., "credential": ...}`, what a
    browser's `RTCPeerConnection` takes and the server's session answer lists), each given as a URL or such a dict.
    Raises ValueError naming the server when a URL is malformed, or a TURN server has no username and credential."""
    out = []
    for server in servers:
        entry = {"urls": server} if isinstance(server, str) else dict(server)
        urls = entry.get("urls")
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        if not urls or not all(isinstance(u, str) for u in urls):
            raise ValueError(f"ICE server {server!r}: no URL (give 'stun:HOST[:PORT]' or 'turn:HOST[:PORT]')")
        for url in urls:
            try:
                parse_stun_turn_uri(url)
            except ValueError as e:
                raise ValueError(f"ICE server {url!r}: {e} (expected stun:HOST[:PORT], turn:HOST[:PORT][?transport="
                                 "udp|tcp] or turns:HOST[:PORT])") from None
            if url.startswith("turn") and not (entry.get("username") and entry.get("credential")):
                raise ValueError(f"TURN server {url!r} needs a username and a credential")
        entry["urls"] = urls
        out.append({k: v for k, v in entry.items() if k in ("urls", "username", "credential") and v is not None})
    return out


def ice_configuration(servers: Iterable[str | Mapping] = (), relay_only: bool = False) -> RTCConfiguration:
    """aiortc's configuration for STUN/TURN `servers` (as `ice_servers` takes them). With none, an explicit empty
    list: aiortc's default would query Google's STUN server on every gathering. aiortc uses the first STUN and the
    first TURN server (turn: over udp or tcp, turns: over tcp) and ignores the rest. `relay_only`: only candidates
    relayed through the TURN server (a browser's `iceTransportPolicy: "relay"`): the peer never learns this host's
    addresses, and a connection is made only if the relay works."""
    entries = ice_servers(servers)
    if relay_only and not any(u.startswith("turn") for e in entries for u in e["urls"]):
        raise ValueError("relay_only needs a TURN server (turn:HOST[:PORT] with a username and credential)")
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=e["urls"], username=e.get("username"), credential=e.get("credential"))
                    for e in entries],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL)


def relay_missing(servers: list[dict], sdp: str) -> str | None:
    """What to tell the user when `servers` name a TURN server but the SDP `sdp` (a description with its candidates
    gathered) holds no candidate relayed through it: the relay is unreachable or refused the credentials, and aioice
    only logs that. None when there is no TURN server or a relayed candidate is there."""
    turn = [u for e in servers for u in e["urls"] if u.startswith("turn")]
    if not turn or " typ relay" in sdp:
        return None
    return (f"the TURN server {turn[0]} gave no relayed address: it is unreachable, or it refused the credentials "
            "(a --turn-secret other than its static-auth-secret, or credentials that expired)")


# Where a container's own network takes its addresses by default, reachable from its host alone: Docker's bridge
# networks, Podman's (rootful) bridge network "podman", and rootless Podman's slirp4netns (before Podman 5's pasta,
# which copies the host's addresses and so cannot be told apart here).
BRIDGE_POOLS = tuple(ipaddress.ip_network(n) for n in ("172.16.0.0/12", "10.88.0.0/16", "10.0.2.0/24"))


def in_container() -> bool:
    """Docker (/.dockerenv) or Podman (/run/.containerenv) made this process's filesystem."""
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def bridged_host_addresses(ice_servers: Iterable = (), container: bool | None = None,
                           addresses: Iterable[str] | None = None) -> list[str]:
    """The IPv4 addresses a peer connection here would offer as its own (aioice's host candidates) when they are all
    a container's on a bridge network (in a container, every one in BRIDGE_POOLS) and no STUN/TURN server is given:
    reachable from the container's host alone, so a client elsewhere loads the pages but never gets the media.
    [] otherwise (host networking, any other address, a STUN or TURN server to get past it)."""
    if list(ice_servers) or not (in_container() if container is None else container):
        return []
    if addresses is None:
        from aioice.ice import get_host_addresses

        addresses = get_host_addresses(use_ipv4=True, use_ipv6=False)
    ips = [ipaddress.ip_address(a) for a in addresses]
    ips = [ip for ip in ips if ip.version == 4 and not ip.is_loopback]
    return [str(ip) for ip in ips] if ips and all(any(ip in pool for pool in BRIDGE_POOLS) for ip in ips) else []


def selected_route(pc: RTCPeerConnection) -> dict | None:
    """The candidate types of the pair ICE chose on `pc`, as a browser's stats give them: {"local": ..., "remote": ...},
    each "host", "srflx" (through a NAT, found by STUN), "prflx" or "relay" (through the TURN server); None before a
    pair is chosen. aiortc keeps it only inside aioice's connection (no getStats entry), read here defensively."""
    for transceiver in pc.getTransceivers():
        ice = getattr(getattr(transceiver.receiver.transport, "transport", None), "_connection", None)
        pair = (getattr(ice, "_nominated", None) or {}).get(1)
        if pair is not None:
            return {"local": pair.local_candidate.type, "remote": pair.remote_candidate.type}
    return None


async def peer_heard(pc: RTCPeerConnection, marks: dict[str, object]) -> bool:
    """Whether the peer sent an RTCP receiver report or an RTP packet since `marks` (updated; {} at first) were
    taken. A peer that stops sending both for seconds is gone, whatever its connection state says: a killed tab or a
    lost network says no goodbye, and ICE's consent check notices only after ~30 s."""
    heard = False
    for t in pc.getTransceivers():
        for key, part in (("s", t.sender), ("r", t.receiver)):
            try:
                report = await part.getStats()
            except Exception:
                continue
            for stat in report.values():
                mark = None
                if stat.type == "remote-inbound-rtp":  # a receiver report about what we send
                    mark = stat.timestamp
                elif stat.type == "inbound-rtp":  # what the peer sends us
                    mark = stat.packetsReceived
                if mark is not None:
                    k = f"{t.mid}{key}{stat.type}"
                    if marks.get(k) != mark:
                        marks[k] = mark
                        heard = True
    return heard


def answer_checks_at_once(pc: RTCPeerConnection) -> bool:
    """Make `pc`'s ICE agent retransmit its own check on a candidate pair at once when the peer's check on that pair
    comes in while its own is still waiting for an answer (RFC 8445 section 7.3.1.4: the pair's in-progress check is
    redone as a triggered check). aioice does nothing then, so its check, sent before the way back was open, is
    retried only after its 500 ms timeout. That way back is closed whenever the peer is behind a NAT, or relayed
    through a TURN server, that lets nothing in until the peer has sent out: each such connection took ~0.5 s longer
    (measured through coturn: ICE done on the peer's side in ~20 ms, on this side ~500 ms later). Call it once
    the peer connection has its ICE transports (after setting the remote offer, or the local one) and before the
    checks start; a version of aiortc or aioice whose internals differ is left as it is (False, and logged)."""
    from aioice.ice import CandidatePair

    patched = False
    for transport in {t.receiver.transport for t in pc.getTransceivers() if t.receiver.transport is not None}:
        connection = getattr(getattr(transport, "transport", None), "_connection", None)
        original = getattr(connection, "check_incoming", None)
        if getattr(original, "_answers_at_once", False):
            patched = True
            continue
        if original is None or not hasattr(connection, "_check_list"):
            continue

        def check_incoming(message, addr, protocol, connection=connection, original=original) -> None:
            original(message, addr, protocol)
            for pair in connection._check_list:
                if (pair.protocol is protocol and pair.remote_addr == addr
                        and pair.state == CandidatePair.State.IN_PROGRESS):
                    for transaction in list(getattr(protocol, "transactions", {}).values()):
                        request = getattr(transaction, "_Transaction__request", None)
                        if request is not None and getattr(transaction, "_Transaction__addr", None) == addr:
                            protocol.send_stun(request, addr)  # the same transaction: its answer is matched

        check_incoming._answers_at_once = True
        connection.check_incoming = check_incoming
        patched = True
    if not patched:
        log.info("this aioice retries ICE checks only on its timeout (~0.5 s more to connect through a NAT or relay)")
    return patched
