#!/usr/bin/env bash
# Make sure the headless browser that tests/test_browser.py drives is present: Debian's chromium and
# chromium-driver (never a browser downloaded by `playwright install`). Idempotent; called from `make test`.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: /usr/bin/chromium is absent and apt-get is unavailable; the browser tests will skip." >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: /usr/bin/chromium is absent and installing it needs root; the browser tests will skip." >&2
        exit 0
    fi
fi

echo "ensure_chromium: installing chromium and chromium-driver with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }; then
    echo "ensure_chromium: apt-get could not install chromium; the browser tests will skip." >&2
    exit 0
fi
test -x /usr/bin/chromium && /usr/bin/chromium --version || true
