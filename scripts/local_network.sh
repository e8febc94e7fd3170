#!/usr/bin/env bash
# Set up .venv (idempotent) and start/stop/inspect a local network of fi-peer daemons,
# one process per peer. Arguments go to scripts/local_network.py, e.g.
#   bash scripts/local_network.sh start --peers 5 --transport libp2p --dir ./localnet
#   bash scripts/local_network.sh status --dir ./localnet
#   bash scripts/local_network.sh stop --dir ./localnet
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
exec .venv/bin/python scripts/local_network.py "$@"
