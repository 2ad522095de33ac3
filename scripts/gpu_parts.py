"""Where a batch window's GPU time goes, part by part, and what the decoder gains from each known lever.

    python scripts/gpu_parts.py --preset letstalk-b --wav2vec2 W2V_DIR [--batches 1,8,16] [--compile] [--json F]

Random weights (speed only), bf16 on CUDA (fp32 on a CPU, for trying the script). For each batch of B
sessions' windows: the two sampling steps (CUDA graphs) and the decode of the B * window frames; then the
decoder alone on 16 frames: eager, with cuDNN's autotuner (`torch.backends.cudnn.benchmark`), replayed
from a CUDA graph, and (--compile) through torch.compile; and decoders of 1/2 and 1/4 the width (the
narrower-decoder lever, `letstalk train --stage decoder --decoder-channels`). Each figure is the median
of 10 timed runs after 3 warm-ups; TFLOP/s from torch's FLOP counter. docs/benchmarks.md says why: the B
preset's decoder is ~72 % of a frame's arithmetic and caps the sessions per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.config import model_preset  # noqa: E402
from letstalk_rt.models.autoencoder import DCAutoencoder  # noqa: E402
from letstalk_rt.pipeline import CudaGraphed, LetsTalkPipeline, Portrait  # noqa: E402


def timed(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of fn() (3 warm-up runs first)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="letstalk-b")
    ap.add_argument("--wav2vec2", default=None, help="wav2vec2 directory, for the letstalk-* presets")
    ap.add_argument("--batches", default="1,8,16", help="sessions per batch window")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16, help="frames per decoder call for the decoder variants")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the decoder (minutes)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_preset(args.preset)
    if args.wav2vec2:
        config.audio.wav2vec2_path = args.wav2vec2
    torch.set_grad_enabled(False)
    pipe = LetsTalkPipeline.from_config(config, device=device, dtype=dtype)
    tc, T = config.transformer, args.window
    portrait = Portrait(image=np.zeros((config.image_size,) * 2 + (3,), np.uint8),
                        latent=torch.zeros(tc.latent_channels, tc.latent_size, tc.latent_size, device=device))
    tokens = pipe.silence_tokens(T)
    report: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "preset": args.preset, "window": T, "batches": []}

    for b in [int(x) for x in args.batches.split(",")]:
        streams = [pipe.new_stream(portrait, seed=i) for i in range(b)]
        lat = pipe.generate_latents(streams, [tokens] * b).flatten(0, 1)  # (b*T, C, h, w)
        row = {"sessions": b, "frames": b * T,
               "sampling_ms": timed(lambda: pipe.generate_latents(streams, [tokens] * b), device),
               "decode_ms": timed(lambda: pipe.decode(lat), device)}
        row["decode_ms_per_frame"] = round(row["decode_ms"] / (b * T), 3)
        report["batches"].append(row)
        print(json.dumps(row), flush=True)

    ae = pipe.autoencoder
    z = torch.randn(args.frames, tc.latent_channels, tc.latent_size, tc.latent_size, device=device)

    def run(fn):
        with pipe._autocast():
            return fn(z)

    gflop = flops(lambda: run(ae.decode)) / 1e9
    variants: dict[str, float] = {"eager": timed(lambda: run(ae.decode), device)}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        variants["eager, cudnn.benchmark"] = timed(lambda: run(ae.decode), device)
        graphed = CudaGraphed(ae.decode)
        variants["CUDA graph, cudnn.benchmark"] = timed(lambda: run(graphed), device)
        torch.backends.cudnn.benchmark = False
        graphed = CudaGraphed(ae.decode)
        variants["CUDA graph"] = timed(lambda: run(graphed), device)
    if args.compile:
        compiled = torch.compile(ae.decode, mode="max-autotune-no-cudagraphs", dynamic=False)
        start = time.perf_counter()
        run(compiled)
        report["compile_s"] = round(time.perf_counter() - start, 1)
        variants["torch.compile max-autotune"] = timed(lambda: run(compiled), device)
    report["decoder"] = {name: {"ms": ms, "ms_per_frame": round(ms / args.frames, 3),
                                "tflops": round(gflop / ms, 1)} for name, ms in variants.items()}
    report["decoder_gflop_per_frame"] = round(gflop / args.frames, 1)
    # The other lever: a narrower decoder for the same latents (`letstalk train --stage decoder
    # --decoder-channels`, as the cpu-128 default was made). Random weights, so speed only; replayed from a
    # CUDA graph where there is one, like the engine's.
    for share in (2, 4):
        widths = tuple(max(8, c // share) for c in config.autoencoder.block_channels)
        narrow = DCAutoencoder(dataclasses.replace(config.autoencoder, decoder_channels=widths)).to(device).eval()
        fn = CudaGraphed(narrow.decode) if device.type == "cuda" else narrow.decode
        ms, g = timed(lambda: run(fn), device), flops(lambda: run(narrow.decode)) / 1e9
        report["decoder"][f"1/{share} width {','.join(map(str, widths))}"] = {
            "ms": ms, "ms_per_frame": round(ms / args.frames, 3), "tflops": round(g / ms, 1),
            "gflop_per_frame": round(g / args.frames, 1)}
    print(json.dumps({"decoder_gflop_per_frame": report["decoder_gflop_per_frame"], **report["decoder"]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
