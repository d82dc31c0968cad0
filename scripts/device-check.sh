#!/usr/bin/env bash
# The device check, in one command, on a machine with a GPU (or NPU):
#
#   bash scripts/device-check.sh                    # --backend cuda, tiny and small presets
#   bash scripts/device-check.sh --backend ascend   # any option of the module (see --help)
#
# Runs `python -m elasticmoe_worker.devicecheck` (worker/elasticmoe_worker/devicecheck.py) with
# the repository's .venv if there is one (scripts/_setup.sh makes it; the CUDA extra must be in
# it: pip install -e '.[cuda]' and a CUDA build of torch), else with $PYTHON or python3. Prints
# one PASS/FAIL/SKIP line per check; exits 1 if any check failed.
# It has run with --backend cpu only; never on a GPU or NPU so far.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
args=("$@")
if [[ " ${args[*]-} " != *" --backend "* && " ${args[*]-} " != *" --backend="* ]]; then
    args=(--backend cuda "${args[@]}")
fi
cd "$root"
exec "$python" -m elasticmoe_worker.devicecheck "${args[@]}"
