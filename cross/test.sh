#!/usr/bin/env bash
# Proves the ARM builds under qemu (a CI step):
# 1. the tether-proto test suite built for aarch64 (static musl) and run
#    under qemu-aarch64;
# 2. the static aarch64 tetherd, under qemu, enrolls with the x86 reference
#    platform on 127.0.0.1, brings its tunnel up and carries a tcp stream
#    byte for byte (tether-cross-smoke), with its size against the 6 MiB
#    budget;
# 3. the armv7 tetherd runs --version under qemu-arm.
set -euo pipefail
cd "$(dirname "$0")/.."
. cross/env.sh

echo "== tether-proto's tests for aarch64, under qemu-aarch64" >&2
cross_env aarch64-unknown-linux-musl
cargo test --locked -p tether-proto --all-features --target aarch64-unknown-linux-musl

echo "== static aarch64 tetherd under qemu against the x86 platform" >&2
out="$(bash cross/build.sh aarch64-unknown-linux-musl)"
echo "$out"
size="$(echo "$out" | awk '{ print $2 }')"
budget=$((6 * 1024 * 1024))
if [ "$size" -ge "$budget" ]; then
    echo "MISS static aarch64 tetherd is $size bytes, budget under $budget" >&2
    exit 1
fi
echo "PASS static aarch64 tetherd $size bytes, under 6 MiB"
cargo run --locked -p tether-e2e --bin tether-cross-smoke -- \
    --tetherd target/aarch64-unknown-linux-musl/release/tetherd --runner qemu-aarch64

echo "== armv7 tetherd --version under qemu-arm" >&2
bash cross/build.sh armv7-unknown-linux-gnueabihf
cross_env armv7-unknown-linux-gnueabihf
$CROSS_RUNNER target/armv7-unknown-linux-gnueabihf/release/tetherd --version
