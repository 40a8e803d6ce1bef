#!/usr/bin/env bash
# The README's main command: a whole Tether fleet of one on this machine.
#
#   bash tests/demo.sh
#
# 1. starts the reference platform in a temporary folder (its own CA, server
#    certificate, admin token and store);
# 2. creates a one-time provisioning token, as a fleet manager would;
# 3. enrolls a device with it: tetherd makes its own key, the platform signs
#    its certificate;
# 4. runs tetherd, which keeps a mutual-TLS WebSocket tunnel to the platform,
#    with one allow-listed local service (a small HTTP server standing in for
#    the device's own service);
# 5. exposes that service on this machine with `tether-platform connect`, as
#    a field engineer would, and fetches a page through the tunnel.
#
# Then it waits: Ctrl-C stops everything and removes the folder. With
# DEMO_CHECK=1 it exits after step 5 instead (CI runs it that way).
# Ports: PLATFORM_PORT (default 8443) and ENGINEER_PORT (default 8080), both
# on 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PLATFORM_PORT=${PLATFORM_PORT:-8443}
ENGINEER_PORT=${ENGINEER_PORT:-8080}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tether-demo.XXXXXX")
PIDS=()

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
fail() {
    printf '\ndemo: %s\n' "$*" >&2
    for log in "$WORK"/*.log; do
        [ -s "$log" ] && { echo "--- $(basename "$log") (last lines)" >&2; tail -n 15 "$log" >&2; }
    done
    exit 1
}
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo; say "Stopping: agent, platform, proxy and service shut down; $WORK removed."; exit 0' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    fail "nothing came up on 127.0.0.1:$1"
}
port_free "$PLATFORM_PORT" || fail "127.0.0.1:$PLATFORM_PORT is in use; run with PLATFORM_PORT=another port"
port_free "$ENGINEER_PORT" || fail "127.0.0.1:$ENGINEER_PORT is in use; run with ENGINEER_PORT=another port"

say "Building tetherd, tether-platform and the demo service (release)..."
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" \
    -p tether-agent -p tether-platform -p tether-e2e --bins
BIN="$ROOT/target/release"
PLATFORM_DIR="$WORK/platform"
STATE_DIR="$WORK/device"

say "1. Starting the reference platform on https://localhost:$PLATFORM_PORT (data in $PLATFORM_DIR)"
"$BIN/tether-platform" serve --data-dir "$PLATFORM_DIR" --listen "127.0.0.1:$PLATFORM_PORT" \
    >"$WORK/platform.log" 2>&1 &
PIDS+=($!)
wait_port "$PLATFORM_PORT"

say "2. Creating a one-time provisioning token (valid 1 hour, 1 use)"
echo "   \$ tether-platform token create --data-dir $PLATFORM_DIR"
TOKEN=$("$BIN/tether-platform" token create --data-dir "$PLATFORM_DIR" 2>>"$WORK/platform-cli.log") ||
    fail "token create failed"
echo "   ${TOKEN:0:12}... (shown once; the platform keeps only its hash)"

say "3. Enrolling the device: its key is made here and never leaves it"
"$BIN/tether-demo-service" 127.0.0.1:0 >"$WORK/service.out" 2>"$WORK/service.log" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q listening "$WORK/service.out" 2>/dev/null && break; sleep 0.05; done
SERVICE_ADDR=$(sed -n 's/^listening on //p' "$WORK/service.out")
[ -n "$SERVICE_ADDR" ] || fail "the demo service did not start"
echo "   \$ tetherd enroll --platform https://localhost:$PLATFORM_PORT --token tpt_... --ca $PLATFORM_DIR/ca.crt --state-dir $STATE_DIR --name demo-gateway"
"$BIN/tetherd" enroll --platform "https://localhost:$PLATFORM_PORT" --token "$TOKEN" \
    --ca "$PLATFORM_DIR/ca.crt" --state-dir "$STATE_DIR" --name demo-gateway ||
    fail "enrollment failed"
echo "   The same token again is refused:"
if "$BIN/tetherd" enroll --platform "https://localhost:$PLATFORM_PORT" --token "$TOKEN" \
    --ca "$PLATFORM_DIR/ca.crt" --state-dir "$WORK/second-device" --name copycat 2>&1 | sed 's/^/   /'; then
    fail "a used token was accepted"
fi

say "4. Running tetherd with one allow-listed service: web -> $SERVICE_ADDR"
cat >"$WORK/tetherd.toml" <<EOF
state_dir = "$STATE_DIR"

[[service]]
name = "web"
target = "$SERVICE_ADDR"
EOF
"$BIN/tetherd" run --config "$WORK/tetherd.toml" >"$WORK/tetherd.log" 2>&1 &
PIDS+=($!)
STATUS=""
for _ in $(seq 1 100); do
    STATUS=$("$BIN/tetherd" status --state-dir "$STATE_DIR" 2>/dev/null || true)
    grep -qi "connected" <<<"$STATUS" && ! grep -qi "disconnected" <<<"$STATUS" && break
    sleep 0.1
done
echo "   \$ tetherd status --state-dir $STATE_DIR"
sed 's/^/   /' <<<"$STATUS"
DEVICE=$("$BIN/tetherd" status --state-dir "$STATE_DIR" --json | sed -n 's/.*"device_id": *"\([^"]*\)".*/\1/p' | head -n1)
[ -n "$DEVICE" ] || fail "tetherd status did not report a device id"
echo "   \$ tether-platform device list --data-dir $PLATFORM_DIR"
"$BIN/tether-platform" device list --data-dir "$PLATFORM_DIR" | sed 's/^/   /'

say "5. Exposing the device's 'web' service on 127.0.0.1:$ENGINEER_PORT for an engineer"
echo "   \$ tether-platform connect $DEVICE web --listen 127.0.0.1:$ENGINEER_PORT --data-dir $PLATFORM_DIR"
"$BIN/tether-platform" connect "$DEVICE" web --listen "127.0.0.1:$ENGINEER_PORT" \
    --data-dir "$PLATFORM_DIR" >"$WORK/connect.log" 2>&1 &
PIDS+=($!)
wait_port "$ENGINEER_PORT"
exec 3<>"/dev/tcp/127.0.0.1/$ENGINEER_PORT"
printf 'GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' >&3
REPLY=$(cat <&3)
exec 3<&-
grep -q "reached through the Tether tunnel" <<<"$REPLY" || fail "no answer through the tunnel: $REPLY"
echo "   GET http://127.0.0.1:$ENGINEER_PORT/ through the tunnel answered:"
echo "   $(tail -n1 <<<"$REPLY")"

if [ "${DEMO_CHECK:-0}" = 1 ]; then
    say "Demo checked: enrollment, tunnel and service access all work."
    exit 0
fi

say "Ready. Try it yourself:"
cat <<EOF
   curl http://127.0.0.1:$ENGINEER_PORT/                      # the device's service, through the tunnel
   $BIN/tetherd status --state-dir $STATE_DIR
   $BIN/tether-platform device list --data-dir $PLATFORM_DIR
   $BIN/tether-platform device revoke $DEVICE --data-dir $PLATFORM_DIR   # the tunnel closes at once
   tail -f $WORK/tetherd.log $WORK/platform.log

Press Ctrl-C to stop everything.
EOF
while true; do sleep 1; done
