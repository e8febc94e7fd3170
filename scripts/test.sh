#!/usr/bin/env bash
# Run the test suite: the one test command of this repository (README, CI).
#
#   bash scripts/test.sh [pytest args...]
#
# Sets up .venv first (scripts/setup.sh, fast when nothing changed), then runs
# `.venv/bin/python -m pytest` with the options of [tool.pytest.ini_options]
# in pyproject.toml plus any arguments given here, e.g.
#   bash scripts/test.sh -m "not integration"     # skip real transports, anvil, Chromium
#   bash scripts/test.sh tests/unit -x
#
# Exit status: pytest's. "No tests collected" (pytest exit 5) is a failure here
# too: a run that checks nothing must not pass.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh

args=""
if (($#)); then args="$(printf ' %q' "$@")"; fi
printf '==> Running: .venv/bin/python -m pytest%s\n' "$args"
rc=0
.venv/bin/python -m pytest "$@" || rc=$?

if [[ $rc == 5 ]]; then
    printf 'test.sh: FAILED: pytest collected no tests (exit 5); a run that checks nothing fails\n' >&2
elif [[ $rc != 0 ]]; then
    printf 'test.sh: FAILED: pytest exited with %s\n' "$rc" >&2
fi
exit "$rc"
