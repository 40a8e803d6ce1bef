#!/usr/bin/env bash
# Installs what the editor's browser test needs, once: Debian's chromium
# (apt) and playwright-core (npm) into a cache folder. Idempotent; prints
# what it does. The last line is the playwright-core package path, for
# PLAYWRIGHT_CORE.
#
#   bash tests/browser/install.sh
set -euo pipefail

# As root, a folder other users can read: Node-RED is then started as its
# own unprivileged user and must be able to run what is installed here.
if [ "$(id -u)" = 0 ]; then DEFAULT_CACHE=/var/cache/tether; else DEFAULT_CACHE=$HOME/.cache/tether; fi
CACHE=${TETHER_CACHE:-$DEFAULT_CACHE}/browser
# The version the script was written against; minor updates keep the API.
PLAYWRIGHT=playwright-core@1.65

if ! command -v chromium >/dev/null; then
    echo "installing chromium (apt-get install chromium)" >&2
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
    else
        sudo apt-get update -qq >&2
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
    fi
fi
echo "chromium: $(chromium --version 2>/dev/null)" >&2

if [ ! -f "$CACHE/node_modules/playwright-core/package.json" ]; then
    echo "installing $PLAYWRIGHT into $CACHE (npm)" >&2
    mkdir -p "$CACHE"
    npm install --prefix "$CACHE" --no-audit --no-fund --silent "$PLAYWRIGHT" >&2
fi
echo "playwright-core: $(node -p "require('$CACHE/node_modules/playwright-core/package.json').version")" >&2
echo "$CACHE/node_modules/playwright-core"
