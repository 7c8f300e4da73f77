#!/usr/bin/env bash
# The GPU check in one line on a GPU machine: benchmarks/gpu_check.py with the repo's virtualenv when there
# is one (else python3), output to $OUT (else /tmp/gpu_check). Arguments go to gpu_check.py, e.g.
#   OUT=/tmp/gc benchmarks/gpu_check.sh --sections memory throughput
#
# A machine that cannot reach a package index (the device tool's H200 has torch, h5py, typer, rich,
# scikit-image, pytest, ... but not pydantic or mlxtend): put the missing wheels in .whl/ (ignored by git;
# see /work/.library/device/README.md for the pip download line, Python 3.12) and carry it; they are
# installed into /tmp/site first:
#   pydantic pydantic-core annotated-types typing-inspection mlxtend
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu_check}" "$@"
