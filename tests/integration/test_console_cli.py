"""`memory-worker console` as a process: it serves until SIGTERM and refuses an open bind."""

from __future__ import annotations

import asyncio
import signal
import sys

import httpx
import pytest

from tests.integration.helpers import SPAWNED, declared, rejected_dead_letters, worker_env
from worker.exitcodes import EXIT_USAGE

pytestmark = pytest.mark.integration


async def console_process(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    """Start `python -m worker console ARGS`; killed at test end if still alive."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "console",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    SPAWNED.append(process)
    return process


async def test_console_serves_the_dead_letters_until_sigterm(make_settings, connection):
    """The command prints its URL, serves the groups, and exits 0 on SIGTERM."""
    settings, topology = await declared(make_settings, connection)
    await rejected_dead_letters(connection, topology, 3)
    process = await console_process(worker_env(settings), "--port", "0", "--read-only")
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    url = line.decode().strip().rpartition(" ")[2]
    assert url.startswith("http://127.0.0.1:")
    # A read of the DLQ waits for a quorum queue to take its messages back: seconds on a busy
    # shared broker, more than httpx's default timeout.
    async with httpx.AsyncClient(timeout=30) as client:
        page = await client.get(f"{url}/dlq")
        post = await client.post(f"{url}/actions/purge", headers={"Sec-Fetch-Site": "same-origin"})
    assert page.status_code == 200 and 'data-reason="rejected_by_sink"' in page.text
    assert post.status_code == 405
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_console_refuses_an_open_address_without_a_token(make_settings):
    """Binding 0.0.0.0 without console.token or --insecure exits 2 and says why."""
    process = await console_process(worker_env(make_settings()), "--host", "0.0.0.0")
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == EXIT_USAGE and "console.token" in err.decode()
