#!/usr/bin/env bash
# Builds the tetherd .deb for one architecture from a built binary:
#
#   bash packaging/build-deb.sh amd64            # target/x86_64-unknown-linux-musl/release/tetherd
#   bash packaging/build-deb.sh arm64            # target/aarch64-unknown-linux-musl/release/tetherd
#   bash packaging/build-deb.sh armhf            # target/armv7-unknown-linux-gnueabihf/release/tetherd
#   bash packaging/build-deb.sh ARCH BINARY      # any other binary
#
# Build the binary first: bash cross/build.sh TARGET. amd64 and arm64 ship
# the static (musl) build: no C library to match on the gateway, and less
# resident memory (docs/decisions.md, 24). Prints the package's path:
# target/deb/tetherd_VERSION_ARCH.deb. Contents: /usr/bin/tetherd, the
# systemd unit, /etc/tether/agent.toml (0640, a conffile), the docs, and
# maintainer scripts that create Node-RED's system user, keep the state
# across upgrades (the service restarted on the new binary) and remove it
# on purge.
set -euo pipefail
arch="${1:?usage: packaging/build-deb.sh amd64|arm64|armhf [BINARY]}"
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/.." && pwd)"
case "$arch" in
    amd64) default="$top/target/x86_64-unknown-linux-musl/release/tetherd" ;;
    arm64) default="$top/target/aarch64-unknown-linux-musl/release/tetherd" ;;
    armhf) default="$top/target/armv7-unknown-linux-gnueabihf/release/tetherd" ;;
    *) echo "build-deb: unknown architecture '$arch' (amd64, arm64, armhf)" >&2; exit 64 ;;
esac
binary="${2:-$default}"
if [ ! -x "$binary" ]; then
    echo "build-deb: $binary is missing; build it first (see the comment at the top)" >&2
    exit 1
fi
version="${TETHER_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -1)}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/tetherd_${version}_$arch"
install -D -m 0755 "$binary" "$root/usr/bin/tetherd"
install -D -m 0644 "$here/tetherd.service" "$root/lib/systemd/system/tetherd.service"
install -D -m 0640 "$here/agent.toml.example" "$root/etc/tether/agent.toml"
for doc in operations.md snapshots.md audit-events.md; do
    install -D -m 0644 "$top/docs/$doc" "$root/usr/share/doc/tetherd/$doc"
done
install -D -m 0644 "$here/README.md" "$root/usr/share/doc/tetherd/packaging.md"
mkdir -p "$root/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$here/deb/$script" "$root/DEBIAN/$script"
done
echo /etc/tether/agent.toml > "$root/DEBIAN/conffiles"
size_kib=$(du -sk --exclude=DEBIAN "$root" | awk '{ print $1 }')
cat > "$root/DEBIAN/control" <<CONTROL
Package: tetherd
Version: $version
Architecture: $arch
Maintainer: Tether <tether@localhost>
Section: net
Priority: optional
Installed-Size: $size_kib
Depends: util-linux, passwd
Recommends: nodejs, npm
Homepage: https://localhost/tether
Description: Tether device agent for edge gateways
 Keeps one outbound mutual-TLS WebSocket tunnel to the Tether platform and
 carries editor access to the local Node-RED, local services, audit events
 and signed snapshots over it. Runs Node-RED as its own unprivileged user,
 applies signed snapshots atomically with rollback, and queues audit events
 durably while offline.
CONTROL
mkdir -p "$top/target/deb"
out="$top/target/deb/tetherd_${version}_$arch.deb"
# Files owned by root whoever builds it.
dpkg-deb --root-owner-group --build "$root" "$out" >/dev/null
echo "$out"
