#!/usr/bin/env bash
# Run the real Session-Buddy MCP server (installed by install.sh) on loopback, in the
# foreground: this script execs the server, so SIGTERM (or Ctrl-C) to this PID stops it.
#
# Usage: run.sh [PORT]            (PORT defaults to 8678)
# Env:   SESSION_BUDDY_HOME       install prefix (default $HOME/.cache/memory-worker/session-buddy)
#        SESSION_BUDDY_STATE      folder for the server's HOME and working directory
#                                 (default $SESSION_BUDDY_HOME/state/PORT; kept across runs,
#                                 so stored reflections persist; point it at an empty folder
#                                 for a fresh database)
#        SESSION_BUDDY_START_TIMEOUT  seconds to wait for /healthz (default 120)
# Prints "Session-Buddy ready: MCP URL http://127.0.0.1:PORT/mcp" once /healthz answers.
set -euo pipefail

log() { printf '[session-buddy run] %s\n' "$*"; }
die() { printf '[session-buddy run] ERROR: %s\n' "$*" >&2; exit 1; }

PORT=${1:-8678}
case "$PORT" in ''|*[!0-9]*) die "PORT must be a number, got '$PORT'" ;; esac
PREFIX=${SESSION_BUDDY_HOME:-$HOME/.cache/memory-worker/session-buddy}
VENV=$PREFIX/venv
[ -x "$VENV/bin/session-buddy" ] && [ -x "$VENV/bin/python" ] \
  || die "no session-buddy in $VENV: run $(dirname "$0")/install.sh $PREFIX first"
STATE=${SESSION_BUDDY_STATE:-$PREFIX/state/$PORT}
TIMEOUT=${SESSION_BUDDY_START_TIMEOUT:-120}
BASE=http://127.0.0.1:$PORT

# Refuse a port that already answers (another server, or a stale one).
if "$VENV/bin/python" - "$PORT" <<'EOF'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
then die "127.0.0.1:$PORT is already in use"; fi

# The server initialises a session for the git repository it finds in its working
# directory, so run it from a folder that is not inside one, with a scratch HOME.
mkdir -p "$STATE/home" "$STATE/cwd"
STATE=$(cd "$STATE" && pwd -P)
export GIT_CEILING_DIRECTORIES=$STATE
if command -v git >/dev/null && git -C "$STATE/cwd" rev-parse --git-dir >/dev/null 2>&1; then
  die "$STATE/cwd is inside a git repository; set SESSION_BUDDY_STATE elsewhere"
fi
cd "$STATE/cwd"

export HOME=$STATE/home
export ONEIRIC_MCP_HTTP_PORT=$PORT
export FASTMCP_CHECK_FOR_UPDATES=off
export HF_HUB_OFFLINE=1
# It posts every item to an embedding server: port 9 (discard) refuses at once.
export MAHAVISHNU__LLAMA_SERVER_URL=http://127.0.0.1:9/v1
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME LD_LIBRARY_PATH

log "PREFIX=$PREFIX STATE=$STATE PORT=$PORT"
log "exec session-buddy server start (pid $$; SIGTERM stops it)"

# Watcher: waits for /healthz, prints the MCP URL, and stops the server if it never gets
# ready. It exits on its own once the server is ready or gone. Started from a subshell so
# that it is not a child of the server (no zombie left behind).
( "$VENV/bin/python" - "$BASE" "$$" "$TIMEOUT" <<'EOF' &
import os, signal, sys, time, urllib.request
base, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
while time.monotonic() - t0 < timeout:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(0)  # server already gone
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
            if r.status == 200:
                print("[session-buddy run] Session-Buddy ready after %.1f s: MCP URL %s/mcp"
                      % (time.monotonic() - t0, base), flush=True)
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.25)
print("[session-buddy run] ERROR: %s/healthz did not answer within %.0f s; stopping the server"
      % (base, timeout), file=sys.stderr, flush=True)
try:
    os.kill(pid, signal.SIGTERM)
except OSError:
    pass
sys.exit(1)
EOF
)

exec "$VENV/bin/session-buddy" server start
