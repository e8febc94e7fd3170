#!/usr/bin/env bash
# libp2p==0.8.1 builds fastecdsa from source: it needs a compiler and GMP headers.
set -euo pipefail
need=()
dpkg -s libgmp-dev >/dev/null 2>&1 || need+=(libgmp-dev)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
