"""What the stand-in says: Session-Buddy's tool schema, result texts and error answers.

The texts follow Session-Buddy's `store_reflection` at the protocol level (status codes, SSE
framing, result texts), so a client cannot tell the stand-in from the real server by them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

MAX_CONTENT_CHARS = 10_000
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
PROJECT = re.compile(r"[a-zA-Z0-9._-]{1,128}")
EMPTY = "❌ Validation error: Store reflection - content cannot be empty"
BAD_PROJECT = "❌ Validation error: Store reflection - project must match ^[a-zA-Z0-9._-]{1,128}$"
GUARD = "Memory guard blocked write: rule=test"
GUARD_RESULT = {"result": {"content": [{"type": "text", "text": GUARD}], "isError": True}}
GUARD_HTTP = {"status": 422, "body": {"stored": False, "error": GUARD}}
JSON = "application/json"
SSE = "text/event-stream"
_STR_ARGS = frozenset({"content", "project", "source_session_id", "source_artifact_uri"})
_STR = {"type": "string"}
TOOLS = {
    "tools": [
        {
            "name": "store_reflection",
            "description": "Store an important insight or reflection for future reference.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "content": _STR,
                    "tags": {"type": "array", "items": _STR},
                    "project": _STR,
                    "source_session_id": _STR,
                    "source_artifact_uri": _STR,
                },
                "required": ["content"],
                "additionalProperties": False,
            },
        }
    ]
}
Payload = dict[str, Any]


class _StoreArgs(BaseModel):
    """The tool's argument model, used only to word a refusal exactly as FastMCP's pydantic does."""

    model_config = ConfigDict(extra="forbid", title="store_reflectionArguments")
    content: str
    tags: list[str] | None = None
    project: str | None = None
    source_session_id: str | None = None
    source_artifact_uri: str | None = None


def rpc_error(status: int, message: str, code: int = -32600) -> web.Response:
    """A JSON-RPC error without a request id, as the SDK's transport sends it."""
    body = {"jsonrpc": "2.0", "id": "server-error", "error": {"code": code, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def json_answer(
    status: int, payload: object, headers: dict[str, str] | None = None
) -> web.Response:
    """A plain JSON answer."""
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type=JSON, headers=headers
    )


def sse_answer(sid: str, message: Payload) -> web.Response:
    """One JSON-RPC message as a one-event SSE answer on session `sid`."""
    body = b"event: message\r\ndata: " + orjson.dumps(message) + b"\r\n\r\n"
    headers = {
        "Content-Type": SSE,
        "Cache-Control": "no-cache, no-transform",
        "mcp-session-id": sid,
    }
    return web.Response(body=body, headers=headers)


def tool_result(text: str, is_error: bool) -> Payload:
    """A tools/call result with one text block."""
    return {"result": {"content": [{"type": "text", "text": text}], "isError": is_error}}


def accepts(accept: str) -> tuple[bool, bool]:
    """Whether an Accept header admits JSON and SSE, with the SDK's wildcard rules."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    anything = "*/*" in types
    return (
        anything or bool(types & {JSON, "application/*"}),
        anything or bool(types & {SSE, "text/*"}),
    )


def well_typed(args: object) -> bool:
    """Fast check that arguments pass the tool's model (pydantic runs only to word a refusal)."""
    if not isinstance(args, dict) or type(args.get("content")) is not str:
        return False
    for key, value in args.items():
        if key == "tags":
            if value is not None and not (
                type(value) is list and all(type(t) is str for t in value)
            ):
                return False
        elif key not in _STR_ARGS or (type(value) is not str and value is not None):
            return False
    return True


def validation_text(args: object) -> str:
    """The pydantic text FastMCP returns for arguments its model refuses."""
    try:
        _StoreArgs.model_validate(args)
    except ValidationError as exc:
        return str(exc)
    return "1 validation error for store_reflectionArguments"


def refusal(params: Payload) -> Payload | None:
    """The tool result refusing a tools/call's name or arguments, None when they are valid."""
    name = params["name"]
    if name != "store_reflection":
        return tool_result(f"Unknown tool: {name!r}", True)
    args = params.get("arguments")
    args = {} if args is None else args
    if not well_typed(args):
        return tool_result(validation_text(args), True)
    content: str = args["content"]
    project = args.get("project")
    if not content.strip() or (project is not None and not PROJECT.fullmatch(project)):
        return tool_result(BAD_PROJECT if content.strip() else EMPTY, False)
    return None


def success_text(content: str, tags: list[str]) -> str:
    """The real server's success text: first line exact, then a short summary."""
    more = "..." if len(content) > 100 else ""
    lines = ["💾 Reflection stored successfully!", f"📝 Content: {content[:100]}{more}"]
    if tags:
        lines.append(f"🏷️ Tags: {', '.join(tags)}")
    lines.append(f"📅 Stored: {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
    return "\n".join(lines)
