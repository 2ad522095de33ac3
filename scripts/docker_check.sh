#!/usr/bin/env bash
# Build the server's image (Dockerfile) and check a container of it as a deployment would use it:
#   1. without an API key it refuses to start, saying why;
#   2. it starts, turns healthy, runs as a user that is not root;
#   3. a session streams through it: client_examples/speak_file.py on this host (the SDK: HTTP, websocket, WebRTC to
#      the container's published port) speaks the bundled speech and records the reply; its frames are counted;
#   4. `docker stop` (SIGTERM through tini) stops it gently: exit status 0 and the server's own shutdown in its log;
#   5. with coturn's turnserver on this host: a container on Docker's bridge network with only its HTTP port published,
#      given the relay (--ice-server, LETSTALK_TURN_SECRET), streams a session to a client allowed only relayed
#      candidates (speak_file.py --relay); both sides' routes are printed and the relay's log must show the session.
#      STRICT_RELAY=1 (root: an iptables rule in the container's network namespace) keeps what the relay sends from
#      reaching the container's own addresses, as with a relay on another machine: the server must connect relay to
#      relay.
#
#   bash scripts/docker_check.sh                      # the build fetches from Docker Hub and PyPI
#   BASE=IMAGE WHEELS=DIR bash scripts/docker_check.sh  # offline: a base image you have (python3 with venv), and a folder
#                                                     # of wheels served to the build over http (pip download -d DIR ...)
# Needs docker, and this checkout's SDK installed on the host (scripts/setup.sh --sdk is enough). IMAGE, PORT, TURN_PORT
# and OUT (where the reply and the logs go, default ./out/docker_check) can be set too.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-letstalk-rt:check}
PORT=${PORT:-18080}
TURN_PORT=${TURN_PORT:-13478}
OUT=${OUT:-out/docker_check}
NAME=letstalk-check-$$
mkdir -p "$OUT"
rm -f "$OUT"/reply*.mp4 "$OUT"/session*.log  # nothing of an earlier run passes for this one's

build=(docker build -t "$IMAGE")
[ -n "${BASE:-}" ] && build+=(--build-arg "BASE=$BASE")
http_pid=""
turn_pid=""
cleanup() {
  docker rm -f "$NAME" "$NAME-relay" >/dev/null 2>&1 || true
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null || true
  [ -n "$turn_pid" ] && kill "$turn_pid" 2>/dev/null || true
}
trap cleanup EXIT

wait_healthy() {  # NAME: until Docker's health check passes (the model warmed up, the port open)
  local start
  start=$(date +%s)
  until [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = healthy ]; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$1")" != true ] || [ $(( $(date +%s) - start )) -gt 300 ]; then
      echo "docker_check: FAILED: not healthy"; docker logs "$1" 2>&1 | tail -20; exit 1
    fi
    sleep 2
  done
  echo "  healthy after $(( $(date +%s) - start )) s (the model's warm-up, then the first health check)"
}

check_reply() {  # MP4: its frames counted against the bundled speech's length
  python3 - "$1" <<'EOF'
import sys
import av
with av.open(sys.argv[1]) as f:
    speech = av.open("letstalk_rt/assets/speech.ogg")
    seconds = float(speech.duration / av.time_base)
    frames = sum(1 for _ in f.decode(video=0))
print(f"  reply: {frames} frames for {seconds:.2f} s of speech ({seconds * 25:.0f} frames)")
if frames < seconds * 25 * 0.95:
    sys.exit("docker_check: FAILED: fewer frames than the speech lasts")
EOF
}
if [ -n "${WHEELS:-}" ]; then
  python3 -m http.server 18765 --bind 127.0.0.1 --directory "$WHEELS" >"$OUT/wheels_http.log" 2>&1 &
  http_pid=$!
  build+=(--network host --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:18765/)
fi
start=$(date +%s)
"${build[@]}" . 2>&1 | tee "$OUT/build.log" | grep -E "^Step|^#[0-9]+ \[|Successfully|letstalk-rt " || true
[ "${PIPESTATUS[0]}" = 0 ] || { echo "docker_check: the build failed ($OUT/build.log)"; exit 1; }
echo "docker_check: built $IMAGE in $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

echo "docker_check: 1. no API key"
if docker run --rm "$IMAGE" >"$OUT/no_key.log" 2>&1; then
  echo "docker_check: FAILED: the server started on 0.0.0.0 without an API key"; exit 1
fi
grep -q "without authentication" "$OUT/no_key.log" || { echo "docker_check: FAILED: no reason given"; cat "$OUT/no_key.log"; exit 1; }
echo "  refused: $(grep -o 'refusing[^:]*' "$OUT/no_key.log" | head -1)"

echo "docker_check: 2. start"
KEY=check-$RANDOM$RANDOM
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8080" -e LETSTALK_API_KEY="$KEY" "$IMAGE" --max-sessions 2 \
  --drain-seconds 20 >/dev/null
wait_healthy "$NAME"
echo "  user $(docker exec "$NAME" id -u)"
docker logs "$NAME" 2>&1 | grep -q "bridge network's" \
  || { echo "docker_check: FAILED: on a bridge with no relay, the server did not warn that its media stays here"; exit 1; }
echo "  warned: $(docker logs "$NAME" 2>&1 | grep -o "warning: this container's addresses ([^)]*) are a bridge network's")"
[ "$(docker exec "$NAME" id -u)" != 0 ] || { echo "docker_check: FAILED: runs as root"; exit 1; }

echo "docker_check: 3. a session through the container"
python3 client_examples/speak_file.py --audio letstalk_rt/assets/speech.ogg --server "http://127.0.0.1:$PORT" \
  --api-key "$KEY" --out "$OUT/reply.mp4" 2>&1 | tee "$OUT/session.log" | tail -3
check_reply "$OUT/reply.mp4"

echo "docker_check: 4. docker stop"
start=$(date +%s)
docker stop -t 30 "$NAME" >/dev/null
status=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
docker logs "$NAME" >"$OUT/server.log" 2>&1
echo "  stopped in $(( $(date +%s) - start )) s, exit status $status; the log's last line: $(tail -1 "$OUT/server.log")"
[ "$status" = 0 ] || { echo "docker_check: FAILED: exit status $status ($OUT/server.log)"; exit 1; }

echo "docker_check: 5. through a TURN relay, the container on the bridge network with only its HTTP port published"
if ! command -v turnserver >/dev/null; then
  echo "  skipped: needs coturn's turnserver on this host (apt-get install coturn)"
else
  # The relay on this host's own address (not the bridge's gateway: traffic from one relayed port to another of that
  # address would pass Docker's MASQUERADE rule for the bridge's subnet and come back from another port); the
  # container reaches it through the bridge, and the client here directly.
  GW=$(docker network inspect bridge -f '{{(index .IPAM.Config 0).Gateway}}')
  RELAY_IP=${RELAY_IP:-$(hostname -I | tr ' ' '\n' | grep -v -x -e "$GW" -e '' | grep -v ':' | head -1)}
  SECRET=check-turn-$RANDOM$RANDOM
  rm -f "$OUT/turnserver.log"
  # coturn 4.6 starts its CLI and DTLS listeners unless told not to; 4.18 starts neither and refuses --no-cli
  OFF=$(turnserver --help 2>&1 | grep -o -E '^ *--no-(cli|dtls)\b' | tr -d ' ' | tr '\n' ' ' || true)
  turnserver -n -v --listening-ip "$RELAY_IP" --listening-port "$TURN_PORT" --relay-ip "$RELAY_IP" --use-auth-secret \
    --static-auth-secret "$SECRET" --realm letstalk --min-port 20000 --max-port 20999 --no-tls $OFF \
    --userdb "$OUT/turndb" --pidfile "$OUT/turnserver.pid" --log-file "$OUT/turnserver.log" --simple-log \
    >/dev/null 2>&1 &
  turn_pid=$!
  docker run -d --name "$NAME-relay" -p "127.0.0.1:$PORT:8080" -e LETSTALK_API_KEY="$KEY" \
    -e LETSTALK_TURN_SECRET="$SECRET" "$IMAGE" --max-sessions 2 --ice-server "turn:$RELAY_IP:$TURN_PORT" >/dev/null
  if [ -n "${STRICT_RELAY:-}" ]; then
    # as if the relay ran on another machine: what it relays never reaches the container's own addresses (dropped
    # on their way in, in the container's network namespace, gone with it), so the server must send and receive
    # through an allocation of its own. Needs root, nsenter and iptables here.
    nsenter -t "$(docker inspect -f '{{.State.Pid}}' "$NAME-relay")" -n \
      iptables -I INPUT -s "$RELAY_IP" -p udp --sport 20000:20999 -j DROP
  fi
  wait_healthy "$NAME-relay"
  python3 client_examples/speak_file.py --audio letstalk_rt/assets/speech.ogg --server "http://127.0.0.1:$PORT" \
    --api-key "$KEY" --relay --out "$OUT/reply_relay.mp4" 2>&1 | tee "$OUT/session_relay.log" \
    | grep -E "connected|server:|error" || true
  [ -f "$OUT/reply_relay.mp4" ] || { echo "docker_check: FAILED: no reply ($OUT/session_relay.log)"; exit 1; }
  check_reply "$OUT/reply_relay.mp4"
  grep -q "connected (relay to" "$OUT/session_relay.log" || { echo "docker_check: FAILED: not relayed"; exit 1; }
  if [ -n "${STRICT_RELAY:-}" ]; then
    grep -q "its side connected relay to relay" "$OUT/session_relay.log" \
      || { echo "docker_check: FAILED: the server's side did not go through its own relay allocation"; exit 1; }
  fi
  session=$(grep -o "^session [0-9a-zA-Z_-]*" "$OUT/session_relay.log" | head -1 | cut -d' ' -f2)
  lines=$(grep -c -- ":$session" "$OUT/turnserver.log" || true)
  echo "  the relay ($RELAY_IP) logged session $session on $lines lines"
  [ "$lines" -gt 0 ] || { echo "docker_check: FAILED: the relay never saw the session ($OUT/turnserver.log)"; exit 1; }
  docker stop -t 30 "$NAME-relay" >/dev/null
fi
echo "docker_check: passed"
