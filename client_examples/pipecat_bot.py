"""A Pipecat bot with the avatar's face, shown in a browser through Pipecat's SmallWebRTC transport.

    pip install 'letstalk-rt[pipecat]'                         # the engine here (or [pipecat-client] with --server)
    python client_examples/pipecat_bot.py                      # then open http://127.0.0.1:7860, type, press Say
    python client_examples/pipecat_bot.py --server http://gpu-box:8080 --api-key KEY   # the avatar on a server

Each page that connects gets a bot of its own: a Pipecat pipeline of `LetsTalkVideoService` (the avatar) and
SmallWebRTC's output transport (WebRTC to the page). What the page types stands in for your bot's TTS output: the
text is spoken here with espeak-ng and given to the pipeline as a TTS gives it (`TTSStartedFrame`, its audio in
chunks faster than real time, `TTSStoppedFrame`); Interrupt sends the `InterruptionFrame` the user talking over the
bot would. In your bot, the avatar goes after your TTS instead:

    Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar, transport.output(), assistant_aggregator])

Locally every bot's session is on one engine (the bundled model unless --model), their windows batched together;
with --server each bot opens a session on that LetsTalk server and this machine runs no model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.errors import InputError, LetsTalkError  # noqa: E402

CHUNK_S = 0.2  # the TTS's audio chunks
PAGE_GONE_S = 6.0  # a page that sent nothing back this long (no RTCP report) is gone: its bot ends
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>LetsTalk + Pipecat</title></head><body>
<video id="video" autoplay playsinline muted width="256" height="256"></video><audio id="audio" autoplay></audio><br>
<input id="text" size="60" value="Hello! I am a Pipecat bot with a face."> <button id="say" disabled>Say</button>
<button id="interrupt" disabled>Interrupt</button> <span id="status">connecting...</span>
<script>
const $ = (id) => document.getElementById(id);
let bot = null;
async function post(path, body) {
  const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                               body: JSON.stringify(body)});
  const answer = await r.json();
  if (!r.ok) throw new Error(answer.error || r.statusText);
  return answer;
}
(async () => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('audio', {direction: 'sendrecv'});  // as a Pipecat client negotiates (no microphone sent here)
  pc.addTransceiver('video', {direction: 'sendrecv'});
  pc.createDataChannel('pipecat');
  pc.ontrack = (e) => {
    $(e.track.kind).srcObject = new MediaStream([e.track]);
    $(e.track.kind).play().catch(() => {});
  };
  pc.onconnectionstatechange = () => { $('status').textContent = pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => {
    if (pc.iceGatheringState === 'complete') ok();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && ok();
  });
  try {
    const answer = await post('/offer', {sdp: pc.localDescription.sdp, type: pc.localDescription.type});
    bot = answer.bot;
    await pc.setRemoteDescription({sdp: answer.sdp, type: answer.type});
    $('say').disabled = $('interrupt').disabled = false;
  } catch (e) { $('status').textContent = 'error: ' + e.message; }
  window.pc = pc;
})();
$('say').onclick = () => post('/say', {bot, text: $('text').value})
  .catch((e) => { $('status').textContent = e.message; });
$('interrupt').onclick = () => post('/interrupt', {bot});
addEventListener('pagehide', () => bot && navigator.sendBeacon('/bye', JSON.stringify({bot})));
</script></body></html>"""


class Bots:
    """The bots of the pages connected: one Pipecat pipeline each, ended when its page closes (`pagehide`), its
    connection closes or fails, or the page sends nothing back for PAGE_GONE_S (a killed tab, a lost network)."""

    def __init__(self, args: argparse.Namespace, engine=None) -> None:
        self.args, self.engine = args, engine
        self.bots: dict[str, tuple] = {}  # id -> (PipelineTask, runner task)

    def avatar(self):
        from letstalk_rt.integrations.pipecat import LetsTalkVideoService

        a = self.args
        if a.server:  # a photo of ours uploaded for each bot's session, or the server's "default" avatar
            return LetsTalkVideoService(server=a.server, api_key=a.api_key, portrait=a.face,
                                        avatar_id=None if a.face is not None else "default")
        return LetsTalkVideoService(engine=self.engine, portrait=a.face)

    async def offer(self, request: web.Request) -> web.Response:
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineWorker
        from pipecat.transports.base_transport import TransportParams
        from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
        from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

        body = await _json(request)
        if not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            raise _error(web.HTTPBadRequest, 'send {"sdp": ..., "type": "offer"}')
        if "\nm=video " not in body["sdp"]:  # a bot with nothing to show its face on would run for nothing
            raise _error(web.HTTPBadRequest, "the offer has no video to receive the avatar on: add a video "
                                             "transceiver (recvonly or sendrecv)")
        avatar = self.avatar()
        connection = SmallWebRTCConnection()
        try:
            await connection.initialize(sdp=body["sdp"], type="offer")
        except Exception as e:  # aiortc's parser and negotiation raise many kinds: not an offer it can answer
            await connection.disconnect()
            raise _error(web.HTTPBadRequest, f"cannot answer this offer: {e}")
        size = self.args.size
        transport = SmallWebRTCTransport(webrtc_connection=connection, params=TransportParams(
            audio_out_enabled=True, video_out_enabled=True, video_out_width=size, video_out_height=size,
            video_out_framerate=25))
        worker = PipelineWorker(Pipeline([avatar, transport.output()]), cancel_on_idle_timeout=False)
        bot = uuid.uuid4().hex[:12]

        async def gone(_connection) -> None:  # the page went (closed, or its network): its bot ends, its avatar too
            await self.end(bot)

        connection.add_event_handler("closed", gone)
        connection.add_event_handler("failed", gone)
        self.bots[bot] = (worker, asyncio.ensure_future(self._run(bot, worker, connection)))
        return web.json_response({**connection.get_answer(), "bot": bot})

    async def _run(self, bot: str, worker, connection) -> None:
        from pipecat.workers.runner import WorkerRunner

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        watching = asyncio.ensure_future(self._watch(bot, connection))
        try:
            await runner.run()
        finally:
            watching.cancel()
            self.bots.pop(bot, None)

    async def _watch(self, bot: str, connection) -> None:
        """End the bot once its page has sent nothing back (the RTCP reports a browser sends about the media it
        gets) for PAGE_GONE_S since the last one, or since it connected (a page killed before its first report): a
        killed tab or a lost network says no goodbye, and WebRTC's own consent check would notice only after ~30 s."""
        from letstalk_rt.rtc import peer_heard

        loop, marks, heard = asyncio.get_running_loop(), {}, None
        while True:
            await asyncio.sleep(1.0)
            connected = heard is None and connection.pc.connectionState == "connected"
            if await peer_heard(connection.pc, marks) or connected:
                heard = loop.time()
            elif heard is not None and loop.time() - heard > PAGE_GONE_S:
                print(f"bot {bot}: its page sent nothing for {PAGE_GONE_S:.0f} s: gone", file=sys.stderr)
                await asyncio.shield(self.end(bot))  # (ending it cancels this watch)
                return

    async def end(self, bot: str) -> None:
        found = self.bots.get(bot)
        if found is not None:
            await found[0].cancel()

    async def bye(self, request: web.Request) -> web.Response:
        """The page is being closed (`pagehide`): its bot ends now, not when WebRTC notices it gone (~30 s)."""
        await self.end((await _json(request)).get("bot"))
        return web.json_response({})

    def _task(self, body: dict):
        found = self.bots.get(body.get("bot"))
        if found is None:
            raise _error(web.HTTPNotFound, "no such bot (its page closed?): reload the page")
        return found[0]

    async def say(self, request: web.Request) -> web.Response:
        """The text spoken (espeak-ng), queued into the bot as its TTS's output would come."""
        from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame

        from letstalk_rt.media import pcm16
        from letstalk_rt.tts import Speech, check_text

        body = await _json(request)
        task = self._task(body)
        try:
            text = check_text(body.get("text"))
            speech = Speech(self.args.voice)
        except InputError as e:
            raise _error(web.HTTPUnprocessableEntity, str(e))
        rate = 24000
        pcm = pcm16(await asyncio.to_thread(speech.synthesize, text, rate))
        step = int(CHUNK_S * rate)
        await task.queue_frames([TTSStartedFrame(), *[TTSAudioRawFrame(pcm[i:i + step].tobytes(), rate, 1)
                                                      for i in range(0, len(pcm), step)], TTSStoppedFrame()])
        return web.json_response({"seconds": round(len(pcm) / rate, 2)})

    async def interrupt(self, request: web.Request) -> web.Response:
        from pipecat.frames.frames import InterruptionFrame

        await self._task(await _json(request)).queue_frame(InterruptionFrame())
        return web.json_response({})

    async def close(self) -> None:
        for worker, running in list(self.bots.values()):
            await worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


def _error(kind: type[web.HTTPError], message: str) -> web.HTTPError:
    """An HTTP error whose JSON body says what is wrong (the page shows it)."""
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def make_app(args: argparse.Namespace, engine=None) -> tuple[web.Application, Bots]:
    bots = Bots(args, engine)
    app = web.Application()

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", index)
    app.router.add_post("/offer", bots.offer)
    app.router.add_post("/say", bots.say)
    app.router.add_post("/interrupt", bots.interrupt)
    app.router.add_post("/bye", bots.bye)
    app.on_shutdown.append(lambda _: bots.close())
    return app, bots


async def serve(args: argparse.Namespace) -> None:
    load_face(args)
    engine = None
    if not args.server:  # one engine for every bot of this process
        from letstalk_rt.pipeline import LetsTalkPipeline
        from letstalk_rt.stream import StreamEngine, run_off_loop

        from letstalk_rt.cli import resolve_device

        device = resolve_device(args.device)  # a LetsTalkError naming the flag
        pipe = await run_off_loop(lambda: LetsTalkPipeline.from_pretrained(args.model, device=device))
        engine = await StreamEngine(pipe).start()
        args.size = args.size or pipe.config.image_size
    app, _ = make_app(args, engine)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"open http://{args.host}:{args.port} in a browser (Ctrl-C stops)")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        if engine is not None:
            await engine.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--portrait", default=None, help="the face (default: the bundled one, or the server's avatar)")
    p.add_argument("--voice", default="en-us", help="the espeak-ng voice the typed text is spoken with")
    p.add_argument("--model", default=None, help="a model directory (default: the bundled model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when there is one)")
    p.add_argument("--server", default=None, help="a LetsTalk server's URL: the avatar runs there, no model here")
    p.add_argument("--api-key", default=None)
    p.add_argument("--size", type=int, default=0, help="the video's side in px (default: the model's frames; 128 "
                   "with --server)")
    args = p.parse_args(argv)
    args.size = args.size or (128 if args.server else 0)
    return args


def load_face(args: argparse.Namespace) -> None:
    """args.face: the portrait, read once (InputError now if it is not a photo), or None for the server's avatar."""
    from letstalk_rt.media import load_image

    import letstalk_rt

    bundled = Path(letstalk_rt.__file__).parent / "assets" / "portrait.png"
    path = args.portrait or (None if args.server else bundled)
    args.face = None if path is None else load_image(path)


def main() -> int:
    args = parse_args()
    try:
        asyncio.run(serve(args))
    except LetsTalkError as e:
        print(f"pipecat_bot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pipecat_bot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
