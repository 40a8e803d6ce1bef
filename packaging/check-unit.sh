#!/usr/bin/env bash
# Checks packaging/tetherd.service as systemd reads it: `systemd-analyze
# verify` (syntax, the binary it starts) and its sandbox's exposure score
# (`systemd-analyze security`, offline), which must not grow past
# THRESHOLD (in tenths: 18 = 1.8). Prints the score and every setting that
# costs exposure.
#
#   bash packaging/check-unit.sh [TETHERD_BINARY] [THRESHOLD]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:-$here/../target/debug/tetherd}"
threshold="${2:-18}"
if ! command -v systemd-analyze >/dev/null; then
    echo "check-unit: systemd-analyze is missing (apt-get install systemd)" >&2
    exit 1
fi
if [ ! -x "$binary" ]; then
    echo "check-unit: $binary is missing; build it first (cargo build -p tether-agent)" >&2
    exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The unit names /usr/bin/tetherd; verify it against the binary just built.
sed "s#^ExecStart=/usr/bin/tetherd#ExecStart=$(realpath "$binary")#" \
    "$here/tetherd.service" > "$work/tetherd.service"
systemd-analyze verify "$work/tetherd.service"
echo "check-unit: systemd-analyze verify: ok"
report="$(systemd-analyze security --offline=true "$work/tetherd.service" || true)"
echo "$report" | grep -E '✗|Overall' || true
score="$(echo "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')"
systemd-analyze security --offline=true --threshold="$threshold" "$work/tetherd.service" >/dev/null
echo "check-unit: exposure ${score:-?}, within $(awk "BEGIN { print $threshold / 10 }")"
