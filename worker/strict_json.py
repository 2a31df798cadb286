"""Strict decoding of a message body into JSON: what the worker accepts, and why not otherwise.

orjson parses fast; the checks around it keep what the stdlib would refuse or lose refused
too: byte order marks, UTF-16/32, duplicate keys, NaN, integers too wide to keep, nesting past
a bound.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any

import orjson

from worker.outcome import Reason

_MAX_DETAIL = 280
_MAX_NAME = 40
_MAX_ERRORS = 5
_MAX_INT_DIGITS = 30
# Longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF8, "UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_BOM_FIRST_BYTES = frozenset(bom[:1] for bom, _ in _BOMS)
# A string token (skipped whole, so brackets inside it do not count) or a bracket.
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]', re.DOTALL)
# A key: a string, optional JSON whitespace, a colon.
_KEY_COLON = re.compile(r'"[ \t\n\r]*:')
_QUOTE_THEN_SPACE = re.compile(r'"[ \t\n\r]')
_ESCAPED_QUOTE_COLON = re.compile(r'\\"[ \t\n\r]*:')
# Below this many characters str.count is the cheaper way to count keys, above it findall.
_SHORT_TEXT = 1024
# The integers orjson parses exactly (int64 and uint64); beyond them it returns a float.
_MIN_EXACT_INT = -(2**63)
_MAX_EXACT_INT = 2**64 - 1
_WIDE_FLOAT = float(2**63)


def clip(text: str, limit: int = _MAX_DETAIL) -> str:
    """Make `text` printable as UTF-8 and at most `limit` characters long."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DecodeError(Exception):
    """A message body that can never become a valid memory item."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = clip(detail)
        super().__init__(self.detail)

    def __reduce__(self) -> tuple[type[DecodeError], tuple[Reason, str]]:
        # The default reduce would call __init__ with `detail` only and fail to unpickle.
        return type(self), (self.reason, self.detail)


def _check_content_type(content_type: str | None) -> None:
    """Accept no content type or application/json in UTF-8."""
    if content_type is None or content_type == "application/json":
        return  # the usual cases, without parsing
    media, *params = (part.strip() for part in content_type.split(";"))
    if media.lower() != "application/json":
        shown = clip(content_type, _MAX_NAME)
        raise DecodeError(Reason.WRONG_CONTENT_TYPE, f"content type {shown!r} is not JSON")
    for param in params:
        name, _, charset = param.partition("=")
        charset = charset.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            shown = clip(charset, _MAX_NAME)
            raise DecodeError(Reason.WRONG_CONTENT_TYPE, f"charset {shown!r} is not utf-8")


def _decode_utf8(body: bytes) -> str:
    """Decode strictly as UTF-8 without a byte order mark."""
    if body[:1] in _BOM_FIRST_BYTES:  # most bodies start with `{` and skip the loop
        for bom, name in _BOMS:
            if body.startswith(bom):
                raise DecodeError(Reason.INVALID_ENCODING, f"{name} byte order mark at byte 0")
    # NUL is valid UTF-8 but never valid JSON text; it is the mark of UTF-16/32 without a BOM.
    nul = body.find(b"\x00")
    if nul >= 0:
        detail = f"NUL at byte {nul}: looks like UTF-16 or UTF-32, expected UTF-8"
        raise DecodeError(Reason.INVALID_ENCODING, detail)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"invalid UTF-8 at byte {exc.start}: {exc.reason}"
        raise DecodeError(Reason.INVALID_ENCODING, detail) from None


def _check_depth(text: str, max_depth: int) -> None:
    """Reject nesting deeper than `max_depth` without recursing."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    for match in _TOKENS.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > max_depth:
                detail = f"nested deeper than {max_depth} at char {match.start()}"
                raise DecodeError(Reason.INVALID_JSON, detail)
        elif char in "]}":
            depth -= 1


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Build an object, rejecting a key that appears twice."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DecodeError(Reason.INVALID_JSON, f"duplicate key {clip(key, _MAX_NAME)!r}")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> float:
    """Reject NaN, Infinity and -Infinity, which are not JSON."""
    raise DecodeError(Reason.INVALID_JSON, f"{name} is not valid JSON")


def _bounded_int(literal: str) -> int:
    """Parse an integer literal of at most `_MAX_INT_DIGITS` digits."""
    digits = len(literal.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        detail = f"integer of {digits} digits, limit is {_MAX_INT_DIGITS}"
        raise DecodeError(Reason.INVALID_JSON, detail)
    return int(literal)


def _finite_float(literal: str) -> float:
    """Parse a number literal, rejecting one that overflows to infinity."""
    value = float(literal)
    if math.isinf(value):
        raise DecodeError(Reason.INVALID_JSON, f"number {clip(literal, _MAX_NAME)} out of range")
    return value


def _unencodable(value: object, path: str) -> str | None:
    """Return the path of the first string or key that is not valid Unicode, if any."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{clip(key, _MAX_NAME)}" if path else clip(key, _MAX_NAME)
            found = child if not _is_unicode(key) else _unencodable(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _is_unicode(text: str) -> bool:
    """Tell whether `text` is free of lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json(text: str, max_depth: int) -> object:
    """Parse strict JSON: no duplicate keys, NaN, huge numbers, deep nesting or lone surrogates."""
    _check_depth(text, max_depth)
    # orjson is ~10x faster than the strict parser, but keeps the last of duplicate keys and
    # returns an integer beyond 64 bits as a float. Like the strict parser it rejects NaN,
    # Infinity, overflowing floats, lone surrogates and anything else that is not JSON, and
    # rounds floats correctly. Its value is used only when it provably equals the strict
    # parser's; otherwise the strict parser decides and says why. A string holding `\":`
    # (JSON inside the content) defeats both key counts below: skip the attempt.
    if _ESCAPED_QUOTE_COLON.search(text) is None:
        try:
            value: object = orjson.loads(text)
            keys = _keys_unless_wide(value)
        except (orjson.JSONDecodeError, RecursionError):
            return _parse_strict(text)
        # Every key has a colon of its own, outside strings, right after the key's closing
        # quote and optional whitespace. So the colons in the text, and the strings followed
        # by a colon, are two counts never below the number of keys: if either equals the
        # number orjson kept, no key was a duplicate.
        if keys >= 0 and (keys == text.count(":") or keys == _count_key_colons(text)):
            return value
    return _parse_strict(text)


def _count_key_colons(text: str) -> int:
    """Count strings followed by optional JSON whitespace and a colon."""
    if len(text) <= _SHORT_TEXT and _QUOTE_THEN_SPACE.search(text) is None:
        return text.count('":')  # no whitespace follows any string: the same count
    return len(_KEY_COLON.findall(text))


def _keys_unless_wide(value: Any) -> int:
    """Count the object keys in a parsed value, or -1 if it holds an integer beyond 64 bits.

    orjson returns such an integer as a float of magnitude 2**63 or more; a float literal that
    large also gives -1, and the strict parser reads it the same.
    """
    # Exact type checks: a third faster than isinstance here, and orjson makes no subclasses.
    kind = type(value)
    if kind is dict:
        count = len(value)
        children = value.values()
    elif kind is list:
        count, children = 0, value
    elif kind is float:
        return 0 if -_WIDE_FLOAT < value < _WIDE_FLOAT else -1
    elif kind is int:  # were orjson to return wide integers as they are
        return 0 if _MIN_EXACT_INT <= value <= _MAX_EXACT_INT else -1
    else:
        return 0
    for child in children:
        if type(child) is str:
            continue  # the most common value, and nothing to check
        inner = _keys_unless_wide(child)
        if inner < 0:
            return -1
        count += inner
    return count


def _parse_strict(text: str) -> object:
    """Parse with the stdlib parser, rejecting with a precise detail what is not strict JSON."""
    try:
        value: object = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        detail = str(exc)  # "Expecting value: line 1 column 2 (char 1)"
        raise DecodeError(Reason.INVALID_JSON, detail) from None
    except RecursionError:
        raise DecodeError(Reason.INVALID_JSON, "nested too deeply") from None
    # Lone surrogates can only come from \u escapes, so most bodies skip the walk.
    if "\\u" in text:
        path = _unencodable(value, "")
        if path is not None:
            detail = f"{path or 'top level'}: lone surrogate, not encodable as UTF-8"
            raise DecodeError(Reason.INVALID_ENCODING, detail)
    return value


def parse_body(body: bytes, content_type: str | None, max_bytes: int, max_depth: int) -> object:
    """The JSON value of a message body, or `DecodeError` saying why it is not one."""
    if len(body) > max_bytes:
        raise DecodeError(Reason.TOO_LARGE, f"body is {len(body)} bytes, limit is {max_bytes}")
    _check_content_type(content_type)
    return _parse_json(_decode_utf8(body), max_depth)
