"""Reading a request body as JSON the strict way: UTF-8 only (RFC 8259), no NaN or Infinity
(not JSON), no number Python or the databases cannot hold, no key given twice (the last would
silently win), no nesting deeper than any request needs, no lone surrogate (not text)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from server.api.problems import BadRequest

# The deepest request body is three levels (a consultation, its team list, a member); the
# limit leaves room for that and refuses a deep body before the parser recurses into it.
MAX_DEPTH = 16
# A number literal longer than this is no value any field takes (the widest, an offset, has
# 19 digits); refusing it early keeps Python's 4300-digit int conversion limit out of reach.
MAX_NUMBER_CHARS = 100

# A JSON string (skipped whole, so brackets inside it do not count) or a bracket.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPENERS = frozenset("[{")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or BadRequest naming what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"request body is not valid JSON: it is not UTF-8 ({exc.reason})"
        raise BadRequest(detail) from None
    _check_depth(text)
    try:
        data = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable after _check_depth; kept as the last line of defence
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    _check_text(data)
    return data


def _check_depth(text: str) -> None:
    depth = 0
    for token in _STRING_OR_BRACKET.findall(text):
        if token in _OPENERS:
            depth += 1
            if depth > MAX_DEPTH:
                raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels")
        elif token in "]}":
            depth -= 1


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"request body gives the key {_quoted(key)} more than once")
        result[key] = value
    return result


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadRequest(
            f"request body holds an integer of {len(literal)} characters; "
            f"at most {MAX_NUMBER_CHARS} are allowed"
        )
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadRequest(
            f"request body holds a number of {len(literal)} characters; "
            f"at most {MAX_NUMBER_CHARS} are allowed"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise BadRequest(f"request body holds the number {literal}, which is out of range")
    mantissa = literal.lower().partition("e")[0]
    if value == 0.0 and any(d in mantissa for d in "123456789"):
        raise BadRequest(f"request body holds the number {literal}, which is too small to hold")
    return value


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON number")


def _check_text(data: Any) -> None:
    """Every key and string is text: a lone surrogate (from a `\\ud800` escape) is not."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(key)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)


def _check_string(value: str) -> None:
    found = _SURROGATE.search(value)
    if found:
        raise BadRequest(
            f"request body holds a lone surrogate U+{ord(found.group()):04X}, which is not text"
        )


def _quoted(key: str) -> str:
    # The key is echoed back: shortened, and a lone surrogate (not serialisable) escaped.
    shown = key if len(key) <= 60 else key[:60] + "…"
    return "'" + shown.encode("utf-8", "backslashreplace").decode("utf-8") + "'"
