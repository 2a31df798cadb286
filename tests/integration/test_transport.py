"""Http1Client on loopback: what goes out on the wire, and which failures become which error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import orjson
import pytest
from aiohttp import web

from worker.mcp import McpSink
from worker.outcome import Kind
from worker.sections import SinkSettings
from worker.settings import Settings, load_settings
from worker.sink import HttpSink, StoreRequest
from worker.transport import TransportError, TransportTimeout, make_client

STORED_TEXT = "💾 Reflection stored successfully!"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Seen(NamedTuple):
    """One request as the server received it."""

    method: str
    headers: dict[str, str]
    body: bytes


class Server:
    """A loopback server that keeps every request and answers with `handler`."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.handler: Handler = self.mcp
        self.released = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Record the request, then answer it with the current handler."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.method, headers, await request.read()))
        return await self.handler(request)

    async def mcp(self, request: web.Request) -> web.StreamResponse:
        """Just enough MCP for one session: initialize, initialized, tools/call, DELETE."""
        if request.method == "DELETE":
            return web.Response(status=200)
        payload = orjson.loads(await request.read())
        if payload["method"] == "initialize":
            answer = {"jsonrpc": "2.0", "id": payload["id"], "result": {}}
            return web.json_response(answer, headers={"mcp-session-id": "s-1"})
        if payload["method"] == "notifications/initialized":
            return web.Response(status=202)
        result = {"content": [{"type": "text", "text": STORED_TEXT}], "isError": False}
        message = orjson.dumps({"jsonrpc": "2.0", "id": payload["id"], "result": result})
        body = b"event: message\r\ndata: " + message + b"\r\n\r\n"
        return web.Response(body=body, content_type="text/event-stream")

    async def hold(self, request: web.Request) -> web.StreamResponse:
        """Answer only when the test ends."""
        await self.released.wait()
        return web.Response(status=200)

    async def drop(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without answering."""
        assert request.transport is not None
        request.transport.close()
        await self.released.wait()
        return web.Response(status=200)

    async def cut(self, request: web.Request) -> web.StreamResponse:
        """Promise 100 bytes, send 3, close the connection."""
        response = web.StreamResponse(headers={"content-length": "100"})
        await response.prepare(request)
        await response.write(b"abc")
        assert request.transport is not None
        request.transport.close()
        return response

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        """Send the client elsewhere."""
        return web.Response(status=307, headers={"location": "/elsewhere"})


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.url = f"http://{host}:{port}/mcp"
    try:
        yield srv
    finally:
        srv.released.set()
        await runner.cleanup()


def settings_for(url: str, **sink: Any) -> Settings:
    """Settings pointing at `url`, with sink settings changed by keyword arguments."""
    return load_settings({"pools": {"session_buddy_url": url}, "sink": sink})


def store_request(content: str = "hello") -> StoreRequest:
    """A store request with no metadata."""
    return StoreRequest(content, {}, "key-1")


@pytest.mark.parametrize("token", ["t", None])
async def test_bearer_header_reaches_the_server(server: Server, token: str | None) -> None:
    """Client default headers (the bearer token) go out on every MCP request."""
    settings = settings_for(server.url, token=token)
    async with make_client(settings) as client, McpSink(client, server.url, SinkSettings()) as sink:
        assert (await sink.store(store_request())).kind is Kind.STORED
    assert [s.method for s in server.seen] == ["POST", "POST", "POST", "DELETE"]
    for seen in server.seen:
        assert seen.headers["user-agent"] == "memory-worker"
        assert seen.headers.get("authorization") == (f"Bearer {token}" if token else None)
        assert "cookie" not in seen.headers
    for seen in server.seen[:3]:
        assert seen.headers["accept"] == "application/json, text/event-stream"
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["mcp-protocol-version"] == "2025-06-18"
    assert [s.headers.get("mcp-session-id") for s in server.seen] == [None, "s-1", "s-1", "s-1"]
    assert orjson.loads(server.seen[2].body)["params"]["arguments"]["content"] == "hello"


async def test_refused_connection_is_a_transport_error() -> None:
    """Nobody listening: TransportError (not a timeout), and the store is transient."""
    async with make_client(settings_for("http://127.0.0.1:9/mcp")) as client:
        with pytest.raises(TransportError) as caught:
            await client.request("POST", "http://127.0.0.1:9/mcp", {}, b"{}")
        assert not isinstance(caught.value, TransportTimeout)
        outcome = await McpSink(client, "http://127.0.0.1:9/mcp", SinkSettings()).store(
            store_request()
        )
    assert outcome.kind is Kind.TRANSIENT and not outcome.overload
    assert "connection refused by 127.0.0.1:9" in outcome.detail


async def test_slow_answer_is_a_timeout(server: Server) -> None:
    """No answer within sink.timeout_s: TransportTimeout, and the store is transient overload."""
    server.handler = server.hold
    async with make_client(settings_for(server.url, timeout_s=0.2)) as client:
        with pytest.raises(TransportTimeout):
            await client.request("POST", server.url, {}, b"{}")
        outcome = await HttpSink(client, server.url).store(store_request())
    assert outcome.kind is Kind.TRANSIENT and outcome.overload
    assert outcome.detail.startswith("timeout: ")


@pytest.mark.parametrize("how", ["drop", "cut"])
async def test_broken_answer_is_a_transport_error(server: Server, how: str) -> None:
    """A connection closed before or during the answer: TransportError, store transient."""
    server.handler = getattr(server, how)
    async with make_client(settings_for(server.url)) as client:
        with pytest.raises(TransportError) as caught:
            await client.request("POST", server.url, {}, b"{}")
        assert not isinstance(caught.value, TransportTimeout)
        outcome = await HttpSink(client, server.url).store(store_request())
    assert outcome.kind is Kind.TRANSIENT and not outcome.overload


async def test_redirect_is_returned_not_followed(server: Server) -> None:
    """A 307 comes back as the answer (as with httpx), so the store is judged on it."""
    server.handler = server.redirect
    async with make_client(settings_for(server.url)) as client:
        reply = await client.request("POST", server.url, {"content-type": "application/json"}, b"")
        assert reply.status == 307 and reply.headers["location"] == "/elsewhere"
        outcome = await HttpSink(client, server.url).store(store_request())
    assert outcome.kind is Kind.REJECTED and "HTTP 307" in outcome.detail
    assert len(server.seen) == 2


async def test_request_needs_an_open_client() -> None:
    """A client used outside `async with` says so instead of opening a stray session."""
    client = make_client(settings_for("http://127.0.0.1:9/mcp"))
    with pytest.raises(RuntimeError, match="async with"):
        await client.request("HEAD", "http://127.0.0.1:9/mcp", {})


async def raw_server(answer: bytes) -> tuple[asyncio.Server, str, list[bytes]]:
    """A loopback server that reads one request per connection, writes `answer` and closes."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/mcp", seen


async def test_keep_alive_reuses_one_connection(server: Server) -> None:
    """Sequential requests share one pooled connection; the pool never grows past its size."""
    peers: set[object] = set()

    async def peer(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(body=b"ok")

    server.handler = peer
    async with make_client(settings_for(server.url)) as client:
        for _ in range(5):
            assert (await client.request("POST", server.url, {}, b"{}")).body == b"ok"
        await asyncio.gather(*(client.request("POST", server.url, {}, b"{}") for _ in range(20)))
        assert len(client._open) <= client.pool_size
    assert len(peers) <= client.pool_size
    assert len(server.seen) == 25


async def test_chunked_answer_is_read_whole(server: Server) -> None:
    """A chunked answer (what streamed SSE looks like) arrives as one body."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"event: message\r\n", b"data: {}\r\n", b"\r\n"):
            await response.write(part)
        await response.write_eof()
        return response

    server.handler = chunked
    async with make_client(settings_for(server.url)) as client:
        reply = await client.request("POST", server.url, {}, b"{}")
    assert reply.status == 200 and reply.body == b"event: message\r\ndata: {}\r\n\r\n"
    assert reply.headers["content-type"] == "text/event-stream"


async def test_answer_ended_by_close_is_complete_and_not_reused() -> None:
    """An answer with no length ends with its connection; the next request opens another."""
    answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"
    srv, url, seen = await raw_server(answer)
    async with srv, make_client(settings_for(url)) as client:
        first = await client.request("POST", url, {}, b"{}")
        second = await client.request("POST", url, {}, b"{}")
    assert first.body == second.body == b"all of it"
    assert len(seen) == 2


async def test_head_answer_has_no_body() -> None:
    """A HEAD answer ends after its headers, whatever its content-length says."""
    srv, url, seen = await raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
    async with srv, make_client(settings_for(url)) as client:
        reply = await asyncio.wait_for(client.request("HEAD", url, {}), 5)
    assert reply.status == 200 and reply.body == b""
    assert seen[0].startswith(b"HEAD /mcp HTTP/1.1\r\n")


async def test_malformed_answer_is_a_transport_error() -> None:
    """Bytes that are not HTTP are a TransportError, not a crash."""
    srv, url, _ = await raw_server(b"SMTP ready\r\n\r\n")
    async with srv, make_client(settings_for(url)) as client:
        with pytest.raises(TransportError):
            await client.request("POST", url, {}, b"{}")


async def test_cancelled_request_frees_its_connection(server: Server) -> None:
    """A request cancelled mid-answer closes its connection and gives its pool slot back."""
    server.handler = server.hold
    async with make_client(settings_for(server.url)) as client:
        pending = asyncio.create_task(client.request("POST", server.url, {}, b"{}"))
        await asyncio.sleep(0.2)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert client._open == set() and client._idle == []
        server.handler = server.mcp
        server.released.set()
        reply = await client.request("DELETE", server.url, {})
    assert reply.status == 200


async def test_line_break_in_a_header_is_refused(server: Server) -> None:
    """A header value with a line break (a session id the server chose) is never sent."""
    async with make_client(settings_for(server.url)) as client:
        with pytest.raises(TransportError, match="line break"):
            await client.request("POST", server.url, {"mcp-session-id": "a\r\nx-evil: 1"}, b"")
    assert server.seen == []
