"""The aiortc, aioice and pylibsrtp internals the relay reaches into (media/internals.py): each
module notices when what it relies on moves, and the server refuses to start the relay then,
in one line naming it, through the app factory and through `telemed serve`."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioice
import pylibsrtp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import HeaderExtensionsMap

from media.internals import PINNED, AiortcInternalsChanged, check_internals, internals_problems
from server.app import create_app
from server.config import Config

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
COMMAND_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- each module's own list ----------------------------------------------------------------


def _no_packetize(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Vp8Encoder, "_packetize")


def _seven_bit_picture_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3-byte descriptor (7-bit picture id), one payload however long the frame.
    def packetize(cls: Any, buffer: bytes, picture_id: int) -> list[bytes]:
        return [bytes([0x90, 0x80, picture_id & 0x7F]) + buffer]

    monkeypatch.setattr(Vp8Encoder, "_packetize", classmethod(packetize))


def _candidates_without_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    async def get_component_candidates(self: Any, component: int) -> list[Any]:
        return []

    monkeypatch.setattr(aioice.Connection, "get_component_candidates", get_component_candidates)


def _gathering_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    async def gather_candidates(self: Any) -> None:
        await self.gatherer.run()

    monkeypatch.setattr(aioice.Connection, "gather_candidates", gather_candidates)


def _connection_without_start_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    original = aioice.Connection.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._local_candidates_start

    monkeypatch.setattr(aioice.Connection, "__init__", init)


def _no_pli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RTCRtpReceiver, "_send_rtcp_pli")


def _handle_rtp_without_arrival_time(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handle_rtp_packet(self: Any, packet: Any) -> None:
        pass

    monkeypatch.setattr(RTCRtpReceiver, "_handle_rtp_packet", handle_rtp_packet)


def _no_trailer_length(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pylibsrtp, "SRTP_MAX_TRAILER_LEN")


def _srtp_session_without_its_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pylibsrtp.Session.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._buffer = None

    monkeypatch.setattr(pylibsrtp.Session, "__init__", init)


def _extension_ids_renamed(monkeypatch: pytest.MonkeyPatch) -> None:
    original = HeaderExtensionsMap.__init__

    def init(self: Any) -> None:
        original(self)
        self._ids = self.__dict__.pop("_HeaderExtensionsMap__ids")

    monkeypatch.setattr(HeaderExtensionsMap, "__init__", init)


def _no_encoded_frame_method(monkeypatch: pytest.MonkeyPatch) -> None:
    # A method a check reads the source of: the check names it rather than fail itself.
    monkeypatch.delattr(RTCRtpSender, "_next_encoded_frame")


def _other_aioice_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PINNED, "aioice", "0.12.0")


CHANGES: list[tuple[Callable[[pytest.MonkeyPatch], None], str]] = [
    (_no_packetize, "missing: Vp8Encoder._packetize(buffer, picture_id)"),
    (_seven_bit_picture_ids, "changed: Vp8Encoder._packetize no longer makes the payloads"),
    (
        _candidates_without_addresses,
        "missing: aioice Connection.get_component_candidates(component, addresses)",
    ),
    (
        _gathering_elsewhere,
        "missing in aioice Connection.gather_candidates: self._local_candidates_start = True",
    ),
    (_connection_without_start_flag, "missing: aioice Connection._local_candidates_start"),
    (_no_pli, "missing: RTCRtpReceiver._send_rtcp_pli(media_ssrc)"),
    (
        _handle_rtp_without_arrival_time,
        "missing: RTCRtpReceiver._handle_rtp_packet(packet, arrival_time_ms)",
    ),
    (_no_trailer_length, "missing: pylibsrtp.SRTP_MAX_TRAILER_LEN"),
    (
        _srtp_session_without_its_buffer,
        "changed: pylibsrtp Session._srtp, _cdata, _buffer with libsrtp's srtp_protect",
    ),
    (
        _srtp_session_without_its_buffer,
        "changed: pylibsrtp Session._srtp, _cdata, _buffer with libsrtp's srtp_unprotect",
    ),
    (_extension_ids_renamed, "missing: HeaderExtensionsMap.__ids (abs_send_time)"),
    (_extension_ids_renamed, "missing: HeaderExtensionsMap.__ids (mid, abs_send_time)"),
    (
        _no_encoded_frame_method,
        "missing (media.frame_sender): AttributeError: type object 'RTCRtpSender' has no "
        "attribute '_next_encoded_frame'",
    ),
    (_other_aioice_pin, "aioice is 0.13.0, the relay was written for 0.12.0"),
]


def test_the_installed_libraries_have_every_internal_the_relay_uses() -> None:
    assert internals_problems() == []
    check_internals()


@pytest.mark.parametrize(("change", "problem"), CHANGES)
def test_a_changed_internal_is_named(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[pytest.MonkeyPatch], None], problem: str
) -> None:
    change(monkeypatch)

    problems = internals_problems()

    assert any(p.startswith(problem) for p in problems), problems
    with pytest.raises(AiortcInternalsChanged) as raised:
        check_internals()
    assert raised.value.problems == problems
    assert "\n" not in str(raised.value)
    assert problem in str(raised.value)


def test_the_pins_are_those_of_pyproject() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pinned = {
        name: version
        for name, _, version in (d.partition("==") for d in dependencies)
        if name in PINNED
    }
    assert pinned == PINNED


# --- the app factory ---------------------------------------------------------------------


def test_the_app_factory_refuses_when_an_internal_is_missing(
    monkeypatch: pytest.MonkeyPatch, config: Config
) -> None:
    _no_pli(monkeypatch)

    with pytest.raises(AiortcInternalsChanged, match=r"RTCRtpReceiver\._send_rtcp_pli"):
        create_app(config)


async def test_the_app_factory_starts_on_the_pinned_libraries(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/healthz")

    assert response.status == 200


# --- telemed serve -----------------------------------------------------------------------

# `telemed serve` with one internal taken away first (by name), as an upgrade would.
SERVE = """
import sys
import aioice
from aiortc.codecs.vpx import Vp8Encoder
from server.cli import main

if sys.argv[1] == "packetize":
    del Vp8Encoder._packetize
elif sys.argv[1] == "gathering":
    async def get_component_candidates(self, component):
        return []
    aioice.Connection.get_component_candidates = get_component_candidates
sys.exit(main(sys.argv[2:]))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env["TELEMED_DATA_DIR"] = str(tmp_path / "data")
    key_file = tmp_path / "recording.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    env["TELEMED_RECORDING_KEY_FILE"] = str(key_file)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(
    tmp_path: Path, take_away: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SERVE, take_away, "serve", "--dev", *args],
        env=env or _env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize(
    ("take_away", "named"),
    [
        ("packetize", "Vp8Encoder._packetize"),
        ("gathering", "aioice Connection.get_component_candidates"),
    ],
)
def test_serve_refuses_to_start_in_one_line_naming_the_internal(
    tmp_path: Path, take_away: str, named: str
) -> None:
    port = _free_port()

    result = _serve(tmp_path, take_away, "--port", str(port))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("telemed: refusing to start: the media relay relies on ")
    assert named in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    with socket.socket() as sock:  # nothing was listening there
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_serve_with_workers_refuses_before_starting_any(tmp_path: Path) -> None:
    # Redis is never reached: the supervisor refuses before it migrates or starts a worker.
    env = _env(tmp_path, TELEMED_REDIS_URL="redis://127.0.0.1:1/0")

    result = _serve(tmp_path, "packetize", "--workers", "2", "--port", str(_free_port()), env=env)

    assert result.returncode == 2
    assert "Vp8Encoder._packetize" in result.stderr
    assert result.stderr.count("\n") == 1
    assert "worker" not in result.stdout + result.stderr


def test_serve_starts_when_nothing_is_taken_away(tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "nothing", "serve", "--dev", "--port", str(port)],
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        status = None
        while status != 200 and time.monotonic() < deadline and process.poll() is None:
            try:
                with _OPENER.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    status = response.status
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert status == 200, process.poll()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"server ignored SIGTERM for {SHUTDOWN_TIMEOUT_S}s")
    assert process.returncode == 0, stderr
    assert stdout.startswith(f"telemed listening on http://127.0.0.1:{port}")
    assert "refusing" not in stderr
