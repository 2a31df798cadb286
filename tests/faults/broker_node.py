"""A private RabbitMQ node for tests that stop, restart or disconnect a broker.

The shared broker on 5672 must never be stopped, so these tests start a node of their own on
free ports, with every file in a temporary folder and its Erlang cookie in a temporary HOME.
A node of the installed RabbitMQ shares epmd with any other node on the machine and boots in
about 10 s (more on a busy one).

With `MEMORY_WORKER_TEST_RABBITMQ=4.3` the node runs RabbitMQ 4.3 from the tree that
`tests/rabbitmq4/prepare.sh` unpacks (Debian sid's packages, OTP 29, in a cache directory):
its Erlang goes first on PATH, and it runs an epmd of its own on a port of its own, so
nothing of the shared broker's (its epmd, /etc/rabbitmq) is used.

The node is tied to the test process twice: `stop()` runs `rabbitmqctl stop` and kills what is
left, and on Linux the start script gets SIGTERM if the test process dies without cleaning up
(its trap then stops the node), so no stray `beam.smp` outlives a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from worker.testing import free_port

BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 60.0
# Where distribution packages put the real scripts; /usr/sbin holds Debian's wrapper, which
# switches to the `rabbitmq` user and that user's cookie.
SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/sbin")
#: Which RabbitMQ the tests run on: unset or empty for the installed one, "4.3" for the tree
#: `tests/rabbitmq4/prepare.sh` prepares (the integration suite then starts a node of it).
VERSION_ENV = "MEMORY_WORKER_TEST_RABBITMQ"
PREPARED_VERSIONS = ("4.3",)
#: Where prepare.sh unpacks RabbitMQ 4.3 (its own default; the same variable overrides both).
PREPARED_DIR_ENV = "MEMORY_WORKER_RABBITMQ4_DIR"
PREPARE_SCRIPT = "tests/rabbitmq4/prepare.sh"


class BrokerNodeError(Exception):
    """The private node could not be started or controlled."""


class NodeExited(BrokerNodeError):
    """The node's start script ended while the node was booting."""


def server_script() -> Path | None:
    """The non-wrapper `rabbitmq-server` script, or None when RabbitMQ is not installed."""
    candidates = [shutil.which("rabbitmq-server")]
    candidates += [os.path.join(d, "rabbitmq-server") for d in SCRIPT_DIRS]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            path = Path(candidate).resolve()
            # Debian's rabbitmq-script-wrapper sits beside the real scripts.
            script = path if path.name == "rabbitmq-server" else path.with_name("rabbitmq-server")
            if script.exists() and script.with_name("rabbitmqctl").exists():
                return script
    return None


@dataclass(frozen=True)
class Install:
    """A RabbitMQ to start nodes from: its scripts, and the Erlang they need if not the system's."""

    version: str
    server: Path
    #: A prepared tree's Erlang bin folder: first on PATH (its escripts and `erl` are found
    #: there); such a node also gets an epmd of its own.
    erlang_bin: Path | None = None

    @property
    def ctl(self) -> Path:
        """The `rabbitmqctl` script beside the server script."""
        return self.server.with_name("rabbitmqctl")

    @property
    def epmd(self) -> Path | None:
        """The epmd a node of this tree runs privately, or None to share the machine's."""
        return None if self.erlang_bin is None else self.erlang_bin / "epmd"


def prepared_dir() -> Path:
    """Where prepare.sh puts RabbitMQ 4.3 ($MEMORY_WORKER_RABBITMQ4_DIR or its default)."""
    default = Path.home() / ".cache" / "memory-worker" / "rabbitmq-4.3"
    return Path(os.environ.get(PREPARED_DIR_ENV) or default)


def selected_version() -> str:
    """The RabbitMQ version asked for with $MEMORY_WORKER_TEST_RABBITMQ ("" when installed)."""
    version = os.environ.get(VERSION_ENV, "").strip()
    if version and version not in PREPARED_VERSIONS:
        raise BrokerNodeError(f"{VERSION_ENV}={version}: only {PREPARED_VERSIONS} are known")
    return version


def find_install(version: str | None = None) -> Install:
    """The installed RabbitMQ, or a prepared one; raise with what to do when it is missing."""
    version = selected_version() if version is None else version
    if not version:
        script = server_script()
        if script is None:
            raise BrokerNodeError("RabbitMQ is not installed: no rabbitmq-server script found")
        return Install("installed", script)
    root = prepared_dir()
    stamp = root / "prepared"
    if not stamp.exists() or not stamp.read_text().startswith(version):
        raise BrokerNodeError(f"RabbitMQ {version} is not prepared in {root}: run {PREPARE_SCRIPT}")
    tree = root / "root" / "usr" / "lib"
    return Install(version, tree / "rabbitmq" / "bin" / "rabbitmq-server", tree / "erlang" / "bin")


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the test process dies."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class BrokerNode:
    """Start a private RabbitMQ node; control it with rabbitmqctl; stop it and remove its files.

    Use as `with BrokerNode() as node:` (blocking, for fixtures) and call the async `stop_app`,
    `start_app` and `close_all_connections` from tests.
    """

    def __init__(
        self,
        consumer_timeout_ms: int | None = None,
        management: bool = False,
        install: Install | None = None,
    ) -> None:
        self.install = install or find_install()
        self.server = self.install.server
        self.ctl_path = self.install.ctl
        self.name = ""
        self.port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self._epmd: subprocess.Popen[bytes] | None = None
        self.app_running = False
        self._consumer_timeout_ms = consumer_timeout_ms
        self._management = management
        self.management_port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def management_url(self) -> str:
        """The management API's base URL with guest's credentials (management=True only)."""
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    @property
    def amqp_url(self) -> str:
        """The node's AMQP URL (guest/guest, default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        assert self._dir is not None
        base = self._dir
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        if self.install.erlang_bin is not None:
            # Nothing of the machine's Erlang or broker: no inherited flags, every path set here.
            for name in ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_LIBS"):
                env.pop(name, None)
            env["PATH"] = f"{self.install.erlang_bin}{os.pathsep}{env.get('PATH', '')}"
            env.update(
                {
                    "ERL_EPMD_PORT": str(self.epmd_port),
                    "ERL_EPMD_ADDRESS": "127.0.0.1",
                    "RABBITMQ_SERVER_START_ARGS": "-start_epmd false",
                    "RABBITMQ_MNESIA_DIR": str(base / "mnesia" / self.name),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                    "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
                }
            )
        env.update(
            {
                "HOME": str(base),
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            }
        )
        return env

    def _write_files(self, base: Path) -> None:
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        plugins = "[rabbitmq_management]" if self._management else "[]"
        (base / "enabled_plugins").write_text(f"{plugins}.\n")
        (base / "rabbitmq-env.conf").write_text("")
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "log.file.level = info"]
        if self._consumer_timeout_ms is not None:
            lines.append(f"consumer_timeout = {self._consumer_timeout_ms}")
        if self._management:
            port = self.management_port
            lines += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {port}"]
        (base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Boot the node and wait until it accepts AMQP connections; once more if it exits."""
        try:
            self._boot()
        except NodeExited:
            # Most often a port taken by someone else between `free_port()` and the node's bind.
            self.stop()
            self._boot()

    def _boot(self) -> None:
        self.name = f"mw-test-{uuid.uuid4().hex[:8]}@localhost"
        self._dir = Path(tempfile.mkdtemp(prefix="mw-rabbit-"))
        self.port, self.dist_port = free_port(), free_port()
        self.management_port = free_port() if self._management else 0
        self._write_files(self._dir)
        self._start_epmd()
        self._spawn()
        self._await_startup()

    def _spawn(self) -> None:
        """Run the server script on the node's files (`_await_startup` waits for it).

        Call it from a thread that outlives the node: the script's parent-death signal fires
        when the thread that started it ends, not only the process.
        """
        assert self._dir is not None
        # Appended: a restarted node's earlier output stays readable in `log_tail`.
        output = (self._dir / "server.out").open("ab")
        with output:
            self._process = subprocess.Popen(
                [str(self.server)],
                env=self._env(),
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest does not reach the node
                # subprocess has no other way to set a parent-death signal (a prctl in the child).
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    def _start_epmd(self) -> None:
        """A prepared tree's node gets an epmd of its own, stopped with the node."""
        if self.install.epmd is None:
            return
        assert self._dir is not None
        self.epmd_port = free_port()
        self._epmd = start_epmd(self.install.epmd, self.epmd_port, self._dir, self._env())

    def _await_startup(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise NodeExited(
                    f"RabbitMQ node {self.name} stopped while booting (script exit "
                    f"{self._process.returncode})\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerNodeError(
                    f"RabbitMQ node {self.name} did not boot within {BOOT_TIMEOUT_S:.0f} s"
                    f"\n{self.log_tail()}"
                )
            # Fails at once while the Erlang VM is not reachable yet, so poll it.
            wait_s = max(1, int(remaining))
            result = self._ctl_sync(
                "await_startup", "--timeout", str(wait_s), timeout_s=wait_s + 10
            )
            if result.returncode == 0 and self._accepts_amqp():
                self.app_running = True
                return
            time.sleep(0.5)

    def _accepts_amqp(self) -> bool:
        return _listens(self.port)

    def _ctl_sync(
        self, *args: str, timeout_s: float = CTL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(self.ctl_path), "-q", "-n", self.name, *args],
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, -1, "", f"timed out after {timeout_s} s")

    async def ctl(self, *args: str) -> str:
        """Run `rabbitmqctl -n <node> ARGS`; raise with its output when it fails."""
        process = await asyncio.create_subprocess_exec(
            str(self.ctl_path),
            "-q",
            "-n",
            self.name,
            *args,
            env=self._env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), CTL_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise BrokerNodeError(f"rabbitmqctl {' '.join(args)} timed out") from None
        if process.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmqctl {' '.join(args)} failed ({process.returncode}): "
                f"{err.decode() or out.decode()}"
            )
        return out.decode()

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application: every connection drops and the port closes."""
        self.app_running = False  # first: a failed stop must still be undone by `start_app`
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        """Start the application again and wait until it accepts AMQP connections."""
        await self.ctl("start_app")
        await self.ctl("await_startup")
        self.app_running = True

    async def ensure_running(self) -> None:
        """Start the application if a test stopped it (for `finally:` blocks)."""
        if not self.app_running:
            await self.start_app()

    async def close_all_connections(self, reason: str = "fault test") -> None:
        """Close every client connection on the node."""
        await self.ctl("close_all_connections", reason)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's log and of its start script's output."""
        if self._dir is None:
            return ""
        parts = []
        logs = sorted((self._dir / "log").glob("*.log"))
        for path in [self._dir / "server.out", self._dir / "epmd.out", *logs]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the node (orderly, then by force) and remove its files."""
        process, self._process = self._process, None
        epmd, self._epmd = self._epmd, None
        try:
            if process is not None and process.poll() is None:
                assert self._dir is not None
                # With the pid file, `stop` returns once the Erlang VM has exited.
                self._ctl_sync("stop", str(self._dir / "rabbit.pid"), timeout_s=STOP_TIMEOUT_S)
                _end(process)
        finally:
            if epmd is not None:
                epmd.terminate()
                _end(epmd)
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __repr__(self) -> str:
        state = "running" if self.app_running else "stopped"
        return f"<BrokerNode {self.install.version} {self.name} :{self.port} {state}>"

    def __enter__(self) -> BrokerNode:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_epmd(epmd: Path, port: int, folder: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a private epmd on 127.0.0.1:`port`, its output in `folder`; wait until it listens."""
    with (folder / "epmd.out").open("wb") as output:
        process = subprocess.Popen(
            [str(epmd), "-port", str(port), "-address", "127.0.0.1"],
            env=env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    deadline = time.monotonic() + 10
    while not _listens(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()  # by its PID: it is ours
            process.wait()
            raise NodeExited(f"epmd on port {port} did not start")
        time.sleep(0.05)
    return process


def _listens(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
        return True
    return False


def _end(process: subprocess.Popen[bytes]) -> None:
    """Wait for a process started here; kill its process group (by its PID) if it lingers."""
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)
