#!/usr/bin/env bash
# Bulk throughput through the Tether tunnel, against direct loopback TCP and
# against rathole with its TLS transport, in one run (docs/benchmarks.md).
#
#   bash tests/bench/throughput.sh            # 1 GiB per transfer, 3 rounds
#   ROUNDS=5 SIZE=2G bash tests/bench/throughput.sh
#   TETHER_BIN=/path/to/other/build bash tests/bench/throughput.sh
#   TETHERD=target/x86_64-unknown-linux-musl/release/tetherd bash tests/bench/throughput.sh
#
# The three paths carry the same iperf3 stream to the same iperf3 server
# (the "local TCP sink" on the device side):
#
#   direct:  iperf3 -c -> 127.0.0.1:SINK
#   rathole: iperf3 -c -> rathole server -> TLS -> rathole client -> SINK
#   tether:  iperf3 -c -> platform-side listener (tether-platform connect)
#            -> tunnel (mTLS WebSocket) -> tetherd -> SINK
#
# `tether-platform connect` has the platform itself listen on 127.0.0.1 for as
# long as the command runs, so tether, like rathole, crosses one TLS hop; the
# connect process only holds the session (its CPU is reported, and is ~0).
#
# Rounds alternate the paths so that the machine's drift hits all of them.
# For each transfer it reports Gbit/s (iperf3's receiver figure), the
# CPU-seconds per GiB of every process on the path (utime + stime from
# /proc/PID/stat) and their peak resident memory (VmHWM). Needs iperf3,
# rathole (cargo install rathole), openssl and python3; traffic stays on
# 127.0.0.1.
set -euo pipefail

# glibc 2.36 on this machine's x86 CPU copies some 16 KiB buffers with
# `rep movsb` up to 20x slower depending on their placement, which makes
# runs of the same binary differ by 2x (docs/benchmarks.md). Every process
# of every path gets the same setting; GLIBC_TUNABLES= (empty) turns it off.
export GLIBC_TUNABLES=${GLIBC_TUNABLES-glibc.cpu.x86_rep_movsb_threshold=4294967295}

ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-1G}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() {
    command -v "$1" >/dev/null || { echo "throughput.sh: $1 is missing: $2" >&2; exit 69; }
}
need iperf3 "apt-get install iperf3"
need rathole "cargo install rathole"
need openssl "apt-get install openssl"
need python3 "apt-get install python3"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "throughput.sh: nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

# CPU ticks (user + system) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

# TETHER_BIN=DIR measures the tetherd and tether-platform in DIR instead
# (an earlier build, say, to compare against); otherwise they are built.
if [ -n "${TETHER_BIN:-}" ]; then
    BIN=$TETHER_BIN
else
    echo "building release binaries..." >&2
    cargo build --release --quiet -p tether-agent -p tether-platform --manifest-path "$ROOT/Cargo.toml"
    BIN="$ROOT/target/release"
fi
# TETHERD=PATH measures that tetherd (the static build the package ships,
# say) with the platform from BIN.
TETHERD=${TETHERD:-$BIN/tetherd}

# --- the sink ---------------------------------------------------------------
SINK=$(free_port)
iperf3 -s -p "$SINK" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$SINK"

# --- rathole with TLS ----------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\n' >"$WORK/san.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.crt" 2>/dev/null
openssl pkcs12 -export -out "$WORK/identity.pfx" -inkey "$WORK/server.key" \
    -in "$WORK/server.crt" -certfile "$WORK/ca.crt" -passout pass:bench 2>/dev/null
RH_CTRL=$(free_port)
RH_PORT=$(free_port)
cat >"$WORK/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$RH_CTRL"
[server.transport]
type = "tls"
[server.transport.tls]
pkcs12 = "$WORK/identity.pfx"
pkcs12_password = "bench"
[server.services.sink]
token = "bench"
bind_addr = "127.0.0.1:$RH_PORT"
EOF
cat >"$WORK/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$RH_CTRL"
[client.transport]
type = "tls"
[client.transport.tls]
trusted_root = "$WORK/ca.crt"
hostname = "localhost"
[client.services.sink]
token = "bench"
local_addr = "127.0.0.1:$SINK"
EOF
rathole --server "$WORK/rathole-server.toml" >"$WORK/rathole-server.log" 2>&1 &
RH_SERVER=$!
PIDS+=($RH_SERVER)
wait_port "$RH_CTRL"
rathole --client "$WORK/rathole-client.toml" >"$WORK/rathole-client.log" 2>&1 &
RH_CLIENT=$!
PIDS+=($RH_CLIENT)
wait_port "$RH_PORT"

# --- tether ------------------------------------------------------------------
PLATFORM_PORT=$(free_port)
"$BIN/tether-platform" serve --data-dir "$WORK/platform" --listen "127.0.0.1:$PLATFORM_PORT" --no-mqtt \
    >"$WORK/platform.log" 2>&1 &
PLATFORM=$!
PIDS+=($PLATFORM)
wait_port "$PLATFORM_PORT"
TOKEN=$("$BIN/tether-platform" token create --data-dir "$WORK/platform" 2>/dev/null)
cat >"$WORK/agent.toml" <<EOF
state_dir = "$WORK/agent"
[[service]]
name = "sink"
target = "127.0.0.1:$SINK"
EOF
printf '%s\n' "$TOKEN" | "$TETHERD" enroll --platform "https://localhost:$PLATFORM_PORT" --token-stdin \
    --state-dir "$WORK/agent" --name bench >/dev/null 2>&1
"$TETHERD" run --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
DEVICE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' \
    "$WORK/agent/identity.json")
for _ in $(seq 1 100); do
    "$BIN/tether-platform" device list --data-dir "$WORK/platform" --json 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(x.get("online") for x in d) else 1)' &&
        break
    sleep 0.1
done
TETHER_PORT=$(free_port)
"$BIN/tether-platform" connect "$DEVICE" sink --listen "127.0.0.1:$TETHER_PORT" \
    --data-dir "$WORK/platform" >"$WORK/connect.log" 2>&1 &
CONNECT=$!
PIDS+=($CONNECT)
wait_port "$TETHER_PORT"

# --- measure -----------------------------------------------------------------
# run NAME PORT PID... : one transfer; prints "NAME gbps cpu_per_gib..." to the results file.
run() {
    local name=$1 port=$2
    shift 2
    local before=() pid
    for pid in "$@"; do before+=("$(ticks "$pid")"); done
    local json
    json=$(iperf3 -c 127.0.0.1 -p "$port" -n "$SIZE" -l 128K -J)
    local bps bytes
    bps=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' <<<"$json")
    bytes=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bytes"])' <<<"$json")
    local line="$name $bps $bytes" i=0
    for pid in "$@"; do
        line+=" $(( $(ticks "$pid") - ${before[$i]} ))"
        i=$((i + 1))
    done
    echo "$line" >>"$WORK/results"
}

HZ=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    run direct "$SINK"
    run rathole "$RH_PORT" "$RH_SERVER" "$RH_CLIENT"
    run tether "$TETHER_PORT" "$CONNECT" "$PLATFORM" "$AGENT"
done

python3 - "$WORK/results" "$HZ" "$(peak_kib "$RH_SERVER")" "$(peak_kib "$RH_CLIENT")" \
    "$(peak_kib "$CONNECT")" "$(peak_kib "$PLATFORM")" "$(peak_kib "$AGENT")" <<'EOF'
import statistics, sys
path, hz = sys.argv[1], int(sys.argv[2])
peaks = dict(zip(["rathole server", "rathole client", "connect", "platform", "tetherd"],
                 [int(x) for x in sys.argv[3:]]))
rows = {}
for line in open(path):
    name, bps, nbytes, *ticks = line.split()
    gib = int(nbytes) / 2**30
    rows.setdefault(name, []).append((float(bps) / 1e9, [int(t) / hz / gib for t in ticks]))
def med(xs): return statistics.median(xs)
gbps = {name: med([r[0] for r in runs]) for name, runs in rows.items()}
labels = {"direct": [], "rathole": ["server", "client"], "tether": ["connect", "platform", "tetherd"]}
print(f"| path | Gbit/s (median of {len(rows['direct'])}) | CPU-s per GiB | vs direct | vs rathole |")
print("| --- | --- | --- | --- | --- |")
for name in ["direct", "rathole", "tether"]:
    runs = rows[name]
    cpu = [med([r[1][i] for r in runs]) for i in range(len(labels[name]))]
    cpu_text = ", ".join(f"{l} {c:.2f}" for l, c in zip(labels[name], cpu)) or "-"
    if cpu:
        cpu_text += f" (total {sum(cpu):.2f})"
    print(f"| {name} | {gbps[name]:.2f} | {cpu_text} | {gbps[name] / gbps['direct']:.2f} | "
          f"{gbps[name] / gbps['rathole']:.2f} |")
print()
print("peak resident memory (VmHWM): " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in peaks.items()))
EOF
