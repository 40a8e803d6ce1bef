#!/usr/bin/env bash
# Builds the amd64 .deb and proves its life cycle in a throwaway root (a CI
# step): contents and modes (dpkg-deb), install (Node-RED's system user with
# its own group, /etc/tether/agent.toml 0640, the state directory 0700),
# upgrade to a newer version (the device's state and an edited config
# kept), purge (state and config removed). dpkg runs with --root and
# --force-script-chrootless: the maintainer scripts honour DPKG_ROOT and
# start nothing there. Needs root (files owned by root, useradd --prefix).
#
#   bash packaging/test-deb.sh [BINARY]      # default: target/release/tetherd
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/.." && pwd)"
binary="${1:-$top/target/release/tetherd}"
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
    echo "test-deb: needs root (dpkg --root owns files as root; useradd --prefix)" >&2
    exit 1
fi
old="$(TETHER_DEB_VERSION=0.0.9 bash "$here/build-deb.sh" amd64 "$binary")"
new="$(bash "$here/build-deb.sh" amd64 "$binary")"
echo "built $new"

contents="$(dpkg-deb -c "$new")"
for want in \
    '-rwxr-xr-x root/root .* ./usr/bin/tetherd' \
    '-rw-r----- root/root .* ./etc/tether/agent.toml' \
    '-rw-r--r-- root/root .* ./lib/systemd/system/tetherd.service'; do
    echo "$contents" | grep -Eq -- "$want" || fail "no '$want' in the package:"$'\n'"$contents"
done
dpkg-deb -f "$new" Package Version Architecture Depends
[ "$(dpkg-deb -I "$new" conffiles)" = /etc/tether/agent.toml ] || fail "agent.toml is not a conffile"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
touch "$root/var/lib/dpkg/status"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf 'root:*:19000:0:99999:7:::\n' > "$root/etc/shadow"
printf 'root:*::\n' > "$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
dpkg_root() { dpkg --root="$root" --force-script-chrootless --force-depends "$@"; }

echo "== install $(basename "$old")"
dpkg_root -i "$old" >/dev/null
grep -q '^tether-nodered:' "$root/etc/passwd" || fail "no tether-nodered user"
gid="$(awk -F: '$1 == "tether-nodered" { print $4 }' "$root/etc/passwd")"
grep -q "^tether-nodered:x:$gid:" "$root/etc/group" || fail "tether-nodered has no group of its own"
[ "$(stat -c %a "$root/etc/tether/agent.toml")" = 640 ] || fail "agent.toml is not 0640"
[ "$(stat -c %a "$root/var/lib/tether")" = 700 ] || fail "/var/lib/tether is not 0700"
"$root/usr/bin/tetherd" --version

echo "== upgrade to $(basename "$new"), with state and an edited config"
echo '{"device": "kept"}' > "$root/var/lib/tether/identity.json"
echo '# edited on site' >> "$root/etc/tether/agent.toml"
dpkg_root --force-confold -i "$new" >/dev/null
dpkg --root="$root" -s tetherd | grep -q "^Version: $(dpkg-deb -f "$new" Version)$" || fail "not upgraded"
grep -q kept "$root/var/lib/tether/identity.json" || fail "the state was lost on upgrade"
grep -q 'edited on site' "$root/etc/tether/agent.toml" || fail "the edited config was replaced"

echo "== purge"
dpkg_root --purge tetherd >/dev/null
[ ! -e "$root/var/lib/tether" ] || fail "the state survived the purge"
[ ! -e "$root/etc/tether/agent.toml" ] || fail "the config survived the purge"
[ ! -e "$root/usr/bin/tetherd" ] || fail "the binary survived the purge"
echo "PASS .deb: contents, install, upgrade (state and config kept), purge (state removed)"
