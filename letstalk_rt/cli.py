"""The `letstalk` command.

    letstalk generate --portrait face.jpg --audio speech.wav --out talk.mp4   # offline file
    letstalk demo                                                            # bundled portrait + speech
    letstalk new-model --preset cpu-128 --out models/mine                     # untrained model directory
    letstalk eval --data data/synth --model models/mine                      # lip sync, identity, drift report
    letstalk train --stage transformer --data data/synth --init models/ae --run runs/dit --out models/dit
    letstalk bench | serve | data synth | data prepare | train               # see --help of each

Every failure the user can fix prints one line, `letstalk: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .config import MAX_NOISE_DRAWS, PRESETS_MODEL, check_box, check_noise_draws
from .aio import stop_on_sigterm
from .errors import InputError, LetsTalkError, OutputError, Stopped, engine_not_installed
from .train.options import parse_widths

ASSETS = Path(__file__).parent / "assets"


def resolve_device(name: str) -> str:
    """--device: auto, cpu, cuda or cuda:N, checked against this machine (a LetsTalkError naming the flag)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if "," in name or name == "cuda:all":
        raise LetsTalkError(f"--device {name}: this command runs on one device; `letstalk serve` takes several")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LetsTalkError(f"--device {name}: choose cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise LetsTalkError(f"--device {name}: only cpu and cuda devices are supported; choose cpu, cuda, cuda:N "
                            "or auto")
    if not torch.cuda.is_available():
        raise LetsTalkError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LetsTalkError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return name


def resolve_devices(spec: str) -> list[str]:
    """`letstalk serve --device`: one device (resolve_device), or several comma-separated, one engine on each (an
    EnginePool); `cuda:all`: every CUDA device here. Each device at most once."""
    import torch

    if spec == "cuda:all":
        if not torch.cuda.is_available():
            raise LetsTalkError("--device cuda:all: no CUDA device is available here; use --device cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    names = [n.strip() for n in spec.split(",")]
    if len(names) == 1:
        return [resolve_device(names[0])]
    devices: list[str] = []
    for name in names:
        if name in ("", "auto", "cuda:all"):
            raise LetsTalkError(f"--device {spec}: name each device of a list (cuda:0,cuda:1); auto and cuda:all "
                                "stand alone")
        device = resolve_device(name)
        if device.startswith("cuda") and ":" not in device:
            device = f"cuda:{torch.cuda.current_device()}"
        if device in devices:
            raise LetsTalkError(f"--device {spec}: {device} is named twice; each device runs one engine (one copy of "
                                "the model, its sessions batched together)")
        devices.append(device)
    return devices


def check_output_file(path: Path | None, flag: str, example: str = "out") -> None:
    """Fail before a long run if `path` (an output file written at its end, whole or not at all) cannot be."""
    if path is not None:
        from .media import check_output_path

        check_output_path(path, flag, example)


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


START_TIME_HELP = ("flow time sampling starts at, 0 < T <= 1: each window starts from the portrait noised to T "
                   "instead of pure noise (1); lower leaves less of the face and mouth to the noise (default: the "
                   "model's at its own step count, 0.6 for the bundled one's 1 step; 1 at other --steps)")


NOISE_HOLD_HELP = ("a steadier face: outside the mouth each frame's starting noise keeps this much of the last "
                   "frame's, 0..1 (default: the model's, 0 for the bundled one; 0.7 cut its flicker by a fifth for "
                   "0.02 dB of identity, docs/eval.md)")


NOISE_DRAWS_HELP = ("sample each window from K starting noises and show their mean, at K network rows per step: "
                    f"1..{MAX_NOISE_DRAWS} (default: the model's, 2 for the bundled one; 1 is half the compute, with "
                    "a little less lip sync and more flicker, docs/eval.md)")


AUDIO_LOOKAHEAD_HELP = ("frames of audio after a frame that its mouth waits for, 0..2 (default: the model's; the "
                        "bundled one's 2 offline, 1 live): each frame less is 40 ms less latency live and a little "
                        "less lip sync (docs/eval.md, \"Less audio lookahead\")")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """How a loaded model samples (the CLI's commands and `letstalk serve`); `sampling_kwargs` reads them."""
    p.add_argument("--steps", type=int, default=None, help="sampling steps per window, 1..50 (default: the model's)")
    p.add_argument("--audio-guidance", type=float, default=None, metavar="G",
                   help="classifier-free guidance of the audio: G > 1 moves the mouth more, at one more network "
                        "row per step (default: the model's, 1 = off; --steps 2 --audio-guidance 1.25 is the "
                        "bundled model's best offline setting, docs/eval.md)")
    p.add_argument("--detail-transfer", type=float, default=None, metavar="GREY",
                   help="add back the portrait's fine detail where the face keeps still: the gate's width in grey "
                        "levels, 0 = off (default: the model's, 12 for the bundled one)")
    p.add_argument("--start-time", type=float, default=None, metavar="T",
                   help=START_TIME_HELP)
    p.add_argument("--noise-hold", type=float, default=None, metavar="H", help=NOISE_HOLD_HELP)
    p.add_argument("--noise-draws", type=int, default=None, metavar="K", help=NOISE_DRAWS_HELP)
    p.add_argument("--audio-lookahead", type=int, default=None, metavar="F", help=AUDIO_LOOKAHEAD_HELP)
    p.add_argument("--audio-guidance-box", default=None, metavar="X,Y,W,H",
                   help="with --audio-guidance: guide only this box of the face crop (fractions; the mouth is about "
                        "0.3,0.48,0.4,0.4), the rest of the face gets the unguided velocity, which keeps more of the "
                        "identity; 'all' guides the whole frame (default: the model's, the whole frame for the "
                        "bundled one; docs/eval.md)")


def audio_guidance_box(text: str | None) -> tuple[float, float, float, float] | str | None:
    """--audio-guidance-box: 'all', x,y,w,h, or None (not given)."""
    if text is None or text.strip().lower() == "all":
        return None if text is None else "all"
    try:
        return check_box(text.split(","), f"--audio-guidance-box {text}", LetsTalkError)
    except LetsTalkError as e:
        raise LetsTalkError(f"{e} (or 'all')") from None


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """LetsTalkPipeline keyword arguments from add_sampling_args' flags (None: the model's own setting)."""
    return {"num_steps": args.steps, "audio_guidance": args.audio_guidance, "detail_transfer": args.detail_transfer,
            "start_time": args.start_time, "noise_hold": args.noise_hold, "noise_draws": args.noise_draws,
            "audio_lookahead": args.audio_lookahead,
            "audio_guidance_box": audio_guidance_box(args.audio_guidance_box)}


def pipeline_kwargs(args: argparse.Namespace, device) -> dict:
    """LetsTalkPipeline keyword arguments from add_device_args' and add_sampling_args' flags, on `device`."""
    return {"device": device, "dtype": resolve_dtype(args.dtype, device), "cuda_graphs": not args.no_cuda_graphs,
            "traced": not args.no_trace, **sampling_kwargs(args)}


def check_sampling_args(args: argparse.Namespace) -> None:
    """Fail before the model loads, naming the flag."""
    if args.steps is not None and not 1 <= args.steps <= 50:
        raise LetsTalkError(f"--steps {args.steps}: choose 1..50")
    for flag in ("audio_guidance", "detail_transfer", "start_time", "noise_hold"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise LetsTalkError(f"--{flag.replace('_', '-')} {value}: give a finite number")
    if args.start_time is not None and not 0 < args.start_time <= 1:
        raise LetsTalkError(f"--start-time {args.start_time:g}: choose a flow time in (0, 1] (1 = pure noise)")
    if args.noise_hold is not None and not 0 <= args.noise_hold <= 1:
        raise LetsTalkError(f"--noise-hold {args.noise_hold:g}: choose 0..1 (0 = fresh noise every frame)")
    if args.noise_draws is not None:
        check_noise_draws(args.noise_draws, "--noise-draws", LetsTalkError)
    if args.audio_lookahead is not None and args.audio_lookahead < 0:
        raise LetsTalkError(f"--audio-lookahead {args.audio_lookahead}: choose 0 up to the model's (2 for the "
                            "bundled one)")
    audio_guidance_box(args.audio_guidance_box)


def add_device_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--device and --dtype (the CLI's commands and `letstalk serve`): resolve_device / resolve_dtype read them;
    `several`: --device may name several (resolve_devices)."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)" + (
        "; or several, one engine and copy of the model on each, new sessions on the least busy: cuda:0,cuda:1 or "
        "cuda:all" if several else ""))
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch the model's kernels one by one instead of replaying CUDA graphs of them "
                        "(slower; for debugging)")
    p.add_argument("--no-trace", action="store_true",
                   help="on a CPU, run the model eagerly instead of from TorchScript traces of it (slower, and "
                        "more so beside a busy event loop; for debugging)")


def _full_frame_side(text: str) -> int:
    from .framing import MAX_PHOTO_SIDE

    try:
        side = int(text)
    except ValueError:
        side = -1
    if not 16 <= side <= MAX_PHOTO_SIDE:
        raise argparse.ArgumentTypeError(f"expected the frames' longest side in pixels, 16..{MAX_PHOTO_SIDE}, "
                                         f"got {text!r}")
    return side


def _add_full_frame_arg(p: argparse.ArgumentParser) -> None:
    from .framing import FULL_FRAME_SIDE

    p.add_argument("--full-frame", type=_full_frame_side, nargs="?", const=FULL_FRAME_SIDE, default=0, metavar="PX",
                   help="the whole photo talks: each animated face is pasted back into the portrait photo, frames "
                        f"scaled to fit PX on the longest side (default {FULL_FRAME_SIDE}); without it, the face "
                        "crop at the model's size")


def _framing(text: str) -> float:
    from .framing import check_framing

    try:
        return check_framing(text, "--framing")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_framing_arg(p: argparse.ArgumentParser) -> None:
    from .framing import FRAMING

    p.add_argument("--framing", type=_framing, default=FRAMING, metavar="K",
                   help="with --full-frame: a face small in a large photo (a full-body shot, a group) is shown with at "
                        f"most K sides of its square on the frames' shorter side: head and shoulders (default "
                        f"{FRAMING:g}); 0: the whole photo however small the face")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (config.json + *.safetensors); default: the bundled model")
    add_sampling_args(p)
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video")
    add_device_args(p)
    p.add_argument("--no-face-detect", action="store_true",
                   help="use a centre crop of the image instead of detecting the face")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Keeping:
    """An argparse parser or argument group whose `add_argument` also keeps each action it makes (`actions`)."""

    def __init__(self, parser) -> None:
        self.parser, self.actions = parser, []

    def add_argument(self, *names, **options) -> argparse.Action:
        action = self.parser.add_argument(*names, **options)
        self.actions.append(action)
        return action


def _add_server_args(p: argparse.ArgumentParser, help: str, live: bool) -> None:
    """--server URL (the model runs there, not here) and --api-key; the flags that choose and run the model here
    (_add_model_args, and add_live_args if `live`) in a group of their own, kept (`here_only`) so that
    `check_server_args` refuses those given with --server: the server runs its model as `letstalk serve` started it."""
    p.add_argument("--server", default=None, metavar="URL", help=help)
    p.add_argument("--api-key", default=None, help="with --server: its API key (letstalk serve --api-key)")
    group = _Keeping(p.add_argument_group("the model, run here (with --server only --seed and --quiet: the server "
                                          "runs its own as `letstalk serve` started it)"))
    _add_model_args(group)
    if live:
        add_live_args(group)
    p.set_defaults(here_only=[(a.option_strings[0], a.dest, a.default) for a in group.actions
                              if a.dest not in ("seed", "quiet")])  # the server takes a seed; --quiet is ours


def check_server_args(args: argparse.Namespace) -> None:
    """With --server: none of the flags that only this machine's model would read (`_add_server_args`)."""
    given = [flag for flag, dest, default in args.here_only if getattr(args, dest) != default]
    if given:
        raise LetsTalkError(f"{', '.join(given)}: with --server the server runs its own model as `letstalk serve` "
                            f"was started (it takes {given[0]} there); leave {'them' if len(given) > 1 else 'it'} out")


def _load_pipeline(args: argparse.Namespace):
    from .pipeline import LetsTalkPipeline

    device = resolve_device(args.device)
    pipe = LetsTalkPipeline.from_pretrained(args.model, **pipeline_kwargs(args, device))
    if not pipe.config.trained:
        print("letstalk: warning: this model is UNTRAINED (random weights): the video will not look like a "
              "talking face. " + pipe.config.description, file=sys.stderr)
    return pipe


def _add_speech_args(p: argparse.ArgumentParser) -> None:
    from .tts import DEFAULT_VOICE, PITCH_RANGE, RATE_RANGE

    p.add_argument("--voice", default=DEFAULT_VOICE, help=f"with --text: an espeak-ng voice (`espeak-ng --voices`), "
                   f"optionally with a variant (`espeak-ng --voices=variant`) after '+', e.g. fr, en-us+f3 (default "
                   f"{DEFAULT_VOICE})")
    p.add_argument("--rate", type=int, default=175, help=f"with --text: words per minute, {RATE_RANGE[0]}..{RATE_RANGE[1]} "
                   "(default 175)")
    p.add_argument("--pitch", type=int, default=50, help=f"with --text: {PITCH_RANGE[0]}..{PITCH_RANGE[1]} (default 50)")


def _speech(args: argparse.Namespace):
    """--text's voice, rate and pitch, checked (InputError names what to give)."""
    from .tts import Speech

    return Speech(args.voice, args.rate, args.pitch)


def _generate(args: argparse.Namespace, portrait: Path, audio: Path | None, out: Path) -> None:
    from .media import WHITE, check_video_path, load_audio, load_image, parse_colour
    from .pipeline import generate_video

    # Check the cheap things first, so a typo does not wait for the model to load. Each input is read once
    # (a pipe such as <(ffmpeg ...) can be read only once).
    image = load_image(portrait, parse_colour(args.background, "--background") if args.background else WHITE)
    said: list[tuple[int, str]] = []  # --text: where each sentence starts
    if audio is not None:
        wav = load_audio(audio)
    else:
        wav, said = _speech(args).speak_timed(args.text)
    check_video_path(out, "--out")
    pipe = _load_pipeline(args)
    start = time.perf_counter()
    result = generate_video(image, wav, out, pipeline=pipe, seed=args.seed, detect_face=not args.no_face_detect,
                            progress=not args.quiet, name=str(portrait), full_frame=args.full_frame,
                            framing=args.framing)
    took = time.perf_counter() - start
    print(f"wrote {result.path} ({result.frames} frames, {result.seconds:.2f} s of audio) in {took:.1f} s "
          f"= {result.frames / max(took, 1e-9):.1f} frames/s")
    if said:
        _write_captions(out, said, len(wav), pipe.fps)


def _write_captions(out: Path, said: list[tuple[int, str]], samples: int, fps: int) -> None:
    """--text: each sentence a caption while it is spoken, WebVTT beside the video (`out` with .vtt)."""
    from .stream.recorder import CaptionCues
    from .tts import SAMPLE_RATE

    ends = [a for a, _ in said[1:]] + [samples]
    _save_captions(out, CaptionCues(fps, cues=[(round(a * fps / SAMPLE_RATE), round(b * fps / SAMPLE_RATE), text)
                                               for (a, text), b in zip(said, ends)]))


def _save_captions(out: Path, cues) -> None:
    from .media import write_text_atomic
    from .stream.recorder import captions_path

    path = captions_path(out)
    write_text_atomic(path, cues.webvtt(), "choose another --out")
    print(f"wrote {path} ({len(cues.cues)} captions)")


def cmd_generate(args: argparse.Namespace) -> None:
    if args.server is None:
        _generate(args, args.portrait, args.audio, args.out)
        return
    check_server_args(args)
    import aiohttp

    try:
        asyncio.run(_generate_remote(args))
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        raise _unreachable(args.server, e) from None


def _unreachable(server: str, error: Exception) -> LetsTalkError:
    import aiohttp

    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return LetsTalkError(f"the server at {server} has a TLS certificate this machine does not trust "
                             f"({error.certificate_error}): set SSL_CERT_FILE to the certificate (PEM) of the CA that "
                             "signed it (a self-signed server: its own --tls-cert)")
    return LetsTalkError(f"cannot reach the server at {server} ({error or 'timed out'}); is `letstalk serve` running "
                         "there?")


def _render_progress(state: dict) -> None:
    """`letstalk generate --server`'s line while the server makes the video (a render's state: AvatarClient.render)."""
    if state["state"] == "queued":
        line = f"  queued: {state.get('queue_position') or '?'} in line for a session slot on the server"
    else:
        line = f"  {state['rendered_seconds']:5.1f} s made"
        if state.get("speech_seconds") is not None:
            line += f" of {state['speech_seconds']:.1f} s of speech"
        if state.get("speed") is not None:
            line += f", {state['speed']:.2f}x real time"
        if state.get("eta_seconds") is not None:
            line += f", ~{state['eta_seconds']:.0f} s left"
        if state.get("live_sessions"):
            line += f" (sharing the server's device with {state['live_sessions']} live sessions)"
    print(f"\r{line:<100}", end="", file=sys.stderr, flush=True)


async def _generate_remote(args: argparse.Namespace) -> None:
    """`letstalk generate --server URL`: the server makes the video (AvatarClient.render: one of its session slots,
    as fast as its live sessions leave room), and it and a text's captions are saved here, each under a temporary
    name until whole."""
    from .client import AvatarClient
    from .media import check_video_path
    from .stream.recorder import captions_path

    check_video_path(args.out, "--out")  # before anything goes up
    speech = {"audio": args.audio} if args.audio is not None else {
        "text": args.text, "voice": args.voice, "rate": args.rate, "pitch": args.pitch}
    start = time.perf_counter()
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        if not args.quiet:
            print(f"the server at {args.server} is making it ...", file=sys.stderr)
        try:
            state = await client.render(args.out, portrait=args.portrait, seed=args.seed,
                                        full_frame=args.full_frame or None, framing=args.framing,
                                        background=args.background,
                                        on_progress=None if args.quiet else _render_progress, **speech)
        finally:
            if not args.quiet:
                print(file=sys.stderr)  # past the progress line
        print(f"wrote {args.out} ({state['speech_seconds']:.2f} s of speech, made by the server in "
              f"{state['seconds_taken']:.1f} s; {time.perf_counter() - start:.1f} s in all)")
        if args.text is not None:
            path = captions_path(args.out)
            await client.download_captions(state["render_id"], path)
            print(f"wrote {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Stream the bundled speech through the live engine in real time and record what the tracks emit."""
    from .media import check_video_path, load_image

    check_live_args(args)
    check_video_path(args.out, "--out")
    if args.broadcast:
        from .media import check_live_url

        for url in args.broadcast:
            check_live_url(url)
    voice = None
    if args.text is not None:  # checked before the model loads
        from .tts import check_text

        check_text(args.text)
        voice = _speech(args)
    image = load_image(ASSETS / "portrait.png")
    pipe = _load_pipeline(args)
    asyncio.run(_demo(pipe, image, ASSETS / DEMO_SPEECH, args, voice))


DEMO_SPEECH = "speech.ogg"


async def _first_word(session) -> float | None:
    """Seconds from now until `session` shows its first frame of speech (None: it closed first)."""
    from .stream.events import SpeechStarted

    start = time.time()
    async for event in session.events():
        if isinstance(event, SpeechStarted):
            return event.time - start
    return None


async def _demo(pipe, image, speech: Path, args: argparse.Namespace, voice=None) -> None:
    """`speech` played in real time, or with `voice` (a tts.Speech) `args.text` said as the server's `say` does."""
    import math

    import numpy as np

    from .media import VideoWriter
    from .stream import EngineConfig, FileSource, StreamEngine
    from .stream.recorder import CaptionCues
    from .stream.tracks import VIDEO_CLOCK_RATE

    source = FileSource(speech, realtime=True) if args.text is None else None
    config = EngineConfig(max_sessions=1, max_batch=1, **live_config(args))
    async with StreamEngine(pipe, config) as engine:
        if args.max_steps:
            print(f"sampling {pipe.num_steps} step(s) per window on this machine (--max-steps {args.max_steps})",
                  file=sys.stderr)
        session = await engine.open_session(image, seed=args.seed, detect_face=not args.no_face_detect,
                                            full_frame=args.full_frame, framing=args.framing)
        # connected (its process started) before the speech: the stream has it all
        broadcasts = [await session.broadcast(url) for url in args.broadcast]
        for broadcast in broadcasts:
            print(f"streaming live to {broadcast.url}", file=sys.stderr)
        if source is not None:
            feeder = asyncio.create_task(source.run(session))
            print(f"streaming {source.seconds:.1f} s of speech in real time through the engine ...", file=sys.stderr)
        else:
            first_word = asyncio.create_task(_first_word(session))
            feeder = session.say(args.text, voice)
            print(f"speaking {args.text[:40]!r}{'...' if len(args.text) > 40 else ''} ({voice.voice}) through "
                  "the engine ...", file=sys.stderr)
        video, audio = session.video_track(), session.audio_track()
        # the speech and one second of rest after it (said text: once its length is known)
        ticks = math.ceil((source.seconds + 1.0) * pipe.fps) if source is not None else None
        cues = CaptionCues(pipe.fps)  # said text: each sentence's caption, on the file's timeline
        with VideoWriter(args.out, session.frame_size, fps=pipe.fps) as writer:
            i = 0
            while ticks is None or i < ticks:
                if ticks is None and feeder.done():
                    ticks = math.ceil((feeder.result() + 1.0) * pipe.fps)
                frame = await video.recv()
                if (shown := session.player.shown.get(frame.pts * pipe.fps // VIDEO_CLOCK_RATE)) is not None:
                    cues.add(i, shown)
                writer.write_frame(frame.to_ndarray(format="rgb24"))
                for _ in range(2):  # this frame's two 20 ms packets
                    packet = await audio.recv()
                    writer.write_audio(packet.to_ndarray()[0].astype(np.float32) / 32768.0)
                if not args.quiet and i % pipe.fps == 0:
                    print(f"\r  {i / pipe.fps:5.1f} s streamed", end="", file=sys.stderr, flush=True)
                i += 1
        await feeder
        if broadcasts:
            with contextlib.suppress(OutputError):  # a failed stream is said below
                await session.stop_broadcast()
        stats = session.stats()
    if not args.quiet:
        print(file=sys.stderr)
    print(f"wrote {args.out} ({ticks} frames recorded from the WebRTC tracks)")
    for broadcast in broadcasts:
        again = f" (its connection dropped and was made again {broadcast.reconnects}x)" if broadcast.reconnects else ""
        print(f"streamed {broadcast.seconds:.1f} s live to {broadcast.url}{again}" if broadcast.error is None else
              f"the live stream to {broadcast.url} failed after {broadcast.seconds:.1f} s: {broadcast.error}")
    cues.close(ticks)
    if cues.cues:
        _save_captions(args.out, cues)
    # said text is queued ahead of real time; its latency counts from when each piece would have come at real-time
    # pace (push_audio(ahead=True)), and how long its first word took to show is printed beside it
    latency = (f"speech-to-screen latency p50 {stats['latency_ms_p50'] or 0:.0f} ms, "
               f"p95 {stats['latency_ms_p95'] or 0:.0f} ms")
    if source is None:
        said_at = first_word.result() if first_word.done() else None
        latency += "; time to first word (say() to its first frame on screen) " + (
            f"{said_at * 1000:.0f} ms" if said_at is not None else "never: no speech was shown")
    print(f"time to first frame {stats['first_frame_s'] * 1000:.0f} ms; {latency}; held (late) frames "
          f"{stats['fillers']}; dropped {sum(stats['dropped'].values()) - stats['dropped'].get('late', 0)}")


def cmd_camera(args: argparse.Namespace) -> None:
    """Your microphone (or --audio) in; the avatar out as a virtual camera and its voice, in step, on --speaker."""
    from .media import load_image
    from .devices import audio_devices, check_camera_size

    if args.list_devices:
        print(audio_devices())
        return
    check_live_args(args)
    check_camera_size(args.camera_size)
    if args.seconds is not None and not (math.isfinite(args.seconds) and args.seconds > 0):
        raise LetsTalkError(f"--seconds {args.seconds}: give more than 0 (or leave it out: until Ctrl-C)")
    if args.no_camera and args.speaker == "none":
        raise LetsTalkError("--no-camera and --speaker none leave nothing to show the avatar on")
    if args.speaker_latency is not None and not 1 <= args.speaker_latency <= 500:
        raise LetsTalkError(f"--speaker-latency {args.speaker_latency:g}: give 1..500 ms (more than 80 if the voice "
                            "clicks)")
    if args.server is not None:
        check_server_args(args)
    from .stream import FileSource, MicrophoneSource

    # a file that is not speech, or a microphone that is not there: said now, before the model loads
    source = FileSource(args.audio, realtime=True) if args.audio is not None else MicrophoneSource(args.mic)
    try:
        if args.server is not None:
            import aiohttp

            try:
                asyncio.run(_camera_remote(source, args))
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                raise _unreachable(args.server, e) from None
        else:
            image = load_image(args.portrait or ASSETS / "portrait.png")
            asyncio.run(_camera(_load_pipeline(args), image, source, args))
    except KeyboardInterrupt:  # how it is meant to stop: the devices were closed on the way out
        print("\nletstalk camera: stopped", file=sys.stderr)


def _audio_device(text: str) -> int | str:
    """--mic / --speaker: a device's number, or (part of) its name."""
    return int(text) if text.isdigit() else text


def _open_camera(args: argparse.Namespace, frame_size: tuple[int, int], fps: int):
    """`letstalk camera`'s virtual camera (None with --no-camera), said on stderr."""
    from .devices import VirtualCamera

    if args.no_camera:
        return None
    camera = VirtualCamera(frame_size, fps, size=args.camera_size, device=args.camera_device)
    print(f"virtual camera: {camera.device} ({camera.width}x{camera.height}, {fps} fps)", file=sys.stderr)
    return camera


def _open_voice(args: argparse.Namespace, sample_rate: int):
    """`letstalk camera`'s voice output (None with --speaker none), said on stderr."""
    from .devices import AudioOutput

    if args.speaker == "none":
        return None
    voice = AudioOutput(args.speaker, sample_rate,
                        **({} if args.speaker_latency is None else {"latency": args.speaker_latency / 1000}))
    print(f"the avatar's voice: {voice.name} ({voice.rate} Hz, {voice.latency * 1000:.0f} ms buffered); make its "
          "loopback the call's microphone", file=sys.stderr)
    return voice


def _camera_summary(shown_s: float, latency: str, held: int, camera, voice) -> None:
    dropped = {type(d).__name__: d.dropped for d in (camera, voice) if d is not None and d.dropped}
    skipped = f"; pauses skipped to keep the voice in step {voice.skipped_s:.2f} s" if voice and voice.skipped_s else ""
    if voice and voice.underflows:
        skipped += (f"; the speaker ran out of sound {voice.underflows}x (clicks: a larger --speaker-latency gives "
                    "it more margin)")
    print(f"showed {shown_s:.1f} s; {latency}; held (late) frames {held}"
          + (f"; ticks a device fell behind on {dropped}" if dropped else "") + skipped)


async def _until_shown(shower: asyncio.Task, helpers: list[asyncio.Task], progress: Callable[[], str] | None) -> int:
    """`letstalk camera`'s run: wait for `shower` (it returns the ticks shown), printing `progress()` each second; a
    helper that failed (the microphone, the speaker) ends the run with its error at once, not hidden. Every task is
    cancelled on the way out."""
    try:
        while not shower.done():
            await asyncio.wait([shower, *(t for t in helpers if not t.done())], timeout=1.0,
                               return_when=asyncio.FIRST_COMPLETED)
            for helper in helpers:
                if helper.done() and not helper.cancelled() and helper.exception() is not None:
                    raise helper.exception()
            if progress is not None:
                print("\r" + progress(), end="", file=sys.stderr, flush=True)
        return shower.result()
    finally:
        for task in (shower, *helpers):
            task.cancel()


async def _camera_remote(source, args: argparse.Namespace) -> None:
    """`letstalk camera --server URL`: the avatar made by a server (`letstalk serve`, on a GPU), this machine only
    listening and showing: the microphone's speech goes up the session's websocket, the video and voice come back over
    WebRTC, where the SDK holds each frame for its sound (AvatarClient), and go to the devices as they come."""
    from .client import AvatarClient, AvatarClientError
    from .devices import show_frames
    from .rtc import OPUS_RATE  # the rate the SDK hands the voice over at

    shown = 0
    camera, voice = None, _open_voice(args, OPUS_RATE)  # a speaker that is not there: said before the server is asked
    try:
        async with AvatarClient(args.server, api_key=args.api_key) as client:
            shape = {"full_frame": args.full_frame or None, "framing": args.framing, "seed": args.seed}
            session = await (client.start_session(portrait=args.portrait, **shape) if args.portrait is not None
                             else client.start_session(avatar_id=args.avatar, **shape))
            async with session:
                await session.connect()
                video = session.info["video"]
                fps = video["fps"]
                ticks = None if args.seconds is None else math.ceil(args.seconds * fps)
                print(f"the server's session {session.id}", file=sys.stderr)

                async def feed() -> None:
                    async for pcm, rate in source.chunks():
                        await session.send_audio(pcm, rate)
                    if args.audio is not None:
                        await session.end_speech()

                async def play() -> None:
                    async for chunk in session.audio_frames():
                        if chunk.sample_rate != OPUS_RATE:
                            raise OutputError(f"the server's voice came at {chunk.sample_rate} Hz, not {OPUS_RATE}")
                        voice.play(chunk.mono_float())

                async def frames():  # the voice comes on its own (play): the frames alone, counted as shown
                    nonlocal shown
                    async for rgb in session.video_frames():
                        shown += 1
                        yield rgb, None

                camera = _open_camera(args, (video["width"], video["height"]), fps)
                helpers = [asyncio.create_task(feed())] + ([asyncio.create_task(play())] if voice is not None else [])
                print(f"listening to {args.audio or 'the microphone'}; Ctrl-C to stop", file=sys.stderr)
                started = time.monotonic()

                def progress() -> str:
                    return f"  {shown / fps:6.1f} s shown, {time.monotonic() - started:6.1f} s"

                try:
                    await _until_shown(asyncio.create_task(show_frames(frames(), camera, voice, ticks)), helpers,
                                       None if args.quiet else progress)
                except AvatarClientError:  # a send (SessionClosedError) or the media after the server closed it
                    if session.close_reason is None:
                        raise
                if session.close_reason is not None:  # its time limit, a shutdown, an operator ...
                    raise LetsTalkError(f"the server closed the session after {shown / fps:.1f} s: "
                                        f"{session.close_reason}")
                stats = (await session.stats())["stats"]
    finally:
        for device in (camera, voice):
            if device is not None:
                device.close()
    if not args.quiet:
        print(file=sys.stderr)
    _camera_summary(shown / fps, f"speech-to-screen latency p95 at the server {stats['latency_ms_p95'] or 0:.0f} ms",
                    stats["fillers"], camera, voice)


async def _camera(pipe, image, source, args: argparse.Namespace) -> None:
    from .stream import EngineConfig, StreamEngine
    from .devices import show_on_devices

    config = EngineConfig(max_sessions=1, max_batch=1, **live_config(args))
    camera = voice = None
    async with StreamEngine(pipe, config) as engine:
        session = await engine.open_session(image, seed=args.seed, detect_face=not args.no_face_detect,
                                            full_frame=args.full_frame, framing=args.framing)
        try:
            camera = _open_camera(args, session.frame_size, pipe.fps)
            voice = _open_voice(args, session.sample_rate)
            feeder = asyncio.create_task(source.run(session, end_speech=args.audio is not None))
            print(f"listening to {args.audio or 'the microphone'}; Ctrl-C to stop", file=sys.stderr)
            ticks = None if args.seconds is None else math.ceil(args.seconds * pipe.fps)

            def progress() -> str:  # counters only: stats() sorts every kept latency, too much each second for hours
                last = session.latencies[-1] * 1000 if session.latencies else 0.0
                return (f"  {session.player.tick / pipe.fps:6.1f} s shown, latency {last:4.0f} ms, held "
                        f"{session.player.fillers}")

            shown = await _until_shown(asyncio.create_task(show_on_devices(session, camera, voice, ticks)), [feeder],
                                       None if args.quiet else progress)
        finally:
            for device in (camera, voice):
                if device is not None:
                    device.close()
        stats = session.stats()
    if not args.quiet:
        print(file=sys.stderr)
    _camera_summary(shown / pipe.fps, f"speech-to-screen latency p95 {stats['latency_ms_p95'] or 0:.0f} ms",
                    stats["fillers"], camera, voice)


def cmd_train(args: argparse.Namespace) -> None:
    from .train import trainer

    trainer.main(args)
    trainer.leave_if_distributed(0)  # (a rank under torchrun: no interpreter teardown)


def cmd_bench(args: argparse.Namespace) -> None:
    import numpy as np

    from .bench import check_neighbours, run_bench
    from .media import load_audio, load_image
    from .pipeline import LetsTalkPipeline

    check_live_args(args)
    if args.decoder_channels is not None and not args.preset:
        raise LetsTalkError("--decoder-channels changes a --preset's decoder; a model directory has its own")
    if args.preset and args.model is not None:
        raise LetsTalkError("--preset benchmarks a preset's random weights; --model a trained model: give one")
    if args.wav2vec2 is not None and not args.preset:
        raise LetsTalkError("--wav2vec2 is for a letstalk-* --preset; a model directory names its own")
    if args.repeat < 1:
        raise LetsTalkError(f"--repeat {args.repeat}: give 1 or more runs per session count")
    if not (math.isfinite(args.seconds) and args.seconds > 0) or not (math.isfinite(args.soak) and args.soak >= 0):
        raise LetsTalkError(f"--seconds {args.seconds:g} / --soak {args.soak:g}: give seconds > 0 (--soak 0: no soak)")
    check_output_file(args.json, "--json", "out.json")  # before the run, not after it
    if args.record and (args.webrtc or args.peer_process):
        raise LetsTalkError("--record records in-process sessions; drop --webrtc / --peer-process to use it")
    if not (math.isfinite(args.loss) and 0 <= args.loss <= 50):
        raise LetsTalkError(f"--loss {args.loss:g}: give a percentage of packets from 0 to 50")
    if args.loss and not (args.webrtc or args.peer_process):
        raise LetsTalkError("--loss loses packets on the way through WebRTC: add --webrtc")
    try:
        busy, period = (float(x) for x in args.neighbour_duty.split("/"))
    except ValueError:
        raise LetsTalkError(f"--neighbour-duty {args.neighbour_duty!r}: give BUSY/PERIOD seconds, like 30/60") from None
    check_neighbours(args.neighbours, busy, period)
    if args.soak:
        counts, seconds = [1], float(args.soak)
    else:
        try:
            counts = [int(x) for x in args.sessions.split(",")]
        except ValueError:
            raise LetsTalkError(f"--sessions {args.sessions!r}: give counts like 1,2,4") from None
        if min(counts) < 1:
            raise LetsTalkError(f"--sessions {args.sessions!r}: session counts start at 1")
        seconds = args.seconds
    device = resolve_device(args.device)
    if args.preset:
        pipe = LetsTalkPipeline.from_config(_preset_config(args), **pipeline_kwargs(args, device))
        print(f"benchmarking preset {args.preset} with RANDOM weights (speed only)", file=sys.stderr)
    else:
        pipe = _load_pipeline(args)
    if args.window > pipe.max_window:
        raise LetsTalkError(f"--window {args.window}: this model generates 1..{pipe.max_window} frames per window")
    portrait = pipe.prepare_portrait(load_image(ASSETS / "portrait.png"), detect=not args.no_face_detect)
    audio = load_audio(ASSETS / DEMO_SPEECH)
    run_bench(pipe, counts, seconds, np.asarray(audio), portrait, json_path=args.json,
              breakdown=not args.soak, repeat=args.repeat, live=live_config(args),
              neighbours=(args.neighbours, busy, period), seed=args.seed, webrtc=args.webrtc,
              peer_process=args.peer_process, full_frame=args.full_frame, record=args.record, loss=args.loss / 100)


def _preset_config(args: argparse.Namespace):
    """The preset's ModelConfig, with --wav2vec2 applied (presets that use wav2vec2 need a local checkpoint)."""
    from .config import model_preset

    config = model_preset(args.preset)
    widths = getattr(args, "decoder_channels", None)
    if widths is not None:  # a narrower decoder for the same latents (speed; `letstalk train --stage decoder`)
        from .models.autoencoder import check_config

        config.autoencoder.decoder_channels = widths
        check_config(config.autoencoder)  # ModelError naming the rule a width breaks
    if args.wav2vec2 is not None:
        if config.audio.encoder != "wav2vec2":
            raise LetsTalkError(f"--wav2vec2: preset {args.preset!r} uses the {config.audio.encoder!r} audio encoder; "
                                "drop --wav2vec2 or pick a letstalk-* preset")
        config.audio.wav2vec2_path = str(args.wav2vec2.resolve())  # read later, from wherever the model is used
    return config


def cmd_new_model(args: argparse.Namespace) -> None:
    from .checkpoint import build_components, save_model, weights_digest, write_dir_atomic

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise LetsTalkError(f"--out {out}: already exists and is not an empty folder; choose a new --out, or add "
                            "--force to replace it (a trained model there would be lost)")
    config = _preset_config(args)
    config.description = f"untrained: preset {args.preset}, random init seed {args.seed}"
    dcae = None
    if args.dcae is not None:  # a pretrained DC-AE as the autoencoder: its latents decide the transformer's
        import dataclasses

        from .models.autoencoder import load_diffusers_dcae

        dcae = load_diffusers_dcae(args.dcae, image_size=config.autoencoder.image_size).requires_grad_(False)
        dc = dcae.config
        config.autoencoder = dataclasses.replace(
            config.autoencoder, latent_channels=dc.latent_channels, block_channels=dc.block_channels,
            layers_per_block=dc.layers_per_block, scaling_factor=dc.scaling_factor,
            diffusers_path=str(args.dcae.resolve()))
        config.transformer.latent_channels = dc.latent_channels
        config.transformer.latent_size = config.autoencoder.latent_size
        config.validate()
        config.description += f", the pretrained DC-AE at {args.dcae.resolve()} as its autoencoder"
    comps = build_components(config, seed=args.seed, autoencoder=dcae)
    if config.audio.encoder == "wav2vec2":  # the model remembers which checkpoint it was made on
        config.audio.wav2vec2_digest = weights_digest(comps.audio_encoder.model)
    write_dir_atomic(out, lambda tmp: save_model(comps, tmp))  # whole or not at all
    print(f"wrote untrained model '{args.preset}' to {out}")


def cmd_sync_check(args: argparse.Namespace) -> None:
    from .eval import MAX_LAG, sync_check

    check_output_file(args.json, "--json", "out.json")
    rows = [sync_check(v, args.portrait, args.audio) for v in args.video]
    for r in rows:
        print(f"{r['video']}: {r['seconds']} s at {r['fps']:g} fps; speech to mouth r = {r['speech_sync']:.3f} at offset 0, peak "
              f"{r['peak_sync']:.3f} at {r['speech_offset']:+d} frames (-{MAX_LAG}..+{MAX_LAG}; positive = video "
              f"late); closed mouth from {r['closed_mouth']}")
    if args.json is not None:
        from .media import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval import evaluate

    try:
        steps_list = [int(x) for x in args.steps_list.split(",")] if args.steps_list else []
    except ValueError:
        raise LetsTalkError(f"--steps-list {args.steps_list!r}: give step counts like 1,2,4,8") from None
    device = resolve_device(args.device)
    report = evaluate(args.data, args.model or [None], args.out, split=args.split, clips=args.clips,
                      steps=args.steps, steps_list=steps_list, long_seconds=args.long_seconds,
                      probe_clips=args.probe_clips, window=args.window, detail_transfer=args.detail_transfer,
                      start_time=args.start_time, noise_hold=args.noise_hold, audio_guidance=args.audio_guidance,
                      noise_draws=args.noise_draws, audio_guidance_box=audio_guidance_box(args.audio_guidance_box),
                      audio_lookahead=args.audio_lookahead,
                      seed=args.seed, seeds=args.seeds, device=device,
                      dtype=resolve_dtype(args.dtype, device), progress=not args.quiet)
    for m in report["models"]:
        marks = [f"{k.replace('_', ' ')} {'n/a' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'}"
                 for k, t in m["targets"].items()]
        print(f"{m['label']}: {', '.join(marks)}")
        s, truth = m["summary"], report["probe"][str(m["size"])]["ground_truth"]
        if "speech_sync" in s:
            print(f"  speech to mouth (label-free): {s['speech_sync']:.3f} at offset 0, peak at {s['speech_offset']:+d}; "
                  f"the real frames {truth['speech_sync']:.3f}")
        groups = m["by_skin_tone"]
        worst = min(groups, key=lambda g: g["worst_sync"])
        if report["kind"] == "prepared":
            s = m["summary"]
            print(f"  real videos: mouth agreement {s['sync_correlation']:.3f} (label-free, not the lip-sync metric), "
                  f"PSNR outside the mouth {s['psnr_gt']:.2f} dB; worst clip {worst['worst_identity']} "
                  f"{worst['worst_sync']:.3f}")
            continue
        print("  lip sync by skin tone: " + ", ".join(f"{g['group']} {g['sync_correlation']:.3f} ({g['clips']} clips)"
                                               for g in groups)
              + f"; worst face {worst['worst_identity']} ({worst['group']}) {worst['worst_sync']:.3f}")
        if "interior_sync" in m["summary"]:
            print("  mouth interior (teeth, cavity shown) against the real frames': "
                  + ", ".join(f"{g['group']} sync {g['interior_sync']:.2f} spread {g['interior_spread']:.2f}"
                              for g in groups))
    print(f"wrote {Path(args.out) / 'report.md'} (+ report.json, plots) in {report['runtime_s']:.0f} s")


WINDOW_HELP = ("frames per live window, 1..the model's (default 0: the model's); fewer frames cut the "
               "speech-to-screen latency and cost more compute per frame")


MAX_STEPS_HELP = ("at start, raise the sampling steps per window up to N while a window (of all the sessions a batch "
                  "may hold) still takes at most half its real-time duration (better lips where the machine has "
                  "headroom; default 0: the model's steps)")
CATCH_UP_TEMPO_HELP = ("while a session runs behind its target latency in continuous speech (a slow stretch of the "
                       "machine), play the speech this much faster, pitch kept, until it is back (1.0 .. 2.0; "
                       "1.0: off; default 1.25)")
SAFETY_HELP = ("start a window this many ms before its frames are due (default 30): less lowers the latency by as "
               "much where the window's compute is steady (a GPU), more avoids held frames where it varies (0 .. 200)")
THREADS_HELP = ("torch threads of the engine on a CPU: 0 (default): at start, the fewest (1, 2, 4 ...) whose window "
                "takes at most 0.35 of its real-time duration, else the fastest, lowered later (not with --compile) "
                "once windows fall 2 windows behind real time because another process took the cores, and tried "
                "again after 60 s (a failed try doubles the wait); N: exactly "
                "N; -1: leave torch's setting (and OMP_NUM_THREADS) alone. On a GPU the engine's own threads: 0: 1 "
                "unless OMP_NUM_THREADS is set (their host work is small; more let idle OpenMP helpers spin on the "
                "cores the tracks need)")
RAISE_HELP = ("seconds after which auto threads that were lowered (or a warm-up that fitted no count) try one "
              "count more, and noise draws lowered (at start or live) the model's again once they would fit "
              "(default 60; a failed try doubles the wait; 0: never)")
COMPILE_HELP = ("torch.compile the transformer and decoder at start, for full windows: about half the compute per "
                "window on a 2-core CPU, after minutes of compiling the first time (cached on disk after); needs "
                "a C++ compiler (apt-get install g++)")


def check_live_args(args: argparse.Namespace) -> None:
    """Fail before the model loads, naming the flag (EngineConfig checks the same again)."""
    if args.window < 0:
        raise LetsTalkError(f"--window {args.window}: give frames per window, 1..the model's, or 0 for its own")
    if not 0 <= args.max_steps <= 50:
        raise LetsTalkError(f"--max-steps {args.max_steps}: choose 0 (off) or up to 50")
    if args.catch_up_tempo is not None and not 1.0 <= args.catch_up_tempo <= 2.0:
        raise LetsTalkError(f"--catch-up-tempo {args.catch_up_tempo}: choose 1.0 (off) .. 2.0")
    if args.threads < -1:
        raise LetsTalkError(f"--threads {args.threads}: choose 0 (auto), -1 (torch's own) or a count")
    if args.safety_ms is not None and not 0 <= args.safety_ms <= 200:
        raise LetsTalkError(f"--safety-ms {args.safety_ms}: choose 0 .. 200 ms")
    if args.trim_heap_every is not None and not (math.isfinite(args.trim_heap_every) and args.trim_heap_every >= 0):
        raise LetsTalkError(f"--trim-heap-every {args.trim_heap_every}: choose 0 (never) or more seconds")
    if args.threads_raise_after is not None and not (math.isfinite(args.threads_raise_after)
                                                     and args.threads_raise_after >= 0):
        raise LetsTalkError(f"--threads-raise-after {args.threads_raise_after}: choose 0 (never) or more seconds")


def add_live_args(p: argparse.ArgumentParser) -> None:
    """The live engine's flags (demo, bench and `letstalk serve`); `live_config` reads them."""
    p.add_argument("--window", type=int, default=0, help=WINDOW_HELP)
    p.add_argument("--max-steps", type=int, default=0, metavar="N", help=MAX_STEPS_HELP)
    p.add_argument("--catch-up-tempo", type=float, default=None, metavar="X", help=CATCH_UP_TEMPO_HELP)
    p.add_argument("--threads", type=int, default=0, metavar="N", help=THREADS_HELP)
    p.add_argument("--safety-ms", type=float, default=None, metavar="MS", help=SAFETY_HELP)
    p.add_argument("--threads-raise-after", type=float, default=None, metavar="S", help=RAISE_HELP)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--no-freeze-gc", dest="freeze_gc", action="store_false",
                   help="leave the garbage collector alone at start (by default everything loaded by then is frozen, "
                        "so a full collection does not stall streaming for ~180 ms; EngineConfig.freeze_gc)")
    p.add_argument("--trim-heap-every", type=float, default=None, metavar="S",
                   help="hand the memory the C library holds freed back to the system every S seconds while running "
                        "(default 60; 0: never; glibc only): through WebRTC 20-30 MB each minute "
                        "(EngineConfig.trim_heap_every_s)")


def live_config(args: argparse.Namespace) -> dict:
    """The EngineConfig fields add_live_args sets."""
    out = {"window": args.window, "max_steps": args.max_steps, "threads": args.threads, "compile": args.compile,
           "freeze_gc": args.freeze_gc}
    if args.catch_up_tempo is not None:
        out["catch_up_tempo"] = args.catch_up_tempo
    if args.safety_ms is not None:
        out["safety_ms"] = args.safety_ms
    if args.threads_raise_after is not None:
        out["threads_raise_after_s"] = args.threads_raise_after
    if args.trim_heap_every is not None:
        out["trim_heap_every_s"] = args.trim_heap_every
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letstalk", description="LetsTalk real-time talking avatars")
    parser.add_argument("--version", action="version", version=f"letstalk-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="animate a portrait with speech into an mp4 file")
    p.add_argument("--portrait", type=Path, required=True, help="image with one front-facing face")
    said = p.add_mutually_exclusive_group(required=True)
    said.add_argument("--audio", type=Path, help="speech: wav, mp3, m4a, ogg, flac (any rate)")
    said.add_argument("--text", help="text to speak instead, with espeak-ng (--voice, --rate, --pitch); each "
                      "sentence is also a caption in a WebVTT file beside --out (.vtt)")
    p.add_argument("--out", type=Path, required=True, help="output .mp4 (written atomically)")
    p.add_argument("--background", default=None, metavar="RRGGBB",
                   help="the colour a portrait's transparent parts go on (default white), e.g. 00ff00 to key it out")
    _add_speech_args(p)
    _add_full_frame_arg(p)
    _add_framing_arg(p)
    _add_server_args(p, "have this server (letstalk serve --recordings-dir ..., e.g. on a GPU machine) make the video "
                        "instead of here: the portrait and speech (or text) go up, the mp4 (and captions) come back; "
                        "this machine needs no torch", live=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="stream the bundled speech through the live engine; record the tracks to mp4")
    p.add_argument("--out", type=Path, default=Path("letstalk_demo.mp4"), help="output .mp4")
    p.add_argument("--text", default=None, help="speak this text (espeak-ng, a sentence at a time, as the server's "
                   "`say` does) instead of the bundled speech; its captions go to a WebVTT file beside --out (.vtt)")
    p.add_argument("--broadcast", action="append", default=[], metavar="URL",
                   help="also stream it live to a streaming server: an RTMP ingest URL with its stream key (YouTube "
                        "Live, Twitch; or `ffplay -listen 1 rtmp://127.0.0.1:1935/live/demo` to watch it here), "
                        "srt://, udp:// or tcp://; repeat it to stream to several at once (up to 4)")
    _add_speech_args(p)
    _add_full_frame_arg(p)
    _add_framing_arg(p)
    _add_model_args(p)
    add_live_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("camera", help="the avatar as a webcam and a microphone for video calls: your microphone in, "
                       "a virtual camera and the avatar's voice out, in step")
    p.add_argument("--portrait", type=Path, default=None, help="image with one front-facing face (default: the "
                   "bundled portrait)")
    p.add_argument("--mic", type=_audio_device, default=None, metavar="DEVICE", help="the microphone: a name (or part of one) or number "
                   "from --list-devices (default: the system's)")
    p.add_argument("--audio", type=Path, default=None, help="play this speech file at real-time pace instead of "
                   "listening to a microphone (to try the set-up)")
    p.add_argument("--speaker", type=_audio_device, default=None, metavar="DEVICE", help="where the avatar's voice plays, in step with its "
                   "lips: a loopback the call app takes as its microphone (a PulseAudio/PipeWire null sink, "
                   "BlackHole, VB-Cable); default: the system's output; none: no voice")
    p.add_argument("--speaker-latency", type=float, default=None, metavar="MS",
                   help="the speaker's buffer (default 80 ms, 40 of them kept filled ahead: the voice plays 40 ms "
                        "after its frame, margin for a busy machine); more if the voice clicks")
    p.add_argument("--no-camera", action="store_true", help="no virtual camera (the voice only)")
    p.add_argument("--camera-device", default=None, help="which virtual camera, e.g. /dev/video2 (default: the "
                   "first free one)")
    p.add_argument("--camera-size", type=int, default=512, metavar="PX",
                   help="the camera's frames scaled to PX on their longer side (default 512)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: at Ctrl-C)")
    p.add_argument("--list-devices", action="store_true", help="list the audio devices and exit")
    p.add_argument("--avatar", default="default", help="with --server and no --portrait: one of its avatars")
    _add_full_frame_arg(p)
    p.add_argument("--face-crop", dest="full_frame", action="store_const", const=0,
                   help="show only the face crop the model animates, scaled up (default: the whole photo, framed "
                        "head and shoulders, as a webcam shows a person)")
    _add_framing_arg(p)
    _add_server_args(p, "the avatar made by this server (letstalk serve, e.g. on a GPU machine) instead of here: only "
                        "the microphone and the devices run on this machine", live=True)
    from .framing import FULL_FRAME_SIDE

    p.set_defaults(func=cmd_camera, full_frame=FULL_FRAME_SIDE)

    p = sub.add_parser("bench", help="measure real-time capacity: fps, latency, A/V offset, memory")
    _add_model_args(p)
    p.add_argument("--preset", choices=sorted(PRESETS_MODEL), default=None,
                   help="benchmark a preset with RANDOM weights instead of a model directory (speed only)")
    p.add_argument("--wav2vec2", type=Path, default=None,
                   help="local transformers Wav2Vec2 directory, for the letstalk-* presets (their audio encoder)")
    p.add_argument("--decoder-channels", type=parse_widths, default=None, metavar="W0,W1,...",
                   help="with --preset: a decoder of these stage widths (finest first) for the preset's latents, "
                        "as `letstalk train --stage decoder --decoder-channels` makes (speed of a narrower decoder)")
    p.add_argument("--sessions", default="1", help="comma-separated concurrent session counts (default 1)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of streaming per session count")
    p.add_argument("--soak", type=float, default=0.0, help="one session for this many seconds (A/V drift)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each session count this many times and report the median, min and max "
                        "(speed on shared machines varies from run to run)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--neighbours", type=int, default=0, metavar="N",
                   help="run N CPU-bound processes beside the engine, as a shared machine's noisy neighbours "
                        "(default 0)")
    p.add_argument("--neighbour-duty", default="30/60", metavar="BUSY/PERIOD",
                   help="each neighbour is busy BUSY seconds of every PERIOD, busy first (default 30/60)")
    p.add_argument("--webrtc", action="store_true",
                   help="each session through the WebRTC server on 127.0.0.1 and a real aiortc peer (speech sent as "
                        "its microphone): adds frame pacing, the lip-to-sound offset and speech-to-sound latency "
                        "where the peer receives")
    p.add_argument("--peer-process", action="store_true",
                   help="with --webrtc (implies it): the receiving peers in a process of their own, as a user's "
                        "peer is, instead of sharing the server's event loop")
    p.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                   help="with --webrtc: every receiver (the server's of the microphones, the peers' of the avatar) "
                        "loses PCT %% of the RTP packets that reach it, at random: a lossy Wi-Fi or cellular link "
                        "(default 0)")
    _add_full_frame_arg(p)
    p.add_argument("--record", action="store_true",
                   help="record every session to an MP4 as it streams (Session.record, the server's `record`): its "
                        "cost beside the sessions, and the files' size per minute (in-process sessions, not --webrtc)")
    add_live_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="the WebRTC/HTTP server for browsers and the Python SDK")
    try:
        from letstalk_rt.server.options import add_serve_arguments  # the server itself (and torch) loads when it runs
    except ImportError as e:  # the server package ships beside letstalk_rt; a partial install lacks it
        _missing = str(e)

        def serve_main(args: argparse.Namespace) -> None:
            raise LetsTalkError(f"the server is not installed ({_missing}); reinstall with scripts/setup.sh")
    else:
        add_serve_arguments(p)

        def serve_main(args: argparse.Namespace) -> None:
            from letstalk_rt.server.app import serve_main

            serve_main(args)
    p.set_defaults(func=serve_main)

    p = sub.add_parser("data", help="make training data: a synthetic corpus, or shards from real videos")
    data = p.add_subparsers(dest="data_command", required=True)
    from .train import prepare, synth

    q = data.add_parser("synth", help="render a synthetic talking-head corpus (needs espeak-ng)")
    synth.add_arguments(q)
    q.set_defaults(func=synth.main)
    q = data.add_parser("prepare", help="folder of talking-head videos -> 25 fps face crops + 16 kHz audio shards")
    prepare.add_arguments(q)
    q.set_defaults(func=prepare.main)

    p = sub.add_parser("train", help="train a model: autoencoder, transformer, or few-step distillation "
                                     "(docs/training.md)")
    from .train import options as train_options  # torch loads with the training, not with the parser

    train_options.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score models on a synth corpus or real videos: lip sync, identity, flicker, "
                                    "long-run drift")
    p.add_argument("--data", type=Path, required=True,
                   help="corpus folder written by `letstalk data synth`; or real talking-head videos: a folder "
                        "`letstalk data prepare` wrote, or a folder of videos (prepared into OUT/prepared first)")
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="model directory; repeat to compare several (default: the bundled model)")
    p.add_argument("--split", default="test", help="corpus split to score (default test; real videos have none)")
    p.add_argument("--clips", type=int, default=8, help="clips of the split to generate and score (default 8)")
    add_sampling_args(p)  # each model's own setting where a flag is not given
    p.add_argument("--steps-list", default="", help="also score lip sync and PSNR at these step counts, e.g. 1,2,4,8")
    p.add_argument("--window", type=int, default=None,
                   help="frames per window (default: each model's sampling.stream_window, what streams use)")
    p.add_argument("--long-seconds", type=float, default=180.0,
                   help="seconds of the long run for drift, memory bank on and off (default 180; 0 skips it)")
    p.add_argument("--probe-clips", type=int, default=128,
                   help="train clips the mouth-state probe is fitted on (default 128)")
    p.add_argument("--out", type=Path, default=Path("eval_report"), help="report folder (default eval_report)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every generation (the first, with --seeds)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="generate every clip with N noise seeds from --seed and average (default 1; one seed "
                        "moves the mean lip sync of a dozen clips by ~0.03: 2-4 for decisions; the report gives "
                        "the spread; the long run uses the first)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sync-check", help="label-free lip sync of talking-face videos (any photograph, any "
                                          "language): the mouth against the speech's loudness, and the offset")
    p.add_argument("video", type=Path, nargs="+", help="mp4 (or any video) with its audio, a square face crop as "
                                                       "`letstalk generate` writes")
    p.add_argument("--portrait", type=Path, default=None,
                   help="an image of the face with its mouth closed, for real recordings whose quiet moments may "
                        "not show one (default: the video's frame at the quietest moment of its speech, which suits "
                        "generated videos a little better: a photograph's own colours are not what the autoencoder "
                        "draws)")
    p.add_argument("--audio", type=Path, default=None,
                   help="score against this speech instead of the video's own audio (a control: speech the video was "
                        "not made from should score near 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.set_defaults(func=cmd_sync_check)

    p = sub.add_parser("new-model", help="write an UNTRAINED model directory for a preset (training start, benchmarks)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS_MODEL))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wav2vec2", type=Path, default=None,
                   help="local transformers Wav2Vec2 directory, for the letstalk-* presets (their audio encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists (its model is lost)")
    p.add_argument("--dcae", type=Path, default=None, metavar="DIR",
                   help="a pretrained DC-AE in diffusers format (config.json + weights) as the autoencoder: frozen, "
                        "loaded from DIR, not copied (needs `pip install 'letstalk-rt[diffusers]'`)")
    p.set_defaults(func=cmd_new_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a `kill` or `timeout` stops these as Ctrl-C does: the half-written video removed, the server's session or render
    # deleted at once, a corpus's finished clips kept, a benchmark's finished runs named (serve has its own handlers,
    # train too: it stops after the step under way, checkpointed)
    stops_on_sigterm = args.command not in ("serve", "train")
    on_sigterm = stop_on_sigterm() if stops_on_sigterm else contextlib.nullcontext()
    try:
        if hasattr(args, "noise_hold"):  # every command with the sampling flags: checked once, before any work
            check_sampling_args(args)
        with on_sigterm:
            args.func(args)
    except ModuleNotFoundError as e:  # the engine's packages in an install of the SDK alone (EngineNotInstalledError
        # too, named for the command here): one line
        what = "letstalk camera without --server" if args.command == "camera" else f"letstalk {args.command}"
        error = engine_not_installed(e, what)
        if error is None:
            raise
        print(f"letstalk: error: {error}", file=sys.stderr)
        return 2
    except LetsTalkError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # what was done is kept (a training run's checkpoint): the message says where
        if str(e):
            print(f"letstalk: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("letstalk: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
