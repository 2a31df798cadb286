"""McpSink against the official MCP SDK's streamable-HTTP server (mcp 2.x `MCPServer`).

The server runs under uvicorn on loopback inside the test process, with the SDK's defaults:
stateful sessions, SSE answers to POSTs. The client is the worker's own transport
(`make_client`), so this is the wire path production uses. No broker is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from worker.mcp import McpSink
from worker.outcome import Kind
from worker.sections import SinkSettings
from worker.settings import Settings, load_settings
from worker.sink import StoreRequest
from worker.testing import free_port
from worker.transport import Http1Client, make_client

STORED_TEXT = "💾 Reflection stored successfully!"
EMPTY_TEXT = "❌ Validation error: Store reflection - content cannot be empty"


class SdkServer:
    """An SDK `MCPServer` offering `store_reflection`, served by uvicorn; restartable."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.mcp: MCPServer[Any] = MCPServer("session-buddy-sdk", log_level="WARNING")
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        # None: the SDK's default for 127.0.0.1 (DNS-rebinding protection, loopback Hosts only).
        self.transport_security: TransportSecuritySettings | None = None
        calls = self.calls

        @self.mcp.tool()
        def store_reflection(
            content: str,
            tags: list[str] | None = None,
            project: str | None = None,
            source_session_id: str | None = None,
            source_artifact_uri: str | None = None,
        ) -> str:
            """Store a reflection, like Session-Buddy's tool of the same name."""
            if content == "boom":
                raise RuntimeError("boom")
            if not content.strip():
                return EMPTY_TEXT
            calls.append(
                {
                    "content": content,
                    "tags": tags,
                    "project": project,
                    "source_session_id": source_session_id,
                    "source_artifact_uri": source_artifact_uri,
                }
            )
            return f"{STORED_TEXT}\nContent: {content[:40]}"

    async def start(self) -> None:
        """Serve a fresh app (a new session manager, so no sessions) on `self.port`."""
        app = self.mcp.streamable_http_app(transport_security=self.transport_security)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()  # raises what went wrong
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.01)
        self._server, self._task = server, task

    async def stop(self) -> None:
        """Shut uvicorn down; the session manager forgets every session."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(10):
                await task
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def restart(self) -> None:
        """Stop, then start again on the same port: the server has forgotten our session."""
        await self.stop()
        await self.start()


@pytest.fixture
async def sdk() -> AsyncIterator[SdkServer]:
    server = SdkServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def settings(sdk: SdkServer) -> Settings:
    return load_settings({"pools": {"session_buddy_url": sdk.url}})


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Http1Client]:
    async with make_client(settings) as http:
        yield http


def _sink(client: Http1Client, settings: Settings, sink: SinkSettings | None = None) -> McpSink:
    # Default SinkSettings, not the loaded ones: a local.yaml must not change the expected tags.
    return McpSink(client, str(settings.pools.session_buddy_url), sink or SinkSettings())


def _request(content: str, key: str = "key-1", **metadata: Any) -> StoreRequest:
    return StoreRequest(content=content, metadata=metadata, key=key)


async def test_store_is_stored_with_mapped_arguments(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """A store is STORED and the tool sees content, tags, project and source_session_id."""
    request = StoreRequest(
        content="pool alpha finished its run",
        metadata={
            "type": "pool_result",
            "pool_id": "pool/alpha 1",
            "worker_id": "w-7",
            "status": None,
            "exit_code": 0,
        },
        key="idem-42",
        extra_tags=("part:1/2",),
    )
    async with _sink(client, settings) as sink:
        outcome = await sink.store(request)
    assert outcome.kind is Kind.STORED, outcome
    assert sdk.calls == [
        {
            "content": "pool alpha finished its run",
            "tags": [
                "type:pool_result",
                "pool_id:pool/alpha 1",
                "worker_id:w-7",
                "exit_code:0",
                "part:1/2",
            ],
            "project": "pool-alpha-1",
            "source_session_id": "idem-42",
            "source_artifact_uri": None,
        }
    ]


async def test_blank_content_is_rejected_with_soft_error_text(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """Blank content gets the ❌ soft error (isError false) and is REJECTED with that text."""
    async with _sink(client, settings) as sink:
        outcome = await sink.store(_request("   "))
    assert outcome.kind is Kind.REJECTED, outcome
    assert outcome.detail == EMPTY_TEXT
    assert sdk.calls == []


async def test_tool_exception_is_rejected(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """A tool that raises comes back isError true and is REJECTED."""
    async with _sink(client, settings) as sink:
        outcome = await sink.store(_request("boom"))
    assert outcome.kind is Kind.REJECTED, outcome
    # The SDK hides the exception's own message; only the tool's name reaches the client.
    assert "store_reflection" in outcome.detail
    assert sdk.calls == []


async def test_unknown_tool_is_transient(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """Calling a tool the server lacks is TRANSIENT (a configuration error), naming the tool."""
    async with _sink(client, settings, SinkSettings(tool="nope")) as sink:
        outcome = await sink.store(_request("hello"))
    assert outcome.kind is Kind.TRANSIENT, outcome
    assert outcome.detail.startswith("Unknown tool")
    # The SDK says `Unknown tool: nope`; Session-Buddy (fastmcp) says `Unknown tool: 'nope'`.
    assert "nope" in outcome.detail
    assert sdk.calls == []


async def test_list_tools_includes_store_reflection(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """list_tools() over the SDK's SSE answer includes store_reflection."""
    async with _sink(client, settings) as sink:
        assert "store_reflection" in await sink.list_tools()


async def test_concurrent_stores_share_one_session(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """20 concurrent stores over one session are all STORED, and only one session is opened."""
    async with _sink(client, settings) as sink:
        outcomes = await asyncio.gather(
            *(sink.store(_request(f"item {i}", key=f"k-{i}")) for i in range(20))
        )
        assert sink.sessions_opened == 1
    assert [o.kind for o in outcomes] == [Kind.STORED] * 20
    assert sorted(c["source_session_id"] for c in sdk.calls) == sorted(f"k-{i}" for i in range(20))


async def test_reopens_session_after_server_forgets_it(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """After a server restart (404 Session not found) McpSink opens a new session and stores."""
    async with _sink(client, settings) as sink:
        assert (await sink.store(_request("before restart", key="k-a"))).kind is Kind.STORED
        await sdk.restart()
        outcome = await sink.store(_request("after restart", key="k-b"))
        assert outcome.kind is Kind.STORED, outcome
        assert sink.sessions_opened == 2
    assert [c["source_session_id"] for c in sdk.calls] == ["k-a", "k-b"]


async def test_server_down_is_transient(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """With the server stopped, a store is TRANSIENT (connection refused), not an exception."""
    await sdk.stop()
    async with _sink(client, settings) as sink:
        outcome = await sink.store(_request("nobody home"))
    assert outcome.kind is Kind.TRANSIENT, outcome
    assert sdk.calls == []


async def test_refused_host_header_is_transient(
    sdk: SdkServer, client: Http1Client, settings: Settings
) -> None:
    """A Host the SDK's DNS-rebinding protection refuses (421) is TRANSIENT, not a dead letter."""
    sdk.transport_security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=["session-buddy:*"]
    )
    await sdk.restart()
    async with _sink(client, settings) as sink:
        outcome = await sink.store(_request("wrong host"))
    assert outcome.kind is Kind.TRANSIENT, outcome
    assert "421" in outcome.detail
    assert sdk.calls == []
