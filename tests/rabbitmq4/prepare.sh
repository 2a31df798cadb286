#!/usr/bin/env bash
# Prepare RabbitMQ 4.3 and the Erlang/OTP it needs from Debian sid, unpacked into a cache
# directory, for tests that start private 4.3 nodes (tests/faults/broker_node.py). Nothing is
# installed system-wide: the machine's RabbitMQ 3.10 and its Erlang stay as they are.
#
# How and why (docs: ../../../shared/design/rabbitmq4.md, summarised): sid's binaries need a
# newer glibc than bookworm's, so sid's libc6 and friends are unpacked beside Erlang and every
# ELF file under usr/lib/erlang gets that loader and rpath (patchelf). LD_LIBRARY_PATH would
# leak into the system programs beam starts (/bin/sh, df) and crash them. The patched paths are
# absolute: the prepared tree cannot be moved, only prepared again.
#
# Usage: tests/rabbitmq4/prepare.sh   (idempotent; a second run only checks the stamp)
#   MEMORY_WORKER_RABBITMQ4_DIR  where to prepare (default ~/.cache/memory-worker/rabbitmq-4.3)
#   MEMORY_WORKER_RABBITMQ4_VERSION  the rabbitmq-server version wanted (default 4.3.6)
#   MEMORY_WORKER_DEBIAN_MIRROR  default: the machine's own Debian mirror, else deb.debian.org
set -euo pipefail

CACHE="${MEMORY_WORKER_RABBITMQ4_DIR:-$HOME/.cache/memory-worker/rabbitmq-4.3}"
VERSION="${MEMORY_WORKER_RABBITMQ4_VERSION:-4.3.6}"
SUITE=sid
ROOT="$CACHE/root"        # the unpacked tree (one prefix for every package)
STAMP="$CACHE/prepared"   # written last: its presence means the tree is complete

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ]; then
  echo "RabbitMQ $VERSION already prepared in $CACHE"
  exit 0
fi
[ "$(uname -m)" = x86_64 ] || { echo "only x86_64 is supported" >&2; exit 1; }

# sid's own libraries, which its Erlang and its NIFs are linked against.
LIBS=(libc6 libssl3t64 libstdc++6 libgcc-s1 libtinfo6 zlib1g libsystemd0 libcap2 libsctp1
      libzstd1 openssl-provider-legacy)

mirror() {
  local found
  found=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
          /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | head -n 1 | tr -d ' ') || true
  echo "${MEMORY_WORKER_DEBIAN_MIRROR:-${found:-http://deb.debian.org/debian}}"
}

started=$(date +%s)
rm -rf "$ROOT" "$STAMP"
mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial" "$CACHE/apt/etc" \
         "$CACHE/debs" "$ROOT" "$CACHE/sys"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(mirror) $SUITE main" \
  > "$CACHE/apt/etc/sources.list"
# A private apt state: its own sources, lists and cache; no system sources or lock touched.
APT=(-o "Dir::Etc::sourcelist=$CACHE/apt/etc/sources.list" -o "Dir::Etc::sourceparts=-"
     -o "Dir::State::Lists=$CACHE/apt/lists" -o "Dir::Cache=$CACHE/apt/cache"
     -o "Dir::State::status=/dev/null" -o "Debug::NoLocking=1" -o "APT::Get::List-Cleanup=0"
     -o "APT::Sandbox::User=$(id -un)")

# The packages are kept: a preparation that failed later does not download them again.
if [ "$(cat "$CACHE/debs/complete" 2>/dev/null)" != "$VERSION" ]; then
  echo "apt-get update ($SUITE, $(mirror)) into $CACHE/apt"
  apt-get "${APT[@]}" -q update | grep -E '^(Get|Err|W:|E:)' || true
  candidate=$(apt-cache "${APT[@]}" show --no-all-versions rabbitmq-server | sed -n 's/^Version: //p')
  case "$candidate" in
    "$VERSION"*) ;;
    *) echo "$SUITE has rabbitmq-server $candidate, not $VERSION" \
         "(set MEMORY_WORKER_RABBITMQ4_VERSION to take it)" >&2; exit 1 ;;
  esac

  # rabbitmq-server and every erlang-* package it needs, recursively.
  mapfile -t ERLANG < <(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances rabbitmq-server \
    | grep -E '^erlang-[a-z0-9-]+$' | sort -u)
  cd "$CACHE/debs"
  rm -f ./*.deb complete
  echo "apt-get download rabbitmq-server ${ERLANG[*]} ${LIBS[*]}"
  apt-get "${APT[@]}" -q download rabbitmq-server "${ERLANG[@]}" "${LIBS[@]}" \
    | grep -E '^(Get|Err|W:|E:)' || true
  echo "$VERSION" > "$CACHE/debs/complete"
fi
cd "$CACHE/debs"
for deb in ./*.deb; do dpkg -x "$deb" "$ROOT"; done
echo "unpacked $(ls ./*.deb | wc -l) packages ($(du -cm ./*.deb | tail -n 1 | cut -f1) MB) into $ROOT"

PATCHELF=$(command -v patchelf || true)
if [ -z "$PATCHELF" ]; then
  # bookworm's patchelf, from the machine's own apt lists, unpacked beside the rest.
  mkdir -p "$CACHE/tools"
  (cd "$CACHE/tools" && rm -f ./*.deb && apt-get -q -o "APT::Sandbox::User=$(id -un)" \
     download patchelf && dpkg -x ./patchelf_*.deb "$CACHE/tools/root")
  PATCHELF="$CACHE/tools/root/usr/bin/patchelf"
fi

LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu"
patched=0
while IFS= read -r -d '' file; do
  if [ "$(head -c 4 "$file" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    if "$PATCHELF" --print-interpreter "$file" >/dev/null 2>&1; then
      "$PATCHELF" --set-interpreter "$LIBDIR/ld-linux-x86-64.so.2" "$file"
    fi
    "$PATCHELF" --force-rpath --set-rpath "$LIBDIR" "$file"
    patched=$((patched + 1))
  fi
done < <(find "$ROOT/usr/lib/erlang" -type f -print0)
# The Erlang start scripts name their root; make them name this one.
mapfile -t scripts < <(grep -rlE '^\s*ROOTDIR=/usr/lib/erlang$' "$ROOT/usr/lib/erlang")
sed -i -E "s|^(\s*)ROOTDIR=/usr/lib/erlang\$|\1ROOTDIR=$ROOT/usr/lib/erlang|" "${scripts[@]}"
# /etc/rabbitmq belongs to the shared broker: this tree's scripts look in $CACHE/sys instead.
defaults=$(find "$ROOT/usr/lib/rabbitmq" -name rabbitmq-defaults -path '*/sbin/*')
sed -i -E "s|^SYS_PREFIX=.*|SYS_PREFIX=$CACHE/sys|" $defaults
echo "patched $patched ELF files, ${#scripts[@]} scripts, SYS_PREFIX in $(echo $defaults | wc -w)"

echo "$VERSION" > "$STAMP"
echo "RabbitMQ $VERSION prepared in $CACHE in $(( $(date +%s) - started )) s" \
     "($(du -sm "$ROOT" | cut -f1) MB unpacked)"
