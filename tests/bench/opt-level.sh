#!/usr/bin/env bash
# Chooses the release opt-level by measurement. For each level given (default
# 3 2 s z): the size of a release binary linking the whole tunnel stack (the
# demo: tokio, rustls with ring, tungstenite, tether-proto), one bulk stream
# through a loopback TLS tunnel, and the state machine alone. Tunnel runs
# alternate between levels, five rounds, medians reported: on a shared
# machine, figures taken minutes apart differ more than the levels do.
#   bash tests/bench/opt-level.sh [LEVEL...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -gt 0 ]; then levels=("$@"); else levels=(3 2 s z); fi
export TETHER_BENCH_MIB="${TETHER_BENCH_MIB:-1024}"
declare -A tunnel_bin codec_bin size
for level in "${levels[@]}"; do
    export CARGO_PROFILE_RELEASE_OPT_LEVEL="$level" CARGO_PROFILE_BENCH_OPT_LEVEL="$level"
    dir="target/opt-$level"
    cargo build -q --release --target-dir "$dir" -p tether-proto --features tokio --example demo
    size[$level]=$(( $(stat -c %s "$dir/release/examples/demo") / 1024 ))
    cargo bench -q --no-run --target-dir "$dir" -p tether-proto --features tokio --bench tunnel --bench codec 2>/dev/null
    tunnel_bin[$level]=$(ls -t "$dir"/release/deps/tunnel-* | grep -v '\.d$' | head -1)
    codec_bin[$level]=$(ls -t "$dir"/release/deps/codec-* | grep -v '\.d$' | head -1)
done
declare -A runs
for round in 1 2 3 4 5; do
    for level in "${levels[@]}"; do
        line=$(TETHER_BENCH_PROFILE=1 "${tunnel_bin[$level]}" --bench)
        runs[$level]+="$(echo "$line" | sed -E 's/tunnel: ([0-9.]+) Gbit\/s, ([0-9.]+) CPU-s per GiB/\1 \2/')"$'\n'
    done
done
printf '%-6s %12s %14s %16s %18s\n' level "binary KiB" "tunnel Gbit/s" "CPU-s per GiB" "state machine GiB/s"
for level in "${levels[@]}"; do
    gbits=$(printf '%s' "${runs[$level]}" | awk 'NF{print $1}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    cpu=$(printf '%s' "${runs[$level]}" | awk 'NF{print $2}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    codec=$("${codec_bin[$level]}" --bench --noplot state_machine 2>/dev/null)
    sm=$(printf '%s\n' "$codec" | awk '/thrpt:/ {print $4; exit}')
    printf '%-6s %12s %14s %16s %18s\n' "$level" "${size[$level]}" "$gbits" "$cpu" "$sm"
done
