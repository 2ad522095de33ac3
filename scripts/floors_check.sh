#!/usr/bin/env bash
# The test suite on the lowest release pyproject.toml allows of every dependency of the plain install, of [engine]
# and of [diffusers], all at once, in a venv of their own (README.md, "Dependencies, and why"):
#   bash scripts/floors_check.sh [pytest args]      e.g. -x tests/test_server.py
# PYTHON (default python3): the Python to make the venv with; VENV (default /tmp/letstalk-floors): where.
# torch at its floor comes from PyPI: on Linux x86_64 that is a CUDA build (~3 GB), which runs on the CPU too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/letstalk-floors}
pins=$("$PY" - <<'PYEOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
pins = []
for req in project["dependencies"] + extras["engine"] + extras["diffusers"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req)
    if m:
        pins.append(f"{m[1]}=={m[2]}")
    elif not req.startswith("letstalk-rt"):
        raise SystemExit(f"floors_check: no floor to pin in {req!r}")
print(" ".join(pins))
PYEOF
)
echo "floors_check: $pins"
"$PY" -m venv "$VENV"
# the floors together, with the test tools at their newest (pip settles what they need beside them, e.g.
# huggingface-hub < 1 for transformers 4.40), then this checkout without dependencies
"$VENV/bin/pip" install -q pytest playwright sounddevice pyvirtualcam $pins
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" check
"$VENV/bin/pip" list 2>/dev/null | grep -iE "^(numpy|av|pillow|aiortc|aiohttp|torch|einops|safetensors|transformers|scikit-image|tqdm|diffusers) "
PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
