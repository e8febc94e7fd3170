#!/usr/bin/env bash
# Transports: Mosquitto, the MQTT broker the MQTT transport is tested against
# (tests start private instances on free loopback ports), and iproute2, whose
# `ip netns` the network-namespace test uses (it skips without it).
set -euo pipefail
need=()
if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
    need+=(mosquitto)
fi
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
    apt-get update -qq
    # The packaged service may start on :1883; harmless, tests use their own ports.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
