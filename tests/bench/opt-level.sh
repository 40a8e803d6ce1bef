#!/usr/bin/env bash
# Chooses the release opt-level by measurement: for each candidate, the size
# of a release binary that links the whole tunnel stack (the demo: tokio,
# rustls/ring, tungstenite, tether-proto) and the codec and tunnel figures.
#   bash tests/bench/opt-level.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export TETHER_BENCH_MIB="${TETHER_BENCH_MIB:-512}"
for level in 3 2 s z; do
    export CARGO_PROFILE_RELEASE_OPT_LEVEL="$level" CARGO_PROFILE_BENCH_OPT_LEVEL="$level"
    target="target/opt-$level"
    cargo build -q --release --target-dir "$target" -p tether-proto --features tokio --example demo
    size=$(stat -c %s "$target/release/examples/demo")
    echo "== opt-level $level: demo binary $((size / 1024)) KiB (stripped)"
    cargo bench -q --target-dir "$target" -p tether-proto --bench codec -- --noplot data_16k/decode_and_copy_out 2>/dev/null | grep -E "thrpt" || true
    cargo bench -q --target-dir "$target" -p tether-proto --features tokio --bench tunnel 2>/dev/null | sed -n '3,6p'
done
