"""The host side of a peer's exec run, driven directly: cancels while inputs arrive, a dropped link, a
records failure, a name in the way. Real Records, Ledger, programs and working directories; the peer at
the other end of the link is a recorder (it can also fail, as a dropped link does)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from vesta import allowlist, artifacts, proto
from vesta.errors import PeerUnavailable
from vesta.host import Host
from vesta.hostexec import ExecRunner
from vesta.ledger import Ledger
from vesta.records import Records, RecordsError
from vesta.spec import ExecSpec, FileInfo
from vesta.wire import Channel

FP = "ab" * 32


class Peer:
    """The submitter's end of the link: keeps what the host sends; from ``drop_at`` on, the link is gone."""

    peer_fingerprint = FP

    def __init__(self, drop_at: float | None = None) -> None:
        self.sent: list[proto.Message] = []
        self.drop_at = drop_at

    async def send(self, *msgs: proto.Message) -> None:
        await asyncio.sleep(0)
        if self.drop_at is not None and time.monotonic() >= self.drop_at:
            raise PeerUnavailable("connection reset by peer")
        self.sent.extend(msgs)

    def names(self) -> list[str]:
        return [type(m).__name__ for m in self.sent]

    def result(self) -> proto.Result:
        results = [m for m in self.sent if isinstance(m, proto.Result)]
        assert len(results) == 1, self.names()
        return results[0]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def make_host(runs: Path, **kw: Any) -> Host:
    return Host(name="h", counters=Counter(), capacity=lambda: (4, 1024), events=lambda kind, text: None,
                runner=ExecRunner(name="h", allowlist=allowlist.Allowlist([]), runs=runs), **kw)


def exec_offer(argv: tuple[str, ...], rid: int = 1, inputs: tuple[FileInfo, ...] = (), **kw: Any) -> proto.Offer:
    return proto.Offer(rid=rid, job_id="j1", spec=ExecSpec(argv, timeout_s=30, inputs=inputs), submitter="sub",
                       **kw)


def serve(h: Host, offer: proto.Offer, peer: Peer) -> Coroutine[Any, Any, None]:
    return h.serve_offer(offer, cast(Channel, peer))


def one_input(name: str, data: bytes) -> tuple[FileInfo, ...]:
    return (FileInfo(name, len(data), hashlib.sha256(data).hexdigest()),)


def left_in(runs: Path) -> list[Path]:
    return list(runs.iterdir()) if runs.exists() else []


async def test_a_cancel_while_the_inputs_arrive_ends_the_run_at_once(runs: Path) -> None:
    h = make_host(runs)
    peer = Peer()
    serving = asyncio.ensure_future(serve(h, exec_offer(("/bin/true",), inputs=one_input("in", b"0123")), peer))
    await asyncio.sleep(0.2)
    assert peer.names() == ["Accept"] and h.lent_running == 1   # waiting for the input, 30 s at most
    assert h.cancel(FP, 1)
    await asyncio.wait_for(serving, 5)
    assert "cancelled while its inputs were arriving" in peer.result().error
    assert h.lent_running == 0 and not left_in(runs)


async def test_lending_hours_ending_while_the_inputs_arrive_stop_the_run_with_that_reason(runs: Path) -> None:
    h = make_host(runs)
    peer = Peer()
    serving = asyncio.ensure_future(serve(h, exec_offer(("/bin/true",), inputs=one_input("in", b"0123")), peer))
    await asyncio.sleep(0.2)
    assert h.stop_all("outside lending hours") == 1
    await asyncio.wait_for(serving, 5)
    assert peer.result().error == "outside lending hours" and h.lent_running == 0


async def test_a_run_that_outlives_its_dropped_link_is_still_charged_and_recorded(runs: Path, tmp_path: Path) -> None:
    ledger = Ledger(None, goodwill=100.0, ratio=2.0, half_life_days=7.0)
    with Records(tmp_path / "records.db") as records:
        h = make_host(runs, ledger=ledger, records=records)
        peer = Peer(drop_at=time.monotonic() + 1.2)   # the first Progress after this finds the link gone
        busy = ("/bin/sh", "-c", "while :; do :; done")
        await asyncio.wait_for(serve(h, exec_offer(busy), peer), 10)
        assert h.lent_running == 0   # its slot is free at once; the program is being stopped
        for _ in range(100):          # then SIGTERM ends it, well within term_grace
            if records.hosted()[0]["state"] != "running":
                break
            await asyncio.sleep(0.05)
        run = records.hosted()[0]
        assert run["state"] == "failed" and "link to the submitter dropped" in run["reason"]
        assert run["cpu_s"] > 0.5    # about a second of a busy loop, charged even though no Result went out
        assert ledger.rows()[0]["lent"] == pytest.approx(run["cpu_s"], rel=0.05)
        assert "Result" not in peer.names()
        for _ in range(100):
            if not left_in(runs):
                break
            await asyncio.sleep(0.05)
        assert not left_in(runs)


async def test_a_records_failure_when_a_run_starts_does_not_cost_a_slot(
        runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Records(tmp_path / "records.db") as records:
        h = make_host(runs, records=records)

        def disk_full(**kw: Any) -> int:
            raise RecordsError("cannot append to the records write log: No space left on device")

        monkeypatch.setattr(records, "start_hosted", disk_full)
        for rid in (1, 2, 3, 4, 5):   # more than the four slots: none may stay taken
            peer = Peer()
            await asyncio.wait_for(serve(h, exec_offer(("/bin/true",), rid=rid), peer), 10)
            assert peer.names() == ["Accept", "Result"] and peer.result().exit_code == 0
        assert h.lent_running == 0 and not left_in(runs)


async def test_an_input_in_the_way_of_the_run_directory_fails_the_run_with_a_result(runs: Path) -> None:
    h = make_host(runs)
    peer = Peer()
    data = b"x"
    serving = asyncio.ensure_future(serve(h, exec_offer(("/bin/true",), inputs=one_input("tmp", data)), peer))
    await asyncio.sleep(0)   # the Accept is out; the peer's input arrives right behind it
    h.receive(FP, proto.FileChunk(rid=1, path="tmp", data=data, eof=True, sha256=hashlib.sha256(data).digest()))
    await asyncio.wait_for(serving, 10)
    r = peer.result()
    assert not r.ok and r.error.startswith("h could not run it: File exists") and "tmp" in r.error
    assert h.lent_running == 0 and not left_in(runs)


async def test_a_flood_of_empty_directories_in_the_output_is_bounded(runs: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_ARTIFACTS", 50)
    h = make_host(runs)
    peer = Peer()
    flood = ("/bin/sh", "-c", 'cd "$VESTA_OUTPUT" && for i in $(seq 300); do mkdir d$i; done && echo hi > z')
    await asyncio.wait_for(serve(h, exec_offer(flood, output_cap=1 << 20), peer), 20)
    pieces = [m for m in peer.sent if isinstance(m, proto.FileChunk)]
    assert peer.result().exit_code == 0
    assert len(pieces) == 1 and "more than 50 entries" in pieces[0].refused
