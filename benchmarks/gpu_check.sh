#!/usr/bin/env bash
# The GPU check in one line on a GPU machine: benchmarks/gpu_check.py with the repo's virtualenv when there
# is one (else python3), output to $OUT (else /tmp/gpu_check). Arguments go to gpu_check.py, e.g.
#   OUT=/tmp/gc benchmarks/gpu_check.sh --sections memory throughput
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu_check}" "$@"
