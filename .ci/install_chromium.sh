#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver for the browser test of `p2pz app`
# (tests/test_app_browser.py, slow tier). Idempotent; .ci/run tolerates a failure (the test then skips
# with the reason). The test runs chromium headless with its network features off.
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "chromium already installed: $(chromium --version 2>/dev/null || echo '?')"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium.sh must run as root (apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver
echo "installed: $(chromium --version 2>/dev/null)"
