#!/usr/bin/env bash
# Installs Node-RED 4 (npm) into a cache folder, once, for the agent's
# Node-RED tests, CI and the demo. Idempotent: an existing 4.x install is
# kept. Prints what it does on stderr; the last line on stdout is the path of
# the `node-red` binary, for TETHER_NODE_RED.
#
#   bash tests/nodered/install.sh
#   TETHER_NODE_RED=$(bash tests/nodered/install.sh) cargo test -p tether-agent --test node_red
#
# Needs node (18 or later) and npm. The folder: ${TETHER_CACHE:-$HOME/.cache/tether}/node-red
# (${TETHER_CACHE:-/var/cache/tether}/node-red as root).
set -euo pipefail

# As root, a folder other users can read: Node-RED is then started as its
# own unprivileged user and must be able to run what is installed here.
if [ "$(id -u)" = 0 ]; then DEFAULT_CACHE=/var/cache/tether; else DEFAULT_CACHE=$HOME/.cache/tether; fi
CACHE=${TETHER_CACHE:-$DEFAULT_CACHE}/node-red
PACKAGE=node-red@4
BIN=$CACHE/node_modules/.bin/node-red
MANIFEST=$CACHE/node_modules/node-red/package.json

installed_version() {
    [ -f "$MANIFEST" ] && node -p "require(process.argv[1]).version" "$MANIFEST" 2>/dev/null || true
}

for tool in node npm; do
    command -v "$tool" >/dev/null || {
        echo "install.sh: '$tool' is not installed; install Node.js 18 or later (Debian: apt-get install nodejs npm)" >&2
        exit 1
    }
done

version=$(installed_version)
if [ -x "$BIN" ] && [[ "$version" == 4.* ]]; then
    echo "node-red $version already in $CACHE" >&2
else
    echo "installing $PACKAGE into $CACHE (npm; found: ${version:-nothing})" >&2
    mkdir -p "$CACHE"
    npm install --prefix "$CACHE" --no-audit --no-fund --silent "$PACKAGE" >&2
    version=$(installed_version)
    if [ ! -x "$BIN" ] || [[ "$version" != 4.* ]]; then
        echo "install.sh: npm did not leave Node-RED 4 in $CACHE (found: ${version:-nothing})" >&2
        exit 1
    fi
    echo "node-red $version installed in $CACHE" >&2
fi
echo "node: $(node --version)" >&2
echo "$BIN"
