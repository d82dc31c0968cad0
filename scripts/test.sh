#!/usr/bin/env bash
# The test command: sets up .venv (see scripts/_setup.sh), makes sure the real components the
# tests start are installed (promtool/Prometheus and Alertmanager from Debian), then runs
# pytest with this script's arguments, from the repository root.
#
#   bash scripts/test.sh                      # the default suite (not the `slow` tests)
#   bash scripts/test.sh -m slow              # the slow ones
#   bash scripts/test.sh -x tests/worker      # any pytest arguments
#
# Exits with pytest's status; "no tests collected" (5) is a failure too.
set -euo pipefail
# shellcheck source=scripts/_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"

emoe_require_debian_packages "prometheus:promtool" "prometheus:prometheus" \
    "prometheus-alertmanager:prometheus-alertmanager|alertmanager"
emoe_setup_venv

emoe_say "running: python -m pytest $*"
status=0
"$EMOE_VENV/bin/python" -m pytest "$@" || status=$?
case "$status" in
    0) emoe_say "tests passed" ;;
    5) emoe_say "pytest collected no tests (exit 5): counted as a failure" ;;
    *) emoe_say "tests failed (pytest exit $status)" ;;
esac
exit "$status"
