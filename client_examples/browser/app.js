// letstalk-rt browser client: create a session, send speech as the WebRTC audio track, show the avatar.
//
// Used by index.html (the full page) and overlay.html (avatar only, for OBS). No build step, no
// dependencies: an ES module the server serves at /static/app.js.
//
//   const info = await createSession({ avatarId: "default" });          // or { file: aFileObject }, fullFrame: 512
//   const conn = new AvatarConnection(info, { onEvent: (e) => console.log(e) });
//   await conn.start({ audioStream });                                   // a MediaStream with one audio track, or null
//                                                                        // (relay: true: only through the TURN server)
//   videoElement.srcObject = conn.stream;
//   await conn.connected();                                              // media flows from here on
//   conn.say("Hello there!", { voice: "en-us" });                        // the server's text to speech (listVoices())
//   conn.interrupt(); conn.endSpeech(); await conn.close();
//   // follow: when the server stops (a rolling update) or its GPU hangs, go on in a new session made the same way
//   new AvatarConnection(info, { onEvent, onState, follow: () => createSession({ avatarId: "default" }) });
//
// From a page served elsewhere (your app), import it from the server and say where the server is; the server must
// allow your page's origin (letstalk serve --cors-origin https://app.example.com):
//
//   import { configure, createSession, AvatarConnection } from "https://avatar.example.com/static/app.js";
//   configure({ server: "https://avatar.example.com" });

// Where the letstalk server is: by default where this module came from (SERVER/static/app.js), so its own pages, one
// of another origin that imports it from the server, and either behind a proxy that serves the server under a path
// (https://example.com/avatar/) all reach it with nothing said.
const moduleServer = new URL("../", import.meta.url);
let serverBase = moduleServer;

// Where the letstalk server is, for a page that serves this module itself (a copy in your app's bundle).
export function configure({ server = null } = {}) {
  serverBase = server ? new URL(server.replace(/\/*$/, "/")) : moduleServer;
}

// The microphone (getUserMedia with `constraints`). A browser gives it only to a secure page: one loaded over HTTPS,
// or from this machine (localhost); elsewhere navigator.mediaDevices is not there at all, and this says what to do.
// Its refusals say what to do too (the browsers' own are "Requested device not found" in Chromium and "The object can
// not be found here." in Firefox for a machine with no microphone).
export async function microphone(constraints = { audio: true }) {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error(`the browser gives the microphone only to a page loaded over HTTPS or from localhost, and this one `
      + `is ${location.origin}: serve it over HTTPS (letstalk serve --tls-cert/--tls-key, or behind a TLS proxy), or `
      + `send an audio file instead`);
  }
  try {
    return await navigator.mediaDevices.getUserMedia(constraints);
  } catch (e) {
    const what = {
      NotFoundError: "this machine has no microphone the browser can use: plug one in",
      NotAllowedError: "the microphone was refused (by you, or by the browser's settings for this site): allow it "
        + "from the icon beside the address",
      NotReadableError: "the microphone could not be opened: another program may hold it, or the system refuses it "
        + "to the browser",
      OverconstrainedError: "no microphone meets what the page asks of it",
    }[e?.name];
    if (!what) throw e;
    throw new Error(`${what}; or send an audio file instead (${e.name}: ${e.message})`);
  }
}

// Why this browser cannot show the avatar live, or null when it can: the avatar comes over WebRTC, which a browser may
// lack (a WebKitGTK or embedded web view built without it) or have turned off (Firefox's media.peerconnection.enabled,
// which privacy settings and extensions turn off). Asked before a session is made, so none is made for nothing; the
// browser's own words were only "RTCPeerConnection is not defined" (Firefox) or "Can't find variable:
// RTCPeerConnection" (WebKit), after the session was made.
export function webrtcMissing() {
  if (typeof RTCPeerConnection === "function") return null;
  return "this browser cannot show the avatar live: it has no WebRTC (RTCPeerConnection), turned off or not built in "
    + "(in Firefox, media.peerconnection.enabled in about:config, which some privacy settings and extensions turn "
    + "off): turn it on, or open the page in a current Chrome, Edge, Firefox or Safari";
}

// Chromium lines the avatar's picture up with its sound by holding the picture as long as its audio buffer holds the
// sound (~30-50 ms), but works up to that over the first 10-20 s, showing the picture up to ~55 ms before its sound
// meanwhile. A video buffer of this many ms asked for from the start kept them within ~25 ms from the first second
// (scripts/browser_sync.py; docs/benchmarks.md, "Lip sync as the browser plays it"): about what the lining up holds
// the picture once settled anyway.
const VIDEO_BUFFER_MS = 40;

// An API path as a URL on the server.
export function apiUrl(path) {
  return sameOrigin(path);
}

// How far the server's clock is ahead of this browser's (ms), from the Date header of its answers: a token's expiry is
// on the server's clock, and a browser's may be off by hours (a wrong time zone setting, a kiosk never synced), which
// renewed a token hours late or took it for expired and never renewed it. (One second's resolution: its middle.)
let clockOffsetMs = 0;

function noteServerTime(resp) {
  const date = Date.parse(resp.headers.get("Date") || "");
  if (!Number.isNaN(date)) clockOffsetMs = date + 500 - Date.now();
}

function authHeaders(apiKey) {
  return apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
}

async function errorText(resp) {
  const text = await resp.text();
  try {
    return JSON.parse(text).error || text;
  } catch {
    return text || resp.statusText;
  }
}

// Server URLs are absolute as seen by the server; keep only their path (and query), on the server this module talks
// to, with the path a proxy serves it under where the URL lacks it: a proxy in front still works.
export function sameOrigin(url, websocket = false) {
  const u = new URL(url, serverBase);
  const prefix = serverBase.pathname.replace(/\/$/, ""); // "" or the proxy's path, "/avatar"
  const path = `${u.pathname}/`.startsWith(`${prefix}/`) ? u.pathname : prefix + u.pathname;
  const out = new URL(path + u.search, serverBase);
  out.protocol = websocket ? (serverBase.protocol === "https:" ? "wss:" : "ws:") : serverBase.protocol;
  return out.toString();
}

export async function listAvatars(apiKey = null) {
  const resp = await fetch(apiUrl("/v1/avatars"), { headers: authHeaders(apiKey) });
  if (!resp.ok) throw new Error(`avatars: HTTP ${resp.status}: ${await errorText(resp)}`);
  return (await resp.json()).avatars;
}

// Upload a portrait once as an avatar: the server prepares its face now, and sessions start on its id
// (createSession({ avatarId })) with no upload and no preparation. -> {id, name, uploaded, created_at}
export async function createAvatar({ apiKey = null, file, name = null, id = null } = {}) {
  const form = new FormData();
  form.append("portrait", file, file.name || "portrait");
  if (name) form.append("name", name);
  if (id) form.append("id", id);
  const resp = await fetch(apiUrl("/v1/avatars"), { method: "POST", body: form, headers: authHeaders(apiKey) });
  if (!resp.ok) throw new Error(`avatar upload: HTTP ${resp.status}: ${await errorText(resp)}`);
  return resp.json();
}

// The voices the server's text to speech speaks with ([{id, name}]); throws with the server's reason (e.g. no
// espeak-ng there: HTTP 503).
export async function listVoices(apiKey = null) {
  const resp = await fetch(apiUrl("/v1/voices"), { headers: authHeaders(apiKey) });
  if (!resp.ok) throw new Error(`text to speech: ${await errorText(resp)}`);
  return (await resp.json()).voices;
}

// fullFrame: the video is the whole photo, its longest side at most this many px (the face pasted back in);
// framing: a small face is shown with at most this many sides of its square on the shorter side (0: the whole photo).
// record: the server (--recordings-dir) records the session; fetchRecording(info.recording_url, info.token) gets it.
export async function createSession({
  apiKey = null, avatarId = "default", file = null, seed = null, fullFrame = null, framing = null, record = false,
} = {}) {
  let resp;
  if (file) {
    const form = new FormData();
    form.append("portrait", file, file.name || "portrait");
    if (seed !== null) form.append("seed", String(seed));
    if (fullFrame !== null) form.append("full_frame", String(fullFrame));
    if (framing !== null) form.append("framing", String(framing));
    if (record) form.append("record", "true");
    resp = await fetch(apiUrl("/v1/sessions"), { method: "POST", body: form, headers: authHeaders(apiKey) });
  } else {
    const body = { avatar_id: avatarId };
    if (seed !== null) body.seed = seed;
    if (fullFrame !== null) body.full_frame = fullFrame;
    if (framing !== null) body.framing = framing;
    if (record) body.record = true;
    resp = await fetch(apiUrl("/v1/sessions"), {
      method: "POST",
      body: JSON.stringify(body),
      headers: { ...authHeaders(apiKey), "Content-Type": "application/json" },
    });
  }
  if (!resp.ok) {
    const retry = resp.headers.get("Retry-After");
    throw new Error(`HTTP ${resp.status}: ${await errorText(resp)}${retry ? ` (retry after ${retry} s)` : ""}`);
  }
  noteServerTime(resp);
  return resp.json();
}

// A clip made on the server (POST /v1/renders): the avatar (avatarId, or a photo `file`) saying an `audio` file or a
// `text` (spoken with `voice`). Made as fast as the server's live sessions leave it room (faster than real time where
// the device has room); where every session slot is in use, `queue` has it wait for one on the server, in turn
// (state "queued"). waitForRender(info) waits for it. -> the render's info ({render_id, token, status_url,
// video_url, ...}); throws with the server's reason (e.g. no --recordings-dir: 422).
export async function createRender({
  apiKey = null, avatarId = "default", file = null, audio = null, text = null, voice = null, fullFrame = null,
  framing = null, queue = true,
} = {}) {
  const form = new FormData();
  if (file) form.append("portrait", file, file.name || "portrait");
  else form.append("avatar_id", avatarId);
  if (audio) form.append("audio", audio, audio.name || "audio");
  if (text) form.append("text", text);
  if (text && voice) form.append("voice", voice);
  if (fullFrame !== null) form.append("full_frame", String(fullFrame));
  if (framing !== null) form.append("framing", String(framing));
  if (queue) form.append("queue", "true");
  const resp = await fetch(apiUrl("/v1/renders"), { method: "POST", body: form, headers: authHeaders(apiKey) });
  if (!resp.ok) throw new Error(`clip: HTTP ${resp.status}: ${await errorText(resp)}`);
  return resp.json();
}

// Wait for a render to end, asking every pollMs (onProgress gets each state while it is made); its MP4 as a Blob, or
// throws with why it has none.
export async function waitForRender(info, { pollMs = 500, onProgress = null } = {}) {
  for (;;) {
    const resp = await fetch(sameOrigin(info.status_url), { headers: { Authorization: `Bearer ${info.token}` } });
    if (!resp.ok) throw new Error(`clip: HTTP ${resp.status}: ${await errorText(resp)}`);
    const state = await resp.json();
    if (state.token) info.token = state.token; // renewed while it waits or is made (it may take longer than one lasts)
    if (state.state === "done") return fetchRecording(state.video_url, info.token);
    if (state.state !== "rendering" && state.state !== "queued") {
      throw new Error(`clip ${state.state}: ${state.error || "no video"}`);
    }
    if (onProgress) onProgress(state);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}

// One line of a render's progress (a state waitForRender's onProgress gets): how much is made, its speed, the time
// left, and the live sessions it shares the server's device with (it gets the time they leave).
export function renderProgress(state) {
  if (state.state === "queued") return `queued: ${state.queue_position ?? "?"} in line for a slot on the server`;
  let text = `${state.rendered_seconds.toFixed(1)} s made`;
  if (state.speech_seconds != null) text += ` of ${state.speech_seconds.toFixed(1)} s`;
  if (state.speed != null) text += `, ${state.speed.toFixed(2)}x real time`;
  if (state.eta_seconds != null) text += `, ~${Math.round(state.eta_seconds)} s left`;
  if (state.live_sessions) text += ` (sharing the server with ${state.live_sessions} live sessions)`;
  return text;
}

// A session's recording (an MP4 Blob) once the server saved it: when the session ended (close()) or stopped
// recording. It waits up to timeoutMs for the save; throws with the server's reason otherwise.
export async function fetchRecording(url, token, timeoutMs = 15000) {
  const start = performance.now();
  for (;;) {
    const resp = await fetch(sameOrigin(url), { headers: { Authorization: `Bearer ${token}` } });
    if (resp.ok) return resp.blob();
    const why = await errorText(resp);
    const waited = performance.now() - start;
    // 409: still recording; 404 in the first seconds: the session is closing and its file not yet in place
    if (!(resp.status === 409 || (resp.status === 404 && waited < 3000)) || waited > timeoutMs) {
      throw new Error(`recording: HTTP ${resp.status}: ${why}`);
    }
    await new Promise((r) => setTimeout(r, 300));
  }
}

// The captions a saved recording showed (text said with `say`), as a WebVTT Blob, or null when it showed none.
// Saved before the recording's MP4: call it once fetchRecording has the recording.
export async function fetchCaptions(recordingUrl, token) {
  const resp = await fetch(sameOrigin(`${recordingUrl}/captions`), { headers: { Authorization: `Bearer ${token}` } });
  if (resp.status === 404) return null;
  if (!resp.ok) throw new Error(`captions: HTTP ${resp.status}: ${await errorText(resp)}`);
  return resp.blob();
}

// Decode an audio file into a MediaStream (WebAudio), to send it like a microphone. It plays from
// play(): call that once the peer connection is connected (conn.connected()), or the first seconds
// play into a track nobody sends yet and the avatar never says them. play() rejects, saying why and what to do, where
// the browser has not started the page's audio 2 s on (its AudioContext suspended: the track sends silence): a browser
// holds it until the page is clicked, and Firefox also on a machine with no sound output device; it starts from the
// file's beginning once the browser lets it (a click on the page asks again).
export async function fileToStream(file, { loop = false, autoplay = false } = {}) {
  const ctx = new AudioContext();
  const buffer = await ctx.decodeAudioData(await file.arrayBuffer());
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.loop = loop;
  const dest = ctx.createMediaStreamDestination();
  source.connect(dest);
  let started = false;
  const play = async () => {
    if (started) return;
    started = true;
    source.start();
    if (ctx.state === "running") return;
    const running = await Promise.race([ctx.resume().then(() => ctx.state === "running", () => false),
      new Promise((resolve) => setTimeout(() => resolve(false), 2000))]);
    if (running || ctx.state === "running") return;
    document.addEventListener("click", () => ctx.resume().catch(() => {}), { once: true });
    throw new Error(`the browser has not started this page's audio (its AudioContext is ${ctx.state}), so the file `
      + "is not being sent: a browser holds it until you click the page (click it), and Firefox on a machine with no "
      + "sound output device (connect one, or use Chromium)");
  };
  if (autoplay) play().catch((e) => console.warn(e.message)); // (call play() yourself to be told)
  return {
    stream: dest.stream,
    play,
    stop: () => { try { source.stop(); } catch {} ctx.close(); },
    duration: buffer.duration,
  };
}

// Why a server ends a session that a new one can take over from (session_ending's reason): it is stopping (a rolling
// update), or its device hung. A time limit is a limit.
const MOVE_REASONS = ["server_stopping", "device_hung"];

export class AvatarConnection {
  // follow: where the server says it will end the session because it is stopping or its device hung (a
  // session_ending event, MOVE_REASONS), go on in a new session that follow() makes (e.g. () => createSession(the
  // same arguments)): move() switches to it; onState gets {type: "moved", session_id, from_session_id, reason,
  // after_ms, motion} (conn.stream is then the new session's: show it; motion: it went on from the old one's
  // frames) or {type: "move_failed", reason} (the old session goes on until it ends). A server that refuses (503:
  // stopping too, before a balancer has noticed) is asked again with backoff until 2 s before the old session ends
  // (30 s for a hung device).
  constructor(info, { onEvent = () => {}, onState = () => {}, follow = null } = {}) {
    this.info = info;
    this.onEvent = onEvent;
    this.onState = onState;
    this.follow = follow;
    this.pc = null;
    this.ws = null;
    this.stream = new MediaStream();
    this.closed = false;
    this._said = 0;
    // say() texts not yet all shown, oldest first, {id, text, options, total: its sentences (the server's `say` answer
    // says), shown: the sentences whose caption came}: a move says the rest again (_sayAgain)
    this._saying = [];
    this._keepToken();
  }

  // A session outlives its first token (good for the server's --token-ttl: an hour): while the session is open it is
  // renewed, with the session's TURN credentials, each time half of what is left of it has gone (POST
  // /v1/sessions/{id}/token), into this.info. A failure is tried again the same way; a server without the renewal
  // (older), or that no longer has the session, leaves the token as it is.
  _keepToken() {
    clearTimeout(this._tokenTimer);
    const left = (this.info.expires_at ?? 0) * 1000 - (Date.now() + clockOffsetMs); // on the server's clock
    if (this.closed || !(left > 0)) return;
    this._tokenTimer = setTimeout(async () => {
      if (this.closed) return;
      try {
        const resp = await fetch(apiUrl(`/v1/sessions/${this.info.session_id}/token`), {
          method: "POST", headers: { Authorization: `Bearer ${this.info.token}` },
        });
        if ([401, 404, 405].includes(resp.status)) return;
        if (resp.ok) {
          noteServerTime(resp);
          const renewed = await resp.json();
          Object.assign(this.info, { token: renewed.token, expires_at: renewed.expires_at });
          if (renewed.ice_servers) this.info.ice_servers = renewed.ice_servers;
          storeToken(this.info.session_id, renewed);
        }
      } catch {}
      this._keepToken();
    }, Math.max(left / 2, 250));
  }

  get sessionId() {
    return this.info.session_id;
  }

  // Negotiate WebRTC (and open the websocket). On failure the peer connection and websocket are closed
  // again before the error is thrown; the session itself is left to its owner (close() deletes it).
  // reconnect (default true): once no media has come for 2 s (the network changed: Wi-Fi to cellular, a laptop
  // waking up) or the connection failed, connect again with a new peer connection (and a new websocket if the old
  // one closed) for up to 30 s; onState gets {type: "reconnecting", reason}, then "reconnected" (conn.stream is then
  // a new MediaStream: show it) or "reconnect_failed". A websocket lost alone (closed with no close from the server,
  // code 1006: a proxy restarted) while the media goes on is opened again, the peer connection left as it is
  // ("reconnected" with websocket_only); what is sent meanwhile waits for it.
  async start(options = {}) {
    try {
      await this._start(options);
    } catch (e) {
      this._hangUp();
      throw e;
    }
    this._options = options;
    if (options.reconnect !== false) {
      this._mediaAt = Date.now();
      this._packets = -1;
      this._watch = setInterval(() => this._checkMedia(), 500);
    }
  }

  async _checkMedia() {
    if (this.closed || this._reconnecting || this._switching || !this.pc) return;
    if (this._wsLostAt && this.ws.readyState === WebSocket.CLOSED) this._reopenSocket();
    const s = await this.stats();
    const packets = (s.video.packetsReceived ?? 0) + (s.audio.packetsReceived ?? 0);
    if (packets !== this._packets) {
      this._packets = packets;
      this._mediaAt = Date.now();
    }
    const state = this.pc?.connectionState;
    if (state === "failed" || state === "closed") this._reconnect(`peer connection ${state}`);
    else if (Date.now() - this._mediaAt > 2000) this._reconnect("no media for 2 s");
  }

  async _reconnect(reason) {
    this._reconnecting = true;
    const started = Date.now();
    this.onState({ type: "reconnecting", reason });
    const old = this.pc;
    this.pc = null;
    if (old) old.close();
    let wait = 500;
    let last = reason;
    while (!this.closed && Date.now() - started < 30000) {
      this.stream = new MediaStream(); // the new connection's tracks
      try {
        const socket = this._options.websocket !== false && (!this.ws || this.ws.readyState > WebSocket.OPEN);
        await this._start({ ...this._options, websocket: socket });
        await this.connected(10000);
        this._packets = -1;
        this._mediaAt = Date.now();
        this._reconnecting = false;
        this.onState({ type: "reconnected", after_ms: Date.now() - started });
        return;
      } catch (e) {
        last = String(e); // 409: the server still hears the old connection; or no network yet
        if (this.pc) this.pc.close();
        this.pc = null;
        if (String(e).includes("HTTP 404") || String(e).includes("HTTP 401")) break; // the session is gone
      }
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(2 * wait, 4000);
    }
    clearInterval(this._watch);
    this._wsLostAt = null;
    this._unsent = [];
    if (!this.closed) this.onState({ type: "reconnect_failed", reason: last });
  }

  // relay: connect only through the server's TURN server (iceTransportPolicy "relay"), e.g. to check that it works.
  // viewer: watch only, as one more viewer of the session (POST .../viewers), beside the peer connection of the
  // client that drives it: no websocket, nothing sent; close() then frees this viewer, not the session.
  async _start({ audioStream = null, receiveAudio = true, websocket = true, relay = false, viewer = false } = {}) {
    const missing = webrtcMissing();
    if (missing) throw new Error(missing);
    const pc = new RTCPeerConnection({
      iceServers: await this._iceServers(),
      iceTransportPolicy: relay ? "relay" : "all",
    });
    this.pc = pc;
    pc.ontrack = (e) => {
      this.stream.addTrack(e.track);
      this.onState({ type: "track", kind: e.track.kind });
    };
    pc.onconnectionstatechange = () => {
      this.onState({ type: "connection", state: pc.connectionState });
    };
    const video = pc.addTransceiver("video", { direction: "recvonly" });
    if ("jitterBufferTarget" in video.receiver) video.receiver.jitterBufferTarget = VIDEO_BUFFER_MS; // (Chromium)
    const mic = audioStream ? audioStream.getAudioTracks()[0] : null;
    if (mic) {
      pc.addTransceiver(mic, { direction: receiveAudio ? "sendrecv" : "sendonly" });
    } else if (receiveAudio) {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    await pc.setLocalDescription(await pc.createOffer());
    await this._gathered(3000); // WHIP-style: one offer with every candidate, no trickle
    if (viewer && this.viewerUrl) { // a reconnect: the old viewer goes now, not once the server finds it silent
      try {
        await fetch(this.viewerUrl, { method: "DELETE", headers: { Authorization: `Bearer ${this.info.token}` } });
      } catch {}
      this.viewerUrl = null;
    }
    const url = viewer ? apiUrl(`/v1/sessions/${this.info.session_id}/viewers`) : sameOrigin(this.info.offer_url);
    const resp = await fetch(url, {
      method: "POST",
      body: pc.localDescription.sdp,
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${this.info.token}` },
    });
    if (!resp.ok) throw new Error(`offer: HTTP ${resp.status}: ${await errorText(resp)}`);
    if (viewer) this.viewerUrl = apiUrl(resp.headers.get("Location")); // DELETEd by close() or the next reconnect
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    if (websocket && !viewer) this._openSocket(); // one websocket per session: an overlay of another client's session opens none
  }

  // Resolves once the peer connection is connected (media flows); rejects when it fails or takes too long.
  connected(timeoutMs = 20000) {
    const pc = this.pc;
    if (!pc) return Promise.reject(new Error("start() the connection first"));
    return new Promise((resolve, reject) => {
      const finish = (error) => {
        clearTimeout(timer);
        pc.removeEventListener("connectionstatechange", check);
        if (error) reject(error);
        else resolve();
      };
      const check = () => {
        const s = pc.connectionState;
        if (s === "connected") finish();
        else if (s === "failed" || s === "closed") finish(new Error(`peer connection ${s}`));
      };
      const timer = setTimeout(() => finish(new Error(`peer connection not connected within ${timeoutMs / 1000} s`)),
        timeoutMs);
      pc.addEventListener("connectionstatechange", check);
      check();
    });
  }

  // The STUN/TURN servers (with this session's TURN credentials) the server handed out: in the session's answer,
  // or, for a session another client created (an overlay given its id and token), from GET /v1/sessions/{id}.
  async _iceServers() {
    if (!this.info.ice_servers) {
      const resp = await fetch(sameOrigin(`/v1/sessions/${this.info.session_id}`), {
        headers: { Authorization: `Bearer ${this.info.token}` },
      });
      if (!resp.ok) throw new Error(`session: HTTP ${resp.status}: ${await errorText(resp)}`);
      noteServerTime(resp);
      this._keepToken(); // (a page given a session's id and token learns the server's time here)
      this.info.ice_servers = (await resp.json()).ice_servers || [];
    }
    return this.info.ice_servers;
  }

  _gathered(timeoutMs) {
    const pc = this.pc;
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", done);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);
    });
  }

  _openSocket() {
    const url = new URL(sameOrigin(this.info.ws_url, true));
    url.searchParams.set("token", this.info.token); // browsers cannot set headers on a WebSocket
    const ws = new WebSocket(url);
    this.ws = ws;
    clearInterval(this._keepAlive); // a reconnect opens a new websocket
    ws.onopen = () => {
      if (this._wsLostAt && !this._reconnecting) { // (a new peer connection's reconnect says so itself)
        this.onState({ type: "reconnected", websocket_only: true, after_ms: Date.now() - this._wsLostAt });
      }
      this._wsLostAt = null;
      for (const message of (this._unsent || []).splice(0)) ws.send(message);
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws) return; // a moved session's old websocket: its events are no longer this connection's
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch {
        return;
      }
      this._followSaying(ev);
      this.onEvent(ev);
      if (ev.type === "session_ending" && this.follow && MOVE_REASONS.includes(ev.reason)) this._followOn(ev);
    };
    ws.onclose = (e) => {
      this.onState({ type: "websocket", state: "closed", code: e.code, reason: e.reason });
      // no close from the server (1006): it stopped, or the connection to it went. With reconnect on and the page
      // not closing, _checkMedia opens a new one while the media goes on (else _reconnect does, with the media)
      if (e.code !== 1006 || this.ws !== ws || !this._watch || this.closed) {
        if (this.ws === ws) this._unsent = []; // closed by the server (the session ended): nothing will carry them
      } else if (!this._wsLostAt) {
        this._wsLostAt = Date.now();
        this.onState({ type: "reconnecting", reason: "websocket lost with no close from the server (code 1006)" });
      }
    };
    this._keepAlive = setInterval(() => this.send({ type: "ping" }), 15000);
  }

  // The session ends (session_ending): a new one from this.follow(), asked for until 2 s before the old one ends (30 s
  // for a hung device, which shows nothing more), a refusal (503) or a network error tried again with backoff.
  async _followOn(ev) {
    if (this._following || this.closed) return;
    this._following = true;
    const left = Math.max(0, Number(ev.seconds_left) || 0) * 1000;
    const until = Date.now() + (left ? Math.max(left - 2000, left / 2) : 30000);
    let wait = 500;
    let last = "";
    try {
      while (!this.closed) {
        try {
          await this.move(await this.follow(), ev.reason);
          return;
        } catch (e) {
          last = String(e);
          if (!/HTTP 503|fetch|network/i.test(last)) break; // (an avatar gone, a key refused: not going to change)
        }
        if (Date.now() + wait > until) break;
        await new Promise((r) => setTimeout(r, wait));
        wait = Math.min(2 * wait, 4000);
      }
      if (!this.closed) this.onState({ type: "move_failed", reason: last });
    } finally {
      this._following = false;
    }
  }

  // Go on in the session `info` (a createSession() answer, or sessionFromToken() for one another client made):
  // connect to it the way start() connected (its websocket too), keep showing the old one until the new one is
  // connected, then hang up the old one and delete it (a viewer's: free the viewer). The new session goes on from the
  // old one's motion and says the say() texts it had not finished (a page that drives it). onState {type: "moved"}
  // says so; conn.stream is the new one's. On failure this stays on the old session (the new one is deleted) and
  // throws.
  async move(info, reason = "moved by the page") {
    if (this.closed) throw new Error("the connection is closed");
    const started = Date.now();
    const old = { info: this.info, pc: this.pc, ws: this.ws, stream: this.stream, viewerUrl: this.viewerUrl };
    const options = this._options || {};
    this._switching = true;
    let motion = false;
    try {
      if (this._owner(options)) motion = await this._carryMotion(old.info, info); // (before its connection)
      this.info = info;
      this.stream = new MediaStream();
      this.viewerUrl = null;
      try {
        await this._start({ ...options, websocket: options.websocket !== false });
        await this.connected(10000);
      } catch (e) {
        if (this.pc && this.pc !== old.pc) this.pc.close();
        if (this.ws && this.ws !== old.ws) this.ws.close();
        const fresh = this.info;
        Object.assign(this, old);
        if (this._owner(options)) this._delete(fresh); // made for this move: not wanted now
        throw e;
      }
      if (this._owner(options)) { // (before its connection closes: the server would end it for that, without the news)
        this._sayAgain(this._saying.splice(0));
        await this._delete(old.info, null, { session_id: info.session_id, token: info.token });
      } else if (old.viewerUrl) {
        this._delete(old.info, old.viewerUrl); // an attached page's own viewer of the old session
      }
      if (old.pc) old.pc.close();
      if (old.ws && old.ws !== this.ws) old.ws.close();
      clearTimeout(this._tokenTimer);
      this._keepToken();
      this._packets = -1;
      this._mediaAt = Date.now();
    } finally {
      this._switching = false;
    }
    this.onState({ type: "moved", session_id: info.session_id, from_session_id: old.info.session_id, reason, motion,
      after_ms: Date.now() - started });
  }

  // A move's new session goes on from the old one's motion (the latents of the frames it showed last: GET, then PUT,
  // the bytes as they came), so the face does not jump back to the portrait's; false where that failed (the move goes
  // on without: an older server, or the old one not answering within 2 s).
  async _carryMotion(from, to) {
    const path = (info) => apiUrl(`/v1/sessions/${info.session_id}/motion`);
    try {
      const got = await fetch(path(from), { headers: { Authorization: `Bearer ${from.token}` },
        signal: AbortSignal.timeout(2000) });
      if (!got.ok) return false;
      const put = await fetch(path(to), { method: "PUT", body: await got.arrayBuffer(),
        signal: AbortSignal.timeout(2000),
        headers: { Authorization: `Bearer ${to.token}`, "Content-Type": "application/octet-stream" } });
      return put.ok;
    } catch (e) {
      return false;
    }
  }

  // Whether this connection made its session (close() deletes it) or watches one another client owns.
  _owner(options = this._options || {}) {
    return !options.viewer && options.websocket !== false;
  }

  // DELETE the session (or `url`: this page's viewer of it); movedTo: the session this page goes on in, which the
  // session's `closed` event then names (an overlay watching it follows).
  _delete(info, url = null, movedTo = null) {
    const headers = { Authorization: `Bearer ${info.token}` };
    const body = movedTo ? JSON.stringify({ moved_to: movedTo }) : undefined;
    if (body) headers["Content-Type"] = "application/json";
    return fetch(url || apiUrl(`/v1/sessions/${info.session_id}`), { method: "DELETE", headers, body, keepalive: true })
      .catch(() => {});
  }

  // A lost websocket, tried again each look of _checkMedia for 30 s, then given up as a failed reconnect.
  _reopenSocket() {
    if (Date.now() - this._wsLostAt > 30000) {
      this._wsLostAt = null;
      this._unsent = [];
      this.onState({ type: "reconnect_failed", reason: "websocket lost and not opened again within 30 s" });
      return;
    }
    this._openSocket();
  }

  // Sent now on an open websocket; while a lost one is being opened again, sent once it is (at most 100 waiting;
  // none once the server has closed it).
  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
    } else if (this._watch && !this.closed && this.ws) { // lost (or closing: its close not seen yet)
      this._unsent = this._unsent || [];
      this._unsent.push(JSON.stringify(message));
      if (this._unsent.length > 100) this._unsent.shift();
    }
  }

  interrupt() {
    this._saying = [];
    this.send({ type: "interrupt" });
  }

  // Speak text with the server's text to speech, after any text said before; the answer comes as a `say` event
  // (or an `error` one) carrying the returned id.
  say(text, { voice = null, rate = null, pitch = null } = {}) {
    const id = `say-${++this._said}`;
    const message = { type: "say", id, text };
    if (voice) message.voice = voice;
    if (rate !== null) message.rate = rate;
    if (pitch !== null) message.pitch = pitch;
    this.send(message);
    const { type, ...options } = message;
    const words = text.split(/\s+/).join(" ").trim(); // (as the server cuts it into sentences)
    if (this._owner()) this._saying.push({ ...options, text: words, total: null, shown: [] });
    return id;
  }

  // Follow the say() texts being shown: the server's answer gives a text's sentences, each `caption` event starts the
  // next one (a text is over once the next text's first caption comes, or speech stops on its last sentence).
  _followSaying(ev) {
    if (ev.type === "interrupted") {
      this._saying = [];
    } else if ((ev.type === "say" || ev.type === "error") && ev.id) {
      const said = this._saying.find((s) => s.id === ev.id);
      if (said && ev.type === "say") said.total = ev.sentences;
      else if (said) this._saying.splice(this._saying.indexOf(said), 1); // refused: never said
    } else if (this._saying.length && this._saying[0].total !== null) {
      const [head, next] = this._saying;
      const over = head.shown.length === head.total;
      if (ev.type === "speech_stopped" && over) {
        this._saying.shift();
      } else if (ev.type === "caption" && !over && this._unsaid(head).startsWith(ev.text)) {
        head.shown.push(ev.text);
      } else if (ev.type === "caption" && over && next && next.text.startsWith(ev.text)) {
        this._saying.shift();
        next.shown.push(ev.text);
      }
    }
  }

  // What of a say() text is not yet shown, the last `keep` sentences shown put back.
  _unsaid(said, keep = 0) {
    let rest = said.text;
    for (const sentence of said.shown.slice(0, said.shown.length - keep)) rest = rest.slice(sentence.length).trim();
    return rest;
  }

  // A move: the new session says the say() texts the old one had not finished, from the sentence on screen (said
  // again from its start), with their options.
  _sayAgain(saying) {
    for (const said of saying) {
      const { id, text, total, shown, ...options } = said;
      const rest = this._unsaid(said, 1);
      if (rest) this.say(rest, options);
    }
  }

  endSpeech() {
    this.send({ type: "end_of_speech" });
  }

  // Stream this session live to a streaming server the letstalk server allows (`letstalk serve --broadcast-to
  // PREFIX`): an RTMP URL with its stream key (YouTube Live, Twitch, OBS), srt://, udp:// or tcp://. Each call adds
  // a destination (up to 4). -> its state ({id, state, url with the key hidden, seconds}); broadcast_reconnecting,
  // broadcast_resumed, broadcast_skipped and broadcast_stopped events follow it, their broadcast_id its id. An Error
  // saying why when the server refuses (403: not allowed there; 409: already streaming there, or to 4; 502: not
  // reachable).
  async broadcast(url, { bitrateKbps = null, reconnectS = null } = {}) {
    const body = { url };
    if (bitrateKbps) body.bitrate_kbps = bitrateKbps;
    if (reconnectS !== null) body.reconnect_s = reconnectS;
    const resp = await fetch(apiUrl(`/v1/sessions/${this.info.session_id}/broadcast`), {
      method: "POST",
      body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${this.info.token}` },
    });
    if (!resp.ok) throw new Error(`cannot go live (${resp.status}): ${await errorText(resp)}`);
    return (await resp.json()).broadcast;
  }

  // End the live stream `id` (broadcast()'s), or every one (their broadcast_stopped events follow); nothing to end
  // is not an error.
  async stopBroadcast(id = null) {
    const which = id ? `/${encodeURIComponent(id)}` : "";
    const resp = await fetch(apiUrl(`/v1/sessions/${this.info.session_id}/broadcast${which}`), {
      method: "DELETE", headers: { Authorization: `Bearer ${this.info.token}` },
    });
    if (!resp.ok && resp.status !== 404) {
      throw new Error(`ending the live stream (${resp.status}): ${await errorText(resp)}`);
    }
  }

  // What arrived, per kind, and the route ICE chose: route.local / route.remote are "host", "srflx" (through a
  // NAT, found by STUN) or "relay" (through the TURN server).
  async stats() {
    const out = { video: {}, audio: {}, route: {} };
    if (!this.pc) return out;
    const report = await this.pc.getStats();
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && (s.kind === "video" || s.kind === "audio")) {
        out[s.kind] = {
          bytesReceived: s.bytesReceived, packetsReceived: s.packetsReceived,
          framesDecoded: s.framesDecoded, frameWidth: s.frameWidth, frameHeight: s.frameHeight,
          framesPerSecond: s.framesPerSecond, totalSamplesReceived: s.totalSamplesReceived,
          totalAudioEnergy: s.totalAudioEnergy, // grows with the loudness of the sound heard: ~0 in silence
        };
      } else if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = report.get(s.selectedCandidatePairId);
        out.route = {
          local: report.get(pair.localCandidateId)?.candidateType,
          remote: report.get(pair.remoteCandidateId)?.candidateType,
        };
      }
    });
    return out;
  }

  // Leave the session without ending it: for a page attached to a session another client owns.
  hangUp() {
    this.closed = true;
    clearTimeout(this._tokenTimer);
    this._hangUp();
  }

  _hangUp() {
    clearInterval(this._keepAlive);
    clearInterval(this._watch);
    if (this.ws) this.ws.close();
    if (this.pc) this.pc.close();
  }

  async close() {
    if (this.closed) return;
    this.closed = true;
    this._hangUp();
    clearTimeout(this._tokenTimer);
    const url = this._options?.viewer ? this.viewerUrl : apiUrl(`/v1/sessions/${this.info.session_id}`);
    if (!url) return;
    try {
      await fetch(url, { method: "DELETE", headers: { Authorization: `Bearer ${this.info.token}` }, keepalive: true });
    } catch {}
  }
}

// Count presented frames of a <video> (requestVideoFrameCallback where available).
export function countFrames(video) {
  const counter = { frames: 0 };
  if ("requestVideoFrameCallback" in HTMLVideoElement.prototype) {
    const tick = () => {
      counter.frames += 1;
      video.requestVideoFrameCallback(tick);
    };
    video.requestVideoFrameCallback(tick);
  }
  return counter;
}

// Attach an existing session (id + token) instead of creating one: used by the overlay.
// A session's newest token, kept in this origin's localStorage by the connection that renewed it (storeToken): a page
// reloaded from a URL whose token has expired since (an OBS browser source reloads its overlay on a scene change,
// hours into a stream) goes on with the kept one where it expires later than the URL's (sessionFromToken: both
// expiries are on the server's clock, the browser's is not asked). Expired ones are cleared, on the server's time.
// Without storage (a sandboxed frame), or with storage holding what is not ours, nothing is kept.
function storeToken(id, { token, expires_at: expiresAt }) {
  const now = (Date.now() + clockOffsetMs) / 1000; // (a renewal's answer just gave the offset)
  try {
    for (const key of Object.keys(localStorage)) {
      if (key.startsWith("letstalk-token-") && !(JSON.parse(localStorage.getItem(key)).expires_at > now)) {
        localStorage.removeItem(key);
      }
    }
    localStorage.setItem(`letstalk-token-${id}`, JSON.stringify({ token, expires_at: expiresAt }));
  } catch {}
}

export function keptToken(id) {
  try {
    const kept = JSON.parse(localStorage.getItem(`letstalk-token-${id}`));
    return kept && typeof kept.token === "string" && typeof kept.expires_at === "number" ? kept : null;
  } catch {
    return null;
  }
}

export function sessionFromToken(id, token) {
  let expiresAt = null; // the token's own expiry (a JWT's "exp"): the connection renews it before then
  try {
    expiresAt = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp ?? null;
  } catch {}
  const kept = keptToken(id);
  if (kept && expiresAt !== null && kept.expires_at > expiresAt) ({ token, expires_at: expiresAt } = kept);
  return {
    session_id: id,
    token,
    expires_at: expiresAt,
    offer_url: `/v1/sessions/${id}/offer`,
    ws_url: `/v1/sessions/${id}/ws`,
  };
}
