"""The `memory-worker check` command (and the tools on several addresses) against a real broker."""

from __future__ import annotations

import asyncio
import json
import sys

import aiormq
import pytest

from tests.integration.helpers import item, publish_items, worker_env
from worker.broker import shown
from worker.exitcodes import EXIT_CONFIG, EXIT_FAILED, EXIT_UNAVAILABLE
from worker.testing import StandIn, free_port

pytestmark = pytest.mark.integration


async def _check(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "check", env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def test_check_passes_when_broker_and_sink_answer(make_settings):
    """`check` exits 0 and says ok for the broker and for Session-Buddy."""
    async with StandIn() as sb:
        code, out = await _check(worker_env(make_settings(pools={"session_buddy_url": sb.url})))
    assert code == 0, out
    assert "broker amqp://guest:***@" in out and f"sink {sb.url}: ok" in out


async def test_check_names_the_sink_that_does_not_answer(make_settings):
    """`check` exits 1 and names Session-Buddy when nothing listens at its URL."""
    url = "http://127.0.0.1:9/mcp"
    code, out = await _check(worker_env(make_settings(pools={"session_buddy_url": url})))
    assert code == EXIT_FAILED
    assert f"sink {url}: FAILED" in out


async def test_check_reaches_the_shared_ledger(make_settings, redis_url):
    """With ledger.url set, `check` also pings Redis and says ok."""
    async with StandIn() as sb:
        env = worker_env(make_settings(pools={"session_buddy_url": sb.url}))
        code, out = await _check({**env, "MAHAVISHNU_LEDGER__URL": redis_url})
    assert code == 0, out
    assert "ledger redis://" in out and out.rstrip().endswith("ok")


async def test_check_names_a_ledger_that_does_not_answer(make_settings):
    """A Redis URL where nothing listens makes `check` exit 1 and name the ledger."""
    async with StandIn() as sb:
        env = worker_env(make_settings(pools={"session_buddy_url": sb.url}))
        code, out = await _check({**env, "MAHAVISHNU_LEDGER__URL": "redis://127.0.0.1:9/0"})
    assert code == EXIT_FAILED
    assert "ledger redis://127.0.0.1:9/0: FAILED" in out


async def _run(env: dict[str, str]) -> tuple[int, str, float]:
    """`memory-worker run` until it exits: exit code, stderr, seconds it took."""
    started = asyncio.get_running_loop().time()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "run", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode(), asyncio.get_running_loop().time() - started


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://guest:not-the-password@{host}/", "refused the login of user 'guest'"),
        ("amqp://guest:guest@{host}/no-such-vhost", "refused vhost 'no-such-vhost'"),
    ],
)
async def test_a_refused_login_or_vhost_fails_at_once_as_a_settings_error(
    make_settings, amqp_url, url, says
):
    """A wrong password or an unknown vhost is not an outage: exit 78 at once, saying which."""
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    env = worker_env(make_settings(), MAHAVISHNU_RABBITMQ__URL=url.format(host=host))
    env["MAHAVISHNU_RABBITMQ__STARTUP_WAIT_S"] = "30"
    code, stderr, _ = await _run(env)
    assert code == EXIT_CONFIG, stderr
    assert says in stderr and "not-the-password" not in stderr
    assert "broker_unreachable" not in stderr  # never retried


async def test_startup_wait_is_waited_out_in_full(make_settings):
    """With nothing listening, `run` retries for all of rabbitmq.startup_wait_s, then exits 69."""
    env = worker_env(make_settings(), MAHAVISHNU_RABBITMQ__URL="amqp://guest:guest@127.0.0.1:9/")
    env["MAHAVISHNU_RABBITMQ__STARTUP_WAIT_S"] = "3"
    code, stderr, took_s = await _run(env)
    assert code == EXIT_UNAVAILABLE, stderr
    assert took_s >= 3.0


async def test_check_is_a_dry_run_of_run(make_settings, connection):
    """`check` refuses what `run` refuses, with run's exit code, and changes nothing: an
    over-long timeout is 78, a queue with other arguments is 78, a missing tool is 78."""
    async with StandIn() as sb:
        settings = make_settings(pools={"session_buddy_url": sb.url})
        env = worker_env(settings)
        code, out = await _check({**env, "MAHAVISHNU_SINK__TIMEOUT_S": "1000"})
        assert code == EXIT_CONFIG and "sink.timeout_s" in out
        code, out = await _check({**env, "MAHAVISHNU_SINK__TOOL": "no_such_tool"})
        assert code == EXIT_CONFIG and "lacks the tool 'no_such_tool'" in out
        code, out = await _check(env)
        assert code == 0 and "to be declared by run" in out
        async with connection.channel() as channel:
            await channel.declare_queue(settings.rabbitmq.queue, durable=True)  # classic
        code, out = await _check(env)
        assert code == EXIT_CONFIG and "already exists with other arguments" in out
    # Only the queue made above exists: check declared nothing of its own.
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        async with connection.channel() as channel:
            await channel.declare_queue(settings.rabbitmq.dead_letter_queue, passive=True)


async def _tool(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`memory-worker ARGS` until it exits: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_tools_use_the_second_address_when_the_first_is_down(
    make_settings, amqp_url, connection, tmp_path
):
    """With the first of two addresses dead, check, publish and dlq work on the second, each
    logging one masked broker_failover line; check names the node that answered."""
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    async with StandIn() as sb:
        settings = make_settings(
            pools={"session_buddy_url": sb.url}, rabbitmq={"url": f"{dead},{amqp_url}"}
        )
        await publish_items(connection, settings, 0)  # the topology, for publish and dlq
        env = worker_env(settings)
        checked = await _tool(env, "check")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(item(n)) + "\n" for n in range(3)))
    published = await _tool(env, "publish", str(items))
    stats = await _tool(env, "dlq", "stats", "--json")
    for code, out, err in (checked, published, stats):
        assert code == 0, out + err
        assert err.count('"broker_failover"') == 1, err
        assert "guest:guest" not in out + err
    assert f"broker {shown(amqp_url)} (one of 2 addresses): ok" in checked[1]
    assert "published 3 of 3 item(s), 0 not confirmed" in published[1]
    assert json.loads(stats[1])["depth"] == 0


async def test_check_with_no_address_answering_names_each_and_exits_69(make_settings):
    """Every address down: check exits 69 and says why each failed, passwords masked."""
    ports = (free_port(), free_port())
    urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports]
    env = worker_env(make_settings(), MAHAVISHNU_RABBITMQ__URL=",".join(urls))
    code, out = await _check(env)
    assert code == EXIT_UNAVAILABLE, out
    broker = next(line for line in out.splitlines() if line.startswith("broker "))
    for port in ports:
        assert f"amqp://guest:***@127.0.0.1:{port}/: " in broker
    assert broker.count(": connection refused") == 2
    assert "guest:guest" not in out
