#!/usr/bin/env bash
# Fetch promtool (Debian's `prometheus` package ships it) into a cache directory, for
# `make check-rules` and tests/unit/test_deploy.py. Nothing is installed system-wide:
# `apt-get download` only writes the .deb into the current directory, and `dpkg -x` unpacks
# it without touching dpkg's database.
#
# Usage: tests/promtool/prepare.sh   (idempotent; prints the promtool path)
#   MEMORY_WORKER_PROMTOOL_DIR  where to unpack (default ~/.cache/memory-worker/promtool)
set -euo pipefail

CACHE="${MEMORY_WORKER_PROMTOOL_DIR:-$HOME/.cache/memory-worker/promtool}"
PROMTOOL="$CACHE/root/usr/bin/promtool"

if [ -x "$PROMTOOL" ] && "$PROMTOOL" --version >/dev/null 2>&1; then
  echo "$PROMTOOL"
  exit 0
fi
mkdir -p "$CACHE/debs"
cd "$CACHE/debs"
rm -f ./prometheus_*.deb
# Uses the machine's package lists; on a machine that never ran `apt-get update`, run it first.
apt-get -q download prometheus 2>&1 | grep -E '^(Get|Err|E:)' >&2 || true
deb=$(ls ./prometheus_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || { echo "apt-get download prometheus fetched nothing" >&2; exit 1; }
rm -rf "$CACHE/root"
dpkg -x "$deb" "$CACHE/root"
"$PROMTOOL" --version >&2
echo "$PROMTOOL"
