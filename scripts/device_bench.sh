#!/usr/bin/env bash
# The GPU figures issue 4 asks for, in one command that fits one call on a lent GPU machine (~6 minutes).
#
#   bash scripts/device_bench.sh OUT_DIR          # from the repository root, on a machine with CUDA
#
# Measures, with random weights (speed only), bf16, after the CUDA-graph test (graphed and eager pipelines
# agree) and scripts/gpu_parts.py (sampling and decoding per batch; the decoder eager, autotuned, graphed,
# and with COMPILE=1 compiled):
#   1. letstalk-b, windows of 2 frames (the only window whose latency floor is under 250 ms, see
#      docs/benchmarks.md "What latency the GPU target allows"): 1, 8, 12 and 16 sessions
#   2. letstalk-b, windows of 4 frames: 8 and 16 sessions (capacity at less compute per frame)
#   3. one window's cost broken down, its transformer arithmetic against the GPU's bf16 matrix-product
#      rate measured on the spot (fraction of peak), CUDA peak memory
#   4. a 120 s soak of one session (A/V offset at the tracks)
#   5. windows of 2 frames with a decoder of half the width (`--decoder-channels`): 8 and 16 sessions
#      (HALF_SESSIONS; empty skips it)
#   6. optional (their session counts unset skip them): STEPS1_SESSIONS (one sampling step), HALF_STEPS1_SESSIONS
#      (half-width decoder, one step), QUARTER_SESSIONS (a decoder of a quarter of the width)
# Shorter or other runs: BENCH_SECONDS, REPEAT (runs per session count, not the soak), W2_SESSIONS, W4_SESSIONS,
# HALF_SESSIONS, SOAK (environment; set empty, a group is skipped), SAFETY_MS (the engine's --safety-ms for every
# run), PARTS=0 skips step 3's gpu_parts.py, GRAPH_TEST=0 the CUDA-graph test. Each writes
# OUT_DIR/NAME.json; every log goes to OUT_DIR/log.txt (a device call returns at most 8 files). Needs a
# CUDA torch and transformers where it runs; PyAV and aiortc with its needs (the tracks the bench reads
# are aiortc tracks; none of them is in the lent machines' image) are installed from wheels in .whl/ if
# there are any:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl av==18.1.0 aiortc==1.16.0 aioice==0.13.0 cffi==2.0.0 cryptography==50.0.2 dnspython==2.9.2 \
#       google-crc32c==1.9.0 ifaddr==0.2.0 pycparser==3.0 pyee==13.0.1 pylibsrtp==1.0.0 pyOpenSSL==26.4.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-device_out}}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python3 -c "import av, aiortc, letstalk_rt.stream.tracks" || exit 1
W2V=/tmp/w2v-base  # a wav2vec2-base-sized checkpoint, random weights: the cost is the same as the real one's
python3 -c "from transformers import Wav2Vec2Config, Wav2Vec2Model; Wav2Vec2Model(Wav2Vec2Config()).save_pretrained('$W2V')" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT_DIR/gpu.txt"

bench() {  # NAME ARGS...
    local name=$1; shift
    echo "== $name: letstalk bench $* ($(date +%T))"
    local extra=(); [ "$name" != b_soak ] && [ -n "${REPEAT-}" ] && extra=(--repeat "$REPEAT")
    [ -n "${SAFETY_MS-}" ] && extra+=(--safety-ms "$SAFETY_MS")
    timeout 240 python3 -c "from letstalk_rt.cli import main; raise SystemExit(main())" bench --device cuda --dtype bf16 \
        --json "$OUT_DIR/$name.json" "${extra[@]}" "$@" 2>&1 | tee -a "$OUT_DIR/log.txt" | grep -E '^\{|one window|arithmetic|rror'
}
if [ "${GRAPH_TEST:-1}" != 0 ]; then
    echo "== the CUDA-graph test ($(date +%T))"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_pipeline.py -k cuda_graph 2>&1 | tail -15 | tee -a "$OUT_DIR/log.txt"
fi
if [ "${PARTS:-1}" != 0 ]; then
    echo "== where a batch window's GPU time goes; the decoder's levers ($(date +%T))"
    timeout 240 python3 scripts/gpu_parts.py --preset letstalk-b --wav2vec2 "$W2V" --batches 1,8,16 ${COMPILE:+--compile} \
        --json "$OUT_DIR/parts.json" 2>&1 | tee -a "$OUT_DIR/log.txt" | grep -E '^\{|rror'
fi
S=${BENCH_SECONDS:-15}  # seconds per session count
B=(--preset letstalk-b --wav2vec2 "$W2V")
HALF=(--decoder-channels 64,128,256,256,512,512)  # B's latents through a decoder of half the width
QUARTER=(--decoder-channels 32,64,128,128,256,256)
# each group runs when its session counts are not set empty
[ -n "${W2_SESSIONS-1,8,12,16}" ] && bench b_w2 "${B[@]}" --window 2 --sessions "${W2_SESSIONS-1,8,12,16}" --seconds "$S"
[ -n "${STEPS1_SESSIONS-}" ] && bench b_w2_s1 "${B[@]}" --steps 1 --window 2 --sessions "$STEPS1_SESSIONS" --seconds "$S"
[ -n "${W4_SESSIONS-8,16}" ] && bench b_w4 "${B[@]}" --window 4 --sessions "${W4_SESSIONS-8,16}" --seconds "$S"
[ -n "${HALF_SESSIONS-8,16}" ] && bench b_w2_half "${B[@]}" "${HALF[@]}" --window 2 --sessions "${HALF_SESSIONS-8,16}" \
    --seconds "$S"
[ -n "${HALF_STEPS1_SESSIONS-}" ] && bench b_w2_half_s1 "${B[@]}" "${HALF[@]}" --steps 1 --window 2 \
    --sessions "$HALF_STEPS1_SESSIONS" --seconds "$S"
[ -n "${QUARTER_SESSIONS-}" ] && bench b_w2_quarter "${B[@]}" "${QUARTER[@]}" --window 2 --sessions "$QUARTER_SESSIONS" \
    --seconds "$S"
[ -n "${SOAK-120}" ] && bench b_soak "${B[@]}" --window 2 --soak "${SOAK-120}"
echo "done ($(date +%T))"
