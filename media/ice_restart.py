"""ICE restarts for aiortc peer connections, which aiortc 1.16 and aioice 0.13 cannot do.

What they do with a restart, read in the installed sources:
- a second `RTCIceTransport.start()` returns at once (`if self.__start is not None`), so the new
  ice-ufrag/ice-pwd of a restart offer or answer are kept by the peer connection but never
  reach aioice's `Connection`, whose `remote_username`/`remote_password` stay the old ones;
- `RTCIceGatherer.gather()` runs only once (`if self.__state == "new"`) and the local
  credentials are fixed for the connection's life, so an answer to a restart, or a restart
  offer, carries the old ones;
- once end-of-candidates was signalled (every non-trickle description does), new remote
  candidates are dropped (`RTCIceTransport.addRemoteCandidate` checks the gatherer's
  `_remote_candidates_end`);
- aioice then answers the peer's checks with its new credentials `401 Unauthenticated`
  (`Connection._valid_username` compares the remote ufrag), and its own checks and consent
  requests use the old ones: the peer's new path never comes up, and after about 30 s of
  failed consent checks (6 × 5 s, `query_consent`) aioice closes the connection, DTLS ends and
  the peer connection closes itself.

What this module does instead, in place, per connection: the aioice `Connection` stays — its
sockets and local candidates (the relay's address does not change when a clinic's does), the
DTLS and SRTP sessions above it, every sender and receiver — and gets new credentials on both
sides, the new remote candidates and a fresh check list, then runs its checks again
(`Connection.connect`). The pair it had keeps carrying media in both directions until a new one
is nominated, and a restart that fails leaves that pair in place, its consent checks running
again. A restart needs an established connection: ICE "completed" (aiortc has no "connected"),
every section on one transport (max-bundle), and at least one remote candidate.

Who restarts is the offerer of the restarting description, as RFC 8445 section 9 says:
`restart_on_next_offer(pc)` puts new local credentials in the next offer, and they take effect
with its answer (until then the old ones stay in force both ways); an offer whose credentials
changed restarts the answerer's side. `set_local_description` and `set_remote_description`
stand in for aiortc's methods on connections that may restart. Every aioice and aiortc internal
used here is listed by `internals_problems()`, which media/internals.py's `check_internals()`
runs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import aioice
from aioice import Candidate
from aioice.utils import random_string
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport, candidate_to_aioice
from aiortc.sdp import SessionDescription

log = logging.getLogger(__name__)

# The shortest RFC 8839 allows (4 and 22 ice-chars), as aioice makes its own.
UFRAG_CHARS = 4
PASSWORD_CHARS = 22


class IceRestartRefused(ValueError):
    """A restart this connection cannot take now; the message says why."""


@dataclass(frozen=True)
class Credentials:
    ufrag: str
    password: str

    @classmethod
    def fresh(cls) -> Credentials:
        return cls(random_string(UFRAG_CHARS), random_string(PASSWORD_CHARS))


@dataclass
class _Restarts:
    """What one peer connection's restarts need between calls."""

    # Set by restart_on_next_offer: the next local offer carries new credentials.
    wanted: bool = False
    # Credentials offered, in force once the answer comes.
    offered: Credentials | None = None
    # The checks of the restart under way.
    task: asyncio.Task[None] | None = None
    # Restarts that found a new path.
    done: int = 0


def _state(pc: RTCPeerConnection) -> _Restarts:
    found: _Restarts | None = getattr(pc, "_telemed_ice_restarts", None)
    if found is None:
        found = _Restarts()
        pc._telemed_ice_restarts = found  # type: ignore[attr-defined]
    return found


def restarts_done(pc: RTCPeerConnection) -> int:
    """How many restarts of `pc` have found a new path so far."""
    return _state(pc).done


def restart_on_next_offer(pc: RTCPeerConnection) -> None:
    """The next offer made with `set_local_description` restarts ICE."""
    _state(pc).wanted = True


def _transport(pc: RTCPeerConnection) -> RTCIceTransport:
    """The connection's one ICE transport, established; IceRestartRefused otherwise."""
    transports: set[RTCIceTransport] = pc._RTCPeerConnection__iceTransports  # type: ignore[attr-defined]
    if len(transports) != 1:
        raise IceRestartRefused(
            f"an ICE restart needs every section on one transport (max-bundle); "
            f"this connection has {len(transports)}"
        )
    transport = next(iter(transports))
    if transport.state != "completed":
        raise IceRestartRefused(
            f"ICE is {transport.state}: a restart needs a connection that was established"
        )
    return transport


async def set_local_description(pc: RTCPeerConnection, description: RTCSessionDescription) -> None:
    """pc.setLocalDescription; an offer after `restart_on_next_offer` carries new ICE
    credentials (the old ones stay in force until its answer is set)."""
    state = _state(pc)
    if description.type != "offer" or not (state.wanted or state.offered):
        await pc.setLocalDescription(description)
        return
    try:
        connection = _transport(pc)._connection
    except IceRestartRefused:
        state.wanted = False
        raise
    offered = state.offered or Credentials.fresh()
    in_force = (connection._local_username, connection._local_password)
    # aiortc writes the gatherer's credentials into the description as it is set.
    connection._local_username, connection._local_password = offered.ufrag, offered.password
    try:
        await pc.setLocalDescription(description)
    finally:
        connection._local_username, connection._local_password = in_force
    state.wanted = False
    state.offered = offered


async def set_remote_description(pc: RTCPeerConnection, description: RTCSessionDescription) -> bool:
    """pc.setRemoteDescription, restarting ICE when the description asks for it: an answer to
    a restart offer, or an offer with new credentials. Returns whether it restarted.
    IceRestartRefused (nothing set) when a restart cannot be done on this connection."""
    state = _state(pc)
    parsed = SessionDescription.parse(description.sdp)
    remote = _credentials(parsed)
    local: Credentials | None = None
    if remote is None:
        pass  # nothing to compare: aiortc refuses such a description itself
    elif description.type == "answer" and state.offered is not None:
        local = state.offered
    elif description.type == "offer" and pc.remoteDescription is not None:
        before = _credentials(SessionDescription.parse(pc.remoteDescription.sdp))
        if before is not None and before != remote:
            local = Credentials.fresh()
    if local is None or remote is None:
        await pc.setRemoteDescription(description)
        return False
    transport = _transport(pc)
    candidates = _remote_candidates(parsed)
    if not candidates:
        raise IceRestartRefused("the description restarts ICE but carries no candidates")
    state.offered = None
    await _reset(state, transport, local, remote, _ice_lite(parsed))
    connection = transport._connection
    for candidate in candidates:
        await connection.add_remote_candidate(candidate)
    await connection.add_remote_candidate(None)
    # aiortc adds the description's candidates too: already there, so they are ignored.
    transport.iceGatherer._remote_candidates_end = True
    await pc.setRemoteDescription(description)
    state.task = asyncio.ensure_future(_checks(state, connection))
    return True


def _credentials(parsed: SessionDescription) -> Credentials | None:
    """The ICE credentials of a bundled description (its first section's)."""
    ice = parsed.media[0].ice if parsed.media else None
    if ice is None or not ice.usernameFragment or not ice.password:
        return None
    return Credentials(ice.usernameFragment, ice.password)


def _ice_lite(parsed: SessionDescription) -> bool:
    ice = parsed.media[0].ice
    return bool(ice is not None and ice.iceLite)


def _remote_candidates(parsed: SessionDescription) -> list[Candidate]:
    """Every section's candidates (bundled: one transport), each address once."""
    seen: set[tuple[str, int, str]] = set()
    found: list[Candidate] = []
    for media in parsed.media:
        for candidate in media.ice_candidates:
            key = (candidate.ip, candidate.port, candidate.protocol.lower())
            if candidate.component == 1 and key not in seen:
                seen.add(key)
                found.append(candidate_to_aioice(candidate))
    return found


async def _reset(
    state: _Restarts,
    transport: RTCIceTransport,
    local: Credentials,
    remote: Credentials,
    remote_is_lite: bool,
) -> None:
    """The connection forgets its checks and its peer's candidates and takes the new
    credentials; `_nominated` stays, so media and DTLS carry on over the old pair."""
    connection: Any = transport._connection
    previous = state.task
    if previous is not None and not previous.done():
        previous.cancel()
        await asyncio.gather(previous, return_exceptions=True)
    consent = connection._query_consent_task
    if consent is not None and not consent.done():
        consent.cancel()
        await asyncio.gather(consent, return_exceptions=True)
    connection._query_consent_task = None
    checks = [p.task for p in connection._check_list if p.task is not None]
    for task in checks:
        task.cancel()
    await asyncio.gather(*checks, return_exceptions=True)
    connection._check_list = []
    connection._check_list_done = False
    connection._check_list_state = asyncio.Queue()
    connection._nominating = set()
    connection._early_checks.clear()
    connection._early_checks_done = False
    connection._remote_candidates = []
    connection._remote_candidates_end = False
    connection._local_username, connection._local_password = local.ufrag, local.password
    connection.remote_username, connection.remote_password = remote.ufrag, remote.password
    connection.remote_is_lite = remote_is_lite
    # aioice counts a component done once it has a nominated pair: the old pair must not count.
    old = dict(connection._nominated)
    connection._check_list_maybe_complete = lambda: _maybe_complete(connection, old)


def _maybe_complete(connection: Any, old: dict[int, Any]) -> bool:
    """aioice's Connection._check_list_maybe_complete, counting only pairs nominated since
    the restart."""
    fresh = {c for c, pair in connection._nominated.items() if old.get(c) is not pair}
    if fresh and fresh >= connection._components:
        if not connection._check_list_done:
            connection._check_list_state.put_nowait(aioice.ice.ICE_COMPLETED)
            connection._check_list_done = True
        return True
    return False


async def _checks(state: _Restarts, connection: Any) -> None:
    try:
        await connection.connect()  # starts consent checks on the new pair when it succeeds
        state.done += 1
        log.info("ICE restart found a new path")
    except ConnectionError:
        if not (connection._closed or connection._closing):
            # The old pair may still be good; if not, its consent checks end it as before.
            log.info("ICE restart found no new path; the previous one stays")
            connection._query_consent_task = asyncio.create_task(connection.query_consent())
    finally:
        with contextlib.suppress(AttributeError):
            del connection._check_list_maybe_complete


def internals_problems() -> list[str]:
    """Each aioice and aiortc internal this module relies on that is no longer there."""
    problems: list[str] = []
    init = inspect.getsource(aioice.Connection.__init__)
    for name in (
        "_local_username",
        "_local_password",
        "remote_username",
        "remote_password",
        "remote_is_lite",
        "_check_list",
        "_check_list_done",
        "_check_list_state",
        "_nominating",
        "_early_checks",
        "_early_checks_done",
        "_remote_candidates",
        "_remote_candidates_end",
        "_query_consent_task",
        "_nominated",
        "_components",
        "_closed",
        "_closing",
    ):
        if f"self.{name} " not in init and f"self.{name}:" not in init:
            problems.append(f"missing: aioice Connection.{name}")
    complete = inspect.getsource(aioice.Connection._check_list_maybe_complete)
    if "self._check_list_state.put_nowait(ICE_COMPLETED)" not in complete:
        problems.append("missing: aioice completes the check list through _check_list_state")
    if "self._check_list_maybe_complete()" not in inspect.getsource(
        aioice.Connection.check_complete
    ):
        problems.append("missing: aioice check_complete asks _check_list_maybe_complete")
    connect = inspect.getsource(aioice.Connection.connect)
    for needle in ("self._check_list_state.get()", "self.query_consent()"):
        if needle not in connect:
            problems.append(f"missing in aioice Connection.connect: {needle}")
    if "self.__start is not None" not in inspect.getsource(RTCIceTransport.start):
        problems.append("changed: RTCIceTransport.start may now restart ICE by itself")
    if "self._remote_candidates_end" not in inspect.getsource(RTCIceGatherer.__init__):
        problems.append("missing: RTCIceGatherer._remote_candidates_end")
    if "self.__iceTransports" not in inspect.getsource(RTCPeerConnection.__init__):
        problems.append("missing: RTCPeerConnection.__iceTransports")
    return problems
