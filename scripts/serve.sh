#!/usr/bin/env bash
# The main-job command: sets up .venv (see scripts/_setup.sh) and runs `elasticmoe serve` with
# this script's arguments. With none it serves the embedded tiny default model (generated into
# ~/.cache/elasticmoe on first use) on http://127.0.0.1:8000/v1, autoscaled: it starts with one
# device and the SLO autoscaler adds devices (up to 4) when p90 latency breaks the SLO and
# removes them when the load drops, logging each decision with its reason.
#
# Unless the arguments hold --devices or --autoscale, `--devices N --autoscale` goes first
# (N: the value of --min-devices if given, else 1); other arguments are passed on as given.
#
#   bash scripts/serve.sh
#   bash scripts/serve.sh --port 8765 --max-devices 2 --slo-ttft-p90-ms 500
#   bash scripts/serve.sh --devices 2                  # two devices, no autoscaling
set -euo pipefail
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

start_devices=1
scaling_given=0
for ((i = 1; i <= $#; i++)); do
    case "${!i}" in
        --devices | --devices=* | --autoscale) scaling_given=1 ;;
        --min-devices=*) start_devices="${!i#*=}" ;;
        --min-devices) j=$((i + 1)) && start_devices="${!j:-1}" ;;
    esac
done
if [ "$scaling_given" = 0 ]; then
    set -- --devices "$start_devices" --autoscale "$@"
fi

emoe_setup_venv
emoe_say "starting: elasticmoe serve $*"
exec "$EMOE_VENV/bin/elasticmoe" serve "$@"
