"""Your microphone drives the avatar on a server; the avatar comes back as a virtual camera and its voice (or as PNG
snapshots + stats).

    python client_examples/microphone.py                               # default mic of the platform
    python client_examples/microphone.py --mic-format alsa --mic-device hw:1
    pip install 'letstalk-rt[devices]'   # then the avatar appears as a webcam in Zoom / Meet / OBS (needs
                                         # v4l2loopback, or OBS's Virtual Camera: letstalk_rt.devices)
    python client_examples/microphone.py --speaker pulse   # and its voice, in step with its lips, on an audio
                                                           # device a call takes as its microphone (README)

The microphone is sent as the session's WebRTC audio track (the server feeds it to the avatar: it speaks what it
hears). Received frames go to a virtual camera when pyvirtualcam is installed and finds one, and the received voice
to --speaker (the SDK hands each frame over with the audio of its media time, so they leave in step); otherwise,
without any GUI dependency, the latest frame is saved to --snapshot every second and stats are printed. The same runs
in-process, with no server, as `letstalk camera`, and against a server as `letstalk camera --server URL` (the speech
sent up the websocket instead: this file shows the SDK's WebRTC route and FFmpeg's microphones).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.aio import stop_on_sigterm
from letstalk_rt.client import AvatarClient, AvatarClientError
from letstalk_rt.errors import LetsTalkError

MIC_DEFAULTS = {  # FFmpeg input format and device of the default microphone, per platform
    "Linux": ("pulse", "default"),
    "Darwin": ("avfoundation", ":0"),
    "Windows": ("dshow", "audio=Microphone"),
}


def open_microphone(fmt: str, device: str):
    from aiortc.contrib.media import MediaPlayer

    try:
        player = MediaPlayer(device, format=fmt, options={"sample_rate": "48000", "channels": "1"})
    except Exception as e:  # av.error.* when the device or the input format does not exist
        raise LetsTalkError(f"cannot open microphone {device!r} with FFmpeg format {fmt!r} ({e}); "
                            "choose --mic-format / --mic-device (e.g. alsa hw:0)") from None
    if player.audio is None:
        raise LetsTalkError(f"{device!r} has no audio")
    return player


async def show(session, args: argparse.Namespace) -> None:
    from letstalk_rt.devices import AudioOutput, VirtualCamera

    info = session.info["video"]
    try:
        cam = VirtualCamera((info["width"], info["height"]), info["fps"], size=args.cam_size)
        print(f"virtual camera: {cam.device} ({cam.width}x{cam.height})")
    except LetsTalkError as e:
        cam = None
        print(f"no virtual camera ({e}); saving snapshots to {args.snapshot} instead")
    voice = None

    async def play_voice() -> None:
        nonlocal voice
        async for chunk in session.audio_frames():
            if voice is None:  # at the rate the SDK hands over (48 kHz: Opus)
                voice = AudioOutput(args.speaker, chunk.sample_rate)
                print(f"the avatar's voice: {voice.name}")
            voice.play(chunk.mono_float())

    playing = asyncio.create_task(play_voice()) if args.speaker else None
    frames, t0, last_report = 0, time.monotonic(), time.monotonic()
    try:
        async for rgb in session.video_frames():
            frames += 1
            if cam is not None:
                cam.send(rgb)
            elif time.monotonic() - last_report >= 1.0:
                from PIL import Image

                Image.fromarray(rgb).save(args.snapshot)
                last_report = time.monotonic()
                counts = session.frames_received
                print(f"\r{frames / (last_report - t0):5.1f} fps shown, {counts['audio']} audio packets, "
                      f"snapshot -> {args.snapshot}", end="", flush=True)
            if playing is not None and playing.done():
                playing.result()  # a speaker that cannot be opened: said
    finally:
        if playing is not None:
            playing.cancel()
        for device in (cam, voice):
            if device is not None:
                device.close()


async def run(args: argparse.Namespace) -> None:
    fmt, device = MIC_DEFAULTS.get(platform.system(), ("pulse", "default"))
    mic = open_microphone(args.mic_format or fmt, args.mic_device or device)
    async with AvatarClient(args.server, api_key=args.api_key, relay_only=args.relay) as client:
        shape = {"full_frame": args.full_frame, "framing": args.framing}
        session = await client.start_session(portrait=args.portrait, **shape) if args.portrait \
            else await client.start_session(avatar_id=args.avatar, **shape)
        session.on("speech_started", lambda ev: print("\n[avatar talking]"))
        session.on("error", lambda ev: print(f"\nserver: {ev['message']}", file=sys.stderr))
        await session.connect(audio_track=mic.audio)
        print(f"session {session.id}: speak into the microphone; Ctrl-C to stop")
        try:
            await show(session, args)
        finally:
            await session.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--avatar", default="default")
    p.add_argument("--portrait", type=Path, default=None)
    p.add_argument("--full-frame", type=int, default=512, metavar="PX",
                   help="the whole photo talks, fit to PX (default 512: framed head and shoulders, as a webcam shows "
                        "a person); 0: the face crop, blown up")
    p.add_argument("--framing", type=float, default=None, metavar="K",
                   help="with --full-frame: a small face is shown with at most K sides of its square on the frames' "
                        "shorter side (the server's default 3); 0: the whole photo")
    p.add_argument("--relay", action="store_true", help="connect only through the server's TURN relay")
    p.add_argument("--mic-format", default=None, help="FFmpeg input format: pulse, alsa, avfoundation, dshow")
    p.add_argument("--mic-device", default=None, help="FFmpeg input device, e.g. default, hw:0, :0")
    p.add_argument("--cam-size", type=int, default=512, help="virtual camera size in pixels (upscaled)")
    p.add_argument("--speaker", default=None, help="play the avatar's voice on this output device (a name from "
                   "`letstalk camera --list-devices`, e.g. pulse), in step with the camera; default: not played")
    p.add_argument("--snapshot", type=Path, default=Path("avatar_latest.png"))
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    try:
        with stop_on_sigterm():  # `kill` stops it as Ctrl-C does: the server's session closed, nothing half-written
            asyncio.run(run(args))
    except KeyboardInterrupt:
        print()
    except (LetsTalkError, AvatarClientError) as e:
        print(f"microphone: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
