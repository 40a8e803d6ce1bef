#!/usr/bin/env bash
# Release build of tetherd for an ARM gateway, with Debian's cross
# compilers (ring needs only a C compiler for the target; no Docker, no
# CMake, no aws-lc-rs). One command per target:
#
#   bash cross/build.sh aarch64-unknown-linux-gnu
#   bash cross/build.sh aarch64-unknown-linux-musl      # static
#   bash cross/build.sh armv7-unknown-linux-gnueabihf
#
# Installs what is missing (cross/env.sh), builds, checks that aws-lc-sys
# is not in the tree, and prints the binary's path and size:
# target/TARGET/release/tetherd (stripped by the release profile).
set -euo pipefail
target="${1:?usage: cross/build.sh TARGET}"
shift
cd "$(dirname "$0")/.."
. cross/env.sh
cross_env "$target"
if cargo tree --target "$target" -p tether-agent -e normal -i aws-lc-sys >/dev/null 2>&1; then
    echo "cross/build.sh: aws-lc-sys is in tetherd's tree for $target; it must not be (docs/decisions.md, 8)" >&2
    exit 1
fi
cargo build --release --locked --target "$target" -p tether-agent --bin tetherd "$@" >&2
binary="target/$target/release/tetherd"
size=$(stat -c %s "$binary")
echo "$binary $size bytes ($(awk "BEGIN { printf \"%.2f\", $size / 1048576 }") MiB)"
