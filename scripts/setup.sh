#!/usr/bin/env bash
# Set up letstalk-rt in the current Python environment (a venv is recommended).
#
#   bash scripts/setup.sh          runtime: torch (kept if present), then the package with its engine ([engine]:
#                                  the model, the server, training), and through apt (when we are root or have
#                                  sudo) espeak-ng, the voice of `say` / --text
#   bash scripts/setup.sh --sdk    the SDK alone, no torch: the Python client of a server and `letstalk camera
#                                  --server` with its devices ([devices]; through apt libportaudio2, PortAudio)
#   bash scripts/setup.sh --dev    also the test dependencies: pytest, playwright (python only; it drives
#                                  Debian's chromium) and, through apt when we are root or have sudo,
#                                  chromium, firefox-esr, and webkit2gtk-driver with xvfb (browser tests: WebKit
#                                  is Safari's engine), espeak-ng (synthetic corpus tests), g++
#                                  (torch.compile: --compile and its test), coturn (a TURN server: the
#                                  tests of connecting through a relay) and libportaudio2 (PortAudio: the
#                                  microphone and speaker tests of `letstalk camera`)
#
# torch: an existing install is kept (so a CUDA build stays). Otherwise, with an NVIDIA driver present
# pip's default (CUDA) build is installed; on a CPU-only machine the pinned CPU build is installed
# (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch==2.5.1+cpu"), so no gigabytes of CUDA wheels are pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-}
case "$mode" in
  "") extras="[engine]" ;;
  --dev) extras="[engine,dev]" ;;
  --sdk) extras="[devices]" ;;
  *) echo "setup: unknown option $mode (give none, --dev or --sdk)" >&2; exit 2 ;;
esac
if ! command -v "$PY" >/dev/null; then
  echo "setup: no $PY here; name the Python (>= 3.11) to install into: PYTHON=python3.11 bash scripts/setup.sh $mode" >&2
  exit 2
elif ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: letstalk-rt needs Python >= 3.11 (PyAV 18 and aiortc 1.16 do); $PY is $("$PY" -V 2>&1)." \
       "Name a newer one: PYTHON=python3.11 bash scripts/setup.sh $mode" >&2
  exit 2
fi

if [ "$mode" = --sdk ]; then
  :  # no torch: the model runs on the server
elif "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install "${TORCH_SPEC:-torch}"
else
  "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -e ".${extras}"

# System packages through apt, when we are root or have sudo: espeak-ng always (the voice of `say` / --text; a few
# MB), and for --dev what the tests drive. Without apt they are reported, not fatal: text to speech then says how to
# get espeak-ng, and the tests that need the others are skipped.
apt_pkgs=""
if [ "$mode" = --sdk ]; then
  ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || apt_pkgs="$apt_pkgs libportaudio2"
else
  command -v espeak-ng >/dev/null 2>&1 || apt_pkgs="$apt_pkgs espeak-ng"
fi
if [ "$mode" = --dev ]; then
  [ -x /usr/bin/chromium ] || apt_pkgs="$apt_pkgs chromium"
  command -v firefox-esr >/dev/null 2>&1 || command -v firefox >/dev/null 2>&1 || apt_pkgs="$apt_pkgs firefox-esr"
  command -v WebKitWebDriver >/dev/null 2>&1 || apt_pkgs="$apt_pkgs webkit2gtk-driver"  # WebKit (Safari's engine)
  command -v xvfb-run >/dev/null 2>&1 || apt_pkgs="$apt_pkgs xvfb"  # ... needs a display
  command -v g++ >/dev/null 2>&1 || apt_pkgs="$apt_pkgs g++"
  command -v turnserver >/dev/null 2>&1 || apt_pkgs="$apt_pkgs coturn"
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_pkgs="$apt_pkgs nginx"
  command -v caddy >/dev/null 2>&1 || apt_pkgs="$apt_pkgs caddy"
  ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || apt_pkgs="$apt_pkgs libportaudio2"
fi
if [ -n "$apt_pkgs" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "setup: apt-get install$apt_pkgs"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $apt_pkgs >/dev/null; }; then
      [ "$mode" = --dev ] && exit 1  # the tests would fail on what is missing: say so here
      echo "setup: could not install$apt_pkgs (espeak-ng: text to speech, say / --text; libportaudio2: the audio" \
           "devices of letstalk camera)"
    fi
  else
    echo "setup: could not install$apt_pkgs (needs apt-get as root); text to speech needs espeak-ng, the audio" \
         "devices libportaudio2, and the tests that need the others will be skipped"
  fi
fi
echo "setup: done ($("$PY" -c 'import letstalk_rt; print("letstalk-rt", letstalk_rt.__version__)'))"
