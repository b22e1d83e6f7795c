#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the browser test (tests/test_browser.py), if missing.
# Non-interactive; needs root (or sudo). Usage: bash scripts/install_chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "No apt-get here: install Chromium with your system's package manager." >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    # NONINTERACTIVE=1 (as the browser test sets it): never wait for a password prompt.
    SUDO="sudo${NONINTERACTIVE:+ -n}"
else
    echo "Need root or sudo to install chromium with apt-get." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# fonts-dejavu-core: so the screenshot has glyphs for the token text.
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
echo "installed: $(command -v chromium)"
