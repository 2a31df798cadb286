"""The Session-Buddy stand-in, driven over loopback with httpx and with the official MCP client."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from worker.testing import StandIn, StandInConfig, StoreCall

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "test", "version": "0"},
}
SUCCESS = "💾 Reflection stored successfully!"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def sb() -> AsyncIterator[StandIn]:
    async with StandIn(StandInConfig(seed=7), host="127.0.0.1", port=0) as standin:
        yield standin


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def sse_message(response: httpx.Response) -> dict[str, Any]:
    """The one JSON-RPC message carried by an SSE answer."""
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("event: message\r\ndata: ")
    data = response.text.split("data: ", 1)[1].strip()
    message: dict[str, Any] = orjson.loads(data)
    return message


async def open_session(http: httpx.AsyncClient, sb: StandIn) -> dict[str, str]:
    """Initialize, send notifications/initialized, and return headers carrying the session."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
    response = await http.post(sb.url, headers=ACCEPT, json=init)
    assert response.status_code == 200
    headers = {**ACCEPT, "mcp-session-id": response.headers["mcp-session-id"]}
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await http.post(sb.url, headers=headers, json=note)).status_code == 202
    return headers


async def call(
    http: httpx.AsyncClient,
    sb: StandIn,
    headers: dict[str, str],
    arguments: object,
    name: str = "store_reflection",
) -> httpx.Response:
    """Send one tools/call."""
    params = {"name": name, "arguments": arguments}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    return await http.post(sb.url, headers=headers, json=body)


async def store(
    http: httpx.AsyncClient, sb: StandIn, headers: dict[str, str], arguments: object
) -> tuple[str, bool]:
    """Call store_reflection and return its (text, isError)."""
    response = await call(http, sb, headers, arguments)
    assert response.status_code == 200
    result = sse_message(response)["result"]
    return result["content"][0]["text"], result["isError"]


async def test_session_flow_stores_with_success_text(sb: StandIn, http: httpx.AsyncClient) -> None:
    """initialize gives a hex session id and server info; a store answers the success text."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
    response = await http.post(sb.url, headers=ACCEPT, json=init)
    sid = response.headers["mcp-session-id"]
    int(sid, 16)
    result = sse_message(response)["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["serverInfo"]["name"] == "session-buddy"
    assert "tools" in result["capabilities"]
    headers = await open_session(http, sb)
    text, is_error = await store(http, sb, headers, {"content": "hello", "tags": ["a", "b"]})
    assert text.splitlines()[0] == SUCCESS and "a, b" in text and not is_error
    assert sb.items == [
        {
            "content": "hello",
            "tags": ["a", "b"],
            "project": None,
            "source_session_id": None,
            "source_artifact_uri": None,
        }
    ]
    stats = sb.stats
    assert (stats.calls, stats.stored, stats.sessions_opened) == (1, 1, 2)


async def test_on_store_sees_each_store_and_may_answer_instead(
    sb: StandIn, http: httpx.AsyncClient
) -> None:
    """`on_store` sees each valid store with its key; a response it returns replaces the store."""
    seen: list[StoreCall] = []

    async def on_store(call: StoreCall) -> web.StreamResponse | None:
        seen.append(call)
        return web.Response(status=503) if call.content == "refuse me" else None

    sb.on_store = on_store
    headers = await open_session(http, sb)
    text, _ = await store(http, sb, headers, {"content": "hello", "source_session_id": "k-1"})
    assert text.startswith(SUCCESS)
    refused = {"content": "refuse me", "source_session_id": "k-2"}
    assert (await call(http, sb, headers, refused)).status_code == 503
    plain = await http.post(f"{sb.base_url}/memory", json={"content": "plain"})
    assert plain.status_code == 201
    keys = [(c.key, c.content) for c in seen]
    assert keys == [("k-1", "hello"), ("k-2", "refuse me"), (None, "plain")]
    assert [row["content"] for row in sb.items] == ["hello", "plain"]


async def test_tools_list_describes_store_reflection(sb: StandIn, http: httpx.AsyncClient) -> None:
    """tools/list offers store_reflection with content required and no extra properties."""
    headers = await open_session(http, sb)
    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    tools = sse_message(await http.post(sb.url, headers=headers, json=body))["result"]["tools"]
    schema = next(t for t in tools if t["name"] == "store_reflection")["inputSchema"]
    assert schema["required"] == ["content"] and schema["additionalProperties"] is False
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}


async def test_missing_session_is_400(sb: StandIn, http: httpx.AsyncClient) -> None:
    """A non-initialize request without a session header gets 400 Missing session ID."""
    response = await call(http, sb, ACCEPT, {"content": "x"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Bad Request: Missing session ID"


async def test_unknown_and_forgotten_sessions_are_404(sb: StandIn, http: httpx.AsyncClient) -> None:
    """An unknown session id, or one dropped by forget_sessions(), gets 404 Session not found."""
    response = await call(http, sb, {**ACCEPT, "mcp-session-id": "deadbeef"}, {"content": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Session not found"
    headers = await open_session(http, sb)
    sb.forget_sessions()
    response = await call(http, sb, headers, {"content": "x"})
    assert response.status_code == 404
    assert sb.stats.stored == 0


async def test_delete_ends_the_session(sb: StandIn, http: httpx.AsyncClient) -> None:
    """DELETE /mcp with a session answers 200 and the session then answers 404."""
    headers = await open_session(http, sb)
    assert (await http.delete(sb.url, headers=headers)).status_code == 200
    assert (await call(http, sb, headers, {"content": "x"})).status_code == 404


async def test_wrong_accept_is_406(sb: StandIn, http: httpx.AsyncClient) -> None:
    """A POST that does not accept both JSON and SSE gets 406."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    response = await http.post(sb.url, headers=headers, json=init)
    assert response.status_code == 406
    assert sb.stats.sessions_opened == 0


async def test_empty_content_is_a_soft_error(sb: StandIn, http: httpx.AsyncClient) -> None:
    """Blank content answers isError false with the ❌ validation text, and nothing is stored."""
    headers = await open_session(http, sb)
    text, is_error = await store(http, sb, headers, {"content": "   "})
    assert text == "❌ Validation error: Store reflection - content cannot be empty"
    assert not is_error and sb.stats.stored == 0 and sb.stats.rejected == 1


async def test_bad_project_is_a_soft_error(sb: StandIn, http: httpx.AsyncClient) -> None:
    """A project outside ^[a-zA-Z0-9._-]{1,128}$ answers isError false with the ❌ text."""
    headers = await open_session(http, sb)
    text, is_error = await store(http, sb, headers, {"content": "x", "project": "a b"})
    assert text.startswith("❌ Validation error: Store reflection - project must match")
    assert not is_error and sb.stats.stored == 0


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"content": "x", "tags": "a"}, "tags\n  Input should be a valid list"),
        ({"content": "x", "tags": {"a": 1}}, "tags\n  Input should be a valid list"),
        ({"tags": ["a"]}, "content\n  Field required"),
        ({"content": "x", "metadata": {}}, "metadata\n  Extra inputs are not permitted"),
    ],
)
async def test_bad_arguments_are_hard_errors(
    sb: StandIn, http: httpx.AsyncClient, arguments: object, expected: str
) -> None:
    """Wrong types, missing content or unexpected arguments answer isError true, pydantic text."""
    headers = await open_session(http, sb)
    text, is_error = await store(http, sb, headers, arguments)
    assert is_error
    assert text.startswith("1 validation error for store_reflectionArguments\n")
    assert expected in text
    assert sb.stats.stored == 0


async def test_unknown_tool(sb: StandIn, http: httpx.AsyncClient) -> None:
    """An unknown tool answers isError true with Unknown tool: 'NAME'."""
    headers = await open_session(http, sb)
    response = await call(http, sb, headers, {"content": "x"}, name="store_memory")
    result = sse_message(response)["result"]
    assert result == {
        "content": [{"type": "text", "text": "Unknown tool: 'store_memory'"}],
        "isError": True,
    }


async def test_long_content_is_truncated_and_quarantined(
    sb: StandIn, http: httpx.AsyncClient
) -> None:
    """Content over 10,000 characters is stored cut to 10,000 and tagged quarantine."""
    headers = await open_session(http, sb)
    text, is_error = await store(http, sb, headers, {"content": "x" * 12_000, "tags": ["t"]})
    assert text.startswith(SUCCESS) and not is_error
    (item,) = sb.items
    assert len(item["content"]) == 10_000 and item["tags"] == ["t", "quarantine"]
    assert sb.stats.truncated == 1


async def test_duplicates_are_counted_by_key(sb: StandIn, http: httpx.AsyncClient) -> None:
    """Rows count by source_session_id, else by content; repeats are duplicates, still stored."""
    headers = await open_session(http, sb)
    for arguments in (
        {"content": "a", "source_session_id": "k1"},
        {"content": "b", "source_session_id": "k1"},
        {"content": "same"},
        {"content": "same"},
        {"content": "other"},
    ):
        await store(http, sb, headers, arguments)
    stats = sb.stats
    assert (stats.stored, stats.distinct_keys, stats.duplicates) == (5, 3, 2)


@pytest.mark.parametrize(("knob", "status"), [("error_503", 503), ("error_429", 429)])
async def test_error_knobs(sb: StandIn, http: httpx.AsyncClient, knob: str, status: int) -> None:
    """At probability 1.0 every call answers the fault's status (429 with Retry-After)."""
    headers = await open_session(http, sb)
    setattr(sb.config, knob, 1.0)
    sb.config.retry_after_s = 2
    response = await call(http, sb, headers, {"content": "x"})
    assert response.status_code == status
    if status == 429:
        assert response.headers["Retry-After"] == "2"
    assert sb.stats.faults == {knob: 1} and sb.stats.stored == 0


async def test_reset_knob_closes_the_connection(sb: StandIn, http: httpx.AsyncClient) -> None:
    """The reset fault drops the connection without an answer and stores nothing."""
    headers = await open_session(http, sb)
    sb.config.reset = 1.0
    with pytest.raises(httpx.TransportError):
        await call(http, sb, headers, {"content": "x"})
    assert sb.stats.faults == {"reset": 1} and sb.stats.stored == 0


async def test_commit_then_fail_stores_then_500(sb: StandIn, http: httpx.AsyncClient) -> None:
    """commit_then_fail stores the row and still answers 500."""
    headers = await open_session(http, sb)
    sb.config.commit_then_fail = 1.0
    response = await call(http, sb, headers, {"content": "x"})
    assert response.status_code == 500
    assert sb.stats.stored == 1 and sb.items[0]["content"] == "x"


async def test_reject_knob_is_the_memory_guard(sb: StandIn, http: httpx.AsyncClient) -> None:
    """The reject fault answers isError true with the memory guard's text and stores nothing."""
    headers = await open_session(http, sb)
    sb.config.reject = 1.0
    text, is_error = await store(http, sb, headers, {"content": "x"})
    assert (text, is_error) == ("Memory guard blocked write: rule=test", True)
    assert sb.stats.stored == 0 and sb.stats.rejected == 1


async def test_hold_and_release(sb: StandIn, http: httpx.AsyncClient) -> None:
    """hold() parks new store calls (counted in held) until release() lets them finish."""
    headers = await open_session(http, sb)
    sb.hold()
    calls = [asyncio.create_task(store(http, sb, headers, {"content": f"{i}"})) for i in range(3)]
    for _ in range(100):
        if sb.held == 3:
            break
        await asyncio.sleep(0.01)
    assert sb.held == 3 and sb.stats.stored == 0 and sb.stats.in_flight == 3
    sb.release()
    results = await asyncio.gather(*calls)
    assert all(text.startswith(SUCCESS) for text, _ in results)
    assert sb.held == 0 and sb.stats.stored == 3 and sb.stats.peak_in_flight == 3


async def test_waiting_counts_held_calls_until_their_client_leaves(sb: StandIn) -> None:
    """`waiting` counts in-flight store calls whose client is still connected; `calls` all calls."""
    sb.hold()
    async with httpx.AsyncClient(timeout=5) as patient, httpx.AsyncClient(timeout=5) as leaving:
        stays = asyncio.create_task(
            store(patient, sb, await open_session(patient, sb), {"content": "a"})
        )
        headers = await open_session(leaving, sb)
        goes = [
            asyncio.create_task(store(leaving, sb, headers, {"content": f"{i}"})) for i in range(2)
        ]
        for _ in range(200):
            if sb.held == 3:
                break
            await asyncio.sleep(0.01)
        assert sb.stats.waiting == 3 and sb.stats.calls == 3
        for task in goes:
            task.cancel()
        await asyncio.gather(*goes, return_exceptions=True)
        await leaving.aclose()
        for _ in range(200):
            if sb.stats.waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert sb.stats.waiting == 1 and sb.stats.in_flight == 3
        sb.release()
        assert (await stays)[0].startswith(SUCCESS)
    assert sb.stats.waiting == 0 and sb.stats.calls == 3


async def test_max_concurrency_serialises_calls(sb: StandIn, http: httpx.AsyncClient) -> None:
    """With max_concurrency 1 and 50 ms per call, four calls take about 200 ms."""
    headers = await open_session(http, sb)
    sb.config.max_concurrency = 1
    sb.config.latency_s = 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(store(http, sb, headers, {"content": f"{i}"}) for i in range(4)))
    assert loop.time() - started >= 0.2
    assert sb.stats.peak_in_flight == 4


async def test_outage_window(sb: StandIn, http: httpx.AsyncClient) -> None:
    """During outage() every /mcp request gets 503; afterwards the session works again."""
    headers = await open_session(http, sb)
    sb.outage(0.2)
    assert (await call(http, sb, headers, {"content": "x"})).status_code == 503
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
    assert (await http.post(sb.url, headers=ACCEPT, json=init)).status_code == 503
    await asyncio.sleep(0.25)
    text, _ = await store(http, sb, headers, {"content": "x"})
    assert text.startswith(SUCCESS)


async def test_status_for_all(sb: StandIn, http: httpx.AsyncClient) -> None:
    """status_for_all=401 answers 401 to every MCP request, initialize included."""
    sb.config.status_for_all = 401
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS}
    assert (await http.post(sb.url, headers=ACCEPT, json=init)).status_code == 401
    assert (await call(http, sb, ACCEPT, {"content": "x"})).status_code == 401
    assert (await http.get(f"{sb.base_url}/healthz")).status_code == 200


async def test_plain_memory_mode(sb: StandIn, http: httpx.AsyncClient) -> None:
    """POST /memory stores with 201, refuses a repeated Idempotency-Key with 409, no content 422."""
    sb.config.conflict_on_duplicate = True
    url = f"{sb.base_url}/memory"
    body = {"content": "hello", "metadata": {"source": "t"}}
    first = await http.post(url, json=body, headers={"Idempotency-Key": "k1"})
    assert (first.status_code, first.json()) == (201, {"stored": True})
    again = await http.post(url, json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 409
    assert (await http.post(url, json={"metadata": {}})).status_code == 422
    assert sb.stats.stored == 1 and sb.stats.duplicates == 1
    assert sb.items[0]["metadata"] == {"source": "t"}


async def test_control_routes(sb: StandIn, http: httpx.AsyncClient) -> None:
    """The /_standin routes patch the config, hold, release, reset and report stats."""
    patched = await http.post(f"{sb.base_url}/_standin/config", json={"latency_s": 0.01})
    assert patched.json()["latency_s"] == 0.01 and sb.config.latency_s == 0.01
    assert (await http.post(f"{sb.base_url}/_standin/config", json={"nope": 1})).status_code == 400
    headers = await open_session(http, sb)
    await http.post(f"{sb.base_url}/_standin/hold")
    task = asyncio.create_task(store(http, sb, headers, {"content": "x"}))
    for _ in range(100):
        if (await http.get(f"{sb.base_url}/_standin/stats")).json()["held"] == 1:
            break
        await asyncio.sleep(0.01)
    await http.post(f"{sb.base_url}/_standin/release")
    await task
    assert (await http.get(f"{sb.base_url}/_standin/stats")).json()["stored"] == 1
    await http.post(f"{sb.base_url}/_standin/reset")
    assert sb.stats.stored == 0 and sb.items == []


async def test_official_mcp_client_stores(sb: StandIn) -> None:
    """The official mcp SDK client connects, lists the tool and stores with the success text."""
    from mcp import Client  # noqa: PLC0415 - the SDK is a dev extra; only this test needs it

    async with Client(sb.url) as client:
        tools = await client.list_tools()
        assert "store_reflection" in [tool.name for tool in tools.tools]
        result = await client.call_tool("store_reflection", {"content": "from the SDK"})
        bad = await client.call_tool("store_reflection", {"content": "x", "tags": "oops"})
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(SUCCESS) and not result.is_error
    assert bad.is_error
    assert sb.items[0]["content"] == "from the SDK"


async def test_runs_as_a_process_and_stops_on_sigterm() -> None:
    """`python -m worker.testing` prints its URL, applies its flags, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.testing",
        "--port",
        "0",
        "--error-503",
        "1",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
        async with httpx.AsyncClient(timeout=5) as http:
            base = url.removesuffix("/mcp")
            assert (await http.get(f"{base}/healthz")).status_code == 200
            assert (await http.post(f"{base}/memory", json={"content": "x"})).status_code == 503
            stats = (await http.get(f"{base}/_standin/stats")).json()
            assert stats["faults"] == {"error_503": 1} and stats["stored"] == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
