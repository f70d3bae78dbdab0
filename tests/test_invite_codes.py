"""Invites a phone can use: the link, its QR code and a short code to read out; redeeming the
code (case and separators forgiven), its expiry and revocation, the guess limits, and the
stored form (an HMAC only) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import segno
from api_helpers import VILLAGE, Api, assert_problem, one, parse_time
from sqlalchemy import select

from rooms.errors import Conflict
from rooms.invite_codes import ALPHABET, InviteCodes, normalise
from rooms.model import ConsultationId, UserId
from rooms.roles import Role
from rooms.store import InviteCode
from server.app import STORE
from server.db.store import SqlRecordStore
from server.db.tables import invite_codes
from server.guess_limits import GuessLimits, TooManyAttempts

pytest_plugins = ["db_fixtures"]

REDEEM = "/api/v1/invites/redeem"
CODE = re.compile(rf"[{ALPHABET}]{{4}}-[{ALPHABET}]{{4}}")


def modules_drawn(d: str, border: int) -> set[tuple[int, int]]:
    """The (row, column) of every module an SVG path of horizontal strokes paints: segno draws
    each run of dark modules as `h<n>` along the row's middle, moving with `M`/`m`."""
    x = y = 0.0
    dark: set[tuple[int, int]] = set()
    for op, args in re.findall(r"([MmHh])([-\d. ]+)", d):
        numbers = [float(n) for n in args.split()]
        if op == "M":
            x, y = numbers
        elif op == "m":
            x, y = x + numbers[0], y + numbers[1]
        else:
            end = numbers[0] if op == "H" else x + numbers[0]
            dark |= {(int(y) - border, col - border) for col in range(int(x), int(end))}
            x = end
    return dark


def dark_modules(matrix: tuple[bytearray, ...]) -> set[tuple[int, int]]:
    return {(r, c) for r, row in enumerate(matrix) for c, v in enumerate(row) if v}


def full_width(text: str) -> str:
    """As a Chinese input method types it: each ASCII character's full-width form."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


async def invite(api: Api, cid: str, **body: object) -> dict[str, object]:
    reply = await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident", **body})
    assert reply.status == 201, reply
    out: dict[str, object] = reply.body
    return out


async def test_an_invite_gives_link_qr_code_short_code_and_expiry(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cid = await api.create()
    got = await invite(api, cid)
    origin = str(api.client.make_url("/")).rstrip("/")
    assert got["link"] == f"{origin}/web/room.html?c={cid}#token={got['token']}"
    assert CODE.fullmatch(str(got["short_code"])), got["short_code"]
    assert parse_time(str(got["expires_at"])) > datetime.now(UTC) + timedelta(minutes=100)

    # A well-formed SVG document, and exactly segno's drawing of the link.
    svg = str(got["qr_svg"])
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    expected = segno.make(str(got["link"]), error="l", micro=False)
    drawn = io.BytesIO()
    expected.save(drawn, kind="svg", xmldecl=False, scale=4, border=4, title="QR")
    assert svg == drawn.getvalue().decode()
    width = (expected.symbol_size(scale=4, border=4))[0]
    assert root.get("width") == str(width)
    # Read back, the drawing's dark modules are the link's code, module for module.
    path = root.find("{http://www.w3.org/2000/svg}path")
    assert path is not None and path.get("transform") == "scale(4)"
    assert modules_drawn(path.get("d") or "", border=4) == dark_modules(expected.matrix)

    # The landing page the link names is served, and so is the page where a code is typed,
    # at an address short enough to say aloud.
    assert (await api.get(f"/web/room.html?c={cid}", None)).status == 200
    async with api.client.get("/join?code=k7qm 3xrd", allow_redirects=False) as moved:
        assert (moved.status, moved.headers["Location"]) == (302, "/web/join.html?code=k7qm%203xrd")
    assert (await api.get("/web/join.html", None)).status == 200
    # A code in the address never reaches a log line.
    logged = [r.getMessage() for r in caplog.records]
    assert any("/join?code=[redacted]" in m for m in logged), logged
    assert not any("k7qm" in m.lower() for m in logged)


async def test_a_short_code_redeems_for_the_invite_forgiving_case_and_separators(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cid = await api.create()
    got = await invite(api, cid)
    code = str(got["short_code"])
    typed = f" {code[:2].lower()} {code[2:6]}·{code[6:].lower()} "
    reply = await api.post(REDEEM, None, {"code": typed})
    assert reply.status == 200, reply
    out = reply.body
    assert (out["consultation_id"], out["role"]) == (cid, "resident")
    claims = jwt.decode(out["token"], options={"verify_signature": False})
    original = jwt.decode(str(got["token"]), options={"verify_signature": False})
    assert (claims["jti"], claims["cid"], claims["sub"]) == (
        original["jti"],
        original["cid"],
        original["sub"],
    )
    assert abs(claims["exp"] - original["exp"]) <= 1
    assert out["link"].endswith(f"/web/room.html?c={cid}#token={out['token']}")
    # The token it gives reaches the consultation, as the invite's own does.
    seen = await api.get(one(cid), out["token"])
    assert (seen.status, seen.body["id"]) == (200, cid)

    # Full-width characters (a Chinese input method) are the same code.
    wide = full_width(code)
    assert (await api.post(REDEEM, None, {"code": wide})).status == 200

    # The database holds an HMAC, not the code; no log line holds it either.
    async with api.app[STORE].engine.connect() as conn:
        rows = (await conn.execute(select(invite_codes))).mappings().all()
    assert len(rows) == 1
    bare = code.replace("-", "")
    assert all(bare not in str(v) and code not in str(v) for v in rows[0].values())
    assert re.fullmatch(r"[0-9a-f]{64}", rows[0]["code_hash"])
    assert all(bare not in r.getMessage() and code not in r.getMessage() for r in caplog.records)


async def test_a_revoked_invite_takes_its_code_with_it(api: Api) -> None:
    cid = await api.create()
    got = await invite(api, cid)
    assert (await api.delete(one(cid, f"/invites/{got['jti']}"), VILLAGE)).status == 204
    reply = await api.post(REDEEM, None, {"code": got["short_code"]})
    problem = assert_problem(reply, 410, "withdrawn")
    assert problem["code"] == "gone"
    assert "token" not in reply.raw.decode()


async def test_a_code_expires_with_its_invite(api: Api) -> None:
    cid = await api.create()
    got = await invite(api, cid, ttl_s=1)
    expires = parse_time(str(got["expires_at"]))
    # Until the expiry itself has passed (not a guess at how long a request takes).
    await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 1)
    assert datetime.now(UTC) > expires
    assert_problem(await api.post(REDEEM, None, {"code": got["short_code"]}), 410, "expired")


async def test_a_code_is_for_its_own_invite_only(api: Api) -> None:
    first, second = await api.create(), await api.create()
    a, b = await invite(api, first), await invite(api, second)
    assert a["short_code"] != b["short_code"]
    for got, cid in ((a, first), (b, second)):
        reply = await api.post(REDEEM, None, {"code": got["short_code"]})
        assert reply.body["consultation_id"] == cid


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"code": "K7QM-3XR"}, 400, "8 characters, not 7"),
        ({"code": "K7QM-3XRDD"}, 400, "8 characters, not 9"),
        ({"code": "O0I1-LSZB"}, 400, "not '0', '1', 'B'"),
        ({"code": ""}, 400, "8 characters, not 0"),
        ({"code": "x" * 65}, 400, "at most 64"),
        ({"code": 12345678}, 400, "string"),
        ({}, 400, "code"),
        ({"code": "K7QM3XRD", "extra": 1}, 400, "extra"),
        ({"code": "\u0000" * 8}, 400, "not"),
    ],
)
async def test_bad_codes_get_a_clear_400(
    api: Api, body: dict[str, object], status: int, detail: str
) -> None:
    assert_problem(await api.post(REDEEM, None, body), status, detail)


async def test_an_unknown_code_is_404_and_guessing_is_limited_per_client(api: Api) -> None:
    cid = await api.create()
    real = str((await invite(api, cid))["short_code"])
    guesses = [c for c in ("34679ACD", "ACDEFGHJ", "KMNPQRTW") if c != real.replace("-", "")]
    reply = await api.post(REDEEM, None, {"code": guesses[0]})
    assert_problem(reply, 404, "no invite has this code")
    limit = GuessLimits().per_client
    for _ in range(limit - 1):
        assert (await api.post(REDEEM, None, {"code": guesses[1]})).status == 404
    refused = await api.post(REDEEM, None, {"code": real})
    problem = assert_problem(refused, 429, f"at most {limit} invite code attempts per client")
    assert problem["code"] == "too_many_requests"
    assert int(refused.headers["Retry-After"]) >= 1
    # Issuing and using invites is not limited: only redeeming codes is.
    assert (await api.post(one(cid, "/invites"), VILLAGE, {"role": "resident"})).status == 201


def test_the_guess_limits_count_per_client_and_overall_in_a_sliding_window() -> None:
    now = [0.0]
    limits = GuessLimits(per_client=2, overall=3, window_s=60, clock=lambda: now[0])
    limits.attempt("a")
    limits.attempt("a")
    with pytest.raises(TooManyAttempts, match=r"at most 2 .* per client address") as hit:
        limits.attempt("a")
    assert hit.value.retry_after_s == 60
    limits.attempt("b")  # another address is not held back by a's attempts
    with pytest.raises(TooManyAttempts, match=r"at most 3 .* all clients together"):
        limits.attempt("c")
    now[0] = 30.0
    with pytest.raises(TooManyAttempts) as later:
        limits.attempt("c")
    assert later.value.retry_after_s == 30
    now[0] = 60.5  # the first attempts have left the window
    limits.attempt("a")
    limits.attempt("c")


@pytest.mark.parametrize(
    ("typed", "code"),
    [
        ("k7qm-3xrd", "K7QM3XRD"),
        (" K7QM 3XRD ", "K7QM3XRD"),
        ("K7.QM_3X-RD", "K7QM3XRD"),
        (full_width("K7QM-3XRD"), "K7QM3XRD"),
        ("k7qm\u30003xrd", "K7QM3XRD"),
    ],
)
def test_typed_codes_are_normalised(typed: str, code: str) -> None:
    assert normalise(typed) == code


def _row(code_hash: str, expires_at: datetime) -> InviteCode:
    return InviteCode(
        code_hash,
        ConsultationId("c-1"),
        "jti-1",
        UserId("res-1"),
        "李奶奶",
        Role.RESIDENT,
        "村卫生室",
        expires_at,
        expires_at - timedelta(hours=2),
    )


async def test_the_store_keeps_codes_until_they_expire(sql_store: SqlRecordStore) -> None:
    soon = datetime(2026, 12, 4, 12, tzinfo=UTC)
    later = soon + timedelta(hours=1)
    async with sql_store.transaction() as tx:
        await tx.add_invite_code(_row("a" * 64, soon))
        await tx.add_invite_code(_row("b" * 64, later))
    async with sql_store.transaction() as tx:
        with pytest.raises(Conflict):
            await tx.add_invite_code(_row("a" * 64, later))
        # The transaction stays usable after the conflict (PostgreSQL too).
        assert await tx.get_invite_code("b" * 64) == _row("b" * 64, later)
    async with sql_store.reading() as tx:
        assert await tx.get_invite_code("a" * 64) == _row("a" * 64, soon)
        assert await tx.get_invite_code("c" * 64) is None
    async with sql_store.transaction() as tx:
        assert await tx.purge_invite_codes(soon) == 1
    async with sql_store.reading() as tx:
        assert await tx.get_invite_code("a" * 64) is None
        assert await tx.get_invite_code("b" * 64) is not None


async def test_codes_redeem_through_the_service_on_each_backend(
    sql_store: SqlRecordStore,
) -> None:
    now = [datetime(2026, 12, 4, 12, tzinfo=UTC)]
    codes = InviteCodes(sql_store, b"k" * 32, clock=lambda: now[0])
    expires = now[0] + timedelta(hours=2)
    args = (ConsultationId("c-9"), "jti-9", UserId("res-9"), "王大爷", Role.RESIDENT, "卫生室")
    code = await codes.issue(*args, expires)
    found = await codes.redeem(code.lower())
    assert (found.consultation_id, found.jti, found.name) == ("c-9", "jti-9", "王大爷")
    # Another key (another deployment) does not know the code.
    other = InviteCodes(sql_store, b"x" * 32, clock=lambda: now[0])
    with pytest.raises(Exception, match="no invite has this code"):
        await other.redeem(code)
    now[0] = expires
    with pytest.raises(Exception, match="expired"):
        await codes.redeem(code)
    # Issuing another code purges the expired one: its row held a name.
    await codes.issue(*args, expires + timedelta(hours=2))
    async with sql_store.reading() as tx:
        assert await tx.get_invite_code(codes.digest(code.replace("-", ""))) is None
