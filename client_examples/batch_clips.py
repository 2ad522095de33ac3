"""Make many video clips on a server at once: each line of a text file, or each audio file in a folder, said by the
avatar, as one MP4 each.

    letstalk serve --recordings-dir rec/ &
    python client_examples/batch_clips.py lines.txt --out clips/          # one clip a line: clips/001.mp4, 002 ...
    python client_examples/batch_clips.py voicemails/ --out clips/       # one clip an audio file: clips/NAME.mp4
    python client_examples/batch_clips.py lines.txt --out clips/ --avatar ceo --voice fr

They are all asked for at once (`AvatarClient.render`, POST /v1/renders with `queue`): the server makes as many side by
side as it has session slots free and queues the rest in order, beside its live sessions (they come first). A server
whose queue is full too answers 503 with Retry-After: that clip is asked again after it. Each clip is saved as it is
done (written under a temporary name and renamed: an MP4 in --out is always whole), a text's captions beside it
(.vtt), and the end says which failed and why. A clip already in --out is skipped, so after a failure the same command
makes only what is missing. Ctrl-C (or `kill`) cancels the renders still queued or being made on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from letstalk_rt.aio import stop_on_sigterm
from letstalk_rt.client import AvatarClient, AvatarClientError, ServerBusyError
from letstalk_rt.errors import LetsTalkError

AUDIO = {".wav", ".mp3", ".m4a", ".ogg", ".opus", ".flac", ".aac", ".webm", ".mp4"}


def jobs(source: Path) -> list[tuple[str, dict]]:
    """(clip name, what it says: {"audio": path} or {"text": line}) for each audio file in the folder `source`, or
    each non-empty line of the text file `source`."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in AUDIO)
        if not files:
            raise LetsTalkError(f"no audio files in {source} (looked for {', '.join(sorted(AUDIO))})")
        return [(p.stem, {"audio": p}) for p in files]
    if not source.is_file():
        raise LetsTalkError(f"{source} is neither a text file of lines nor a folder of audio files")
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise LetsTalkError(f"{source} has no lines to say")
    width = max(3, len(str(len(lines))))
    return [(f"{i:0{width}d}", {"text": line}) for i, line in enumerate(lines, 1)]


async def run(args: argparse.Namespace) -> dict[str, str]:
    """Make every clip not in args.out yet; returns each clip's outcome: "saved", "kept" (there already) or
    "failed: why"."""
    todo = jobs(Path(args.source))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    said: dict[str, str] = {}  # the last thing printed of each clip (each change is printed once)

    def tell(name: str, what: str) -> None:
        if said.get(name) != what:
            said[name] = what
            print(f"{name}: {what}", file=sys.stderr)

    async def one(client: AvatarClient, name: str, speech: dict) -> None:
        path = out / f"{name}.mp4"
        if path.exists():
            outcome[name] = "kept"
            return

        def progress(state: dict) -> None:
            if state["state"] == "queued":
                tell(name, f"queued ({state.get('queue_position')} in line)")
            else:
                tell(name, "being made")

        voice = {"voice": args.voice} if "text" in speech and args.voice else {}
        while True:
            try:
                state = await client.render(path, avatar_id=args.avatar, on_progress=progress, **speech, **voice)
                if "text" in speech:
                    await client.download_captions(state["render_id"], path.with_suffix(".vtt"))
                outcome[name] = "saved"
                tell(name, f"saved {path} ({state['rendered_seconds']:.1f} s, made in {state['seconds_taken']:.1f} s)")
                return
            except ServerBusyError as e:  # every slot in use and the queue full: asked again after Retry-After
                tell(name, "the server is full; asking again")
                await asyncio.sleep(e.retry_after or 5)
            except (AvatarClientError, LetsTalkError) as e:  # this clip only: the others go on
                outcome[name] = f"failed: {e}"
                tell(name, outcome[name])
                return

    start = time.monotonic()
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        semaphore = asyncio.Semaphore(args.parallel)

        async def limited(name: str, speech: dict) -> None:
            async with semaphore:
                await one(client, name, speech)

        await asyncio.gather(*(limited(name, speech) for name, speech in todo))
    counts = {k: sum(v.split(":")[0] == k for v in outcome.values()) for k in ("saved", "kept", "failed")}
    print(f"{counts['saved']} clip(s) made in {time.monotonic() - start:.1f} s, {counts['kept']} already there, "
          f"{counts['failed']} failed", file=sys.stderr)
    return outcome


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a text file (one clip a line) or a folder of audio files (one clip each)")
    p.add_argument("--out", required=True, help="the folder the MP4s go to (made if missing)")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--avatar", default="default", help="the server's avatar that says them (GET /v1/avatars)")
    p.add_argument("--voice", default=None, help="for lines of text: an espeak-ng voice (GET /v1/voices), e.g. fr")
    p.add_argument("--parallel", type=int, default=8,
                   help="renders asked for at once (default 8; the server makes what its slots allow, queues the rest)")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    try:
        with stop_on_sigterm():  # `kill` stops it as Ctrl-C does: the renders on the server cancelled
            outcome = asyncio.run(run(args))
    except (LetsTalkError, AvatarClientError) as e:
        print(f"batch_clips: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch_clips: interrupted; the clips saved are whole, the others were cancelled", file=sys.stderr)
        return 130
    return 1 if any(v.startswith("failed") for v in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
