#!/usr/bin/env bash
# Set everything up (idempotent) and run the FI demo. Extra arguments go to `fi-peer demo`,
# e.g.  bash scripts/demo.sh --alpha 0.5 --queries 100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fi-peer demo "$@"
