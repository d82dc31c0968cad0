#!/usr/bin/env bash
# The main-job command: sets up .venv (see scripts/_setup.sh) and runs `elasticmoe serve` with
# this script's arguments. With none it serves the embedded tiny default model (generated into
# ~/.cache/elasticmoe on first use) on http://127.0.0.1:8000/v1.
#
#   bash scripts/serve.sh
#   bash scripts/serve.sh --port 8765 --model /path/to/checkpoint
set -euo pipefail
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

emoe_setup_venv
emoe_say "starting: elasticmoe serve $*"
exec "$EMOE_VENV/bin/elasticmoe" serve "$@"
