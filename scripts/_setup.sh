# shellcheck shell=bash
# Shared setup for scripts/test.sh and scripts/serve.sh; source it, do not run it.
#
# emoe_setup_venv: creates (or reuses) the virtualenv and installs this repository into it,
# editable, with the test and ray extras. The install is skipped when the venv already holds an
# editable install of *this* checkout and pyproject.toml has not changed since (a stamp file in
# the venv records its hash), so a second run starts in about a second.
#
# emoe_require_debian_packages PKG:CMD[|CMD]...: installs missing Debian packages (a package is
# missing when none of its commands is on PATH) with apt-get when run as root; otherwise says
# what to install and exits non-zero. Never skips silently.
#
# Knobs (environment):
#   ELASTICMOE_VENV   the virtualenv (default: .venv in the repository root)
#   PYTHON            the interpreter that creates it (default: python3, 3.10 or newer)
#   TORCH_INDEX_URL   if set, torch is installed from this index first, e.g.
#                     https://download.pytorch.org/whl/cpu for the CPU-only build
#                     (plain PyPI gives the multi-GB CUDA build on Linux)

set -euo pipefail

EMOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMOE_VENV="${ELASTICMOE_VENV:-$EMOE_ROOT/.venv}"
EMOE_PYTHON="${PYTHON:-python3}"

emoe_say() { printf '[elasticmoe] %s\n' "$*" >&2; }
emoe_die() { printf '[elasticmoe] error: %s\n' "$*" >&2; exit 1; }

# True when one of the '|'-separated commands is on PATH.
_emoe_has_any_command() {
    local cmd
    local -a cmds
    IFS='|' read -r -a cmds <<<"$1"
    for cmd in "${cmds[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 && return 0
    done
    return 1
}

emoe_require_debian_packages() {
    # Each argument is "package:command[|command...]": the package counts as missing when none
    # of its commands is on PATH (Debian names the Alertmanager binary prometheus-alertmanager,
    # upstream calls it alertmanager).
    local spec pkg
    local -a missing=() wanted=()
    for spec in "$@"; do
        pkg="${spec%%:*}"
        [[ " ${wanted[*]} " == *" $pkg "* ]] || wanted+=("$pkg")
        if ! _emoe_has_any_command "${spec#*:}" && [[ " ${missing[*]} " != *" $pkg "* ]]; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        emoe_say "system packages present: ${wanted[*]}"
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        emoe_die "missing system packages: ${missing[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}), or run this script as root on Debian/Ubuntu, then rerun."
    fi
    emoe_say "installing system packages with apt-get: ${missing[*]}"
    # The lock timeout makes a concurrent apt run (unattended upgrades) delay us, not fail us.
    apt-get -o DPkg::Lock::Timeout=300 update -qq \
        || emoe_die "apt-get update failed; install ${missing[*]} by hand and rerun"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null \
        || emoe_die "apt-get install ${missing[*]} failed; see the messages above"
    for spec in "$@"; do
        _emoe_has_any_command "${spec#*:}" \
            || emoe_die "apt-get installed ${spec%%:*} but none of its commands (${spec#*:}) is on PATH"
    done
}

# True when the venv imports both packages from this checkout (an editable install of it).
_emoe_venv_is_current() {
    local stamp="$EMOE_VENV/.elasticmoe-install-stamp"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(_emoe_pyproject_hash)" ] || return 1
    "$EMOE_VENV/bin/python" - "$EMOE_ROOT" "$EMOE_VENV" <<'PY' >/dev/null 2>&1
import pathlib, sys
import elasticmoe_operator, elasticmoe_worker
root, venv = (pathlib.Path(a).resolve() for a in sys.argv[1:3])
files = [pathlib.Path(m.__file__).resolve() for m in (elasticmoe_worker, elasticmoe_operator)]
sys.exit(0 if all(f.is_relative_to(root) and not f.is_relative_to(venv) for f in files) else 1)
PY
}

_emoe_pyproject_hash() { cat "$EMOE_ROOT/pyproject.toml" "$EMOE_ROOT/scripts/_setup.sh" | sha256sum | cut -d' ' -f1; }

emoe_setup_venv() {
    cd "$EMOE_ROOT"
    # Two scripts started at once on a fresh machine must not install into one venv together.
    local lock
    lock="${TMPDIR:-/tmp}/elasticmoe-setup-$(printf '%s' "$EMOE_VENV" | sha256sum | cut -c1-16).lock"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$lock"
        flock 9
    fi
    local hint="no up-to-date install of this checkout in the venv"
    if [ -x "$EMOE_VENV/bin/python" ]; then
        emoe_say "reusing virtualenv $EMOE_VENV"
    else
        hint="a fresh venv takes a few minutes"
        command -v "$EMOE_PYTHON" >/dev/null 2>&1 || emoe_die "$EMOE_PYTHON not found: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
        "$EMOE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || emoe_die "$EMOE_PYTHON is Python $("$EMOE_PYTHON" -c 'import platform; print(platform.python_version())'); 3.10 or newer is needed (set PYTHON=...)"
        emoe_say "creating virtualenv $EMOE_VENV ($("$EMOE_PYTHON" --version 2>&1))"
        local existed=0
        [ -e "$EMOE_VENV" ] && existed=1
        if ! "$EMOE_PYTHON" -m venv "$EMOE_VENV"; then
            # A half-made venv (python without pip) would be "reused" by the next run.
            [ "$existed" = 1 ] || rm -rf "$EMOE_VENV"
            emoe_die "'$EMOE_PYTHON -m venv' failed; on Debian/Ubuntu install python3-venv"
        fi
    fi
    if _emoe_venv_is_current; then
        emoe_say "dependencies up to date (pyproject.toml unchanged since the last install)"
    else
        local pip=("$EMOE_VENV/bin/python" -m pip install --progress-bar off)
        if [ -n "${TORCH_INDEX_URL:-}" ]; then
            local torch_req
            torch_req="$(grep -o '"torch==[^"]*"' "$EMOE_ROOT/pyproject.toml" | tr -d '"')"
            emoe_say "installing $torch_req from $TORCH_INDEX_URL"
            "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$torch_req"
        fi
        # The ray extra too: the Ray fleet's tests start a real Ray cluster.
        emoe_say "installing elasticmoe editable with test and ray extras (pip install -e '.[test,ray]'; $hint)"
        local start=$SECONDS
        "${pip[@]}" -e "${EMOE_ROOT}[test,ray]"
        # The Helm library for the chart tests; it declares Python >= 3.12 and works on 3.10+.
        "${pip[@]}" --ignore-requires-python "helm-sdkpy>=0.1.32"
        _emoe_pyproject_hash >"$EMOE_VENV/.elasticmoe-install-stamp"
        emoe_say "installed in $((SECONDS - start)) s"
    fi
    if command -v flock >/dev/null 2>&1; then
        exec 9>&-
    fi
}
