#!/usr/bin/env bash
# Set everything up (idempotent) and run the networked FI demo: anvil, the contracts,
# N `fi-peer run` daemons over libp2p paying each other, the explorer, queries, settlement.
# Extra arguments go to `fi-peer demo --network`, e.g.
#   bash scripts/demo-network.sh --peers 6 --queries 60 --keep-running
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fi-peer demo --network "$@"
