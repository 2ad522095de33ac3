"""What a lost packet costs the avatar's sound: the server's Opus encoding against aiortc's, packets lost at random.

    python scripts/opus_loss.py [--loss 2,5,10] [--seed 0] [--json out.json]

The bundled speech, encoded as the server sends a session's sound (`rtc.OpusFramer` into `rtc.opus_encoder`: in-band
FEC on) and as aiortc's own encoder does (CELT, no FEC), each loses the same packets at random (seeded), and is decoded
by libopus as a receiver does: a lost packet concealed (what aiortc's own decoder does), or decoded from the
in-band FEC of the packet after it where that one came (what Chrome, Firefox and Safari do, and this project's
receivers, the SDK's and the server's: `rtc.FecOpusDecoder`, which this uses). Each decoded sound is scored against
the speech with PESQ (ITU-T P.862.2 wide-band, 1-4.64; `pip install pesq`) and by the SNR of the lost packets' 20 ms
against the same packets decoded without loss (dB). The figures of 2026-12-07 are in
docs/benchmarks.md ("The avatar's sound on a lossy link: in-band FEC").
"""

from __future__ import annotations

import argparse
import fractions
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLES = 960  # a 20 ms packet at 48 kHz


def encode(speech: np.ndarray, encoder) -> list[bytes]:
    """16 kHz mono float speech -> Opus packets, 20 ms each, as the server's SharedAudioEncoder makes them."""
    import av

    from letstalk_rt.rtc import OpusFramer

    framer, packets = OpusFramer(), []
    for i in range(0, len(speech), 320):  # the session's 20 ms packets of 16 kHz sound
        frame = av.AudioFrame.from_ndarray((np.clip(speech[i:i + 320], -1, 1) * 32767).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, i, fractions.Fraction(1, 16000)
        framer.push(frame)
        while (pcm := framer.pop()) is not None:
            payloads, _ = encoder.encode(pcm)
            packets += payloads[:1]
    return packets


def decode(packets: list[bytes], lost: set[int], fec: bool) -> np.ndarray:
    """The packets decoded at 48 kHz (left channel, float) by the receivers' decoder (`rtc.FecOpusDecoder`, libopus),
    `lost` concealed, or with `fec` decoded from the next packet's FEC where that one came."""
    from aiortc.jitterbuffer import JitterFrame

    from letstalk_rt.rtc import FecFrame, FecOpusDecoder

    decoder, out = FecOpusDecoder(), []
    for i, packet in enumerate(packets):
        if i not in lost:
            frame = JitterFrame(data=packet, timestamp=i * SAMPLES)
        elif fec and i + 1 < len(packets) and i + 1 not in lost:
            frame = FecFrame(packets[i + 1], i * SAMPLES, SAMPLES)
        else:  # a lone TOC byte (one frame of no data, of the packet before's kind): libopus conceals it, as the
            # receivers' jitter buffer has it do
            frame = JitterFrame(data=bytes([packets[max(i - 1, 0)][0] & 0xFC]), timestamp=i * SAMPLES)
        out += [f.to_ndarray().reshape(-1, 2)[:, 0] / 32767.0 for f in decoder.decode(frame)]
    return np.concatenate(out).astype(np.float32)


def pesq_wb(speech: np.ndarray, decoded48: np.ndarray) -> float | None:
    """PESQ wide-band of the decoded sound (back at 16 kHz, lined up with the speech); None without `pesq`."""
    try:
        from pesq import pesq
    except ImportError:
        return None
    from scipy.signal import resample_poly

    y = resample_poly(decoded48, 1, 3).astype(np.float32)
    n = min(len(speech), 48000)
    lag = int(np.argmax(np.correlate(y[:n + 400], speech[:n], "valid")))  # the codec's delay (~6.5 ms)
    m = min(len(speech), len(y) - lag)
    return round(float(pesq(16000, speech[:m], y[lag:lag + m], "wb")), 3)


def lost_snr(clean: np.ndarray, decoded: np.ndarray, lost: set[int]) -> float:
    """The lost packets' 20 ms against the same decoded without loss, dB."""
    idx = np.concatenate([np.arange(i * SAMPLES, (i + 1) * SAMPLES) for i in sorted(lost)])
    idx = idx[idx < min(len(clean), len(decoded))]
    noise = np.sum((decoded[idx] - clean[idx]) ** 2)
    return round(float(10 * np.log10(np.sum(clean[idx] ** 2) / max(noise, 1e-12))), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="2,5,10", help="percentages of packets lost, comma-separated (default 2,5,10)")
    p.add_argument("--seed", type=int, default=0, help="which packets are lost (default 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    from aiortc.codecs.opus import OpusEncoder

    from letstalk_rt.cli import ASSETS
    from letstalk_rt.media import load_audio
    from letstalk_rt.rtc import libopus, opus_encoder

    if libopus() is None:
        raise SystemExit("no libopus found (neither in PyAV's wheel nor on the system: apt-get install libopus0)")
    speech = np.tile(np.asarray(load_audio(ASSETS / "speech.ogg"), np.float32), 2)  # ~21 s
    rows = []
    for name, encoder in (("aiortc (CELT, no FEC)", OpusEncoder()), ("server (rtc.opus_encoder, FEC)", opus_encoder())):
        packets = encode(speech, encoder)
        clean = decode(packets, set(), False)
        row = {"encoder": name, "kbps": round(sum(map(len, packets)) * 8 / (len(packets) * 0.02) / 1000, 1),
               "pesq_no_loss": pesq_wb(speech, clean)}
        for percent in (float(x) for x in args.loss.split(",")):
            draw = np.random.default_rng(args.seed).random(len(packets))
            lost = set(np.flatnonzero(draw < percent / 100).tolist())
            for how, fec in (("concealed", False), ("fec", True)):
                decoded = decode(packets, lost, fec)
                row[f"{percent:g}%_{how}"] = {"pesq": pesq_wb(speech, decoded), "lost_snr_db": lost_snr(clean, decoded,
                                                                                                         lost)}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
