#!/usr/bin/env bash
# Explorer: Debian's Chromium and its WebDriver, for the browser test of the
# settlements explorer (tests/explorer/test_browser.py, Selenium, headless).
# chromium-driver comes from the same source package as chromium, so the two
# versions always match and nothing is downloaded at test time.
# Idempotent: installs only what is missing.
set -euo pipefail
need=()
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
# A font with Latin glyphs, so screenshots show text (fonts-liberation is small).
dpkg -s fonts-liberation >/dev/null 2>&1 || need+=(fonts-liberation)
if ((${#need[@]})); then
    echo "40-chromium.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
else
    echo "40-chromium.sh: chromium and chromedriver present"
fi
/usr/bin/chromium --version 2>/dev/null  # (Debian's launcher warns about /dev/shm on stderr)
