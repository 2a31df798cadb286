#!/usr/bin/env bash
# Fetch Debian's headless-capable Chromium and the few libraries it needs that the machine
# lacks into a cache directory, for the console's browser tests (tests/browser) and
# `make console-screenshots`. Nothing is installed system-wide: `apt-get download` only writes
# .deb files, `dpkg -x` unpacks them without touching dpkg's database, and a wrapper script
# gives only Chromium the unpacked libraries (LD_LIBRARY_PATH would leak into other programs).
#
# Usage: tests/browser/prepare.sh   (idempotent; prints the path of the chromium wrapper)
#   MEMORY_WORKER_CHROMIUM_DIR  where to unpack (default ~/.cache/memory-worker/chromium)
set -euo pipefail

CACHE="${MEMORY_WORKER_CHROMIUM_DIR:-$HOME/.cache/memory-worker/chromium}"
ROOT="$CACHE/root"
WRAPPER="$CACHE/chromium"
# Chromium's libraries that a server image of this kind leaves out (found with ldd); unpacked
# whether or not the machine has them, so the list holds on a machine that has fewer.
LIBS=(libopenh264-7 libdouble-conversion3 libharfbuzz-subset0 libpulse0 libflac12 libopus0
      libxnvctrl0 libminizip1 libopenjp2-7 libogg0 libsndfile1 libasyncns0 libvorbis0a
      libvorbisenc2 libmpg123-0 libmp3lame0)

runs() { "$WRAPPER" --headless --no-sandbox --disable-gpu --dump-dom 'data:text/html,<p>ok</p>' \
           2>/dev/null | grep -q '<p>ok</p>'; }

if [ -x "$WRAPPER" ] && runs; then
  echo "$WRAPPER"
  exit 0
fi
mkdir -p "$CACHE/debs"
cd "$CACHE/debs"
rm -f ./*.deb
# Uses the machine's package lists; on a machine that never ran `apt-get update`, run it first.
apt-get -q -o "APT::Sandbox::User=$(id -un)" download chromium chromium-common "${LIBS[@]}" \
  2>&1 | grep -E '^(Err|E:)' >&2 || true
ls ./chromium_*.deb >/dev/null 2>&1 || { echo "apt-get download chromium fetched nothing" >&2; exit 1; }
rm -rf "$ROOT"
for deb in ./*.deb; do dpkg -x "$deb" "$ROOT"; done
LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu"
cat > "$WRAPPER" <<WRAP
#!/bin/sh
# Chromium from $ROOT with the libraries unpacked beside it (tests/browser/prepare.sh).
LD_LIBRARY_PATH="$LIBDIR:$LIBDIR/pulseaudio\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
  exec "$ROOT/usr/lib/chromium/chromium" "\$@"
WRAP
chmod +x "$WRAPPER"
missing=$(LD_LIBRARY_PATH="$LIBDIR:$LIBDIR/pulseaudio" ldd "$ROOT/usr/lib/chromium/chromium" \
          | grep 'not found' || true)
[ -z "$missing" ] || { echo "chromium still lacks:" >&2; echo "$missing" >&2; exit 1; }
runs || { echo "the unpacked chromium does not run headless" >&2; exit 1; }
echo "$WRAPPER"
