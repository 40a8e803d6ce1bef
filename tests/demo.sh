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
#    a field engineer would, and fetches a page through the tunnel;
# 6. has tetherd start the device's Node-RED, locked down so that only the
#    agent can use its editor (Node-RED 4 is installed into a cache folder
#    with npm when it is missing), creates an owner and a viewer on the
#    platform, logs in as the owner and loads the editor through the tunnel.
#
# Then it prints the editor's address and both logins, and waits: Ctrl-C
# stops everything and removes the folder. With DEMO_CHECK=1 it exits after
# step 6 instead (CI runs it that way). Ports: PLATFORM_PORT (default 8443),
# ENGINEER_PORT (default 8080) and NODE_RED_PORT (default 1880), all on
# 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PLATFORM_PORT=${PLATFORM_PORT:-8443}
ENGINEER_PORT=${ENGINEER_PORT:-8080}
NODE_RED_PORT=${NODE_RED_PORT:-1880}
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
port_free "$NODE_RED_PORT" || fail "127.0.0.1:$NODE_RED_PORT is in use; run with NODE_RED_PORT=another port"
command -v curl >/dev/null || fail "curl is missing: apt-get install curl"

say "Node-RED 4 for the device (installed into a cache folder with npm if missing)..."
NODE_RED=$(bash "$ROOT/tests/nodered/install.sh" 2> >(sed 's/^/   /' >&2)) ||
    fail "cannot install Node-RED (needs node and npm: apt-get install nodejs npm)"

say "Building tetherd, tether-platform and the demo service (release)..."
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" \
    -p tether-agent -p tether-platform -p tether-e2e --bins
BIN="$ROOT/target/release"
PLATFORM_DIR="$WORK/platform"
STATE_DIR="$WORK/device"

say "1. Starting the reference platform on https://localhost:$PLATFORM_PORT (data in $PLATFORM_DIR)"
"$BIN/tether-platform" serve --data-dir "$PLATFORM_DIR" --listen "127.0.0.1:$PLATFORM_PORT" --mqtt-port 0 \
    >"$WORK/platform.log" 2>&1 &
PIDS+=($!)
wait_port "$PLATFORM_PORT"

say "2. Creating a one-time provisioning token (valid 1 hour, 1 use)"
echo "   \$ tether-platform token create --data-dir $PLATFORM_DIR"
TOKEN=$("$BIN/tether-platform" token create --data-dir "$PLATFORM_DIR" 2>>"$WORK/platform-cli.log") ||
    fail "token create failed"
echo "   ${TOKEN:0:12}...${TOKEN: -8} (shown once; the platform keeps only its secret's hash; the part after '.' is the CA's key hash)"

say "3. Enrolling the device: its key is made here and never leaves it"
"$BIN/tether-demo-service" 127.0.0.1:0 >"$WORK/service.out" 2>"$WORK/service.log" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q listening "$WORK/service.out" 2>/dev/null && break; sleep 0.05; done
SERVICE_ADDR=$(sed -n 's/^listening on //p' "$WORK/service.out")
[ -n "$SERVICE_ADDR" ] || fail "the demo service did not start"
# The token goes in an owner-only file, never on a command line (process
# list, shell history). It names the platform's CA by its key's hash, so no
# --ca is needed and no other CA is trusted.
TOKEN_FILE="$WORK/provisioning.token"
(umask 077 && printf '%s\n' "$TOKEN" >"$TOKEN_FILE")
echo "   \$ tetherd enroll --platform https://localhost:$PLATFORM_PORT --token-file $TOKEN_FILE --state-dir $STATE_DIR --name demo-gateway"
"$BIN/tetherd" enroll --platform "https://localhost:$PLATFORM_PORT" --token-file "$TOKEN_FILE" \
    --state-dir "$STATE_DIR" --name demo-gateway ||
    fail "enrollment failed"
echo "   The same token again (on stdin this time) is refused:"
if "$BIN/tetherd" enroll --platform "https://localhost:$PLATFORM_PORT" --token-stdin \
    --state-dir "$WORK/second-device" --name copycat <"$TOKEN_FILE" 2>&1 | sed 's/^/   /'; then
    fail "a used token was accepted"
fi

# Node-RED never runs with the agent's rights. Run as root (CI, a gateway),
# tetherd starts it as an unprivileged system user of its own, as the
# package does; the demo creates that user if it is missing. Run as anyone
# else, Node-RED runs as that user and tetherd says what that means.
NODE_RED_USER_LINE=""
if [ "$(id -u)" = 0 ]; then
    if ! id tether-nodered >/dev/null 2>&1; then
        echo "   \$ useradd --system --no-create-home --shell /usr/sbin/nologin tether-nodered"
        useradd --system --no-create-home --shell /usr/sbin/nologin tether-nodered ||
            fail "cannot create the tether-nodered user"
    fi
    NODE_RED_USER_LINE='user = "tether-nodered"'
    # Its user directory sits beside the state directory, in $WORK.
    chmod 711 "$WORK"
fi

say "4. Running tetherd with one allow-listed service: web -> $SERVICE_ADDR"
cat >"$WORK/tetherd.toml" <<EOF
state_dir = "$STATE_DIR"

[[service]]
name = "web"
target = "$SERVICE_ADDR"

# tetherd starts the device's Node-RED and locks its editor down.
[node_red]
mode = "launch"
command = "$NODE_RED"
port = $NODE_RED_PORT
$NODE_RED_USER_LINE
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

say "6. The device's Node-RED editor, through the tunnel"
password() { head -c 12 /dev/urandom | base64 | tr -d '/+=' | head -c 16; }
OWNER_PASSWORD=$(password)
VIEWER_PASSWORD=$(password)
echo "   \$ tether-platform user add --data-dir $PLATFORM_DIR --team default --role owner olga   (password on stdin)"
printf '%s\n' "$OWNER_PASSWORD" | "$BIN/tether-platform" user add --data-dir "$PLATFORM_DIR" \
    --team default --role owner olga >/dev/null 2>>"$WORK/platform-cli.log" || fail "user add failed"
echo "   \$ tether-platform user add --data-dir $PLATFORM_DIR --team default --role viewer vic"
printf '%s\n' "$VIEWER_PASSWORD" | "$BIN/tether-platform" user add --data-dir "$PLATFORM_DIR" \
    --team default --role viewer vic >/dev/null 2>>"$WORK/platform-cli.log" || fail "user add failed"
EDITOR="https://localhost:$PLATFORM_PORT/devices/$DEVICE/editor/"
CURL=(curl -sS --max-time 20 --cacert "$PLATFORM_DIR/ca.crt")
node_red_up=0
for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NODE_RED_PORT/settings" || true)
    [ "$code" = 401 ] && { node_red_up=1; break; }
    sleep 0.2
done
[ "$node_red_up" = 1 ] || fail "Node-RED did not come up locked down on 127.0.0.1:$NODE_RED_PORT"
echo "   Node-RED on 127.0.0.1:$NODE_RED_PORT without the agent: GET /settings -> 401 (locked down)"
# The editor, as a browser reaches it: the login form (its CSRF token and
# cookie come with the page), then the platform hands the browser over to
# the device's own editor origin https://dev-<id>.devices.localhost:PORT/
# (browsers resolve *.localhost themselves; curl is told with --resolve).
JAR="$WORK/cookies"
EDITOR_HOST="dev-${DEVICE#dev_}.devices.localhost"
CURL+=(--resolve "$EDITOR_HOST:$PLATFORM_PORT:127.0.0.1")
LOGIN_PAGE=$("${CURL[@]}" -c "$JAR" "https://localhost:$PLATFORM_PORT/login") || fail "the login page did not load"
CSRF=$(sed -n 's/.*name="csrf" value="\([0-9a-f]*\)".*/\1/p' <<<"$LOGIN_PAGE" | head -n1)
[ -n "$CSRF" ] || fail "the login page has no CSRF token"
"${CURL[@]}" -o /dev/null -b "$JAR" -c "$JAR" -H "Origin: https://localhost:$PLATFORM_PORT" \
    --data-urlencode "user=olga" --data-urlencode "password=$OWNER_PASSWORD" --data-urlencode "csrf=$CSRF" \
    "https://localhost:$PLATFORM_PORT/login" || fail "login failed"
grep -q "__Host-tether_session" "$JAR" || fail "the login did not start a session"
SETTINGS=""
for _ in $(seq 1 50); do
    SETTINGS=$("${CURL[@]}" -L -b "$JAR" -c "$JAR" "${EDITOR}settings" || true)
    grep -q '"username":"olga"' <<<"$SETTINGS" && break
    sleep 0.2
done
grep -q '"username":"olga"' <<<"$SETTINGS" || fail "the editor did not answer through the tunnel: ${SETTINGS:0:300}"
echo "   Logged in as olga (owner): ${EDITOR}settings led to https://$EDITOR_HOST:$PLATFORM_PORT/settings,"
echo "   which answered through the tunnel, as olga"

say "7. The device's audit trail, as the platform stored and verified it"
echo "   \$ tether-platform audit --device $DEVICE --data-dir $PLATFORM_DIR --limit 6"
AUDIT=""
for _ in $(seq 1 50); do
    AUDIT=$("$BIN/tether-platform" audit --device "$DEVICE" --data-dir "$PLATFORM_DIR" --limit 6 || true)
    grep -q "editor_session_opened" <<<"$AUDIT" && grep -q "chain verified" <<<"$AUDIT" && break
    sleep 0.2
done
grep -q "editor_session_opened" <<<"$AUDIT" || fail "the editor session is not in the device's audit trail: ${AUDIT:0:300}"
grep -q "chain verified" <<<"$AUDIT" || fail "the device's audit chain does not verify: ${AUDIT:0:300}"
sed 's/^/   /' <<<"$AUDIT"

if [ "${DEMO_CHECK:-0}" = 1 ]; then
    say "Demo checked: enrollment, tunnel, service access, the editor and the audit trail all work."
    exit 0
fi

say "Ready. Open the device's Node-RED editor in a browser:"
cat <<EOF
   $EDITOR
     owner:  olga / $OWNER_PASSWORD    (may deploy)
     viewer: vic  / $VIEWER_PASSWORD    (read-only)
   After the login the platform hands the browser over to the device's own
   editor origin, https://$EDITOR_HOST:$PLATFORM_PORT/ (Chromium and Firefox
   resolve every *.localhost name to this machine).
   The browser will warn about the certificate: the demo platform made its own
   CA ($PLATFORM_DIR/ca.crt). Accept it for this demo (once for localhost and
   once for the editor's origin), or import that file.

Try it yourself:
   curl http://127.0.0.1:$ENGINEER_PORT/                      # the device's service, through the tunnel
   curl http://127.0.0.1:$NODE_RED_PORT/flows                 # Node-RED directly: 401, only the agent gets in
   $BIN/tether-platform device protect $DEVICE --on --data-dir $PLATFORM_DIR   # flows read-only for everyone
   $BIN/tetherd status --state-dir $STATE_DIR
   $BIN/tether-platform device list --data-dir $PLATFORM_DIR
   $BIN/tether-platform audit --device $DEVICE --data-dir $PLATFORM_DIR   # also the /audit page once logged in
   $BIN/tether-platform device revoke $DEVICE --data-dir $PLATFORM_DIR   # the tunnel closes at once
   tail -f $WORK/tetherd.log $WORK/platform.log

Press Ctrl-C to stop everything.
EOF
while true; do sleep 1; done
