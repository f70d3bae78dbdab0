"""Choosing which host addresses a connection's ICE offers: aioice offers every interface but
loopback (`aioice.ice.get_host_addresses`), and the relay must offer what its configuration
says (loopback included, for tests and a local front proxy). `offer_host_addresses` replaces,
per connection, aioice's `Connection.gather_candidates` with `_gather_from`, which does what
aioice's does with the given addresses. Every aiortc and aioice internal used here is listed by
`internals_problems()`, which media/internals.py's `check_internals()` runs. ICE restarts are
media/ice_restart.py's."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import aioice
from aioice import Candidate
from aiortc.rtcicetransport import RTCIceGatherer
from aiortc.rtcpeerconnection import RTCPeerConnection

from media.source_check import missing_lines


def offer_host_addresses(pc: RTCPeerConnection, addresses: Iterable[str]) -> None:
    """Makes every ICE gatherer of `pc` offer exactly these host addresses (aioice leaves out
    loopback and offers every interface otherwise). Call before each setLocalDescription."""
    wanted = list(addresses)
    transports: Iterable[Any] = pc._RTCPeerConnection__iceTransports  # type: ignore[attr-defined]
    for transport in transports:
        connection = transport.iceGatherer._connection
        if getattr(connection, "_telemed_addresses", None) == wanted:
            continue
        connection._telemed_addresses = wanted
        connection.gather_candidates = _gather_from(connection, wanted)


def _gather_from(connection: Any, addresses: list[str]) -> Callable[[], Any]:
    async def gather_candidates() -> None:
        if connection._local_candidates_start:
            return
        connection._local_candidates_start = True
        # As aioice does: the relay policy gathers no host candidate, only TURN's.
        hosts = addresses if connection._transport_policy == aioice.TransportPolicy.ALL else []
        for component in connection._components:
            found: list[Candidate] = await connection.get_component_candidates(
                component=component, addresses=hosts
            )
            connection._local_candidates += found
        connection._local_candidates_end = True

    return gather_candidates


def internals_problems() -> list[str]:
    """Each aiortc and aioice internal this module relies on that is no longer there, or no
    longer what `_gather_from` stands in for."""
    problems: list[str] = []
    if "self.__iceTransports" not in inspect.getsource(RTCPeerConnection.__init__):
        problems.append("missing: RTCPeerConnection.__iceTransports")
    if "self._connection = Connection(" not in inspect.getsource(RTCIceGatherer.__init__):
        problems.append("missing: RTCIceGatherer._connection")
    if "await self._connection.gather_candidates()" not in inspect.getsource(RTCIceGatherer.gather):
        problems.append("missing: RTCIceGatherer.gather awaits gather_candidates()")
    # The state _gather_from reads and fills, as a new connection has it.
    connection = aioice.Connection(ice_controlling=True)
    for name, expected in (
        ("_local_candidates_start", False),
        ("_local_candidates_end", False),
        ("_local_candidates", []),
        ("_components", {1}),
        ("_transport_policy", aioice.TransportPolicy.ALL),
    ):
        if getattr(connection, name, None) != expected:
            problems.append(f"missing: aioice Connection.{name} (a new one's is {expected!r})")
    if getattr(connection, "local_candidates", None) != []:
        problems.append("missing: aioice Connection.local_candidates lists _local_candidates")
    # What aioice's own gathering does, which _gather_from repeats with other addresses.
    problems += missing_lines(
        "aioice Connection.gather_candidates",
        (aioice.Connection.gather_candidates,),
        (
            "if not self._local_candidates_start:",
            "self._local_candidates_start = True",
            "if self._transport_policy == TransportPolicy.ALL:",
            "self.get_component_candidates(component=component, addresses=addresses)",
            "for component in self._components",
            "self._local_candidates += candidates",
            "self._local_candidates_end = True",
        ),
    )
    get_candidates = aioice.Connection.get_component_candidates
    parameters = list(inspect.signature(get_candidates).parameters.values())
    if (
        not inspect.iscoroutinefunction(get_candidates)
        or [p.name for p in parameters[:3]] != ["self", "component", "addresses"]
        or any(p.default is inspect.Parameter.empty for p in parameters[3:])
    ):
        problems.append("missing: aioice Connection.get_component_candidates(component, addresses)")
    return problems
