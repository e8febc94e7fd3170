#!/usr/bin/env bash
# The networked demo is now plain `fi-peer demo` (scripts/demo.sh); this name is kept for
# old instructions. Arguments go to `fi-peer demo`.
set -euo pipefail
exec bash "$(dirname "$0")/demo.sh" "$@"
