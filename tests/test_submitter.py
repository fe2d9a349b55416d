"""The submitter's side of a remote chunk when things go wrong on this side: its own records fail, or
the link gives up on a cancelled request. A real Submitter, Records and link Stream; the node at the
other end is scripted (what it sends is put straight into the stream, what we send is kept)."""

from __future__ import annotations

import asyncio
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest

from vesta import chunks, proto, workloads
from vesta.autopilot import NodeView
from vesta.errors import PeerUnavailable, VestaError
from vesta.link import LinkPool, Stream, _Link
from vesta.peertable import PeerTable
from vesta.records import Records, RecordsError
from vesta.spec import CpuSpec, ExecSpec, JobRequest
from vesta.submitter import Submitter

FP = "cd" * 32


class ScriptedNode:
    """The far end of one link: every request gets an Accept, then whatever ``after_accept`` holds."""

    def __init__(self, after_accept: tuple[proto.Message, ...] = ()) -> None:
        self.after_accept = after_accept
        self.received: list[proto.Message] = []
        self.streams: list[Stream] = []
        self.link = types.SimpleNamespace(pending={}, closed=False, last_heard=time.monotonic(),
                                          channel=types.SimpleNamespace(send=self._receive))

    async def _receive(self, *msgs: proto.Message) -> None:
        self.received.extend(msgs)

    async def open(self, fingerprint: str, addr: tuple[str, int], make: Any, name: str = "") -> Stream:
        rid = len(self.streams) + 1
        stream = Stream(cast(_Link, self.link), rid, name)
        await stream.send(make(rid))
        for msg in (proto.Accept(rid=rid, node="peer"), *self.after_accept):
            stream.queue.put_nowait(msg)
        self.streams.append(stream)
        return stream

    def sent(self) -> list[str]:
        return [type(m).__name__ for m in self.received]


def submitter(node: ScriptedNode, records: Records | None = None) -> Submitter:
    peer = NodeView(FP, "peer", local=False, cores=4, cpu_pct=0.0, spare_cores=4.0, hash_rate=1e6,
                    offered_mem_mb=1024, exec_allowed=True)
    table = types.SimpleNamespace(get=lambda fp: types.SimpleNamespace(fingerprint=FP, addr=("127.0.0.1", 9),
                                                                       name="peer"))

    async def no_local(*args: Any) -> proto.Result:
        raise AssertionError("nothing runs locally here")

    return Submitter(name="me", fingerprint="ef" * 32, pool=cast(LinkPool, node), table=cast(PeerTable, table),
                     views=lambda: [peer], spill_cpu_pct=80, counters=Counter(), run_local=no_local,
                     records=records)


async def emit(event: dict[str, Any]) -> None:
    pass


def exec_job(argv: tuple[str, ...], timeout: float) -> JobRequest:
    return JobRequest(ExecSpec(argv, timeout_s=timeout), on="peer")


async def test_a_records_failure_mid_run_fails_the_job_and_stops_it_on_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = ScriptedNode(after_accept=(proto.Output(rid=1, stream="stdout", data=b"hello\n"),))
    with Records(tmp_path / "records.db") as records:
        def disk_full(*args: Any, **kw: Any) -> None:
            raise RecordsError("cannot append to the records write log: No space left on device")

        monkeypatch.setattr(records, "append_log", disk_full)
        with pytest.raises(VestaError, match="No space left on device"):
            await asyncio.wait_for(submitter(node, records).submit(exec_job(("sleep", "3600"), 3600), emit), 10)
    assert node.sent() == ["Offer", "Cancel"]   # not left running there for the hour


async def test_a_cancelled_request_the_link_dropped_ends_without_stalling_the_loop() -> None:
    node = ScriptedNode()
    sub = submitter(node)
    job = asyncio.ensure_future(sub.submit(exec_job(("sleep", "60"), 60), emit))
    for _ in range(100):
        if node.streams and sub.jobs:
            break
        await asyncio.sleep(0.01)
    stream = node.streams[0]
    sub.cancel(next(iter(sub.jobs)))
    stream.queue.put_nowait(proto.Progress(rid=1, done=0))   # a heartbeat: the Cancel goes out after it
    for _ in range(100):
        if "Cancel" in node.sent():
            break
        await asyncio.sleep(0.01)
    assert node.sent() == ["Offer", "Cancel"]
    # Then the node's output overflowed this request: the link dropped it (link._Link._read does this).
    node.link.pending.pop(stream.rid, None)
    stream.queue.put_nowait(PeerUnavailable("peer sent more than this request could take"))
    longest, last = 0.0, time.monotonic()
    deadline = last + 10
    while not job.done() and last < deadline:   # the loop keeps turning: the job does not spin until CANCEL_WAIT
        await asyncio.sleep(0.005)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    with pytest.raises(VestaError, match="cancel"):
        job.result()
    assert longest < 1.0, f"the event loop stalled {longest:.2f}s"


async def test_a_peer_is_credited_and_recorded_for_no_more_than_it_could_have_used(tmp_path: Path) -> None:
    """A member claimed 16,483 core-seconds for 4 s of one chunk's work, raising its borrowing cap 16,000-fold: a
    cpu chunk runs on one thread, so its claim is bounded by one core for as long as the run took."""
    digest = workloads.unit_digest("jcredit", 0, 1)   # the work was really done: only the claim is inflated
    node = ScriptedNode(after_accept=(proto.Result(rid=1, ok=True, node="peer", digests=(digest,), iterations=1,
                                                   elapsed_s=4.0, cpu_s=16_483.0),))
    claimed: list[float] = []
    with Records(tmp_path / "records.db") as records:
        sub = submitter(node, records)
        sub.on_borrowed = lambda fp, name, offer, result: claimed.append(result.cpu_s)
        t0 = time.monotonic()
        result = await asyncio.wait_for(sub.submit(JobRequest(CpuSpec(1), on="peer"), emit, job_id="jcredit"), 10)
        wall = time.monotonic() - t0
        assert result["parts"][0]["node"] == "peer"
        [part] = records.job(result["job_id"])["parts"]   # type: ignore[index]
    assert claimed and claimed[0] <= wall and part["cpu_s"] == claimed[0]


async def test_a_node_that_keeps_a_run_going_past_its_timeout_does_not_hold_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that keeps sending Progress held a job with --timeout 3 `running` for ever: the submitter enforces
    the time it asked for (plus a grace), stops the run and records the job as timed out."""
    monkeypatch.setattr(chunks, "TIMEOUT_GRACE_S", 0.3)
    monkeypatch.setattr(chunks, "CANCEL_WAIT", 0.3)
    node = ScriptedNode()
    with Records(tmp_path / "records.db") as records:
        sub = submitter(node, records)
        job = asyncio.ensure_future(sub.submit(JobRequest(ExecSpec(("sleep", "3600"), timeout_s=0.5), on="peer"),
                                               emit))

        async def keep_busy() -> None:   # the node says it is working, and never stops
            while not job.done():
                for stream in node.streams:
                    stream.queue.put_nowait(proto.Progress(rid=stream.rid, done=0))
                    node.link.pending[stream.rid] = stream        # as a real link keeps its open requests
                node.link.last_heard = time.monotonic()   # ... and notes every frame
                await asyncio.sleep(0.1)

        feeder = asyncio.ensure_future(keep_busy())
        t0 = time.monotonic()
        with pytest.raises(VestaError, match="timed out: still running"):
            await asyncio.wait_for(job, 10)
        took = time.monotonic() - t0
        await feeder
        record = records.job(next(iter(records.jobs(limit=1)))["id"])
    assert took < 5 and "Cancel" in node.sent()
    assert record is not None and record["state"] == "failed" and "timed out" in record["reason"]


async def test_a_made_up_cpu_result_is_rejected_and_earns_no_credit(tmp_path: Path) -> None:
    """A member returned a made-up digest and the job "succeeded": the submitter recomputes a sample of every
    chunk's units, and a mismatch rejects the chunk (re-placed; here no node is left, so the job fails)."""
    node = ScriptedNode(after_accept=(proto.Result(rid=1, ok=True, node="peer", digests=(b"\x01" * 32,),
                                                   iterations=1, elapsed_s=0.01, cpu_s=0.01),))
    credited: list[float] = []
    with Records(tmp_path / "records.db") as records:
        sub = submitter(node, records)
        sub.on_borrowed = lambda fp, name, offer, result: credited.append(result.cpu_s)
        with pytest.raises(VestaError, match="wrong digest for unit 0"):
            await asyncio.wait_for(sub.submit(JobRequest(CpuSpec(1), on="peer"), emit), 10)
        [job] = records.jobs(limit=1)
        [part] = records.job(job["id"])["parts"]   # type: ignore[index]
    assert credited == [] and job["state"] == "failed"
    assert "wrong digest" in part["reason"]
