#!/usr/bin/env bash
# Create or update the project virtualenv in .venv (Python 3.11) and install
# fi-peer into it in editable mode, with the dev tools unless --no-dev.
#
# Idempotent: when pyproject.toml (and the options) are unchanged since the last
# successful install, and the editable install still points at this checkout,
# it only checks and returns. torch==2.13.0 (CPU) is found by pip through the
# machine's pip configuration (find-links /opt/wheels).
#
# Usage: bash scripts/setup.sh [--no-dev] [--force]
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

dev=1
force=0
for arg in "$@"; do
    case "$arg" in
        --no-dev) dev=0 ;;
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.fi-peer-setup-stamp"

is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

# 1. An interpreter: python3.11 if present, else python3; it must be 3.11.
if command -v python3.11 >/dev/null 2>&1 && is_py311 python3.11; then
    base_python="python3.11"
elif command -v python3 >/dev/null 2>&1 && is_py311 python3; then
    base_python="python3"
else
    found="$(python3 --version 2>&1 || echo 'no python3 on PATH')"
    die "fi-peer needs Python 3.11 (python3.11 or python3 on PATH); found: $found"
fi

# 2. The virtualenv: reuse it if its interpreter works and is 3.11, else (re)create.
if [[ -x "$venv/bin/python" ]] && is_py311 "$venv/bin/python"; then
    say "Using virtualenv $venv ($("$venv/bin/python" --version))"
else
    if [[ -e "$venv" ]]; then
        say "Removing unusable virtualenv $venv (missing interpreter or not Python 3.11)"
        rm -rf "$venv"
    fi
    say "Creating virtualenv $venv with $base_python ($("$base_python" --version))"
    "$base_python" -m venv "$venv" ||
        die "'$base_python -m venv' failed; on Debian/Ubuntu install the python3.11-venv package"
    rm -f "$stamp"
fi
py="$venv/bin/python"

# 3. Skip the install if nothing it depends on changed since the last success.
if [[ $dev == 1 ]]; then target=".[dev]"; else target="."; fi
want="$(
    "$py" - "$target" <<'PY'
import hashlib, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read())
h.update(("\0" + sys.argv[1] + "\0" + sys.version).encode())
print(h.hexdigest())
PY
)"
# The editable install must still resolve to this checkout (not a moved or
# deleted one). find_spec locates the package without importing it.
editable_ok() {
    "$py" - "$root" <<'PY' 2>/dev/null
import importlib.util, os, sys
for name in ("fi_peer", "network"):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(1)
    if not os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep):
        sys.exit(1)
PY
}
if [[ $force == 0 && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && editable_ok; then
    say "Dependencies up to date (pyproject.toml unchanged since last install); nothing to do"
    exit 0
fi

# 4. Install. PIP_* settings from the environment or pip.conf (find-links) apply.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -n "${CI:-}" ]]; then export PIP_PROGRESS_BAR=off; fi
rm -f "$stamp"
say "Upgrading pip"
"$py" -m pip install --quiet --upgrade pip
say "Installing fi-peer in editable mode: pip install -e '$target'"
"$py" -m pip install --quiet -e "$target"
editable_ok || die "the editable install of fi-peer does not resolve to $root"
printf '%s\n' "$want" >"$stamp"
say "Done: $("$py" -m pip --version | cut -d' ' -f1-2), $("$py" --version) in $venv"
