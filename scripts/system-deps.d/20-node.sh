#!/usr/bin/env bash
# Node tooling for the contracts (package.json / package-lock.json):
#   solc-js  -> scripts/compile_contracts (and the artifact test that recompiles)
#   anvil    -> node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil (integration tests)
# Idempotent: `npm ci` runs only when node_modules does not match package-lock.json
# (a stamp with the lock file's hash) or a needed file is missing. Install scripts
# are skipped: anvil's postinstall would try to download a binary, and the binary
# comes from the npm package @foundry-rs/anvil-linux-amd64 anyway.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi

stamp="node_modules/.fi-peer-npm-stamp"
want="$(sha256sum package-lock.json | cut -d' ' -f1) $(node --version)"
anvil="node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f node_modules/solc/soljson.js && -x "$anvil" ]]; then
    echo "20-node.sh: node_modules up to date"
    exit 0
fi

echo "20-node.sh: npm ci (solc, anvil)"
npm ci --include=dev --ignore-scripts --no-audit --no-fund --prefer-offline --loglevel=error
if [[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" && ! -x "$anvil" ]]; then
    echo "20-node.sh: npm ci did not install $anvil" >&2
    exit 1
fi
printf '%s\n' "$want" >"$stamp"
"$anvil" --version | head -n1
