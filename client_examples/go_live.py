"""Stream a talking avatar live to YouTube, Twitch or OBS, driven by text, with nothing watching it here.

    letstalk serve --broadcast-to rtmp://a.rtmp.youtube.com/live2/ &
    python client_examples/go_live.py rtmp://a.rtmp.youtube.com/live2/xxxx-xxxx-xxxx-xxxx
    > Hello everyone, welcome to the stream!        # each line typed is said live; Ctrl-D ends the stream
    python client_examples/go_live.py rtmp://... --text "Hello there." --text "Bye now."   # lines given, then it ends

The server encodes the session and sends it to the streaming server itself (`AvatarSession.broadcast`, POST
/v1/sessions/{id}/broadcast): this script only creates the session, starts the stream and sends text over the
session's websocket (`say`), so it needs no WebRTC and no GPU. The session's clock runs while the stream lasts, so
between lines the avatar idles live (blinks, small head motion). A dropped connection to the platform is made again by
the server with back-off (`broadcast_reconnecting` / `broadcast_resumed`, printed here); a stream that cannot be
resumed ends with `broadcast_stopped` and its reason, and so does this script. The stream key is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

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


async def run(args: argparse.Namespace) -> dict:
    """Go live, say each line, end the stream once the last one has been said; returns the stream's last state."""
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(avatar_id=args.avatar, voice=args.voice)
        ended = asyncio.get_running_loop().create_future()
        quiet = asyncio.Event()
        quiet.set()

        def on_stream(ev: dict) -> None:
            if ev["type"] == "broadcast_reconnecting":
                print(f"the stream dropped ({ev['error']}): connecting again in {ev['delay_s']:g} s "
                      f"(try {ev['attempt']})", file=sys.stderr)
            elif ev["type"] == "broadcast_resumed":
                print(f"live again after {ev['down_s']:.1f} s", file=sys.stderr)
            elif not ended.done():
                ended.set_result(ev)

        for kind in ("broadcast_reconnecting", "broadcast_resumed", "broadcast_stopped"):
            session.on(kind, on_stream)
        session.on("speech_started", lambda ev: quiet.clear())
        session.on("speech_stopped", lambda ev: quiet.set())
        try:
            await session.ping()  # the websocket open first: the stream's events come over it
            state = await session.broadcast(args.url, bitrate_kbps=args.bitrate)
            print(f"live to {state['url']}; type what the avatar says (Ctrl-D ends the stream)", file=sys.stderr)
            async for text in lines(args.text):
                if ended.done():
                    break
                answer = await session.say(text)
                print(f"saying {answer.get('sentences', 1)} sentence(s)", file=sys.stderr)
                quiet.clear()  # until the speech has been shown and has stopped
            while not ended.done():  # the last words shown, and a moment of the avatar at rest, then the end
                await asyncio.wait_for(quiet.wait(), args.timeout)
                await asyncio.sleep(args.tail)
                if quiet.is_set():  # (not a pause between two sentences)
                    await session.stop_broadcast()
                    break
            stopped = await asyncio.wait_for(ended, 10)
        finally:
            await session.close()
        if stopped["error"]:
            raise AvatarClientError(f"the live stream failed: {stopped['error']}")
        print(f"streamed {stopped['seconds']:.1f} s live to {stopped['url']}", file=sys.stderr)
        return stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the ingest URL with its stream key: rtmp(s)://HOST/APP/KEY, srt://, udp:// or tcp:// "
                   "(under one of the server's --broadcast-to prefixes)")
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
