"""The network lab itself: each impairment does to real traffic between two namespaces what
it says, measured end to end with a UDP/TCP echo (tests/lab/probe.py). Margins are wide: the
figures are statistics of a seeded generator, and the machine is shared."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Impairment, Lab, LabError

pytestmark = pytest.mark.lab

PROBE = str(Path(__file__).resolve().parent / "probe.py")
PORT = 7001


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with Lab(["clinic"], seed=7) as lab:
        echo = await asyncio.create_subprocess_exec(
            *lab.exec_prefix("srv"),
            sys.executable,
            PROBE,
            "echo",
            str(PORT),
            stdout=asyncio.subprocess.PIPE,
        )
        assert echo.stdout is not None
        assert await asyncio.wait_for(echo.stdout.readline(), 30) == b"ready\n"
        try:
            yield lab
        finally:
            echo.kill()
            await echo.wait()


async def probe(lab: Lab, *args: object) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *lab.exec_prefix("clinic"),
        sys.executable,
        PROBE,
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    result: dict[str, Any] = json.loads(out)
    return result


async def udp(lab: Lab, count: int, gap_ms: float, size: int = 200) -> dict[str, Any]:
    return await probe(lab, "udp", lab.address("srv"), PORT, count, gap_ms, size)


async def test_a_clean_link_carries_everything_in_order(lab: Lab) -> None:
    result = await udp(lab, 500, 1)
    assert result["returned"] == list(range(500))
    tcp = await probe(lab, "tcp", lab.address("srv"), PORT)
    assert tcp["echoed"], tcp


async def test_loss_drops_the_share_asked_for_each_way(lab: Lab) -> None:
    await lab.impair("clinic", up=Impairment(loss=0.10), down=Impairment(loss=0.05))
    result = await udp(lab, 3000, 0.5)
    counters = (await lab.counters())["links"]["clinic"]
    # 3000 out, about 10 % lost up; of what the echo returns about 5 % lost down.
    assert 0.07 < counters["up"]["lost"] / 3000 < 0.13, counters
    assert 0.03 < counters["down"]["lost"] / counters["down"]["packets"] < 0.07, counters
    assert len(result["returned"]) == 3000 - counters["up"]["lost"] - counters["down"]["lost"]


async def test_bursty_loss_comes_in_runs(lab: Lab) -> None:
    # Bad state entered 1 % of packets, left 20 % (runs of ~5), everything lost while bad.
    await lab.impair("clinic", up=Impairment(to_bad=0.01, to_good=0.2))
    result = await udp(lab, 4000, 0.5)
    missing = sorted(set(range(4000)) - set(result["returned"]))
    runs = [1]
    for before, seq in itertools.pairwise(missing):
        if seq == before + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    assert 0.02 < len(missing) / 4000 < 0.09, len(missing)
    assert statistics.mean(runs) > 2.5, runs  # uniform loss at this rate gives ~1.05


async def test_delay_and_jitter_shift_round_trips_and_keep_order(lab: Lab) -> None:
    await lab.impair("clinic", up=Impairment(delay_ms=60, jitter_ms=20))
    result = await udp(lab, 300, 5)
    assert result["returned"] == list(range(300))  # jitter without `reorder` keeps order
    rtts = result["rtt_ms"]
    assert 45 < statistics.median(rtts) < 150, statistics.median(rtts)
    assert min(rtts) >= 40  # never earlier than delay - jitter
    assert max(rtts) - min(rtts) > 15  # the jitter shows


async def test_reordering_lets_packets_overtake(lab: Lab) -> None:
    await lab.impair("clinic", up=Impairment(delay_ms=30, jitter_ms=25, reorder=0.3))
    result = await udp(lab, 400, 2)
    returned = result["returned"]
    assert sorted(returned) == list(range(400))
    assert sum(1 for a, b in itertools.pairwise(returned) if b < a) > 10


async def test_a_rate_cap_queues_then_drops(lab: Lab) -> None:
    # 1,000-byte datagrams at 4 Mbit/s into a 400 kbit/s uplink: about a tenth gets through.
    await lab.impair("clinic", up=Impairment(rate_kbps=400, queue_ms=200))
    result = await udp(lab, 1000, 2, size=1000)
    share = len(result["returned"]) / 1000
    assert 0.06 < share < 0.16, share
    counters = (await lab.counters())["links"]["clinic"]["up"]
    assert counters["queue_dropped"] > 800, counters
    assert 150 < counters["max_queue_ms"] <= 200, counters
    assert max(result["rtt_ms"]) > 150  # the queue shows as delay before it drops


async def test_a_udp_block_lets_tcp_through(lab: Lab) -> None:
    await lab.impair("clinic", up=Impairment(block_udp=True), down=Impairment(block_udp=True))
    result = await udp(lab, 50, 2)
    assert result["returned"] == []
    tcp = await probe(lab, "tcp", lab.address("srv"), PORT)
    assert tcp["echoed"], tcp
    # Lifted, UDP flows again: the impairment is live.
    await lab.impair("clinic")
    assert len((await udp(lab, 50, 2))["returned"]) == 50


async def test_a_clinic_that_moves_is_reached_at_its_new_address_only(lab: Lab) -> None:
    old = lab.address("clinic")
    assert len((await udp(lab, 20, 2))["returned"]) == 20
    await lab.move("clinic", "10.99.0.42")
    assert lab.address("clinic") == "10.99.0.42" != old
    # From the new address, both ways (the echo answers whoever asked).
    moved = await udp(lab, 50, 2)
    assert len(moved["returned"]) == 50, moved
    with pytest.raises(LabError, match=r"cannot move to .10\.99\.0\.42."):
        await lab.move("clinic", "10.99.0.42")  # taken (by itself)
    for elsewhere in ("10.99.0.1", "10.99.0.254", "192.168.1.5"):  # the server, the host, out
        with pytest.raises(LabError, match="not a clinic address"):
            await lab.move("clinic", elsewhere)


async def test_nonsense_is_refused_by_name(lab: Lab) -> None:
    with pytest.raises(LabError, match="no impaired link named 'srv'"):
        await lab.impair("srv", up=Impairment(loss=0.5))
    with pytest.raises(ValueError, match=r"loss must be within 0\.\.1"):
        Impairment(loss=1.5)
    with pytest.raises(ValueError, match="jitter_ms cannot exceed delay_ms"):
        Impairment(delay_ms=10, jitter_ms=20)
