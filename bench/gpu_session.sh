#!/usr/bin/env bash
# One command for a lent GPU: everything we need measured on it, most important first, in at most 8 minutes.
#   bash bench/gpu_session.sh                # writes gpu_session.{json,md,log} to $OUT (else output/gpu_session)
#   bash bench/gpu_session.sh --device cpu   # smoke mode: the same code on toy models (tests/bench runs it)
# Options go to python -m bench.gpu_session (--help). MAX_WALL_S (default 480) bounds the whole run: the session
# plans its parts to end 10 s before it, and timeout interrupts it 5 s before it (what finished is on disk then).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MAX_WALL_S=${MAX_WALL_S:-480}
# fvcore is optional here (bench/gmac_gpu.json holds the counts); wheels carried in .whl/ are installed when it is
# missing (BENCHMARKS.md says how to make them).
if ! "$PY" -c "import fvcore" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout -s INT -k 5 "$((MAX_WALL_S - 5))" "$PY" -m bench.gpu_session --started-at "$START" \
    --max-wall-s "$MAX_WALL_S" "$@"
