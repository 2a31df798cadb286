"""A private three-node RabbitMQ cluster for fault tests that stop and kill nodes.

Built from `BrokerNode`: each node keeps its name, ports and files across a stop or a
SIGKILL, so it comes back as the same cluster member with its queue replicas. The nodes share
an Erlang cookie (written into each node's private HOME) and one private epmd on a port of
their own (a prepared tree's; nodes of the installed RabbitMQ would register with the
machine's epmd, under names of their own), so nothing of the shared broker's is touched. The
first node forms the cluster; the others `join_cluster` it.

Measured with RabbitMQ 4.3 on 2 shared cores: the cluster forms in 17-30 s (three nodes
booting at once, two joins), a node stops in about 3 s and boots again in 4-10 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.faults.broker_node import (
    STOP_TIMEOUT_S,
    BrokerNode,
    BrokerNodeError,
    Install,
    NodeExited,
    _end,
    start_epmd,
)
from worker.testing import free_port

CLUSTER_SIZE = 3


@dataclass(frozen=True)
class Replicas:
    """Where a quorum queue's replicas are: its leader, its members and those online."""

    leader: str
    members: tuple[str, ...]
    online: tuple[str, ...]


class ClusterNode(BrokerNode):
    """A cluster member: same name, ports and files after `halt`/`kill` and `restart`."""

    def __init__(
        self, base: Path, tag: str, index: int, cookie: str, epmd_port: int, install: Install
    ) -> None:
        super().__init__(install=install)
        self.tag = tag
        self.index = index
        self._base = base
        self._cookie = cookie
        self._cluster_epmd_port = epmd_port

    def spawn(self) -> None:
        """Start the node's server script on its files (first made here); returns at once."""
        if self._dir is None:  # first boot, or a retry after a port was taken
            self.name = f"mw-cluster-{self.tag}-{self.index}@localhost"
            self._dir = Path(tempfile.mkdtemp(prefix=f"node{self.index}-", dir=self._base))
            self.port, self.dist_port = free_port(), free_port()
            self.epmd_port = self._cluster_epmd_port
            self._write_files(self._dir)
            # Every node and every rabbitmqctl reads the cookie from its HOME, the node's folder.
            cookie = self._dir / ".erlang.cookie"
            cookie.write_text(self._cookie)
            cookie.chmod(0o400)
        self._spawn()

    def await_boot(self) -> None:
        """Block until the spawned node accepts AMQP connections (safe in any thread)."""
        self._await_startup()

    def ctl_sync(self, *args: str) -> str:
        """Run `rabbitmqctl -n <node> ARGS` blocking; raise with its output when it fails."""
        result = self._ctl_sync(*args)
        if result.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmqctl -n {self.name} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr or result.stdout}"
            )
        return result.stdout

    def halt(self) -> None:
        """Stop the node cleanly (the Erlang VM exits); its files stay for `restart`."""
        process, self._process = self._process, None
        self.app_running = False
        assert self._dir is not None and process is not None
        self._ctl_sync("stop", str(self._dir / "rabbit.pid"), timeout_s=STOP_TIMEOUT_S)
        _end(process)

    def kill(self) -> int:
        """SIGKILL the node's Erlang VM, by the PID it wrote; returns that PID."""
        process, self._process = self._process, None
        self.app_running = False
        assert self._dir is not None and process is not None
        pid = int((self._dir / "rabbit.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        # The start script waits for the VM: it ends once the VM is gone.
        _end(process)
        return pid

    async def restart(self) -> None:
        """Boot the node again on its files: it rejoins the cluster with its replicas."""
        self.spawn()  # in the event loop's thread, which outlives the node
        await asyncio.to_thread(self.await_boot)


class BrokerCluster:
    """Three private nodes in one cluster; `with BrokerCluster(install) as cluster:` (blocking)."""

    def __init__(self, install: Install, size: int = CLUSTER_SIZE) -> None:
        self.install = install
        self.size = size
        self.nodes: list[ClusterNode] = []
        self._base: Path | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self.formed_in_s = 0.0

    def start(self) -> None:
        """Boot every node at once, then join the others to the first."""
        started = time.monotonic()
        self._base = Path(tempfile.mkdtemp(prefix="mw-cluster-"))
        epmd_port = 0
        if self.install.epmd is not None:
            epmd_port = free_port()
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self._base)}
            self._epmd = start_epmd(self.install.epmd, epmd_port, self._base, env)
        cookie, tag = secrets.token_hex(16), uuid.uuid4().hex[:6]
        self.nodes = [
            ClusterNode(self._base, tag, n + 1, cookie, epmd_port, self.install)
            for n in range(self.size)
        ]
        # Spawned from this thread, booted in parallel: a node dies with the thread that spawned it.
        for node in self.nodes:
            node.spawn()
        with ThreadPoolExecutor(self.size) as pool:
            booted = [pool.submit(node.await_boot) for node in self.nodes]
        for node, future in zip(self.nodes, booted, strict=True):
            if isinstance(future.exception(), NodeExited):
                # Most often a port taken between `free_port()` and the node's bind: new ports.
                node.stop()
                node.spawn()
                node.await_boot()
            else:
                future.result()
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            # A node joins with its application stopped; it then syncs from the seed.
            node.ctl_sync("stop_app")
            node.ctl_sync("join_cluster", seed.name)
            node.ctl_sync("start_app")
            node.ctl_sync("await_startup")
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise BrokerNodeError(f"the cluster formed with {running} running")
        self.formed_in_s = time.monotonic() - started

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as the first node sees them."""
        status = json.loads(self.nodes[0].ctl_sync("cluster_status", "--formatter", "json"))
        return list(status["running_nodes"])

    async def replicas(self, queue: str) -> Replicas:
        """Leader, members and online members of a quorum queue in the default vhost."""
        node = self.nodes[0]
        raw = await node.ctl(
            "list_queues", "name", "leader", "members", "online", "--formatter", "json"
        )
        for row in json.loads(raw):
            if row["name"] == queue:
                return Replicas(row["leader"], tuple(row["members"]), tuple(row["online"]))
        raise BrokerNodeError(f"queue {queue!r} not found on {node.name}")

    def label(self, name: str) -> str:
        """A node's label ("node N") for its Erlang name, for a printout."""
        found = [node.index for node in self.nodes if node.name == name]
        return f"node {found[0]}" if found else name or "none"

    def stop(self) -> None:
        """Stop every node that still runs, then the epmd; remove every file."""
        try:
            with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
                list(pool.map(ClusterNode.stop, self.nodes))
        finally:
            if self._epmd is not None:
                self._epmd.terminate()
                _end(self._epmd)
                self._epmd = None
            if self._base is not None:
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None

    def __repr__(self) -> str:
        return f"<BrokerCluster {self.install.version} {self.nodes}>"

    def __enter__(self) -> BrokerCluster:
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
