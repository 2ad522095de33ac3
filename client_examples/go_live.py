"""Stream a talking avatar live to YouTube, Twitch or OBS, driven by text, with nothing watching it here.

    letstalk serve --broadcast-to rtmp://a.rtmp.youtube.com/live2/ &
    python client_examples/go_live.py rtmp://a.rtmp.youtube.com/live2/xxxx-xxxx-xxxx-xxxx
    > Hello everyone, welcome to the stream!        # each line typed is said live; Ctrl-D ends the stream
    python client_examples/go_live.py rtmp://... --text "Hello there." --text "Bye now."   # lines given, then it ends
    python client_examples/go_live.py rtmp://a.rtmp.youtube.com/live2/KEY1 rtmp://live.twitch.tv/app/KEY2  # both

The server encodes the session and sends it to the streaming server itself (`AvatarSession.broadcast`, POST
/v1/sessions/{id}/broadcast): this script only creates the session, starts the stream and sends text over the
session's websocket (`say`), so it needs no WebRTC and no GPU. The session's clock runs while the stream lasts, so
between lines the avatar idles live (blinks, small head motion). Each line is also a caption inside the video
(CEA-608: the platform's CC button shows it). A dropped connection to the platform is made again by
the server with back-off (`broadcast_reconnecting` / `broadcast_resumed`, printed here); a stream that cannot be
resumed ends with `broadcast_stopped` and its reason; the others stream on, and the script ends with an error once
all have ended. The stream keys are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from letstalk_rt.aio import stop_on_sigterm
from letstalk_rt.client import AvatarClient, AvatarClientError
from letstalk_rt.errors import LetsTalkError


async def lines(given: list[str] | None):
    """The lines to say: those given, or stdin's as they are typed (read off the event loop) until its end."""
    if given:
        for text in given:
            yield text
        return
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip():
            yield line.strip()


async def run(args: argparse.Namespace) -> list[dict]:
    """Go live to each URL, say each line, end the streams once the last one has been said; returns each stream's
    `broadcast_stopped` event."""
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(avatar_id=args.avatar, voice=args.voice)
        streams: dict[str, dict] = {}  # broadcast id -> its state, then its broadcast_stopped event
        ended = asyncio.Event()  # every stream has ended
        quiet = asyncio.Event()
        quiet.set()
        sentences = {"said": 0, "started": 0}  # queued by say(), and begun on screen (each one's `caption` event)

        def on_stream(ev: dict) -> None:
            if ev["type"] == "broadcast_reconnecting":
                print(f"{ev['url']}: the stream dropped ({ev['error']}): connecting again in {ev['delay_s']:g} s "
                      f"(try {ev['attempt']})", file=sys.stderr)
            elif ev["type"] == "broadcast_resumed":
                print(f"{ev['url']}: live again after {ev['down_s']:.1f} s", file=sys.stderr)
            elif ev["type"] == "broadcast_skipped":
                print(f"{ev['url']}: the encode fell {ev['behind_s']:g} s behind (the server's CPU is too busy): "
                      f"{ev['frames']} frames skipped", file=sys.stderr)
            else:
                streams[ev["broadcast_id"]] = ev
                if ev["error"]:
                    print(f"{ev['url']}: the live stream failed: {ev['error']}", file=sys.stderr)
                if all(s.get("type") == "broadcast_stopped" for s in streams.values()):  # (a state: still streaming)
                    ended.set()

        for kind in ("broadcast_reconnecting", "broadcast_resumed", "broadcast_skipped", "broadcast_stopped"):
            session.on(kind, on_stream)
        session.on("speech_started", lambda ev: quiet.clear())
        session.on("speech_stopped", lambda ev: quiet.set())
        session.on("caption", lambda ev: sentences.update(started=sentences["started"] + 1))
        try:
            await session.ping()  # the websocket open first: the streams' events come over it
            for url in args.url:
                state = await session.broadcast(url, bitrate_kbps=args.bitrate)
                streams.setdefault(state["id"], state)  # (unless it has ended already)
                print(f"live to {state['url']}", file=sys.stderr)
                if streams[state["id"]].get("type") != "broadcast_stopped":  # (one that failed before this one
                    ended.clear()  # began set it)
            print("type what the avatar says (Ctrl-D ends the stream)", file=sys.stderr)
            async for text in lines(args.text):
                if ended.is_set():
                    break
                answer = await session.say(text)
                sentences["said"] += answer.get("sentences", 1)
                print(f"saying {answer.get('sentences', 1)} sentence(s)", file=sys.stderr)
                quiet.clear()  # until the speech has been shown and has stopped

            async def said_and_at_rest() -> None:
                """The last sentence begun (a pause while a busy server still synthesises the next is not the end),
                its words shown, and a moment of the avatar at rest; or every stream ended already."""
                while not ended.is_set():
                    await quiet.wait()
                    await asyncio.sleep(args.tail)
                    if quiet.is_set() and sentences["started"] >= sentences["said"]:
                        return

            await asyncio.wait_for(said_and_at_rest(), args.timeout)
            if not ended.is_set():
                await session.stop_broadcast()  # every one still streaming
            await asyncio.wait_for(ended.wait(), 10)
        finally:
            await session.close()
        stopped = list(streams.values())
        for ev in stopped:
            if not ev["error"]:
                print(f"streamed {ev['seconds']:.1f} s live to {ev['url']}", file=sys.stderr)
        if failed := [ev for ev in stopped if ev["error"]]:
            raise AvatarClientError("; ".join(f"the live stream to {ev['url']} failed: {ev['error']}" for ev in failed))
        return stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", nargs="+", help="the ingest URL with its stream key: rtmp(s)://HOST/APP/KEY, srt://, udp:// "
                   "or tcp:// (under one of the server's --broadcast-to prefixes); several: one stream to each (up to 4)")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--avatar", default="default")
    p.add_argument("--voice", default=None, help="an espeak-ng voice (the server's: GET /v1/voices), e.g. fr")
    p.add_argument("--bitrate", type=int, default=None, help="video kb/s (100-20000; default ~0.1 bit a pixel)")
    p.add_argument("--text", action="append", default=None, help="a line to say (repeatable); default: stdin's")
    p.add_argument("--tail", type=float, default=1.0, help="seconds of the avatar at rest after the last line")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the last line may take to be said")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    try:
        with stop_on_sigterm():  # `kill` stops it as Ctrl-C does: the server's session closed, nothing half-written
            asyncio.run(run(args))
    except (LetsTalkError, AvatarClientError, asyncio.TimeoutError) as e:
        print(f"go_live: error: {e or 'the last line was not said in time'}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"go_live: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
