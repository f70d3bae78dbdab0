"""A pytest plugin that reads every server log line the suite produces and fails the run if a
token or the signing secret appears in one.

Two sources: the in-process servers' log records (a handler on the root logger, formatted as
the JSON log format writes them, exceptions included), and the log files of servers run as
subprocesses (`*.stderr` of tests/test_cli.py, `server.log` of the browser tests — their
stdout, which prints the demo tokens on purpose, is kept apart and not scanned). The run's exit
status turns to failure and the report names each leak's source, never the token itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import DEV_JWT_SECRET
from server.logs import JsonFormatter

# A JWT's header (and payload) is base64url of a JSON object, so it starts with "eyJ"; 16 more
# characters catch a whole token and any fragment long enough to be replayed or matched.
TOKEN = re.compile(r"eyJ[A-Za-z0-9_-]{16,}")
SECRETS = (DEV_JWT_SECRET,)
# Log files that subprocess servers write (their stderr).
LOG_FILES = ("*.stderr", "server.log")
QUIET_LIBRARIES = ("aioice", "aiortc", "libav")


def leaks_in(text: str) -> list[str]:
    """What kind of secret `text` holds, if any (never the secret itself)."""
    found = [f"token {match.group()[:6]}…" for match in TOKEN.finditer(text)]
    found += ["the JWT secret" for secret in SECRETS if secret in text]
    return found


class LeakScanner(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.findings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as exc:  # a record that cannot be formatted is a finding of its own
            self.findings.append(f"log record from {record.name} unformattable: {exc!r}")
            return
        test = os.environ.get("PYTEST_CURRENT_TEST", "outside a test").split(" ")[0]
        for leak in leaks_in(line):
            self.findings.append(f"{leak} in a log line of {record.name} during {test}")

    def scan_files(self, root: Path) -> None:
        for pattern in LOG_FILES:
            for path in sorted(root.rglob(pattern)):
                text = path.read_text(encoding="utf-8", errors="replace")
                for number, line in enumerate(text.splitlines(), start=1):
                    for leak in leaks_in(line):
                        self.findings.append(f"{leak} in {path.relative_to(root)}:{number}")


SCANNER = pytest.StashKey[LeakScanner]()


def pytest_configure(config: pytest.Config) -> None:
    scanner = LeakScanner()
    config.stash[SCANNER] = scanner
    root = logging.getLogger()
    root.addHandler(scanner)
    # INFO lines (the access log among them) reach the scanner too; the media libraries' INFO
    # chatter (per ICE check) stays out, or pytest's capture of it fills memory.
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for name in QUIET_LIBRARIES:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture(scope="session", autouse=True)
def _scan_subprocess_logs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    yield
    request.config.stash[SCANNER].scan_files(tmp_path_factory.getbasetemp())


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    scanner = session.config.stash.get(SCANNER, None)
    if scanner is None:
        return
    logging.getLogger().removeHandler(scanner)
    if not scanner.findings:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["secrets in server logs:", *(f"  {f}" for f in scanner.findings[:50])]
    if len(scanner.findings) > 50:
        lines.append(f"  … and {len(scanner.findings) - 50} more")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
