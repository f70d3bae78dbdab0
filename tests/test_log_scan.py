"""The suite's own guard against tokens in logs (tests/log_scan.py) can fail: a run whose server
logs a token, or whose subprocess server writes the secret to its log file, fails."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from log_scan import LeakScanner, leaks_in

from server.config import DEV_JWT_SECRET

pytest_plugins = ["pytester"]

A_TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def test_finds_tokens_fragments_and_the_secret_but_not_their_text() -> None:
    assert leaks_in(f"GET /x Bearer {A_TOKEN}") == ["token eyJhbG…"]
    assert leaks_in("header starts eyJhbGciOiJIUzI1NiIsInR5") == ["token eyJhbG…"]
    assert leaks_in(f"secret={DEV_JWT_SECRET}") == ["the JWT secret"]
    assert leaks_in("GET /api/v1/consultations 200 eyJ short") == []


def test_the_handler_reads_messages_arguments_and_exceptions() -> None:
    scanner = LeakScanner()
    logger = logging.getLogger("telemed.test.log_scan")
    logger.addHandler(scanner)
    logger.propagate = False
    try:
        logger.warning("clean line %s", "nothing here")
        logger.warning("refused %s", A_TOKEN)
        try:
            raise ValueError(A_TOKEN)
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(scanner)
        logger.propagate = True
    assert len(scanner.findings) == 2
    assert all(A_TOKEN not in finding for finding in scanner.findings)


@pytest.mark.parametrize(
    "body",
    [
        "import logging\n"
        f"def test_x():\n    logging.getLogger('server').info('t=%s', {A_TOKEN!r})\n",
        "def test_x(tmp_path):\n"
        f"    (tmp_path / 'server.stderr').write_text('x {DEV_JWT_SECRET}')\n",
    ],
    ids=["in-process log line", "subprocess log file"],
)
def test_a_run_with_a_leak_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    pytester.makepyfile(test_leak=body)
    result = _run_with_scanner(pytester, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*secrets in server logs:*"])
    assert A_TOKEN not in result.stdout.str()


def test_a_clean_run_passes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_clean="def test_x():\n    assert True\n")
    assert _run_with_scanner(pytester, monkeypatch).ret == pytest.ExitCode.OK


def _run_with_scanner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    # The inner run's files outside this run's temporary tree, which this run scans too.
    with tempfile.TemporaryDirectory() as basetemp:
        return pytester.runpytest_subprocess(
            "-p", "log_scan", "-p", "no:cacheprovider", f"--basetemp={basetemp}/t"
        )
