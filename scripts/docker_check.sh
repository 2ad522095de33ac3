#!/usr/bin/env bash
# Build the server's image (Dockerfile) and check a container of it as a deployment would use it:
#   1. without an API key it refuses to start, saying why;
#   2. it starts, turns healthy, runs as a user that is not root;
#   3. a session streams through it: client_examples/speak_file.py on this host (the SDK: HTTP, websocket, WebRTC to
#      the container's published port) speaks the bundled speech and records the reply; its frames are counted;
#   4. `docker stop` (SIGTERM through tini) stops it gently: exit status 0 and the server's own shutdown in its log.
#
#   bash scripts/docker_check.sh                      # the build fetches from Docker Hub and PyPI
#   BASE=IMAGE WHEELS=DIR bash scripts/docker_check.sh  # offline: a base image you have (python3 with venv), and a folder
#                                                     # of wheels served to the build over http (pip download -d DIR ...)
# Needs docker, and this checkout's SDK installed on the host (scripts/setup.sh --sdk is enough). IMAGE, PORT and OUT
# (where the reply and the logs go, default ./out/docker_check) can be set too.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-letstalk-rt:check}
PORT=${PORT:-18080}
OUT=${OUT:-out/docker_check}
NAME=letstalk-check-$$
mkdir -p "$OUT"

build=(docker build -t "$IMAGE")
[ -n "${BASE:-}" ] && build+=(--build-arg "BASE=$BASE")
http_pid=""
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null || true
}
trap cleanup EXIT
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
start=$(date +%s)
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8080" -e LETSTALK_API_KEY="$KEY" "$IMAGE" --max-sessions 2 \
  --drain-seconds 20 >/dev/null
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
  if [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ] || [ $(( $(date +%s) - start )) -gt 300 ]; then
    echo "docker_check: FAILED: not healthy"; docker logs "$NAME" 2>&1 | tail -20; exit 1
  fi
  sleep 2
done
echo "  healthy after $(( $(date +%s) - start )) s (the model's warm-up, then the first health check); user $(docker exec "$NAME" id -u)"
[ "$(docker exec "$NAME" id -u)" != 0 ] || { echo "docker_check: FAILED: runs as root"; exit 1; }

echo "docker_check: 3. a session through the container"
python3 client_examples/speak_file.py --audio letstalk_rt/assets/speech.ogg --server "http://127.0.0.1:$PORT" \
  --api-key "$KEY" --out "$OUT/reply.mp4" 2>&1 | tee "$OUT/session.log" | tail -3
python3 - "$OUT/reply.mp4" <<'EOF'
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

echo "docker_check: 4. docker stop"
start=$(date +%s)
docker stop -t 30 "$NAME" >/dev/null
status=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
docker logs "$NAME" >"$OUT/server.log" 2>&1
echo "  stopped in $(( $(date +%s) - start )) s, exit status $status; the log's last line: $(tail -1 "$OUT/server.log")"
[ "$status" = 0 ] || { echo "docker_check: FAILED: exit status $status ($OUT/server.log)"; exit 1; }
echo "docker_check: passed"
