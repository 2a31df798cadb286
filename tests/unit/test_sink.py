"""Tests for the sinks over a fake `HttpClient`: MCP session flow, judging answers, HTTP errors."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest

import worker
from worker.mcp import McpSink, reflection_arguments
from worker.models import decode_item
from worker.outcome import Kind, Outcome
from worker.sections import SinkSettings
from worker.settings import Settings
from worker.sink import HttpSink, StoreRequest
from worker.testing.items import valid_item
from worker.transport import Reply, TransportError, TransportTimeout, make_client

URL = "http://sb.test/mcp"
STORED_TEXT = "💾 Reflection stored successfully!\n📝 Content: hello"
META = valid_item()["metadata"]


class Sent(NamedTuple):
    """One request as a sink handed it to its client."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None

    def json(self) -> Any:
        """The body, decoded."""
        assert self.body is not None
        return json.loads(self.body)


def reply(status: int, text: str = "", headers: Mapping[str, str] | None = None) -> Reply:
    """A whole HTTP answer with a text body."""
    return Reply(status, dict(headers or {}), text.encode())


def request(content: str = "hello", key: str = "key-1", **meta: Any) -> StoreRequest:
    """A store request with the standard metadata, changed by keyword arguments."""
    return StoreRequest(content, {**META, **meta}, key)


def tool_result(text: str, is_error: bool = False) -> dict[str, Any]:
    """A `tools/call` result holding one text part."""
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


def rpc_response(
    answer: dict[str, Any], request_id: Any, sse: bool = True, session: str | None = None
) -> Reply:
    """A JSON-RPC answer, as SSE (what Session-Buddy sends) or as plain JSON."""
    message = {"jsonrpc": "2.0", "id": request_id, **answer}
    headers = {"mcp-session-id": session} if session else {}
    if sse:
        body = f"event: message\ndata: {json.dumps(message)}\n\n"
        return reply(200, body, {**headers, "content-type": "text/event-stream"})
    return reply(200, json.dumps(message), {**headers, "content-type": "application/json"})


class FakeMcp:
    """A Session-Buddy stand-in: sessions, a scripted answer per tools/call, every request kept.

    `reply(payload)` returns the JSON-RPC answer dict, or a `Reply`, or raises.
    """

    def __init__(self, sse: bool = True) -> None:
        self.sse = sse
        self.sessions: set[str] = set()
        self.opened = 0
        self.requests: list[Sent] = []
        self.reply: Callable[[dict[str, Any]], Any] = lambda _: {"result": tool_result(STORED_TEXT)}
        self.before_call: Callable[[dict[str, Any], str | None], Awaitable[None]] | None = None

    def methods(self) -> list[str]:
        """JSON-RPC methods received, in order."""
        return [r.json()["method"] for r in self.requests if r.method == "POST"]

    def calls(self) -> list[Sent]:
        """The tools/call requests received."""
        return [
            r for r in self.requests if r.method == "POST" and r.json()["method"] == "tools/call"
        ]

    def restart(self) -> None:
        """Forget every session, like a server restart."""
        self.sessions.clear()

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """Answer one request the way Session-Buddy does."""
        req = Sent(method, url, dict(headers), body)
        self.requests.append(req)
        if method == "DELETE":
            self.sessions.discard(headers.get("mcp-session-id", ""))
            return reply(200)
        payload = req.json()
        session = headers.get("mcp-session-id")
        if payload["method"] == "initialize":
            self.opened += 1
            new = f"session-{self.opened}"
            self.sessions.add(new)
            result = {"result": {"protocolVersion": payload["params"]["protocolVersion"]}}
            return rpc_response(result, payload["id"], self.sse, session=new)
        if session is None:
            return reply(400, "Bad Request: Missing session ID")
        if self.before_call is not None and payload["method"] == "tools/call":
            await self.before_call(payload, session)
        if session not in self.sessions:
            return reply(404, "Session not found")
        if payload["method"] == "notifications/initialized":
            return reply(202)
        if payload["method"] == "tools/list":
            tools = {"tools": [{"name": "store_reflection"}, {"name": "quick_search"}]}
            return rpc_response({"result": tools}, payload["id"], self.sse)
        answer = self.reply(payload)
        if isinstance(answer, Reply):
            return answer
        return rpc_response(answer, payload["id"], self.sse)


class Answering:
    """A client that hands every request to one function and keeps what was sent."""

    def __init__(self, answer: Callable[[Sent], Reply]) -> None:
        self.answer = answer
        self.requests: list[Sent] = []

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """Record the request and answer it."""
        self.requests.append(Sent(method, url, dict(headers), body))
        return self.answer(self.requests[-1])


def mcp_sink(server: FakeMcp, sink: SinkSettings | None = None) -> McpSink:
    """An McpSink talking to the fake server."""
    return McpSink(server, URL, sink or SinkSettings())


@pytest.mark.parametrize("sse", [True, False], ids=["sse", "json"])
async def test_session_flow(sse: bool) -> None:
    """initialize, then notifications/initialized, then every call reuses the session id."""
    server = FakeMcp(sse=sse)
    sink = mcp_sink(server)
    outcomes = [await sink.store(request(f"item {i}", f"k{i}")) for i in range(3)]
    assert outcomes == [Outcome.stored()] * 3
    assert server.methods() == ["initialize", "notifications/initialized", *["tools/call"] * 3]
    assert "mcp-session-id" not in server.requests[0].headers
    client_info = server.requests[0].json()["params"]["clientInfo"]
    assert client_info == {"name": "memory-worker", "version": worker.__version__}
    assert {r.headers["mcp-session-id"] for r in server.requests[1:]} == {"session-1"}
    assert sink.sessions_opened == server.opened == 1
    for req in server.requests:
        assert "application/json" in req.headers["accept"]
        assert "text/event-stream" in req.headers["accept"]
    params = server.calls()[0].json()["params"]
    assert params["name"] == "store_reflection"
    assert params["arguments"]["content"] == "item 0"


async def test_close_ends_the_session() -> None:
    """close() sends DELETE with the session id, and a later call opens a new session."""
    server = FakeMcp()
    sink = mcp_sink(server)
    await sink.store(request())
    await sink.close()
    assert server.requests[-1].method == "DELETE"
    assert server.requests[-1].headers["mcp-session-id"] == "session-1"
    assert await sink.store(request()) == Outcome.stored()
    assert server.opened == 2


async def test_list_tools() -> None:
    """list_tools returns the names the server offers, inside the session."""
    sink = mcp_sink(FakeMcp())
    assert await sink.list_tools() == ["store_reflection", "quick_search"]


OK = "💾 Reflection stored successfully!"


@pytest.mark.parametrize(
    ("answer", "kind", "detail_part"),
    [
        ({"result": tool_result(STORED_TEXT)}, Kind.STORED, ""),
        ({"result": tool_result(OK)}, Kind.STORED, ""),
        ({"result": tool_result(
            "❌ Validation error: Store reflection - content cannot be empty")},
         Kind.REJECTED, "content cannot be empty"),
        ({"result": tool_result("❌ Validation error: project must match pattern")},
         Kind.REJECTED, "project must match"),
        ({"result": tool_result("1 validation error for call[store_reflection]\ntags\n"
                                "  Input should be a valid list", is_error=True)},
         Kind.REJECTED, "validation error"),
        ({"result": tool_result("Memory guard blocked write: rule=secrets", is_error=True)},
         Kind.REJECTED, "Memory guard"),
        ({"result": tool_result(OK, is_error=True)}, Kind.REJECTED, ""),
        ({"result": tool_result("Unknown tool: 'store_reflection'", is_error=True)},
         Kind.TRANSIENT, "Unknown tool"),
        ({"result": tool_result("Reflection saved")}, Kind.REJECTED, "unrecognised"),
        ({"result": tool_result("")}, Kind.REJECTED, "unrecognised"),
        ({"result": {"content": [], "isError": False}}, Kind.REJECTED, "unrecognised"),
        ({"result": tool_result("note: 💾 Reflection stored successfully!\n")},
         Kind.STORED, ""),
        ({"result": tool_result("first line\n💾 Reflection stored successfully!")},
         Kind.REJECTED, "unrecognised"),
        ({"error": {"code": -32602, "message": "Invalid params"}}, Kind.REJECTED, "-32602"),
        ({"error": {"code": -32603, "message": "Internal error"}}, Kind.TRANSIENT, "-32603"),
        ({"error": {"code": -32601, "message": "Method not found"}}, Kind.TRANSIENT, "-32601"),
        ({"error": {"code": -32000, "message": "Server error"}}, Kind.TRANSIENT, "-32000"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("sse", [True, False], ids=["sse", "json"])
async def test_judgement(sse: bool, answer: dict[str, Any], kind: Kind, detail_part: str) -> None:
    """Each kind of tools/call answer, SSE or plain JSON, is judged as session-buddy.md says."""
    server = FakeMcp(sse=sse)
    server.reply = lambda _: answer
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is kind
    assert detail_part in outcome.detail


async def test_long_answer_text_is_clipped() -> None:
    """A rejection's detail is clipped so a huge answer cannot bloat headers and logs."""
    server = FakeMcp()
    server.reply = lambda _: {"result": tool_result("❌ " + "x" * 50_000)}
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.REJECTED
    assert len(outcome.detail) <= 1000


async def test_session_not_found_opens_one_new_session_and_retries() -> None:
    """A 404 Session not found opens a new session and retries the call once, then stores."""
    server = FakeMcp()
    sink = mcp_sink(server)
    assert await sink.store(request("first", "k1")) == Outcome.stored()
    server.restart()
    assert await sink.store(request("second", "k2")) == Outcome.stored()
    assert sink.sessions_opened == server.opened == 2
    calls = server.calls()
    assert [c.json()["params"]["arguments"]["content"] for c in calls] == [
        "first",
        "second",
        "second",
    ]
    assert [c.headers["mcp-session-id"] for c in calls] == ["session-1", "session-1", "session-2"]


async def test_session_lost_twice_is_transient() -> None:
    """If the fresh session is lost too, the store is transient and not retried forever."""
    server = FakeMcp()
    server.reply = lambda _: reply(404, "Session not found")
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT
    assert len(server.calls()) == 2


async def test_concurrent_session_loss_opens_one_session() -> None:
    """Many calls hitting 404 at once on the same lost session open only ONE new session."""
    n = 20
    server = FakeMcp()
    sink = mcp_sink(server)
    await sink.store(request("warm-up", "k0"))
    server.restart()
    arrived = 0
    all_arrived = asyncio.Event()

    async def hold_stale(payload: dict[str, Any], session: str | None) -> None:
        # Hold every call on the dead session until all of them have arrived.
        nonlocal arrived
        if session == "session-1":
            arrived += 1
            if arrived == n:
                all_arrived.set()
            await all_arrived.wait()

    server.before_call = hold_stale
    outcomes = await asyncio.gather(*(sink.store(request(f"c{i}", f"k{i}")) for i in range(n)))
    assert outcomes == [Outcome.stored()] * n
    assert server.opened == 2
    assert sink.sessions_opened == 2
    assert server.methods().count("initialize") == 2


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [("7", 7.0), ("0", 0.0), ("2.5", 2.5), ("-4", 0.0), (None, None)],
)
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds(status: int, retry_after: str | None, expected_s: Any) -> None:
    """429/503 are transient overload signals and carry Retry-After given in seconds."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    server = FakeMcp()
    server.reply = lambda _: reply(status, "slow down", headers)
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT and outcome.overload
    assert outcome.retry_after_s == expected_s
    assert str(status) in outcome.detail


async def test_retry_after_http_date() -> None:
    """A Retry-After HTTP date becomes the seconds until that date."""
    when = datetime.now(UTC) + timedelta(seconds=120)
    header = email.utils.format_datetime(when, usegmt=True)
    server = FakeMcp()
    server.reply = lambda _: reply(429, headers={"retry-after": header})
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT
    assert outcome.retry_after_s is not None
    assert 100.0 <= outcome.retry_after_s <= 120.0


async def test_retry_after_date_in_the_past_is_zero() -> None:
    """A Retry-After date already past means no extra wait."""
    server = FakeMcp()
    header = "Wed, 21 Oct 2015 07:28:00 GMT"
    server.reply = lambda _: reply(429, headers={"retry-after": header})
    outcome = await mcp_sink(server).store(request())
    assert outcome == Outcome(Kind.TRANSIENT, outcome.detail, retry_after_s=0.0, overload=True)


@pytest.mark.parametrize("garbage", ["soon", "tomorrow-ish", "Fri, 99 Foo 20xx", "inf"])
async def test_unparseable_retry_after_is_ignored(garbage: str) -> None:
    """A Retry-After that is not finite seconds nor a date is ignored: transient, no crash."""
    server = FakeMcp()
    server.reply = lambda _: reply(429, headers={"retry-after": garbage})
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT
    assert outcome.retry_after_s is None


@pytest.mark.parametrize("status", [500, 502, 504, 401, 403, 408])
async def test_other_transient_statuses_are_not_overload(status: int) -> None:
    """Only 429 and 503 say the sink is too busy; other transient statuses do not shrink a limit."""
    server = FakeMcp()
    server.reply = lambda _: reply(status, "no")
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT and not outcome.overload


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, Kind.TRANSIENT),
        (502, Kind.TRANSIENT),
        (503, Kind.TRANSIENT),
        (504, Kind.TRANSIENT),
        (401, Kind.TRANSIENT),
        (403, Kind.TRANSIENT),
        (408, Kind.TRANSIENT),
        (425, Kind.TRANSIENT),
        (429, Kind.TRANSIENT),
        (400, Kind.REJECTED),
        (405, Kind.REJECTED),
        (413, Kind.REJECTED),
        (422, Kind.REJECTED),
    ],
)
async def test_http_status_of_tool_call(status: int, kind: Kind) -> None:
    """A non-200 answer to tools/call: 5xx/401/403/408/425/429 transient, other 4xx rejected."""
    server = FakeMcp()
    server.reply = lambda _: reply(status, "nope")
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is kind
    assert f"HTTP {status}" in outcome.detail


def raising(error: TransportError) -> Answering:
    """A client that fails every request with a transport error."""

    def fail(_: Sent) -> Reply:
        raise error

    return Answering(fail)


# What `Http1Client` raises for refused, timed-out, reset or cut-off connections
# (tests/integration/test_transport.py checks that it does).
TRANSPORT_ERRORS = [
    TransportError("ClientConnectorError: Cannot connect to host sb.test:80"),
    TransportTimeout("ConnectionTimeoutError"),
    TransportTimeout("SocketTimeoutError"),
    TransportError("ClientOSError: [Errno 104] Connection reset by peer"),
    TransportError("ServerDisconnectedError: Server disconnected"),
    TransportTimeout("TimeoutError"),
]


@pytest.mark.parametrize("error", TRANSPORT_ERRORS, ids=repr)
async def test_transport_errors_are_transient(error: TransportError) -> None:
    """Refused, reset or timed-out connections are transient, at session setup or on the call."""
    timeout = isinstance(error, TransportTimeout)
    on_init = McpSink(raising(error), URL, SinkSettings())
    outcome = await on_init.store(request())
    assert outcome.kind is Kind.TRANSIENT and outcome.overload is timeout

    server = FakeMcp()

    def fail(_: dict[str, Any]) -> Any:
        raise error

    server.reply = fail
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT and outcome.overload is timeout
    assert str(error) in outcome.detail


@pytest.mark.parametrize("status", [400, 401, 404, 500, 503])
async def test_failed_initialize_is_transient(status: int) -> None:
    """A server that refuses to open a session gives a transient outcome, never an exception."""

    sink = McpSink(Answering(lambda _: reply(status, "no session for you")), URL, SinkSettings())
    outcome = await sink.store(request())
    assert outcome.kind is Kind.TRANSIENT
    assert str(status) in outcome.detail


async def test_answer_without_matching_id_is_transient() -> None:
    """A 200 whose JSON-RPC id does not match the request is transient (nothing provably stored)."""
    server = FakeMcp()
    server.reply = lambda p: rpc_response({"result": tool_result(OK)}, p["id"] + 1000)
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", "<html>502 from a proxy</html>"),
        ("application/json", "{not json"),
        ("text/event-stream", "event: message\ndata: {broken\n\n"),
    ],
)
async def test_unparseable_200_answer_is_transient(content_type: str, body: str) -> None:
    """A 200 whose body is not JSON-RPC (e.g. a proxy page) is transient, not an exception."""
    server = FakeMcp()
    server.reply = lambda _: reply(200, body, {"content-type": content_type})
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
async def test_sse_lines_end_only_at_cr_or_lf(newline: str) -> None:
    """SSE lines end at CR, LF or CRLF only: a raw U+2028 or U+0085 in the JSON is no line end."""
    server = FakeMcp()

    def answer(payload: dict[str, Any]) -> Reply:
        result = tool_result(f"{OK}\n📝 Content: a\u2028b\x85c")
        message = {"jsonrpc": "2.0", "id": payload["id"], "result": result}
        data = json.dumps(message, ensure_ascii=False)  # as orjson and pydantic write it
        body = newline.join(["event: message", f"data: {data}", "", ""])
        return reply(200, body, {"content-type": "text/event-stream"})

    server.reply = answer
    assert await mcp_sink(server).store(request()) == Outcome.stored()


@pytest.mark.parametrize(
    "answer",
    [
        {"error": "boom"},
        {"result": "stored successfully"},
        {"result": ["stored successfully"]},
        {"result": {"content": 5}},
        {"result": {"content": "stored successfully"}},
    ],
)
async def test_malformed_200_answer_is_transient_not_a_crash(answer: dict[str, Any]) -> None:
    """A JSON-RPC answer of the wrong shape is the server's fault: transient, never raised."""
    server = FakeMcp()
    server.reply = lambda _: answer
    outcome = await mcp_sink(server).store(request())
    assert outcome.kind is Kind.TRANSIENT


@pytest.mark.parametrize(
    ("meta", "sink", "expected"),
    [
        (
            {},
            SinkSettings(),
            {
                "tags": [
                    "type:task_result",
                    "pool_id:pool-1",
                    "pool_type:local",
                    "worker_id:w-7",
                    "status:completed",
                ],
                "project": "pool-1",
            },
        ),
        (
            {"exit_code": 0, "error": "boom"},
            SinkSettings(),
            {
                "tags": [
                    "type:task_result",
                    "pool_id:pool-1",
                    "pool_type:local",
                    "worker_id:w-7",
                    "status:completed",
                    "exit_code:0",
                ],
                "project": "pool-1",
            },
        ),
        (
            {"status": None},
            SinkSettings(tag_fields=["status", "pool_type"], static_tags=["env:prod"]),
            {"tags": ["pool_type:local", "env:prod"], "project": "pool-1"},
        ),
        (
            {"pool_id": "my pool/ü*1"},
            SinkSettings(tag_fields=[]),
            {"tags": [], "project": "my-pool---1"},
        ),
        (
            {"pool_id": "p" * 300},
            SinkSettings(tag_fields=[]),
            {"tags": [], "project": "p" * 128},
        ),
        (
            {"pool_id": "ignored"},
            SinkSettings(tag_fields=[], project="fixed.project_1"),
            {"tags": [], "project": "fixed.project_1"},
        ),
        (
            {"pool_id": "ignored"},
            SinkSettings(tag_fields=[], project="needs cleaning!"),
            {"tags": [], "project": "needs-cleaning-"},
        ),
        (
            {},
            SinkSettings(tag_fields=[], project_field=None),
            {"tags": []},
        ),
        (
            {"team": "core"},
            SinkSettings(tag_fields=["team"], project_field="team"),
            {"tags": ["team:core"], "project": "core"},
        ),
        (
            {},
            SinkSettings(tag_fields=[], project_field="missing"),
            {"tags": []},
        ),
    ],
)
def test_reflection_arguments(
    meta: dict[str, Any], sink: SinkSettings, expected: dict[str, Any]
) -> None:
    """Metadata maps onto tags, a sanitised project and source_session_id = the item's key."""
    args = reflection_arguments(request("text", "key-42", **meta), sink)
    assert args == {"content": "text", **expected, "source_session_id": "key-42"}
    if "project" in args:
        assert re.fullmatch(r"[a-zA-Z0-9._-]{1,128}", args["project"])


def test_reflection_arguments_extra_tags_last() -> None:
    """Extra tags (split parts) follow the metadata tags and the static tags."""
    req = StoreRequest("t", {"type": "x"}, "k#1/2", ("part:1/2", "of:k"))
    args = reflection_arguments(req, SinkSettings(tag_fields=["type"], static_tags=["s"]))
    assert args["tags"] == ["type:x", "s", "part:1/2", "of:k"]
    assert set(args) <= {"content", "tags", "project", "source_session_id", "source_artifact_uri"}


@pytest.mark.parametrize("token", ["tok-123", None])
async def test_make_client_bearer_token(token: str | None) -> None:
    """make_client sends `authorization: Bearer <token>` only when sink.token is set."""
    settings = Settings(sink={"token": token}, pools={"max_concurrent_memory_insertions": 3})
    client = make_client(settings)
    if token is None:
        assert "authorization" not in client.headers
    else:
        assert client.headers["authorization"] == f"Bearer {token}"
    assert client.headers["user-agent"] == "memory-worker"
    assert client.timeout_s == settings.sink.timeout_s
    assert client.connect_timeout_s == settings.sink.connect_timeout_s
    assert client.pool_size == 3 + 2


class FakeHttp(Answering):
    """A plain JSON store answering with a fixed status."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(lambda _: reply(status, "answer", headers))


def http_sink(server: Answering) -> HttpSink:
    """An HttpSink talking to a fake client."""
    return HttpSink(server, "http://m.test/memory")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, Kind.STORED),
        (201, Kind.STORED),
        (202, Kind.STORED),
        (204, Kind.STORED),
        (409, Kind.STORED),
        (408, Kind.TRANSIENT),
        (429, Kind.TRANSIENT),
        (500, Kind.TRANSIENT),
        (502, Kind.TRANSIENT),
        (503, Kind.TRANSIENT),
        (401, Kind.TRANSIENT),
        (403, Kind.TRANSIENT),
        (400, Kind.REJECTED),
        (404, Kind.REJECTED),
        (413, Kind.REJECTED),
        (422, Kind.REJECTED),
    ],
)
async def test_http_sink_status(status: int, kind: Kind) -> None:
    """HttpSink: 2xx and 409 stored, 408/429/5xx (and auth) transient, other 4xx rejected."""
    server = FakeHttp(status, {"retry-after": "11"})
    outcome = await http_sink(server).store(request())
    assert outcome.kind is kind
    if kind is Kind.TRANSIENT:
        assert outcome.retry_after_s == 11.0


async def test_http_sink_request_shape() -> None:
    """HttpSink posts content, metadata and tags as JSON with an Idempotency-Key header."""
    server = FakeHttp(201)
    req = StoreRequest("hello", dict(META), "key-9", ("part:1/2",))
    await http_sink(server).store(req)
    (sent,) = server.requests
    assert sent.method == "POST"
    assert sent.url == "http://m.test/memory"
    assert sent.headers["idempotency-key"] == "key-9"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {"content": "hello", "metadata": META, "tags": ["part:1/2"]}


@pytest.mark.parametrize("error", TRANSPORT_ERRORS, ids=repr)
async def test_http_sink_transport_errors(error: TransportError) -> None:
    """HttpSink turns transport errors into transient outcomes."""
    outcome = await http_sink(raising(error)).store(request())
    assert outcome.kind is Kind.TRANSIENT
    assert outcome.overload is isinstance(error, TransportTimeout)


async def test_http_sink_posts_integers_wider_than_64_bits() -> None:
    """A metadata integer the decoder admits (up to 30 digits) is posted, not a crash."""
    body = json.dumps({"content": "hello", "metadata": {**META, "trace": int("9" * 25)}})
    item = decode_item(body.encode(), "application/json")
    metadata = item.metadata.model_dump(mode="json", exclude_none=True)
    server = FakeHttp(201)
    outcome = await http_sink(server).store(StoreRequest("hello", metadata, "key-1"))
    assert outcome.kind is Kind.STORED
    assert server.requests[0].json()["metadata"]["trace"] == int("9" * 25)
