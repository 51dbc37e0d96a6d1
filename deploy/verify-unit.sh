#!/usr/bin/env bash
# Checks deploy/eventsync.service on a machine where eventsync is not installed:
#   1. `systemd-analyze verify` must pass without a word about the unit;
#   2. `systemd-analyze security --offline=yes` must rate it OK or better (exposure <= 4.9).
# Prints "exposure: <score> <RATING>" and exits 0 only if both hold.
# Exit 77 (the automake "skipped" code) when systemd-analyze is missing and cannot be
# installed because we are not root. On a fresh Debian CI machine running as root it
# installs systemd first.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
unit_src="${1:-$here/eventsync.service}"
# systemd's ratings: PERFECT 0.0, SAFE < 1.0, OK < 5.0, MEDIUM, EXPOSED, UNSAFE, DANGEROUS.
# --threshold counts in tenths (the default, 100, is an exposure of 10.0).
threshold=49

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "verify-unit: systemd-analyze is missing and installing it needs root" >&2
        exit 77
    fi
    echo "verify-unit: installing systemd (for systemd-analyze)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends systemd >&2
fi
systemd-analyze --version | head -n 1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unit="$tmp/eventsync.service"
# verify insists that ExecStart's binary exists; on this machine eventsync is not at its
# production path, so point it at one that is (keeping the arguments). Nothing else changes.
stand_in="$(command -v true)"
sed -E "s|^ExecStart=[^ ]+|ExecStart=$stand_in|" "$unit_src" >"$unit"
grep -q "^ExecStart=$stand_in serve\$" "$unit" || {
    echo "verify-unit: no 'ExecStart=... serve' line to rewrite in $unit_src" >&2
    exit 1
}

status=0

echo "== systemd-analyze verify"
verify_out="$(systemd-analyze verify --man=no "$unit" 2>&1)" || status=1
# verify exits 0 on many warnings (an unknown key, a bad value it ignores): any line about
# our unit is a failure. Lines about other units on the machine are not ours to fix.
if grep -qF -e "$unit" -e "eventsync.service" <<<"$verify_out"; then
    status=1
fi
if [ -n "$verify_out" ]; then
    # Messages name the temporary copy; show the source instead (line numbers are the same).
    printf '%s\n' "${verify_out//"$unit"/"$unit_src"}"
fi
if [ "$status" -ne 0 ]; then
    echo "verify-unit: FAIL: systemd-analyze verify reported problems" >&2
fi

echo "== systemd-analyze security --offline=yes"
security_rc=0
security_out="$(systemd-analyze security --no-pager --offline=yes --threshold="$threshold" \
    "$unit" 2>&1)" || security_rc=$?
security_out="${security_out//"$unit"/"$unit_src"}"
printf '%s\n' "$security_out"
# The last line reads: "→ Overall exposure level for eventsync.service: 2.1 OK :-)"
overall="$(grep -E 'Overall exposure level for' <<<"$security_out" | tail -n 1 || true)"
score="$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+\.[0-9]+) ([A-Z]+).*/\1/p' <<<"$overall")"
rating="$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9]+\.[0-9]+) ([A-Z]+).*/\2/p' <<<"$overall")"
if [ -z "$score" ] || [ -z "$rating" ]; then
    echo "verify-unit: FAIL: could not read the overall exposure level" >&2
    exit 1
fi
echo "exposure: $score $rating"
case "$rating" in
    PERFECT | SAFE | OK) ;;
    *)
        echo "verify-unit: FAIL: rating $rating is worse than OK" >&2
        status=1
        ;;
esac
if [ "$security_rc" -ne 0 ]; then
    echo "verify-unit: FAIL: systemd-analyze security exited $security_rc" >&2
    status=1
fi
exit "$status"
