"""The `telemed` command, run as a user runs it: the installed console script in a subprocess,
with a controlled environment (no TELEMED_* from the caller, data under tmp_path)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from record_helpers import signing_key_file

from rooms.model import ConsultationId, UserId
from rooms.roles import Role
from server.auth import AuthError, TokenService
from server.config import DEV_JWT_SECRET, JwtConfig, load_config
from server.db.migrate import head_revision

TELEMED = Path(sys.executable).parent / "telemed"
STRONG_SECRET = "cli-test-secret-0123456789abcdef-0123456789"
OTHER_SECRET = "some-other-secret-0123456789abcdef-01234567"
COMMAND_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 20.0
DEMO_ROLES = [
    "village_doctor",
    "township_doctor",
    "county_physician",
    "provincial_specialist",
    "coordinator",
    "admin",
    "resident",
]
DEMO_LINE = re.compile(r"^Demo consultation (c_[0-9a-f]+) \((\w+)\): ", re.MULTILINE)
ROLE_LINE = re.compile(r"^  ([a-z_]+) +\S.* \(.+\)$")
TOKEN_LINE = re.compile(r"^    ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$")
HEX_ID = re.compile(r"^[0-9a-f]{32}$")

# Straight to 127.0.0.1, whatever http_proxy the test run has.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- helpers -----------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No TELEMED_* of the caller; data under tmp_path; a recording key file beside it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
    env["TELEMED_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONIOENCODING"] = "utf-8"  # demo names are Chinese, whatever the locale
    key_file = tmp_path / "recording.key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    env["TELEMED_RECORDING_KEY_FILE"] = str(key_file)
    env.update(extra)
    return env


def _telemed(
    args: Sequence[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TELEMED), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _get(url: str, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=10) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, dict(exc.headers), exc.read())


@dataclass
class Server:
    """A `telemed serve` subprocess whose stdout and stderr go to files under tmp_path."""

    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path
    returncode: int | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return _get(self.url + path, headers)

    def wait_healthy(self) -> None:
        """Poll /healthz until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.get("/healthz").status == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            # Waiting on the process is the poll interval, and notices an early exit at once.
            try:
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"server exited with {code}:\n{self.stdout}\n{self.stderr}")
        pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.stderr}")

    def stop(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Ask the server to stop; kill it (and fail) if it does not within the timeout."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"server ignored {sig.name} for {SHUTDOWN_TIMEOUT_S}s")
        self.returncode = self.process.returncode
        return self.returncode


@contextmanager
def running_server(
    tmp_path: Path, env: dict[str, str], *args: str, name: str = "server"
) -> Iterator[Server]:
    port = _free_port()
    stdout_path, stderr_path = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [str(TELEMED), "serve", *args, "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=err,
        )
    server = Server(process, port, stdout_path, stderr_path)
    try:
        server.wait_healthy()
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class DemoOutput:
    consultation_id: str
    status: str
    tokens: list[tuple[str, str]]  # (role, token), in printed order

    def token(self, role: str) -> str:
        return next(token for r, token in self.tokens if r == role)


def _parse_demo(stdout: str) -> DemoOutput:
    match = DEMO_LINE.search(stdout)
    assert match is not None, stdout
    lines = stdout.splitlines()
    tokens: list[tuple[str, str]] = []
    for line, following in pairwise(lines):
        role = ROLE_LINE.match(line)
        token = TOKEN_LINE.match(following)
        if role and token:
            tokens.append((role.group(1), token.group(1)))
    return DemoOutput(match.group(1), match.group(2), tokens)


def _service(secret: str = DEV_JWT_SECRET) -> TokenService:
    return TokenService(JwtConfig.model_validate({"secret": secret}))


# --- telemed token -----------------------------------------------------------------------


def test_token_prints_one_verifiable_token_with_the_given_claims(tmp_path: Path) -> None:
    env = _env(tmp_path, TELEMED_JWT_SECRET=STRONG_SECRET)
    args = ["token", "--user", "u1", "--name", "N", "--role", "county_physician"]
    args += ["--org", "X", "--consultation", "c1", "--ttl", "60"]

    before = datetime.now(UTC).replace(microsecond=0)
    result = _telemed(args, env, tmp_path)
    after = datetime.now(UTC)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    token = result.stdout.strip()
    assert TOKEN_LINE.match(f"    {token}")
    claims = TokenService(load_config(env=env).jwt).verify(token)
    assert claims.user_id == UserId("u1")
    assert claims.name == "N"
    assert claims.role is Role.COUNTY_PHYSICIAN
    assert claims.org == "X"
    assert claims.consultation == ConsultationId("c1")
    assert claims.is_invite is False
    assert claims.jti is not None
    assert HEX_ID.match(claims.jti)
    assert before + timedelta(seconds=60) <= claims.expires_at <= after + timedelta(seconds=60)
    # Signed with the configured secret, not the built-in one.
    with pytest.raises(AuthError, match="signature is invalid"):
        _service(DEV_JWT_SECRET).verify(token)


def test_token_defaults_follow_the_configuration(tmp_path: Path) -> None:
    env = _env(tmp_path, TELEMED_JWT_SECRET=STRONG_SECRET, TELEMED_JWT_ACCESS_TTL_S="600")

    before = datetime.now(UTC).replace(microsecond=0)
    result = _telemed(
        ["token", "--user", "v7", "--name", "王村医", "--role", "admin"], env, tmp_path
    )
    after = datetime.now(UTC)

    assert result.returncode == 0, result.stderr
    claims = _service(STRONG_SECRET).verify(result.stdout.strip())
    assert claims.name == "王村医"
    assert claims.role is Role.ADMIN
    assert claims.org == ""
    assert claims.consultation is None
    assert before + timedelta(seconds=600) <= claims.expires_at <= after + timedelta(seconds=600)


def test_token_with_an_unknown_role_is_a_usage_error(tmp_path: Path) -> None:
    args = ["token", "--user", "u1", "--name", "N", "--role", "surgeon"]

    result = _telemed(args, _env(tmp_path), tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: telemed token ")
    assert "argument --role: invalid choice: 'surgeon'" in result.stderr


def test_token_without_a_user_is_a_usage_error(tmp_path: Path) -> None:
    result = _telemed(["token", "--name", "N", "--role", "admin"], _env(tmp_path), tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "the following arguments are required: --user" in result.stderr


@pytest.mark.parametrize("ttl", ["0", "-5"])
def test_token_with_a_non_positive_ttl_is_a_usage_error(tmp_path: Path, ttl: str) -> None:
    args = ["token", "--user", "u1", "--name", "N", "--role", "admin", "--ttl", ttl]

    result = _telemed(args, _env(tmp_path), tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "ttl" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_without_a_signing_key_is_reported_cleanly(tmp_path: Path) -> None:
    public_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    env = _env(tmp_path, TELEMED_JWT_ALGORITHM="ES256", TELEMED_JWT_PUBLIC_KEY=public_pem)

    result = _telemed(["token", "--user", "u", "--name", "n", "--role", "admin"], env, tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "mint them with your identity provider" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_configuration_is_reported_with_exit_code_2(tmp_path: Path) -> None:
    env = _env(tmp_path, TELEMED_PORT="abc")

    result = _telemed(["token", "--user", "u", "--name", "n", "--role", "admin"], env, tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("telemed: invalid configuration")
    assert "port" in result.stderr
    assert "Traceback" not in result.stderr


# --- telemed db upgrade ------------------------------------------------------------------


def test_db_upgrade_creates_the_database_and_is_idempotent(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    env = _env(tmp_path, TELEMED_DATA_DIR=str(data_dir))
    database = (data_dir / "telemed.db").resolve()

    first = _telemed(["db", "upgrade"], env, tmp_path)
    second = _telemed(["db", "upgrade"], env, tmp_path)

    for result in (first, second):
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"database at head: sqlite+aiosqlite:///{database}\n"
    assert database.is_file()
    assert "Running upgrade  -> " in first.stderr
    assert "Running upgrade" not in second.stderr
    with closing(sqlite3.connect(database)) as conn:
        versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    assert versions == [(head_revision(),)]
    assert "consultations" in tables


# --- telemed serve -----------------------------------------------------------------------


def test_serve_refuses_the_default_secret_outside_dev_mode(tmp_path: Path) -> None:
    port = _free_port()
    env = _env(tmp_path)

    result = _telemed(["serve", "--port", str(port)], env, tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("telemed: set TELEMED_JWT_SECRET (or run with --dev)")
    assert DEV_JWT_SECRET not in result.stderr
    # Refused before anything started: nothing printed, no database, the port never taken.
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()
    assert _port_is_free(port)


def test_serve_refuses_a_short_secret(tmp_path: Path) -> None:
    env = _env(tmp_path, TELEMED_JWT_SECRET="too-short-secret")

    result = _telemed(["serve", "--port", str(_free_port())], env, tmp_path)

    assert result.returncode == 2
    assert result.stderr == "telemed: TELEMED_JWT_SECRET must be at least 32 characters\n"
    assert result.stdout == ""


def test_serve_refuses_to_start_without_an_ed25519_signing_key(tmp_path: Path) -> None:
    env = _env(tmp_path, TELEMED_JWT_SECRET=STRONG_SECRET)
    missing = _telemed(["serve", "--port", str(_free_port())], env, tmp_path)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("telemed: set TELEMED_SIGNING_KEY_FILE")

    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path, message in (
        (ec_key, f"telemed: signing key file {ec_key} holds a "),
        (tmp_path / "absent.pem", f"telemed: cannot read the signing key file {tmp_path}"),
    ):
        env["TELEMED_SIGNING_KEY_FILE"] = str(path)
        wrong = _telemed(["serve", "--port", str(_free_port())], env, tmp_path)
        assert wrong.returncode == 2 and wrong.stdout == ""
        assert wrong.stderr.startswith(message), wrong.stderr
        assert "PRIVATE KEY" not in wrong.stderr


def test_serve_refuses_to_start_without_a_recording_key(tmp_path: Path) -> None:
    port = _free_port()
    env = _env(
        tmp_path,
        TELEMED_JWT_SECRET=STRONG_SECRET,
        TELEMED_SIGNING_KEY_FILE=str(signing_key_file(tmp_path)),
    )
    del env["TELEMED_RECORDING_KEY_FILE"]

    result = _telemed(["serve", "--port", str(port)], env, tmp_path)

    assert result.returncode == 2
    assert result.stderr == (
        "telemed: set TELEMED_RECORDING_KEY_FILE (or run with --dev): recordings are encrypted "
        "at rest with its key (32 random bytes, raw or base64)\n"
    )
    assert result.stdout == ""
    assert _port_is_free(port)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "cannot read the recording key file {path}: No such file or directory"),
        (b"not a key", "recording key file {path}: a recording key file holds 32 bytes"),
    ],
)
def test_serve_refuses_a_recording_key_file_it_cannot_use(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    key_file = tmp_path / "bad.key"
    if content is not None:
        key_file.write_bytes(content)
    env = _env(
        tmp_path,
        TELEMED_JWT_SECRET=STRONG_SECRET,
        TELEMED_SIGNING_KEY_FILE=str(signing_key_file(tmp_path)),
    )
    env["TELEMED_RECORDING_KEY_FILE"] = str(key_file)

    result = _telemed(["serve", "--port", str(_free_port())], env, tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("telemed: " + error.format(path=key_file)), result.stderr
    assert result.stdout == ""


def test_serve_dev_prints_a_working_demo(tmp_path: Path) -> None:
    env = _env(tmp_path)
    # Development mode without a key: one is generated into the data dir, and said so.
    del env["TELEMED_RECORDING_KEY_FILE"]

    with running_server(tmp_path, env, "--dev") as server:
        demo = _parse_demo(server.stdout)
        record = server.get(
            f"/api/v1/consultations/{demo.consultation_id}/record",
            {"Authorization": f"Bearer {demo.token('village_doctor')}"},
        )
        anonymous = server.get(f"/api/v1/consultations/{demo.consultation_id}/record")
        assert server.stop(signal.SIGINT) == 0

    assert demo.status == "scheduled"
    assert [role for role, _ in demo.tokens] == DEMO_ROLES
    assert record.status == 200
    body = record.json()
    assert body["consultation"]["id"] == demo.consultation_id
    assert body["consultation"]["status"] == "scheduled"
    assert body["consultation"]["resident"]["pseudonym"] == "demo-resident-0001"
    assert anonymous.status == 401
    # Every printed token is genuine and says who it is for.
    tokens = _service(DEV_JWT_SECRET)
    for role, token in demo.tokens:
        claims = tokens.verify(token)
        assert claims.role.value == role
        assert claims.is_invite is (role == "resident")
    assert tokens.verify(demo.token("village_doctor")).user_id == "demo-village-doctor"
    assert tokens.verify(demo.token("resident")).consultation == demo.consultation_id
    stdout = server.stdout
    assert stdout.startswith(f"telemed listening on {server.url} (public URL {server.url})\n")
    assert f"{server.url}/api/v1/consultations/{demo.consultation_id}/record" in stdout
    assert DEV_JWT_SECRET not in stdout
    assert DEV_JWT_SECRET not in server.stderr
    # No key file in development mode: one is made, said so in the log, never shown.
    assert "opinions are signed with a key made for this process (key id ed25519:" in (
        server.stderr
    )
    assert "PRIVATE KEY" not in server.stderr + stdout
    key_file = tmp_path / "data" / "recording-dev.key"
    assert f"development mode: generated a recording key at {key_file}" in server.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_bytes()
    for shown in (key.hex(), base64.b64encode(key).decode()):
        assert shown not in stdout and shown not in server.stderr


def test_serve_dev_reuses_the_demo_consultation_after_a_restart(tmp_path: Path) -> None:
    env = _env(tmp_path)

    with running_server(tmp_path, env, "--dev", name="first") as first:
        first_demo = _parse_demo(first.stdout)
        assert first.stop(signal.SIGTERM) == 0
    with running_server(tmp_path, env, "--dev", name="second") as second:
        second_demo = _parse_demo(second.stdout)
        # A token printed by the first run still works against the second.
        record = second.get(
            f"/api/v1/consultations/{first_demo.consultation_id}/record",
            {"Authorization": f"Bearer {first_demo.token('county_physician')}"},
        )
        listed = second.get(
            "/api/v1/consultations",
            {"Authorization": f"Bearer {second_demo.token('village_doctor')}"},
        )
        assert second.stop(signal.SIGINT) == 0

    assert second_demo.consultation_id == first_demo.consultation_id
    assert second_demo.status == "scheduled"
    assert [role for role, _ in second_demo.tokens] == DEMO_ROLES
    assert record.status == 200
    assert record.json()["consultation"]["status"] == "scheduled"
    assert listed.status == 200
    assert [c["id"] for c in listed.json()["items"]] == [first_demo.consultation_id]


def test_serve_json_logs_access_lines_without_tokens(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        TELEMED_JWT_SECRET=STRONG_SECRET,
        TELEMED_LOG_FORMAT="json",
        TELEMED_SIGNING_KEY_FILE=str(signing_key_file(tmp_path)),
    )
    minted = _telemed(
        ["token", "--user", "c1", "--name", "张医生", "--role", "county_physician"], env, tmp_path
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    forged = _service(OTHER_SECRET).mint(
        user_id=UserId("c1"), name="x", role=Role.ADMIN, org="", ttl_s=600
    )

    with running_server(tmp_path, env) as server:
        health = server.get("/healthz", {"X-Request-Id": "cli-health-1"})
        listed = server.get(
            "/api/v1/consultations?limit=5",
            {"Authorization": f"Bearer {token}", "X-Request-Id": "cli-list-1"},
        )
        refused = server.get("/api/v1/consultations", {"Authorization": f"Bearer {forged}"})
        assert server.stop(signal.SIGTERM) == 0

    assert health.status == 200
    assert health.headers["X-Request-Id"] == "cli-health-1"
    assert listed.status == 200
    assert listed.json() == {"items": []}
    assert refused.status == 401
    refused_id = refused.headers["X-Request-Id"]
    assert HEX_ID.match(refused_id)

    stderr_lines = [line for line in server.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in stderr_lines]  # every line is JSON
    access = [r for r in records if r["logger"] == "telemed.access"]
    by_id = {r["request_id"]: (r["method"], r["path"], r["status"]) for r in access}
    assert by_id["cli-health-1"] == ("GET", "/healthz", 200)
    assert by_id["cli-list-1"] == ("GET", "/api/v1/consultations", 200)
    assert by_id[refused_id] == ("GET", "/api/v1/consultations", 401)
    for r in access:
        assert {"ts", "level", "logger", "msg", "request_id", "method", "path", "status"} <= set(r)
        assert r["level"] == "info"
    # Not in any output: the tokens, the secret, the query string.
    outputs = server.stdout + server.stderr
    assert token not in outputs
    assert forged not in outputs
    assert STRONG_SECRET not in outputs
    assert "limit=5" not in outputs
    assert server.stdout.startswith(f"telemed listening on {server.url}")
