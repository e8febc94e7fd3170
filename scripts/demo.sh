#!/usr/bin/env bash
# Set everything up (idempotent) and run the FI demo, `fi-peer demo`: anvil, the contracts,
# N `fi-peer run` daemons over libp2p registered on chain and paying per share, the explorer,
# queries from several peers, batched settlement, a summary. Extra arguments go to
# `fi-peer demo`, e.g.
#   bash scripts/demo.sh --peers 6 --queries 60 --keep-running
#   bash scripts/demo.sh --in-process --alpha 0.5 --json   # one process, no chain
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# anvil comes from node_modules (npm ci; installs Node first if missing); the in-process
# demo does not need it
anvil="node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
if [[ -z "${FI_PEER_ANVIL:-}" && ! -x "$anvil" && " $* " != *" --in-process "* ]]; then
    bash scripts/system-deps.d/20-node.sh
fi
exec .venv/bin/fi-peer demo "$@"
