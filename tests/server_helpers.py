"""Helpers shared by the server, SDK and browser tests: a live server on an ephemeral port, an aiortc peer."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from conftest import speechlike
from live_receiver import free_port

from letstalk_rt.rtc import is_rtp


@dataclass
class Server:
    url: str
    app: web.Application
    engine: object

    @property
    def manager(self):
        from letstalk_rt.server.app import MANAGER

        return self.app[MANAGER]


# --hung-seconds for tests that hang an engine on purpose: far above a tiny-model window even on a loaded machine (at
# 0.5 s a busy CI run took a slow window for a hung device, and the session moved before the test hung anything)
HUNG_S = 2.0


def hang(engine, gate) -> None:
    """A device that stops answering: the engine's next window waits on `gate` (a threading.Event; at most 60 s),
    raising nothing, as a CUDA hang or an Xid error does. Set the gate to let it answer again."""
    execute = engine._execute

    def hangs(jobs, **kwargs):
        gate.wait(60)
        return execute(jobs, **kwargs)

    engine._execute = hangs


def two_device_server(first, second, **config):
    """running_server with an engine on each of two pipelines (a second device) that takes a window running HUNG_S for
    a hang and looks every 0.1 s: the tests that hang one device (`hang`) and see its sessions move to the other."""
    return running_server([first, second], engine_config={"hung_after_s": HUNG_S}, watch_interval_s=0.1, **config)


@contextlib.asynccontextmanager
async def running_server(pipeline, max_sessions: int = 4, engine_config: dict | None = None, **config):
    """The app on 127.0.0.1:<ephemeral> around a fresh engine (no warm-up, `engine_config`'s EngineConfig fields)
    on `pipeline`; a list of pipelines: an EnginePool of one such engine on each, `max_sessions` each."""
    from letstalk_rt.bench_webrtc import local_server
    from letstalk_rt.stream import EngineConfig, EnginePool, StreamEngine
    from letstalk_rt.server import ServerConfig

    engines = [StreamEngine(p, EngineConfig(**{"warmup": False, "max_sessions": max_sessions,
                                               "max_batch": min(max_sessions, 4), **(engine_config or {})}))
               for p in (pipeline if isinstance(pipeline, list) else [pipeline])]
    engine = engines[0] if len(engines) == 1 else EnginePool(engines)
    try:
        async with local_server(engine, ServerConfig(port=0, **config)) as (url, app):
            yield Server(url, app, engine)
    finally:
        await engine.stop()


def self_signed_certificate(directory: Path, names: tuple[str, ...] = ("localhost",), days: float = 1.0
                            ) -> tuple[Path, Path]:
    """A self-signed TLS certificate for 127.0.0.1 and `names`, valid `days`, with its key: (cert.pem, key.pem) in
    `directory`, what `letstalk serve --tls-cert/--tls-key` takes (made with `cryptography`, which aiortc needs
    anyway)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = x509.SubjectAlternativeName([*map(x509.DNSName, names), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)).add_extension(alt, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def served_certificate(url: str) -> bytes:
    """The certificate (DER) the TLS server at `url` serves a new connection now (blocking)."""
    import ssl
    from urllib.parse import urlsplit

    where = urlsplit(url)
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((where.hostname, where.port), timeout=10))


def certificate_der(cert: Path) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(cert.read_text())


@contextlib.contextmanager
def _listening(name: str, command: list[str], port: int, env: dict | None = None, timeout: float = 15):
    """Run `command` (a proxy) until the block ends, once it listens on 127.0.0.1:`port` (what it wrote on stderr
    said if it exits first)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, f"{name} did not start: {proc.stderr.read().decode()[-800:]}"
            assert time.monotonic() < deadline, f"{name} did not listen within {timeout:g} s"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


# What every location that passes a letstalk server on needs: websockets, the Forwarded headers a `--behind-proxy`
# server reads, answers streamed (the event stream), long-lived connections
NGINX_PASS = """
    proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection $connection_upgrade;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $http_host;
    proxy_buffering off;
    proxy_read_timeout 1h;
"""


@contextlib.contextmanager
def _nginx(tmp_path: Path, name: str, port: int, http: str):
    """A real nginx (Debian's nginx-light) in the foreground, its files under tmp_path/name, with `http` inside its
    http block (its server listening on `port`); returns once it listens."""
    import os

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("needs nginx (Debian's nginx-light: scripts/setup.sh --dev installs it)")
    root = tmp_path / name
    root.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""  # (its workers otherwise run as nobody, shut out of tmp_path)
    (root / "nginx.conf").write_text(f"""
        {user}
        worker_processes 1;
        daemon off;
        pid {root}/nginx.pid;
        error_log {root}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fastcgi;
            uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
            client_max_body_size 25m;
            map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
            {http}
        }}
        """)
    with _listening("nginx", [binary, "-p", str(root), "-c", str(root / "nginx.conf")], port):
        yield


@contextlib.contextmanager
def nginx_proxy(tmp_path: Path, upstream: str, cert: Path, key: Path, prefix: str = "/avatar"):
    """A real nginx in front of `upstream` (http://127.0.0.1:PORT) as a deployment puts one: TLS ending there, the
    server under `prefix`, websockets passed on, the Forwarded headers a `--behind-proxy` server reads
    (X-Forwarded-Proto, -Host, -Prefix). Yields its URL, https://127.0.0.1:PORT{prefix}."""
    port = free_port()
    server = f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {cert};
            ssl_certificate_key {key};
            location {prefix}/ {{
                proxy_pass {upstream.rstrip("/")}/;
                proxy_set_header X-Forwarded-Prefix {prefix};
                {NGINX_PASS}
            }}
        }}
        """
    with _nginx(tmp_path, "nginx", port, server):
        yield f"https://127.0.0.1:{port}{prefix}"


@contextlib.contextmanager
def nginx_balancer(tmp_path: Path, upstreams: dict[str, str]):
    """A real nginx balancing several servers as docs/server.md ("Several machines") configures one: each server started
    with `--instance-id NAME` (the keys of `upstreams`, NAME -> http://127.0.0.1:PORT), a session's requests routed by
    its id's NAME- prefix to the server holding it, anything else (a new session, /health, the pages) to any of them,
    a 503 (full, or stopping) tried on the next one. Plain HTTP. Yields its URL, http://127.0.0.1:PORT."""
    hosts = {name: url.split("://", 1)[1].rstrip("/") for name, url in upstreams.items()}
    groups = "".join(f"upstream letstalk_{name} {{ server {host}; }}\n" for name, host in hosts.items())
    every = "".join(f"server {host} max_fails=0; " for host in hosts.values())
    routes = "".join(f"~^/v1/(sessions|renders|recordings)/{name}- letstalk_{name};\n" for name in hosts)
    port = free_port()
    balancer = f"""
        {groups}
        upstream letstalk_any {{ {every} }}
        map $uri $letstalk {{
            {routes}
            default letstalk_any;
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://$letstalk;
                proxy_next_upstream error timeout http_503 non_idempotent;
                {NGINX_PASS}
            }}
        }}
        """
    with _nginx(tmp_path, "nginx-balancer", port, balancer):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def caddy_proxy(tmp_path: Path, upstream: str, cert: Path, key: Path, prefix: str = "/avatar"):
    """A real Caddy (Debian's caddy 2.6) in front of `upstream` as the Caddyfile in docs/server.md puts it: TLS ending
    there (`cert`, `key`), the server under `prefix` (handle_path strips it, X-Forwarded-Prefix says it), Caddy's own
    X-Forwarded-Proto/-Host, websockets and streamed answers passed on. Yields its URL,
    https://127.0.0.1:PORT{prefix}."""
    import os

    binary = shutil.which("caddy")
    if binary is None:
        pytest.skip("needs caddy (Debian's: scripts/setup.sh --dev installs it)")
    port = free_port()
    root = tmp_path / "caddy"
    root.mkdir()
    (root / "Caddyfile").write_text(f"""
        {{
            admin off
            auto_https disable_redirects
            skip_install_trust
            storage file_system {root}/data
        }}
        https://127.0.0.1:{port} {{
            tls {cert} {key}
            handle_path {prefix}/* {{
                reverse_proxy {upstream} {{
                    header_up X-Forwarded-Prefix {prefix}
                    flush_interval -1
                }}
            }}
        }}
        """)
    env = {**os.environ, "HOME": str(root), "XDG_DATA_HOME": str(root / "data"), "XDG_CONFIG_HOME": str(root)}
    with _listening("caddy", [binary, "run", "--config", str(root / "Caddyfile"), "--adapter", "caddyfile"], port,
                    env=env):
        yield f"https://127.0.0.1:{port}{prefix}"


@dataclass
class TurnServer:
    url: str  # turn:127.0.0.1:PORT
    secret: str  # its static-auth-secret: the letstalk server's --turn-secret
    log: Path  # what coturn wrote: its allocations name the usernames that made them


def coturn_off_flags(binary: str) -> list[str]:
    """The flags that keep coturn's CLI and DTLS listeners off, where it has them. coturn 4.6 (Debian 12) starts both
    unless told `--no-cli --no-dtls`; coturn 4.18 (Debian sid) starts neither and stops at `--no-cli` ("no-cli option
    is deprecated, see --cli", exit 255). Its help (on stderr) says which it is."""
    usage = subprocess.run([binary, "--help"], capture_output=True, text=True)
    return [flag for flag in ("--no-cli", "--no-dtls")
            if re.search(rf"^\s*{flag}\s", usage.stdout + usage.stderr, re.MULTILINE)]


@contextlib.contextmanager
def turn_server(tmp_path: Path, secret: str = "letstalk-test-secret"):
    """A real TURN server (coturn, `apt-get install coturn`; scripts/setup.sh --dev installs it) on 127.0.0.1,
    taking the TURN REST API's time-limited credentials made from `secret`, relaying to loopback peers."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("needs coturn's turnserver (apt-get install coturn; scripts/setup.sh --dev installs it)")
    with socket.socket() as s:  # a port free on both UDP and TCP, as coturn listens on both
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "turnserver.log"
    proc = subprocess.Popen(
        [binary, "-n", "-v", "--listening-ip", "127.0.0.1", "--listening-port", str(port), "--relay-ip", "127.0.0.1",
         "--use-auth-secret", "--static-auth-secret", secret, "--realm", "letstalk", "--allow-loopback-peers",
         "--no-tls", *coturn_off_flags(binary), "--userdb", str(tmp_path / "turndb"),
         "--pidfile", str(tmp_path / "pid"), "--log-file", str(log), "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # ready once it answers on TCP (it opens UDP and TCP listeners together)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not start (exit {proc.poll()}); its log: {log}")
            time.sleep(0.05)
        yield TurnServer(f"turn:127.0.0.1:{port}", secret, log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(coro, timeout: float = 240):
    """Run a test coroutine; any exception a background task dropped on the floor fails the test."""
    problems: list[str] = []

    async def main():
        loop = asyncio.get_running_loop()

        def handler(loop, context):
            problems.append(str(context.get("exception") or context.get("message")))
            loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        return await asyncio.wait_for(coro, timeout)

    result = asyncio.run(main())
    assert not problems, f"unhandled exceptions in background tasks: {problems}"
    return result


async def create_session(http: aiohttp.ClientSession, url: str, headers: dict | None = None, **body) -> dict:
    async with http.post(f"{url}/v1/sessions", json=body or {"avatar_id": "default"}, headers=headers or {}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


class SpeechTrack(MediaStreamTrack):
    """A 48 kHz stereo 'microphone' playing speech-like audio in real time (like a browser's)."""

    kind = "audio"

    def __init__(self, seconds: float = 3.0, silence_after: bool = True) -> None:
        super().__init__()
        speech = speechlike(seconds, 48000)
        tail = np.zeros(48000 * 30, np.float32) if silence_after else np.zeros(0, np.float32)
        self.pcm = (np.concatenate([speech, tail]) * 32767).astype(np.int16)
        self.pos = 0
        self.start: float | None = None

    async def recv(self):
        import av

        if self.readyState != "live":
            raise MediaStreamError
        if self.start is None:
            self.start = time.monotonic()
        n = 960  # 20 ms
        due = self.start + self.pos / 48000
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        chunk = self.pcm[self.pos:self.pos + n]
        if len(chunk) < n:
            chunk = np.pad(chunk, (0, n - len(chunk)))
        stereo = np.repeat(chunk, 2)[None]  # (1, 2n) packed s16
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = self.pos
        frame.time_base = fractions.Fraction(1, 48000)
        self.pos += n
        return frame


class Peer:
    """A bare aiortc client: receives the avatar's tracks (counting frames), optionally sends tracks."""

    def __init__(self, send_audio: MediaStreamTrack | None = None, send_video: MediaStreamTrack | None = None,
                 video_codec: str | None = None, audio_codec: str | None = None, pipecat: bool = False) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.video_frames: list = []  # (shape,) of received frames (only the shape: memory stays flat)
        self.audio_frames = 0
        self.audio_rms: list[float] = []
        self.last_video: np.ndarray | None = None
        self.tasks: list[asyncio.Task] = []
        self.connected = asyncio.Event()
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        if pipecat:  # as a Pipecat client negotiates with SmallWebRTC: audio then video, both sendrecv, a data channel
            self.pc.addTransceiver("audio", direction="sendrecv")
            self.pc.addTransceiver("video", direction="sendrecv")
            self.pc.createDataChannel("pipecat")
            return
        if send_video is not None:
            video = self.pc.addTransceiver(send_video, direction="sendrecv")
        else:
            video = self.pc.addTransceiver("video", direction="recvonly")
        if send_audio is not None:
            audio = self.pc.addTransceiver(send_audio, direction="sendrecv")
        else:
            audio = self.pc.addTransceiver("audio", direction="recvonly")
        for transceiver, codec in ((video, video_codec), (audio, audio_codec)):
            if codec is not None:  # offer only this one ("video/H264", "audio/PCMU"), with its retransmissions
                transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities(transceiver.kind).codecs
                                                 if c.mimeType in (codec, "video/rtx")])

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_track(self, track) -> None:
        self.tasks.append(asyncio.ensure_future(self._read(track)))

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                arr = frame.to_ndarray(format="rgb24")
                self.video_frames.append(arr.shape)
                self.last_video = arr
            else:
                self.audio_frames += 1
                pcm = frame.to_ndarray().astype(np.float32) / 32768
                self.audio_rms.append(float(np.sqrt(np.mean(pcm ** 2))))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, http: aiohttp.ClientSession, info: dict, timeout: float = 20) -> None:
        sdp = await self.offer()
        async with http.post(info["offer_url"], data=sdp, headers={
                "Authorization": f"Bearer {info['token']}", "Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            assert r.content_type == "application/sdp"
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def wait_frames(self, video: int, audio: int = 0, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.video_frames) < video or self.audio_frames < audio:
            assert time.monotonic() < deadline, (f"only {len(self.video_frames)} video / {self.audio_frames} audio "
                                                 f"frames after {timeout} s")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """Die without a word: close the ICE sockets under the peer connection (no DTLS close, no BYE)."""
        for transceiver in self.pc.getTransceivers():
            ice = transceiver.receiver.transport.transport
            for protocol in list(ice._connection._protocols):  # aioice's UDP endpoints
                if protocol.transport is not None:
                    protocol.transport.close()
        for task in self.tasks:
            task.cancel()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self.pc.close(), 5)


def collect_media(session, timed: bool = False) -> tuple[list, list, list[asyncio.Task]]:
    """Read an SDK session's video frames (`timed`: TimedFrame) and audio chunks into two lists as they come; returns
    them and the two reading tasks (they end when the session's connection does)."""
    frames: list = []
    chunks: list = []

    async def read(iterator, into: list) -> None:
        async for item in iterator:
            into.append(item)

    video = session.timed_video_frames() if timed else session.video_frames()
    readers = [asyncio.ensure_future(read(video, frames)), asyncio.ensure_future(read(session.audio_frames(), chunks))]
    return frames, chunks, readers


def cut_network(pc) -> int:
    """What a Wi-Fi/cellular switch does to a peer connection: nothing it sends arrives, nothing comes in, and nobody
    says goodbye; its own ICE notices only when consent expires (~30 s). Returns how many sockets went deaf."""
    cut = 0
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport._connection  # the aioice connection under ICE
        for protocol in connection._protocols:
            if protocol.transport is not None:
                protocol.transport.sendto = lambda *args, **kwargs: None
                protocol.datagram_received = lambda *args, **kwargs: None
                cut += 1
    return cut


class LosePackets:
    """Incoming RTP packets of one kind that a peer connection never gets (a lossy Wi-Fi or cellular link): `count`
    of them, one each `every` packets of that kind (`lose_packets`), and after each the next `retransmissions` RTX
    packets (the resends a NACK asks for: their payload, which names the packet, is encrypted, so any). `lost`: the
    sequence numbers lost so far; `lost_rtx`: how many retransmissions."""

    def __init__(self, pc, kind: str, count: int, every: int, retransmissions: int = 0) -> None:
        sdp = pc.remoteDescription.sdp
        section = sdp.split(f"m={kind} ", 1)[1].split("\nm=", 1)[0]
        self.rtx_types = {int(pt) for pt in re.findall(r"a=rtpmap:(\d+) rtx/", section)}
        self.payload_types = {int(pt) for pt in re.findall(r"a=rtpmap:(\d+) ", section)} - self.rtx_types
        self.count, self.every, self.seen, self.lost = count, every, 0, []
        self.retransmissions, self.rtx_to_lose, self.lost_rtx = retransmissions, 0, 0

    def drops(self, data: bytes) -> bool:
        if not is_rtp(data):  # RTCP, DTLS, STUN
            return False
        if data[1] & 0x7F in self.rtx_types and self.rtx_to_lose:
            self.rtx_to_lose -= 1
            self.lost_rtx += 1
            return True
        if data[1] & 0x7F not in self.payload_types or len(self.lost) >= self.count:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.lost.append(int.from_bytes(data[2:4], "big"))
        self.rtx_to_lose = self.retransmissions
        return True


def lose_packets(pc, kind: str, count: int = 3, every: int = 50, retransmissions: int = 0) -> LosePackets:
    """Make `pc` lose `count` incoming RTP packets of `kind` ("audio", "video"), one each `every` of them, and after
    each the next `retransmissions` retransmitted packets, from now on (its RTP header is in the clear under SRTP);
    what it receives otherwise is untouched."""
    loss = LosePackets(pc, kind, count, every, retransmissions)
    connection = pc.getTransceivers()[0].receiver.transport.transport._connection  # the aioice connection under ICE
    for protocol in connection._protocols:
        received = protocol.datagram_received

        def datagram_received(data, addr, received=received):
            if not loss.drops(data):
                received(data, addr)

        protocol.datagram_received = datagram_received
    return loss


async def stream_one_session(client, what: str) -> dict:
    """Through an SDK `client`: a session started, connected, ten frames received, a ping answered on its websocket,
    closed. Returns the session's info as the server answered it."""
    session = await client.start_session()
    info = dict(session.info, ws_url=session.ws_url)
    await session.connect()
    frames, _, readers = collect_media(session)
    await wait_until(lambda: len(frames) >= 10, 20, f"frames {what}")
    assert await session.ping() >= 0  # its websocket
    await session.close()
    await asyncio.gather(*readers)
    return info


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails with `what` after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)
    return time.monotonic() - start


def play_session(server: Server, session_id: str) -> asyncio.Task:
    """Read a session's frames in-process (a stand-in viewer that drives its playback clock)."""
    session = server.engine.sessions[session_id]

    async def consume():
        async for _ in session.frames():
            pass

    return asyncio.ensure_future(consume())
