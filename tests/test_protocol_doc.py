"""docs/protocol.md against the code: every client event the namespace handles, every server
event the room service and namespace emit, every error code and every close reason has its
place in the document, and the document describes no client event the namespace lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rooms import errors
from rooms.model import CloseReason, EventKind
from server.app import NAMESPACE, create_app
from server.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
# Files whose emits and error codes the document must cover.
EMITTERS = (
    ROOT / "rooms" / "room_service.py",
    ROOT / "rooms" / "attachments.py",
    ROOT / "signaling" / "namespace.py",
)
# Where error codes may be raised; globbed so that a new module is covered too.
CODE_DIRS = (ROOT / "rooms", ROOT / "signaling")

CLIENT_PART = "Client → server events"
SERVER_PART = "Server → client events"
ERROR_PART = "Error codes"
CLOSE_PART = "Close reasons"

_NAME = r"([a-z][a-z0-9_]*)"
_EVENT_SECTION = re.compile(r"^### `([^`]+)`[ \t]*$", re.M)
_TABLE_CODE = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.M)

# Server events, however the call is wrapped over lines.
_ANNOUNCE = re.compile(r"\.announce\(\s*\"" + _NAME + r"\"")
_EMIT = re.compile(r"\.emit\(\s*\"" + _NAME + r"\"")
# `out.announce(kind.value, ...)` with `kind = EventKind.A if ... else EventKind.B` before it.
_ANNOUNCE_KIND = re.compile(r"\.announce\(\s*(\w+)\.value\b")
_KIND_ASSIGN = r"\b{var}\s*(?::[^=\n]+)?=\s*([^\n]+)"
_EVENT_KIND = re.compile(r"\bEventKind\.([A-Z_]+)\b")

# Error codes, however the call is wrapped over lines.
_ERROR_CODE_PATTERNS = (
    re.compile(r"\bRoomRefused\(\s*\"" + _NAME + r"\""),
    re.compile(r"\b_refused\(\s*\"" + _NAME + r"\""),
    re.compile(r"\bself\._error\(\s*\w+\s*,\s*\w+\s*,\s*\"" + _NAME + r"\""),
)
DOMAIN_CODES = {"forbidden", "not_found", "conflict", "illegal_transition", "invalid_input"}


def _sections(text: str, level: int) -> dict[str, str]:
    """Headings of one level mapped to their text (up to the next heading of that level or
    higher). Fenced code is blanked first so a `#` line inside an example is no heading."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    heading = re.compile(rf"^(#{{1,{level}}}) (.+?)[ \t]*$", re.M)
    found: dict[str, str] = {}
    marks = list(heading.finditer(text))
    for i, mark in enumerate(marks):
        if len(mark.group(1)) != level:
            continue
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        title = mark.group(2)
        assert title not in found, f"heading {title!r} appears twice at level {level}"
        found[title] = text[mark.end() : end]
    return found


@pytest.fixture(scope="module")
def doc() -> dict[str, str]:
    parts = _sections(DOC.read_text(encoding="utf-8"), 2)
    for part in (CLIENT_PART, SERVER_PART, ERROR_PART, CLOSE_PART):
        assert part in parts, f"docs/protocol.md has no '## {part}' section"
    return parts


def _event_sections(part: str) -> list[str]:
    names = _EVENT_SECTION.findall(part)
    assert len(names) == len(set(names)), f"an event is documented twice: {sorted(names)}"
    return names


def _table_codes(part: str) -> set[str]:
    return set(_TABLE_CODE.findall(part))


def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def emitted_server_events() -> set[str]:
    names: set[str] = set()
    for path in EMITTERS:
        src = _source(path)
        names |= set(_ANNOUNCE.findall(src)) | set(_EMIT.findall(src))
        for var in set(_ANNOUNCE_KIND.findall(src)):
            assigns = re.findall(_KIND_ASSIGN.format(var=re.escape(var)), src)
            members = {m for a in assigns for m in _EVENT_KIND.findall(a)}
            assert members, f"{path.name}: announce({var}.value) without `{var} = EventKind.…`"
            names |= {EventKind[m].value for m in members}
    return names


def used_error_codes() -> set[str]:
    codes: set[str] = set()
    for directory in CODE_DIRS:
        for path in sorted(directory.rglob("*.py")):
            src = _source(path)
            for pattern in _ERROR_CODE_PATTERNS:
                codes |= set(pattern.findall(src))
    return codes


def domain_error_codes() -> set[str]:
    """The codes DomainError subclasses declare as class attributes (RoomRefused takes its
    code per instance and is covered by the scan of the source)."""
    found: set[str] = set()
    pending = [errors.DomainError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not errors.DomainError and isinstance(vars(cls).get("code"), str):
            found.add(vars(cls)["code"])
    return found


def test_the_scans_find_what_they_should() -> None:
    # If a refactor changes how events are emitted or errors raised, fail here rather than let
    # the checks below pass on empty sets.
    events = emitted_server_events()
    assert len(events) >= 15, sorted(events)
    assert {"joined", "error", "hand_raised", "hand_lowered", "session_ended"} <= events
    codes = used_error_codes()
    assert len(codes) >= 15, sorted(codes)
    assert {"room_full", "already_joined", "payload_too_large", "internal"} <= codes
    assert domain_error_codes() >= DOMAIN_CODES


def test_client_events_match_the_namespace(tmp_path: Path, doc: dict[str, str]) -> None:
    app = create_app(load_config(env={}, overrides={"dev": True, "data_dir": tmp_path}))
    handled = set(app[NAMESPACE].handled_events)
    assert len(handled) >= 10, sorted(handled)
    documented = set(_event_sections(doc[CLIENT_PART]))
    assert documented, "no `### `name`` sections in the client → server part"
    assert not handled - documented, f"handled but not documented: {sorted(handled - documented)}"
    assert not documented - handled, f"documented but not handled: {sorted(documented - handled)}"


def test_server_events_are_documented(doc: dict[str, str]) -> None:
    documented = set(_event_sections(doc[SERVER_PART]))
    assert documented, "no `### `name`` sections in the server → client part"
    missing = emitted_server_events() - documented
    assert not missing, f"emitted but not documented: {sorted(missing)}"


def test_error_codes_are_documented(doc: dict[str, str]) -> None:
    table = _table_codes(doc[ERROR_PART])
    assert table, "the error-code table is empty"
    needed = used_error_codes() | domain_error_codes() | DOMAIN_CODES
    missing = needed - table
    assert not missing, f"error codes missing from the table: {sorted(missing)}"


def test_close_reasons_are_documented(doc: dict[str, str]) -> None:
    table = _table_codes(doc[CLOSE_PART])
    assert table, "the close-reason table is empty"
    missing = {r.value for r in CloseReason} - table
    assert not missing, f"close reasons missing from the table: {sorted(missing)}"
    assert not table - {r.value for r in CloseReason}, "the table lists an unknown close reason"


def test_every_event_section_says_something(doc: dict[str, str]) -> None:
    for part in (CLIENT_PART, SERVER_PART):
        events = _sections(doc[part], 3)
        assert events, part
        for title, body in events.items():
            assert body.strip(), f"{part}: section {title} is empty"
