#!/usr/bin/env bash
# Builds the amd64 .deb and proves its life cycle in a throwaway root (a CI
# step): contents and modes (dpkg-deb), install (the agent's system user
# tether and Node-RED's tether-nodered, each with its own group;
# /etc/tether/agent.toml root:tether 0640; the state directory tether's,
# 0700; Node-RED's user directory tether:tether-nodered, 1770), upgrade to
# a newer version (the device's state and an edited config kept, and what
# an agent that ran as root left handed to tether), purge (state and
# config removed). dpkg runs with --root and
# --force-script-chrootless: the maintainer scripts honour DPKG_ROOT and
# start nothing there. Needs root (files owned by root, useradd --prefix).
#
#   bash packaging/test-deb.sh [BINARY]      # default: the static amd64 build
#                                            # (bash cross/build.sh x86_64-unknown-linux-musl)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/.." && pwd)"
binary="${1:-$top/target/x86_64-unknown-linux-musl/release/tetherd}"
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
for user in tether-nodered tether; do
    grep -q "^$user:" "$root/etc/passwd" || fail "no $user user"
    gid="$(awk -F: -v u="$user" '$1 == u { print $4 }' "$root/etc/passwd")"
    grep -q "^$user:x:$gid:" "$root/etc/group" || fail "$user has no group of its own"
done
uid_of() { awk -F: -v u="$1" '$1 == u { print $3 }' "$root/etc/passwd"; }
gid_of() { awk -F: -v g="$1" '$1 == g { print $3 }' "$root/etc/group"; }
agent="$(uid_of tether):$(gid_of tether)"
shared="$(uid_of tether):$(gid_of tether-nodered)"
[ "$(stat -c %a:%u:%g "$root/etc/tether/agent.toml")" = "640:0:$(gid_of tether)" ] ||
    fail "agent.toml is not root:tether 0640"
[ "$(stat -c %a:%u:%g "$root/var/lib/tether")" = "700:$agent" ] ||
    fail "/var/lib/tether is not tether's, 0700"
[ "$(stat -c %a:%u:%g "$root/var/lib/tether-node-red")" = "1770:$shared" ] ||
    fail "/var/lib/tether-node-red is not tether:tether-nodered, 1770"
"$root/usr/bin/tetherd" --version

echo "== upgrade to $(basename "$new"), with state and an edited config left by an agent that ran as root"
echo '{"device": "kept"}' > "$root/var/lib/tether/identity.json"
echo '# edited on site' >> "$root/etc/tether/agent.toml"
nr="$root/var/lib/tether-node-red"
mkdir -p "$nr/snapshots/versions/1" "$nr/snapshots/npm/cache"
echo '[]' > "$nr/snapshots/versions/1/flows.json"
echo '[]' > "$nr/tether-settings.js"
echo '{}' > "$nr/.config.runtime.json"
chmod 0600 "$nr/.config.runtime.json"
chown "$(uid_of tether-nodered):$(gid_of tether-nodered)" "$nr/.config.runtime.json"
chown -R 0:0 "$root/var/lib/tether" "$nr/snapshots" "$nr/tether-settings.js"
chown "0:$(gid_of tether-nodered)" "$nr"
dpkg_root --force-confold -i "$new" >/dev/null
dpkg --root="$root" -s tetherd | grep -q "^Version: $(dpkg-deb -f "$new" Version)$" || fail "not upgraded"
grep -q kept "$root/var/lib/tether/identity.json" || fail "the state was lost on upgrade"
grep -q 'edited on site' "$root/etc/tether/agent.toml" || fail "the edited config was replaced"
[ "$(stat -c %u:%g "$root/var/lib/tether/identity.json")" = "$agent" ] ||
    fail "the state was not handed to tether"
for path in "$nr" "$nr/tether-settings.js" "$nr/snapshots/versions/1/flows.json"; do
    [ "$(stat -c %u:%g "$path")" = "$shared" ] || fail "$path is not tether:tether-nodered"
done
[ ! -e "$nr/snapshots/npm" ] || fail "npm's cache of the root agent was kept"
[ "$(stat -c %a:%u "$nr/.config.runtime.json")" = "660:$(uid_of tether-nodered)" ] ||
    fail "Node-RED's own file is not its own, shared with its group"

echo "== purge"
dpkg_root --purge tetherd >/dev/null
[ ! -e "$root/var/lib/tether" ] || fail "the state survived the purge"
[ ! -e "$root/var/lib/tether-node-red" ] || fail "Node-RED's directory survived the purge"
[ ! -e "$root/etc/tether/agent.toml" ] || fail "the config survived the purge"
[ ! -e "$root/usr/bin/tetherd" ] || fail "the binary survived the purge"
echo "PASS .deb: contents, users, install, upgrade (state and config kept, a root agent's files handed over), purge (state removed)"
