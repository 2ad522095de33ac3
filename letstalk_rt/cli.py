"""The `letstalk` command.

    letstalk generate --portrait face.jpg --audio speech.wav --out talk.mp4   # offline file
    letstalk demo                                                            # bundled portrait + speech
    letstalk new-model --preset cpu-128 --out models/mine                     # untrained model directory

Every failure the user can fix prints one line, `letstalk: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .config import PRESETS_MODEL
from .errors import LetsTalkError

ASSETS = Path(__file__).parent / "assets"


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LetsTalkError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (config.json + *.safetensors); default: the bundled model")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per window, 1..50 (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-face-detect", action="store_true",
                   help="use a centre crop of the image instead of detecting the face")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _load_pipeline(args: argparse.Namespace):
    from .pipeline import LetsTalkPipeline

    device = _device(args.device)
    try:
        pipe = LetsTalkPipeline.from_pretrained(args.model, device=device, dtype=_dtype(args.dtype, device),
                                                num_steps=args.steps)
    except ValueError as e:  # a bad --steps
        raise LetsTalkError(f"--steps: {e}") from None
    if not pipe.config.trained:
        print("letstalk: warning: this model is UNTRAINED (random weights): the video will not look like a "
              "talking face. " + pipe.config.description, file=sys.stderr)
    return pipe


def _generate(args: argparse.Namespace, portrait: Path, audio: Path, out: Path) -> None:
    from .media import load_audio, load_image
    from .pipeline import generate_video

    # Check the cheap things first, so a typo does not wait for the model to load.
    load_image(portrait)
    load_audio(audio)
    if args.steps is not None and not 1 <= args.steps <= 50:
        raise LetsTalkError(f"--steps {args.steps}: choose 1..50")
    pipe = _load_pipeline(args)
    start = time.perf_counter()
    result = generate_video(portrait, audio, out, pipeline=pipe, seed=args.seed,
                            detect_face=not args.no_face_detect, progress=not args.quiet)
    took = time.perf_counter() - start
    print(f"wrote {result.path} ({result.frames} frames, {result.seconds:.2f} s of audio) in {took:.1f} s "
          f"= {result.frames / max(took, 1e-9):.1f} frames/s")


def cmd_generate(args: argparse.Namespace) -> None:
    _generate(args, args.portrait, args.audio, args.out)


def cmd_demo(args: argparse.Namespace) -> None:
    _generate(args, ASSETS / "portrait.png", ASSETS / "speech.ogg", args.out)


def cmd_new_model(args: argparse.Namespace) -> None:
    from .checkpoint import build_components, save_model
    from .config import model_preset

    config = model_preset(args.preset)
    config.description = f"untrained: preset {args.preset}, random init seed {args.seed}"
    path = save_model(build_components(config, seed=args.seed), args.out)
    print(f"wrote untrained model '{args.preset}' to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letstalk", description="LetsTalk real-time talking avatars")
    parser.add_argument("--version", action="version", version=f"letstalk-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="animate a portrait with speech into an mp4 file")
    p.add_argument("--portrait", type=Path, required=True, help="image with one front-facing face")
    p.add_argument("--audio", type=Path, required=True, help="speech: wav, mp3, m4a, ogg, flac (any rate)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (written atomically)")
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="run the bundled portrait and speech through the default model")
    p.add_argument("--out", type=Path, default=Path("letstalk_demo.mp4"), help="output .mp4")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("new-model", help="write an UNTRAINED model directory for a preset (training start, benchmarks)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS_MODEL))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_new_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LetsTalkError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("letstalk: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
