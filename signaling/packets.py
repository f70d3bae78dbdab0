"""Reading socket.io packets without trusting them.

python-socketio decodes a packet before any handler runs, and drops it unanswered when the
decoding raises: JSON nested thousands deep (`RecursionError`), an integer of more than 100
digits, text that is not JSON, an event name that is not a string, a binary placeholder naming
no attachment. Here such a packet keeps its type, namespace and ack id (they come before the
data) and carries an `Unreadable` in place of what could not be read, so the namespace answers
it like any other refusal; a packet whose framing itself cannot be read closes the connection,
as socket.io's reference server does."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import socketio
from engineio.async_drivers import aiohttp as eio_aiohttp
from socketio import packet as sio_packet

log = logging.getLogger(__name__)

# How deep an event argument or the connect auth may nest (arrays and objects); the deepest
# payload of the protocol (an annotation's points) nests three levels.
MAX_NESTING = 32
# The same ceiling python-engineio puts on integer literals.
_MAX_INT_DIGITS = 100

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_EVENT_NAME = re.compile(r'\[\s*("(?:[^"\\]|\\.){0,200}")')
_ATTACHMENTS = re.compile(r"[56](\d{1,10})-")


class PayloadRefused(ValueError):
    """JSON the server will not decode; the message says why, for the client. A ValueError,
    because that is what python-engineio expects of a JSON module that cannot decode."""


@dataclass(frozen=True)
class Unreadable:
    """Stands in for the part of a packet that could not be read: the event (name and
    arguments) of an event packet, or the auth of a connect packet. JSON never decodes to
    one, so no client can send it."""

    code: str
    message: str
    # The event's name if it could be recovered, else "".
    event: str = ""


def nested_deeper(text: str, limit: int) -> bool:
    """Whether the JSON `text` nests arrays and objects more than `limit` deep, found without
    recursing: strings are blanked, then the innermost bracket pairs are removed `limit`
    times. Unbalanced brackets are left for the decoder to refuse."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if "[" * (limit + 1) in brackets or "{" * (limit + 1) in brackets:
        return True  # the usual attack, found without the passes below
    for _ in range(limit):
        brackets, removed = _INNERMOST.subn("", brackets)
        if not brackets or not removed:
            return False
    return _INNERMOST.search(brackets) is not None


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
        raise PayloadRefused(f"a number has more than {_MAX_INT_DIGITS} digits")
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise PayloadRefused(f"the number {literal[:24]} is out of range")
    return value


def _constant(literal: str) -> Any:
    raise PayloadRefused(f"{literal} is not a JSON number")


class WireJson:
    """The JSON module python-socketio and python-engineio decode packets with (their
    `json=` option): standard JSON, but refusing what no client of this protocol sends and
    what would make the decoder recurse without bound."""

    dumps = staticmethod(json.dumps)

    @staticmethod
    def loads(text: str | bytes, **_: Any) -> Any:
        if isinstance(text, bytes | bytearray):
            text = text.decode("utf-8", errors="replace")
        # One level more than MAX_NESTING: an event's arguments come in a list.
        if nested_deeper(text, MAX_NESTING + 1):
            raise PayloadRefused(f"the payload is nested more than {MAX_NESTING} levels deep")
        try:
            return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        except PayloadRefused:
            raise
        except RecursionError:
            raise PayloadRefused(
                f"the payload is nested more than {MAX_NESTING} levels deep"
            ) from None
        except ValueError as exc:
            raise PayloadRefused(f"the payload is not valid JSON ({_json_error(exc)})") from None


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    return "unreadable number"


def payload_problem(data: Any) -> str | None:
    """What makes decoded data unacceptable, whatever the event: nesting deeper than
    MAX_NESTING, binary attachments, text that is not valid Unicode (a lone surrogate, which
    JSON can escape but UTF-8 cannot carry), a number that is not finite. None if nothing.
    Iterative, so no depth of input can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list | tuple):
            if depth >= MAX_NESTING:
                return f"the payload is nested more than {MAX_NESTING} levels deep"
            for item in _children(value):
                stack.append((item, depth + 1))
        elif isinstance(value, bytes | bytearray):
            return "binary data is not accepted; send JSON"
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                return "text holds a lone surrogate (U+D800 to U+DFFF), which is not Unicode"
        elif isinstance(value, float) and not math.isfinite(value):
            return "numbers must be finite"
        elif isinstance(value, Unreadable):
            return value.message
    return None


def _children(value: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield item
    else:
        yield from value


def _describe_name(name: Any) -> str:
    kind = {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        dict: "an object",
        list: "an array",
        bytes: "binary data",
    }.get(type(name), type(name).__name__)
    return f"the event name must be a string, not {kind}"


def event_problem(data: Any) -> Unreadable | None:
    """An event packet's data is a JSON array whose first element is the event's name."""
    if not isinstance(data, list) or not data:
        return Unreadable(
            "invalid_event", "an event is a JSON array starting with the event's name"
        )
    if not isinstance(data[0], str):
        return Unreadable("invalid_event", _describe_name(data[0]))
    return None


def _recovered_name(encoded: str) -> str:
    """The event name of an event packet whose data could not be decoded, if it is there."""
    start = encoded.find("[")
    found = _EVENT_NAME.match(encoded, start) if start >= 0 else None
    if found is None:
        return ""
    try:
        name = json.loads(found.group(1))
    except ValueError:
        return ""
    return name[:64] if isinstance(name, str) and not _SURROGATE.search(name) else ""


def _is_unreadable(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and isinstance(data[0], Unreadable)


_EVENTS = (sio_packet.EVENT, sio_packet.BINARY_EVENT)
_BINARY = (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK)


class CheckedPacket(sio_packet.Packet):  # type: ignore[misc]
    """A socket.io packet whose data, once decoded, is something the server can answer."""

    json = WireJson

    def decode(self, encoded_packet: Any) -> int:
        try:
            count: int = super().decode(encoded_packet) or 0
        except PayloadRefused as exc:
            # The type, namespace and id precede the data, so they have been read.
            is_event = self.packet_type in _EVENTS
            unreadable = Unreadable(
                "invalid_payload", str(exc), _recovered_name(encoded_packet) if is_event else ""
            )
            self.data = [unreadable] if is_event else unreadable
            attachments = _ATTACHMENTS.match(encoded_packet)
            count = int(attachments.group(1)) if attachments else 0
        if self.packet_type in _BINARY and count == 0:
            # "Binary" with no attachment to wait for: python-socketio would take every later
            # packet of the connection for an attachment.
            self.packet_type -= sio_packet.BINARY_EVENT - sio_packet.EVENT
        if self.packet_type in _EVENTS and not _is_unreadable(self.data):
            problem = event_problem(self.data)
            if problem is not None:
                self.data = [problem]
        return count

    def add_attachment(self, attachment: Any) -> bool:
        try:
            done: bool = super().add_attachment(attachment)
        except (IndexError, KeyError, TypeError):
            # A placeholder naming no attachment, or not a number.
            name = self.data[0] if isinstance(self.data, list) and self.data else ""
            self.data = [
                Unreadable(
                    "invalid_payload",
                    "a binary placeholder names no attachment",
                    name[:64] if isinstance(name, str) else "",
                )
            ]
            return True
        return done


class CheckedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, reading packets with CheckedPacket; a packet whose framing
    cannot be read (an unknown packet type, an attachment nobody announced) closes its
    connection with one log line instead of a traceback."""

    def __init__(self, **options: Any) -> None:
        super().__init__(serializer=CheckedPacket, json=WireJson, **options)
        self._closing: set[asyncio.Future[None]] = set()
        # python-engineio has no option for its websocket class or for how it reads a
        # request; it takes both from here.
        self.eio._async = {
            **self.eio._async,
            "websocket": _CheckedWebSocket,
            "translate_request": _checked_translate_request,
        }

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            await super()._handle_eio_message(eio_sid, data)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            log.info("closing %s: unreadable socket.io packet (%s)", eio_sid, type(exc).__name__)
            self._binary_packet.pop(eio_sid, None)
            # Not awaited here: on long-polling the close waits for the client's next GET,
            # which cannot come while its POST is held open by this handler.
            closing = asyncio.ensure_future(self.eio.disconnect(eio_sid))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)


# Engine.IO packet types (0 open to 6 noop) and "b", a base64 binary message.
_ENGINEIO_TYPES = frozenset("0123456b")
# python-engineio refuses a long-polling payload of more packets than this (a ValueError).
_MAX_POLLING_PACKETS = 16
# An Engine.IO close, put in place of a long-polling payload that is none.
_CLOSE = b"1"


def is_engineio_packet(frame: str) -> bool:
    """Whether python-engineio can decode the text frame without raising: a known packet type,
    and base64 that decodes."""
    if not frame or frame[0] not in _ENGINEIO_TYPES:
        return False
    if frame[0] == "b":
        try:
            base64.b64decode(frame[1:])
        except (binascii.Error, ValueError):
            return False
    return True


class _CheckedWebSocket(eio_aiohttp.WebSocket):  # type: ignore[misc]
    """python-engineio's aiohttp websocket, closing the connection on a text frame that is no
    Engine.IO packet instead of failing the request with a traceback: python-engineio decodes
    frames where it cannot catch what that raises."""

    async def wait(self) -> Any:
        data = await super().wait()
        if isinstance(data, str) and not is_engineio_packet(data):
            log.info("closing a websocket: a frame that is no Engine.IO packet")
            raise OSError("not an Engine.IO packet")
        return data


class _Body:
    """A request body already read, as python-engineio reads one (`await read(n)`)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, _: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data


async def _checked_translate_request(request: Any) -> dict[str, Any]:
    """python-engineio's aiohttp request translation, with a long-polling POST read first: a
    payload python-engineio could not decode (not UTF-8, too many packets, a packet of no
    known type) becomes an Engine.IO close, so the session ends without a traceback."""
    environ: dict[str, Any] = eio_aiohttp.translate_request(request)
    if request.method != "POST" or "j" in request.query:  # JSONP bodies are another format
        return environ
    body: bytes = await request.read()
    if not _is_polling_payload(body):
        log.info("closing a long-polling session: a payload that is no Engine.IO payload")
        body = _CLOSE
    environ["wsgi.input"] = _Body(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _is_polling_payload(body: bytes) -> bool:
    if not body:
        return True
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    packets = text.split("\x1e")
    return len(packets) <= _MAX_POLLING_PACKETS and all(map(is_engineio_packet, packets))
