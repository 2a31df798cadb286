"""Tests for the memory item model and strict decoding of message bodies."""

from __future__ import annotations

import json
import math
import pickle
import random
import struct
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import orjson
import pytest

import worker.strict_json
from worker.models import (
    MemoryItem,
    decode_item,
    encode_item,
    idempotency_key,
    item_from_dict,
)
from worker.outcome import Reason
from worker.strict_json import DecodeError, _check_depth, _parse_json, _parse_strict
from worker.testing.items import valid_item

JSON = "application/json"
DROP = object()
ROOT = Path(__file__).resolve().parents[2]


def make(**changes: Any) -> dict[str, Any]:
    """Build a valid item dict; `metadata__x=...` changes a metadata key, `...=DROP` removes it."""
    data = valid_item()
    for key, value in changes.items():
        target, name = (data["metadata"], key[10:]) if key.startswith("metadata__") else (data, key)
        if value is DROP:
            del target[name]
        else:
            target[name] = value
    return data


def body(data: object) -> bytes:
    """Encode `data` as UTF-8 JSON text."""
    return json.dumps(data, ensure_ascii=False).encode()


def test_valid_item_with_float_timestamp() -> None:
    """A float epoch timestamp decodes as that float and the fields as given."""
    item = decode_item(body(make()), JSON)
    assert item.content == "the build passed"
    assert item.metadata.pool_id == "pool-1"
    assert item.metadata.timestamp == 1_717_171_717.25
    assert item.metadata.exit_code is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-06-01T12:00:00Z", datetime(2024, 6, 1, 12, tzinfo=UTC)),
        ("2024-06-01T12:00:00.5+00:00", datetime(2024, 6, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        ("2024-06-01T12:00:00", datetime(2024, 6, 1, 12)),
    ],
)
def test_valid_item_with_iso_timestamp(raw: str, expected: datetime) -> None:
    """An ISO-8601 timestamp string decodes to a datetime."""
    item = decode_item(body(make(metadata__timestamp=raw)), None)
    assert item.metadata.timestamp == expected


def test_integer_timestamp_becomes_float() -> None:
    """Integer epoch seconds are accepted as a float."""
    item = decode_item(body(make(metadata__timestamp=1_717_171_717)), JSON)
    assert isinstance(item.metadata.timestamp, float)


def test_optional_fields_decode() -> None:
    """Duration, exit code and error decode with their types."""
    data = make(metadata__duration_seconds=1.5, metadata__exit_code=2, metadata__error="boom")
    metadata = decode_item(body(data), JSON).metadata
    assert (metadata.duration_seconds, metadata.exit_code, metadata.error) == (1.5, 2, "boom")


def test_extra_metadata_is_preserved() -> None:
    """Unknown metadata keys survive decoding and encoding."""
    extra = {"tags": ["a", "b"], "nested": {"n": 1, "ok": True, "none": None}}
    item = decode_item(body(make(metadata__mahavishnu=extra)), JSON)
    assert item.metadata.model_extra == {"mahavishnu": extra}
    assert json.loads(encode_item(item))["metadata"]["mahavishnu"] == extra


@pytest.mark.parametrize(
    "data",
    [
        make(),
        make(metadata__timestamp="2024-06-01T12:00:00.123456+02:00"),
        make(metadata__timestamp=1e9, metadata__exit_code=0, metadata__extra={"big": 10**25}),
        make(content='ünïcödé ✓ 😀 \u0000 "quoted" \\ back', metadata__error=None),
    ],
)
def test_round_trip(data: dict[str, Any]) -> None:
    """Encoding then decoding gives back an equal item, and the same JSON as was sent."""
    item = decode_item(body(data), JSON)
    encoded = encode_item(item)
    assert decode_item(encoded, JSON) == item
    assert json.loads(encoded) == data


def test_encode_is_compact_utf8_and_keeps_float() -> None:
    """The encoding is compact UTF-8, omits unset fields and keeps a float timestamp a float."""
    encoded = encode_item(decode_item(body(make(content="é", metadata__timestamp=1e9)), JSON))
    assert b" " not in encoded
    assert "é".encode() in encoded
    assert b'"timestamp":1000000000.0' in encoded
    assert b"exit_code" not in encoded


def test_content_type_parameters_accepted() -> None:
    """JSON content types match case-insensitively and allow a utf-8 charset."""
    for content_type in (
        "application/json",
        "Application/JSON; charset=UTF-8",
        'application/json;charset="utf-8"',
    ):
        decode_item(body(make()), content_type)


def nested(depth: int) -> bytes:
    """An item whose metadata carries arrays nested `depth` deep."""
    return body(make()).replace(
        b'"pool_id"', b'"deep":' + b"[" * depth + b"]" * depth + b',"pool_id"'
    )


BAD_INPUT = [
    ("truncated JSON", b'{"content": "x", "meta', JSON, Reason.INVALID_JSON, "line 1 column"),
    ("invalid UTF-8 byte", b'{"content": "\xff"}', JSON, Reason.INVALID_ENCODING, "byte 13"),
    (
        "UTF-8 BOM",
        b"\xef\xbb\xbf" + body(make()),
        JSON,
        Reason.INVALID_ENCODING,
        "UTF-8 byte order mark",
    ),
    (
        "UTF-16 with BOM",
        json.dumps(make()).encode("utf-16"),
        JSON,
        Reason.INVALID_ENCODING,
        "UTF-16 byte order mark",
    ),
    (
        "UTF-16 without BOM",
        json.dumps(make()).encode("utf-16-le"),
        JSON,
        Reason.INVALID_ENCODING,
        "NUL at byte 1",
    ),
    (
        "UTF-32 with BOM",
        json.dumps(make()).encode("utf-32"),
        JSON,
        Reason.INVALID_ENCODING,
        "UTF-32 byte order mark",
    ),
    (
        "NaN",
        body(make()).replace(b"1717171717.25", b"NaN"),
        JSON,
        Reason.INVALID_JSON,
        "NaN is not valid JSON",
    ),
    (
        "Infinity",
        body(make()).replace(b"1717171717.25", b"Infinity"),
        JSON,
        Reason.INVALID_JSON,
        "Infinity is not valid JSON",
    ),
    (
        "overflowing float",
        body(make()).replace(b"1717171717.25", b"1e999"),
        JSON,
        Reason.INVALID_JSON,
        "out of range",
    ),
    (
        "duplicate keys",
        b'{"content": "a", "content": "b"}',
        JSON,
        Reason.INVALID_JSON,
        "duplicate key 'content'",
    ),
    ("nesting depth 100", nested(100), JSON, Reason.INVALID_JSON, "nested deeper than 32"),
    (
        "nesting depth 100_000",
        b"[" * 100_000 + b"]" * 100_000,
        JSON,
        Reason.INVALID_JSON,
        "nested deeper than 32",
    ),
    (
        "5,000-digit integer",
        body(make()).replace(b"1717171717.25", b"7" * 5000),
        JSON,
        Reason.INVALID_JSON,
        "integer of 5000 digits",
    ),
    (
        "lone surrogate",
        body(make()).replace(b'"the build passed"', b'"\\ud800"'),
        JSON,
        Reason.INVALID_ENCODING,
        "content: lone surrogate",
    ),
    ("lone surrogate in key", b'{"\\udfff": 1}', JSON, Reason.INVALID_ENCODING, "lone surrogate"),
    ("top-level array", b"[]", JSON, Reason.SCHEMA, "top level must be a JSON object, not array"),
    ("missing content", body(make(content=DROP)), JSON, Reason.SCHEMA, "content: Field required"),
    (
        "content not a string",
        body(make(content=123)),
        JSON,
        Reason.SCHEMA,
        "content: Input should be a valid string",
    ),
    (
        "metadata missing",
        body(make(metadata=DROP)),
        JSON,
        Reason.SCHEMA,
        "metadata: Field required",
    ),
    (
        "metadata.pool_id missing",
        body(make(metadata__pool_id=DROP)),
        JSON,
        Reason.SCHEMA,
        "metadata.pool_id: Field required",
    ),
    (
        "metadata.pool_id empty",
        body(make(metadata__pool_id="")),
        JSON,
        Reason.SCHEMA,
        "metadata.pool_id: String should have at least 1 character",
    ),
    (
        "metadata.pool_id a number",
        body(make(metadata__pool_id=123)),
        JSON,
        Reason.SCHEMA,
        "metadata.pool_id: Input should be a valid string",
    ),
    (
        "metadata.timestamp a bool",
        body(make(metadata__timestamp=True)),
        JSON,
        Reason.SCHEMA,
        "metadata.timestamp: must be epoch seconds, not a boolean",
    ),
    (
        "metadata.timestamp in ms",
        body(make(metadata__timestamp=1_717_171_717_250)),
        JSON,
        Reason.SCHEMA,
        "metadata.timestamp: epoch seconds out of range",
    ),
    (
        "metadata.timestamp negative",
        body(make(metadata__timestamp=-1)),
        JSON,
        Reason.SCHEMA,
        "metadata.timestamp: epoch seconds out of range",
    ),
    (
        "metadata.timestamp not ISO",
        body(make(metadata__timestamp="yesterday")),
        JSON,
        Reason.SCHEMA,
        "metadata.timestamp: not an ISO-8601 datetime",
    ),
    (
        "metadata.exit_code a string",
        body(make(metadata__exit_code="1")),
        JSON,
        Reason.SCHEMA,
        "metadata.exit_code: Input should be a valid integer",
    ),
    (
        "metadata.exit_code a bool",
        body(make(metadata__exit_code=False)),
        JSON,
        Reason.SCHEMA,
        "metadata.exit_code: Input should be a valid integer",
    ),
    (
        "unknown top-level key",
        body(make(contnet="typo")),
        JSON,
        Reason.SCHEMA,
        "contnet: Extra inputs are not permitted",
    ),
    (
        "oversize body",
        body(make(content="x" * 2_000_000)),
        JSON,
        Reason.TOO_LARGE,
        "limit is 1048576",
    ),
    (
        "content type text/plain",
        body(make()),
        "text/plain",
        Reason.WRONG_CONTENT_TYPE,
        "'text/plain'",
    ),
    (
        "charset utf-16",
        body(make()),
        "application/json; charset=utf-16",
        Reason.WRONG_CONTENT_TYPE,
        "charset 'utf-16'",
    ),
]


@pytest.mark.parametrize(
    ("raw", "content_type", "reason", "fragment"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_rejected_with_reason(
    raw: bytes, content_type: str | None, reason: Reason, fragment: str
) -> None:
    """Each kind of bad body raises DecodeError with its precise reason and a short detail."""
    with pytest.raises(DecodeError) as caught:
        decode_item(raw, content_type)
    assert caught.value.reason is reason
    assert fragment in caught.value.detail
    assert str(caught.value) == caught.value.detail
    assert len(caught.value.detail) < 300


def test_size_is_checked_before_anything_else() -> None:
    """An oversize body is TOO_LARGE even when its content type and bytes are also wrong."""
    with pytest.raises(DecodeError) as caught:
        decode_item(b"\xff" * 11, "text/plain", max_bytes=10)
    assert caught.value.reason is Reason.TOO_LARGE


def test_max_depth_is_configurable() -> None:
    """Nesting up to max_depth passes the depth check; one more level is rejected."""
    decode_item(nested(30), JSON, max_depth=32)
    with pytest.raises(DecodeError, match="nested deeper than 5"):
        decode_item(nested(4), JSON, max_depth=5)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets and escaped quotes inside strings are not mistaken for nesting."""
    item = decode_item(body(make(content='\\" [' * 1000 + "{" * 1000)), JSON)
    assert item.content.endswith("{")


def test_several_errors_are_joined_and_short() -> None:
    """Many schema errors are listed with '; ' and clipped under 300 characters."""
    data = {"content": 1, "metadata": {f"k{'x' * 100}": 1, "exit_code": "x"}}
    for i in range(20):
        data[f"unknown_{'y' * 80}_{i}"] = i
    with pytest.raises(DecodeError) as caught:
        decode_item(body(data), JSON)
    assert "content: Input should be a valid string; " in caught.value.detail
    assert len(caught.value.detail) < 300


def test_decode_error_pickles() -> None:
    """A DecodeError keeps its reason and detail through pickling."""
    error = pickle.loads(pickle.dumps(DecodeError(Reason.SCHEMA, "content: x")))
    assert (error.reason, error.detail) == (Reason.SCHEMA, "content: x")


def test_item_from_dict_accepts_valid_item() -> None:
    """A valid dict becomes an item equal to what the worker decodes from its encoding."""
    data = make(metadata__timestamp=datetime(2024, 6, 1, tzinfo=UTC), metadata__extra=[1, "a"])
    item = item_from_dict(data)
    assert isinstance(item, MemoryItem)
    assert decode_item(encode_item(item), JSON) == item


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (make(metadata__worker_id=DROP), "metadata.worker_id: Field required"),
        (make(content=7), "content: Input should be a valid string"),
        (make(metadata__timestamp=float("nan")), "metadata.timestamp: epoch seconds out of range"),
        (make(metadata__duration_seconds=float("inf")), "metadata.duration_seconds"),
        (make(metadata__extra=float("nan")), "not encodable as JSON"),
        (make(metadata__extra={1, 2}), "not encodable as JSON"),
        (make(content="\ud800"), "not encodable as JSON"),
        (make(metadata__extra=10**40), "integer of 41 digits"),
    ],
)
def test_item_from_dict_rejects_with_schema(data: dict[str, Any], fragment: str) -> None:
    """An invalid or unpublishable dict raises DecodeError with Reason.SCHEMA."""
    with pytest.raises(DecodeError) as caught:
        item_from_dict(data)
    assert caught.value.reason is Reason.SCHEMA
    assert fragment in caught.value.detail


@pytest.mark.parametrize(
    ("message_id", "expected"),
    [
        ("msg-42", "msg-42"),
        (None, "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"),
        ("", "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"),
    ],
)
def test_idempotency_key(message_id: str | None, expected: str) -> None:
    """The message id wins when set; otherwise the key is the body's SHA-256."""
    assert idempotency_key(message_id, b"a") == expected


def test_idempotency_key_is_stable_across_processes() -> None:
    """Another interpreter computes the same key for the same body."""
    code = "from worker.models import idempotency_key; print(idempotency_key(None, b'xyz'))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()
    assert other == idempotency_key(None, b"xyz")
    assert idempotency_key(None, b"xyz") != idempotency_key(None, b"xyz ")


def same(a: object, b: object) -> bool:
    """Equal with the same types all the way down, dict keys in the same order, -0.0 not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and repr(a) == repr(b)


def parsed(text: str, *, strict: bool = False) -> tuple[object, ...]:
    """("ok", value) or ("error", reason, detail) from the decoder, or from the strict parser."""
    try:
        if not strict:
            return ("ok", _parse_json(text, 32))
        _check_depth(text, 32)
        return ("ok", _parse_strict(text))
    except DecodeError as exc:
        return ("error", exc.reason, exc.detail)


# Each is rejected by the strict parser; orjson alone would accept the first ones.
STRICT_REJECTS = [
    ('{"a":1,"a":2}', Reason.INVALID_JSON, "duplicate key 'a'"),
    ('{"a" :1,"a":2}', Reason.INVALID_JSON, "duplicate key 'a'"),
    ('{"a":1 , "a"\t:\n2}', Reason.INVALID_JSON, "duplicate key 'a'"),
    ('{"s":"\\":","a":1,"a":2}', Reason.INVALID_JSON, "duplicate key 'a'"),
    ('{"s":"x\\" : y","t":{"b":[1,{"c":1,"c":1}]}}', Reason.INVALID_JSON, "duplicate key 'c'"),
    ('[{"k":1},{"k":2,"k":3}]', Reason.INVALID_JSON, "duplicate key 'k'"),
    ("1" * 31, Reason.INVALID_JSON, "integer of 31 digits"),
    ('{"n":-' + "9" * 40 + "}", Reason.INVALID_JSON, "integer of 40 digits"),
    ('{"n":1e400}', Reason.INVALID_JSON, "number 1e400 out of range"),
    ('{"n":-1e400}', Reason.INVALID_JSON, "out of range"),
    ('{"n":NaN}', Reason.INVALID_JSON, "NaN is not valid JSON"),
    ('{"n":-Infinity}', Reason.INVALID_JSON, "-Infinity is not valid JSON"),
    ('{"s":"\\ud800"}', Reason.INVALID_ENCODING, "s: lone surrogate"),
    ('{"s":["ok","\\udc00\\ud800"]}', Reason.INVALID_ENCODING, "s[1]: lone surrogate"),
    ('{"\\ud83d":1}', Reason.INVALID_ENCODING, "lone surrogate"),
    ('"\\ud800\\u0041"', Reason.INVALID_ENCODING, "top level: lone surrogate"),
    ("[" * 33 + "]" * 33, Reason.INVALID_JSON, "nested deeper than 32"),
    ('{"a":1,}', Reason.INVALID_JSON, "Expecting property name"),
    ('"a\tb"', Reason.INVALID_JSON, "Invalid control character"),
]


@pytest.mark.parametrize(
    ("text", "reason", "fragment"), STRICT_REJECTS, ids=[case[2] for case in STRICT_REJECTS]
)
def test_fast_path_never_accepts_what_the_strict_parser_rejects(
    text: str, reason: Reason, fragment: str
) -> None:
    """Every body the strict parser rejects is rejected with the same reason and detail."""
    fast = parsed(text)
    assert fast == parsed(text, strict=True)
    assert fast[:2] == ("error", reason)
    assert fragment in str(fast[2])


# Valid inputs, including those orjson alone reads differently (duplicates aside).
STRICT_ACCEPTS = [
    body(make()).decode(),
    body(
        make(metadata__extra={"tags": ["a", "b"], "n": None, "ok": True, "deep": [[{}], []]})
    ).decode(),
    '{"a" : 1,\n "b"\t:\r[1, 2.5, -0, -0.0, 0.1, 1E5, 1e-5, 5e-324, 1e-400]}',
    '{"s":"\\":","k":"\\"  :","a":{"\\":":1}}',
    '{"n":18446744073709551615,"m":18446744073709551616,"o":-9223372036854775808}',
    '{"n":-9223372036854775809,"m":' + "9" * 30 + ',"o":-' + "9" * 30 + "}",
    '{"f":9223372036854775808.0,"g":1e19,"h":-9.3e18,"i":12345678901234567890.5}',
    '{"f":0.1000000000000000055511151231257827,"g":9007199254740993.000000000000000001}',
    '{"s":"\\ud83d\\ude00 \\u00e9 \\u0000 \\/ \\" \\\\","r":"\u2028\u00e9\x7f"}',
    '{"z":{"y":{"x":[1,{"w":"v"}]}},"z2":[]}',
    "[]",
    '"text"',
    "123",
    "-0",
    "1.5",
    "1" * 30,
    "true",
    "null",
    " \t\n\r{} ",
]


@pytest.mark.parametrize("text", STRICT_ACCEPTS)
def test_fast_path_values_are_identical_to_the_strict_parsers(text: str) -> None:
    """What both parsers accept comes back equal, with the same types and key order."""
    fast, strict = parsed(text), parsed(text, strict=True)
    assert fast[0] == strict[0] == "ok"
    assert same(fast[1], strict[1])


@pytest.mark.parametrize(
    "raw",
    [
        body(make(metadata__exit_code=0, metadata__tags=["a"])),
        body(make(metadata__timestamp="2024-06-01T12:00:00Z", content="at 12:00: done")),
        body(make(content='he said "yes" and \\ left')),
        json.dumps(make(), indent=2).encode(),
    ],
    ids=["plain", "colons in strings", "escapes", "indented"],
)
def test_typical_bodies_take_the_fast_path(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typical items never reach the strict parser, which is there to decide and explain."""
    expected = decode_item(raw, JSON)

    def fail(text: str) -> object:
        raise AssertionError("strict parser called")

    monkeypatch.setattr(worker.strict_json, "_parse_strict", fail)
    assert decode_item(raw, JSON) == expected


def test_orjson_alone_differs_where_the_fast_path_checks() -> None:
    """orjson keeps the last duplicate key and reads integers beyond 64 bits as floats."""
    assert orjson.loads('{"a" :1,"a":2}') == {"a": 2}
    assert orjson.loads("18446744073709551615") == 2**64 - 1
    assert isinstance(orjson.loads("18446744073709551616"), float)
    assert isinstance(orjson.loads("-9223372036854775809"), float)


def test_orjson_reads_floats_as_the_strict_parser_does() -> None:
    """The fast path relies on this: orjson rounds every float literal as float() does."""
    rnd = random.Random(1717171717)
    for _ in range(2000):
        value = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        if not math.isfinite(value) or value == 0:
            continue
        above = math.nextafter(value, math.inf)
        if not math.isfinite(above):
            continue
        with localcontext() as context:
            context.prec = 1200  # enough for every double, so the midpoint below is exact
            halfway = (Decimal(value) + Decimal(above)) / 2  # the hardest case to round
            beyond = halfway + Decimal(10) ** (halfway.adjusted() - 30)
        for literal in (repr(value), f"{value:.25e}", f"{halfway:e}", f"{beyond:e}"):
            assert orjson.loads(literal) == float(literal), literal


def test_fast_path_agrees_with_the_strict_parser_on_mutated_bodies() -> None:
    """Random edits of JSON texts get the same value or the same error from both paths."""
    rnd = random.Random(20240601)
    seeds = [
        body(make(metadata__extra=[1, 2.5, {"k": '":'}])).decode(),
        '{"a" :1, "b":{"c":"\\":","d":[true,false,null,-0]}, "e":"\\u00e9\\ud83d\\ude00"}',
        '[1e300, 18446744073709551615, -9223372036854775808, 0.1, {"k\\"":1}]',
    ]
    pieces = [*'{}[]":, \t\\0123456789.eE-', "\\ud800", '"a":1,', '"a" :', "9" * 19, "NaN"]
    for _ in range(3000):
        text = list(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(text))
            if rnd.random() < 0.5:
                text.insert(at, rnd.choice(pieces))
            else:
                text[at] = rnd.choice(pieces)
        mutated = "".join(text)
        fast, strict = parsed(mutated), parsed(mutated, strict=True)
        assert fast[0] == strict[0], mutated
        assert same(fast[1], strict[1]) if fast[0] == "ok" else fast == strict, mutated
