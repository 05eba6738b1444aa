#!/usr/bin/env bash
# Installs Debian's Chromium and its WebDriver (chromium, chromium-driver) for the
# dashboard's browser tests (tests/tests/dashboard.rs), with apt when
# /usr/bin/chromedriver is missing (needs root). Idempotent: does nothing when both are
# there. Fails loudly when they cannot be installed: the browser tests never skip.
set -euo pipefail

if [ -x /usr/bin/chromedriver ] && { [ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ]; }; then
    exit 0
fi
echo "chromium / chromedriver not found: installing them with apt"
if [ "$(id -u)" -ne 0 ]; then
    echo "installing chromium needs root (apt-get install -y chromium chromium-driver)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium chromium-driver
if [ ! -x /usr/bin/chromedriver ]; then
    echo "chromium-driver installed no /usr/bin/chromedriver" >&2
    exit 1
fi
/usr/bin/chromedriver --version
