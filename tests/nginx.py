"""PYTEST_DONT_REWRITE
A private nginx (Debian's, /usr/sbin/nginx) in front of telemed nodes, run with the
configuration operators are told to use: docs/deploy/nginx.conf, with only its `listen` line
(here 127.0.0.1 and a free port), its upstream's `server` lines (here the given backends) and
its access log's path replaced, so that the documented file is the tested one.

    async with Nginx(tmp_path, ["127.0.0.1:8081", "127.0.0.1:8082"]) as proxy:
        proxy.url, proxy.error_log(), proxy.access_log()

nginx is the test's own process (its own process group, `daemon off`), with a main
configuration written here: pid, logs and every temporary path under the prefix directory in
tmp_path, no `user` directive, and one worker process, so that one round-robin state decides
where every request goes (with several workers, consecutive requests may both go to one node)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

NGINX = "/usr/sbin/nginx"
DEPLOY_CONF = Path(__file__).resolve().parent.parent / "docs" / "deploy" / "nginx.conf"
# Generous bounds (a shared machine): start-up, then a graceful stop before SIGKILL.
START_POLLS, POLL_S = 300, 0.05
STOP_POLLS = 100
# Another process may take the free port between our probe and nginx binding it.
START_ATTEMPTS = 3

_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+[^;\n]+;[^\n]*$", re.MULTILINE)
_UPSTREAM = re.compile(r"^[ \t]*upstream[ \t]+\w+[ \t]*\{\n(?P<body>.*?)^[ \t]*\}", re.M | re.S)
_ACCESS_LOG = re.compile(r"^(?P<indent>[ \t]*)access_log[ \t]+[^ \t;]+(?P<rest>[^;]*);", re.M)
_SERVER = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+[^ \t;]+(?P<params>[^;]*);")


class ConfigShapeError(ValueError):
    """The template no longer has the lines the fixture replaces."""


def site_config(template: str, listen: str, backends: Sequence[str], access_log: Path) -> str:
    """`template` (docs/deploy/nginx.conf) listening on `listen` (host:port), its one upstream
    balancing over `backends` (host:port each, with the parameters of the template's first
    `server` line), its access log (in the template's format) written to `access_log`."""
    if not backends:
        raise ValueError("at least one backend")
    if len(_LISTEN.findall(template)) != 1:
        raise ConfigShapeError("expected exactly one active `listen` line")
    upstreams = list(_UPSTREAM.finditer(template))
    if len(upstreams) != 1:
        raise ConfigShapeError(f"expected one upstream block, found {len(upstreams)}")
    upstream = upstreams[0]
    body: list[str] = []
    replaced = False
    for line in upstream["body"].splitlines(keepends=True):
        server = _SERVER.match(line)
        if server is None:
            body.append(line)
        elif not replaced:
            body += [f"{server['indent']}server {b}{server['params']};\n" for b in backends]
            replaced = True
    if not replaced:
        raise ConfigShapeError("the upstream block has no `server host:port ...;` line")
    text = template[: upstream.start("body")] + "".join(body) + template[upstream.end("body") :]
    text = _ACCESS_LOG.sub(lambda m: f"{m['indent']}access_log {access_log}{m['rest']};", text)
    return _LISTEN.sub(lambda m: f"{m['indent']}listen {listen};", text, count=1)


def main_config(prefix: Path, site: Path) -> str:
    """nginx.conf for a private instance under `prefix` that includes `site` in `http`."""
    tmp = prefix / "tmp"
    return f"""\
worker_processes 1;
# A graceful stop waits for open connections (WebSockets stay open): bound it.
worker_shutdown_timeout 5s;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} notice;
events {{
    worker_connections 256;
}}
http {{
    access_log {prefix / "access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    # Bodies and responses stay in memory: run as root without `user`, the workers are
    # `nobody`, who cannot enter the test's tmp_path (mode 0700) to write a temporary file.
    client_body_buffer_size 2m;
    proxy_max_temp_file_size 0;
    include {site};
}}
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (nginx's fast stop) when the test process dies, so a
    killed run (a timeout's SIGTERM skips every finaliser) leaves no nginx behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


class Nginx:
    def __init__(
        self, directory: Path, backends: Sequence[str], template: Path = DEPLOY_CONF
    ) -> None:
        self.prefix = directory / "nginx"
        self.backends = list(backends)
        self.template = template
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def diagnostics(self) -> str:
        return (
            f"nginx output:\n{_tail(self.prefix / 'nginx.out')}\n"
            f"error log:\n{_tail(self.prefix / 'error.log')}"
        )

    async def __aenter__(self) -> Nginx:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if not os.access(NGINX, os.X_OK):
            raise RuntimeError(f"{NGINX} is missing: `make system-deps` (as root) installs nginx")
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        template = self.template.read_text(encoding="utf-8")
        conf = self.prefix / "nginx.conf"
        conf.write_text(main_config(self.prefix, self.prefix / "telemed.conf"), encoding="utf-8")
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            listen = f"127.0.0.1:{self.port}"
            site = site_config(template, listen, self.backends, self.prefix / "access.log")
            (self.prefix / "telemed.conf").write_text(site, encoding="utf-8")
            if await self._start_once(conf):
                return
            if attempt == START_ATTEMPTS or "Address already in use" not in self.error_log():
                raise RuntimeError(f"nginx exited at start-up:\n{self.diagnostics()}")
        raise AssertionError("unreachable")

    async def _start_once(self, conf: Path) -> bool:
        """True once nginx accepts on its port; False if it exited."""
        with (self.prefix / "nginx.out").open("ab") as out:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - started once, then polled
                # -e: the error log before the configuration is read (else /var/log/nginx).
                [
                    *(NGINX, "-p", str(self.prefix), "-e", str(self.prefix / "error.log")),
                    *("-c", str(conf), "-g", "daemon off;"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: stopping it never signals the test's, and a SIGKILL
                # reaches the worker too.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            for _ in range(START_POLLS):
                if self._process.poll() is not None:
                    self._process = None
                    return False
                if await _accepts("127.0.0.1", self.port):
                    return True
                await asyncio.sleep(POLL_S)  # poll interval, bounded by START_POLLS
        except BaseException:
            await self.stop()
            raise
        await self.stop()
        raise RuntimeError(f"nginx did not accept on port {self.port}:\n{self.diagnostics()}")

    async def stop(self) -> None:
        """SIGQUIT (graceful: open WebSockets are closed), SIGKILL to the group if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)
        for _ in range(STOP_POLLS):
            if process.poll() is not None:
                return
            await asyncio.sleep(POLL_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
