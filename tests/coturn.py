"""PYTEST_DONT_REWRITE
A real TURN server for the tests: Debian's coturn (`turnserver`), configured the way telemed's
README deploys it — the TURN REST API's shared secret (`use-auth-secret`), TURN over TCP on
3478 and over TLS on 443 — started in a namespace of the network lab (`lab.exec_prefix("srv")`)
and stopped by the test. The TLS certificate is self-signed, made here with `openssl` for the
server's address; `trust_for_chromium` puts it in an NSS database a test browser trusts.

    async with Coturn(tmp_path, lab.address("srv"), lab.exec_prefix("srv"), relay=...) as turn:
        turn.url("tcp"), turn.url("tls"), turn.secret, turn.log_text(), turn.sessions()

As README's deployment asks, private peer addresses are denied (a TURN credential must not open
a way into the hospital's network) except `relay`, the media relay's own address.

Bounded: at most `total_quota` allocations of at most `max_bps` each, relay ports from a small
range, and everything it writes (config, certificate, database, log) under the test's tmp dir."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

TURNSERVER = "turnserver"
REALM = "telemed.test"
TCP_PORT = 3478
TLS_PORT = 443
# Each allocation takes one port of this range on the relay side.
RELAY_PORTS = (49160, 49260)
Transport = Literal["udp", "tcp", "tls"]


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.decode(errors='replace').strip()}")


async def self_signed_certificate(directory: Path, address: str) -> tuple[Path, Path]:
    """A certificate for `address` (an IP, in the subject alternative name, which is what a
    TLS client checks), signing itself; returns (certificate, key) in PEM."""
    cert, key = directory / "turn-cert.pem", directory / "turn-key.pem"
    await _run(
        *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-days", "2", "-subj", "/CN=telemed test TURN"),
        *("-addext", f"subjectAltName=IP:{address}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,digitalSignature,keyCertSign"),
        *("-addext", "extendedKeyUsage=serverAuth"),
        *("-keyout", str(key), "-out", str(cert)),
    )
    return cert, key


async def trust_for_chromium(home: Path, cert: Path) -> None:
    """Makes `home` a HOME whose NSS database ($HOME/.pki/nssdb, where Chromium on Linux keeps
    the user's trust settings) trusts `cert` to identify TLS servers."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    await _run("certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password")
    await _run(
        "certutil", "-A", "-d", f"sql:{nssdb}", "-n", "telemed-test-turn", "-t", "C,,",
        "-i", str(cert),
    )  # fmt: skip


@dataclass
class TurnSession:
    """One client session (one allocation) as coturn's log tells it."""

    session: str
    username: str
    tls: bool  # the session's TLS cipher is logged when it is authenticated
    local_port: int | None = None  # the listener it came in on, logged when it closes
    closed_reason: str | None = None
    # Bytes relayed between the allocation and its peers (from its "peer usage" line, at close).
    peer_received: int | None = None
    peer_sent: int | None = None


_NEW = re.compile(
    r"session (\d+): new, realm=<[^>]*>, username=<([^>]*)>, lifetime=\d+(, cipher=)?"
)
_PEER_USAGE = re.compile(r"session (\d+): peer usage: .* rp=\d+, rb=(\d+), sp=\d+, sb=(\d+)")
_CLOSED = re.compile(r"session (\d+): closed \(2nd stage\).* local [^ ]+:(\d+), .*reason: (.*)$")


def turn_sessions(log: str) -> list[TurnSession]:
    """The allocations in a coturn log, in order of creation."""
    sessions: dict[str, TurnSession] = {}
    for line in log.splitlines():
        if (new := _NEW.search(line)) is not None:
            sessions[new[1]] = TurnSession(new[1], new[2], tls=new[3] is not None)
        elif (usage := _PEER_USAGE.search(line)) is not None and usage[1] in sessions:
            sessions[usage[1]].peer_received = int(usage[2])
            sessions[usage[1]].peer_sent = int(usage[3])
        elif (closed := _CLOSED.search(line)) is not None and closed[1] in sessions:
            sessions[closed[1]].local_port = int(closed[2])
            sessions[closed[1]].closed_reason = closed[3]
    return list(sessions.values())


class Coturn:
    def __init__(
        self,
        directory: Path,
        address: str,
        exec_prefix: list[str] | None = None,
        *,
        relay: str,
        secret: str | None = None,
        total_quota: int = 24,
        user_quota: int = 8,
        max_bps: int = 2_000_000,
    ) -> None:
        self.directory = directory / "coturn"
        self.address = address
        self.exec_prefix = exec_prefix or []
        self.relay = relay
        self.secret = secret or secrets.token_urlsafe(24)
        self.total_quota = total_quota
        self.user_quota = user_quota
        self.max_bps = max_bps
        self.log = self.directory / "turn.log"
        self.cert = self.directory / "turn-cert.pem"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, transport: Transport) -> str:
        if transport == "tls":
            return f"turns:{self.address}:{TLS_PORT}?transport=tcp"
        return f"turn:{self.address}:{TCP_PORT}?transport={transport}"

    def sessions(self) -> list[TurnSession]:
        return turn_sessions(self.log_text())

    def log_text(self) -> str:
        """What coturn logged so far (its own file: it holds no credential but usernames)."""
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def config_text(self, cert: Path, key: Path) -> str:
        low, high = RELAY_PORTS
        lines = [
            f"listening-ip={self.address}",
            f"relay-ip={self.address}",
            f"listening-port={TCP_PORT}",
            f"tls-listening-port={TLS_PORT}",
            f"min-port={low}",
            f"max-port={high}",
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            f"realm={REALM}",
            f"cert={cert}",
            f"pkey={key}",
            "no-tlsv1",
            "no-tlsv1_1",
            "no-dtls",
            "no-rfc5780",
            "no-cli",
            "no-multicast-peers",
            "denied-peer-ip=10.0.0.0-10.255.255.255",
            "denied-peer-ip=172.16.0.0-172.31.255.255",
            "denied-peer-ip=192.168.0.0-192.168.255.255",
            f"allowed-peer-ip={self.relay}",
            "fingerprint",
            f"total-quota={self.total_quota}",
            f"user-quota={self.user_quota}",
            f"max-bps={self.max_bps}",
            # Its database (unused with a static secret, but opened) under the test's dir.
            f"userdb={self.directory / 'turndb'}",
            f"pidfile={self.directory / 'turnserver.pid'}",
            f"log-file={self.log}",
            "simple-log",
            "no-stdout-log",
            "verbose",
        ]
        return "\n".join(lines) + "\n"

    async def __aenter__(self) -> Coturn:
        self.directory.mkdir(parents=True, exist_ok=True)
        cert, key = await self_signed_certificate(self.directory, self.address)
        self.cert = cert
        config = self.directory / "turnserver.conf"
        config.write_text(self.config_text(cert, key), encoding="utf-8")
        config.chmod(0o600)  # it holds the shared secret
        with (self.directory / "turnserver.out").open("wb") as out:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - started once, then awaited
                [*self.exec_prefix, TURNSERVER, "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group, so stopping it never signals the test's.
                start_new_session=True,
            )
        try:
            await self._listening()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _listening(self) -> None:
        """Until both TCP listeners accept (generous: the machine is shared)."""
        for _ in range(300):
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"turnserver exited at start:\n{self._diagnostics()}")
            if all([await _accepts(self.address, port) for port in (TCP_PORT, TLS_PORT)]):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"turnserver did not start listening:\n{self._diagnostics()}")

    def _diagnostics(self) -> str:
        out = self.directory / "turnserver.out"
        text = out.read_text(errors="replace") if out.exists() else ""
        return (text + self.log_text())[-3000:]

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        for _ in range(100):
            if process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def _accepts(address: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
