"""The exec queue on its own: a real Records and Submitter, no peers (the daemon tests cover placement)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from vesta import identity, proto
from vesta.crypto import derive_keys
from vesta.hostexec import LocalRun
from vesta.jobqueue import ExecQueue
from vesta.link import LinkPool
from vesta.peertable import PeerTable
from vesta.records import Records
from vesta.spec import ExecSpec, JobRequest
from vesta.submitter import Submitter


async def never_local(offer: proto.Offer, run: LocalRun) -> proto.Result:
    raise AssertionError("no node is known: nothing may run locally")


def queue_of(tmp_path: Path, records: Records, ended: list[tuple[str, BaseException | None]]) -> ExecQueue:
    me = identity.load_or_create(tmp_path / "state", "a")
    pool = LinkPool(derive_keys("queue-test-key-0123456789"), me, Counter(), 1.0)
    submitter = Submitter(name="a", fingerprint=me.fingerprint, pool=pool, table=PeerTable(), views=lambda: [],
                          spill_cpu_pct=80.0, counters=Counter(), run_local=never_local, records=records)

    def on_done(job_id: str, result: dict[str, Any] | None, error: BaseException | None) -> None:
        ended.append((job_id, error))

    return ExecQueue(submitter, records, tmp_path / "inputs", lambda on: "", on_done)


def add(queue: ExecQueue, job_id: str) -> None:
    queue.add(job_id, JobRequest(ExecSpec(("true",)), queue=True), submitter="a", fingerprint="fp-a")


def test_a_job_cancelled_as_its_offer_starts_ends_cancelled(tmp_path: Path) -> None:
    """`vesta cancel` in the instant between the queue taking a job and the submitter having it: the job
    used to be neither here nor there ("no running job"), and was then offered anyway."""
    async def scenario() -> None:
        ended: list[tuple[str, BaseException | None]] = []
        with Records(tmp_path / "records.db") as records:
            queue = queue_of(tmp_path, records, ended)
            add(queue, "j1")
            await queue.place_due()                # the job's offer is starting: its task has not run yet
            assert set(queue._placing) == {"j1"} and "j1" not in queue.submitter.jobs
            assert queue.cancel("j1")
            done, pending = await asyncio.wait(queue._tasks, timeout=5)
            assert done and not pending
            record = records.job("j1")
            assert record is not None and (record["state"], record["reason"]) == ("cancelled",
                                                                                   "cancelled while queued")
            assert [(job, str(error)) for job, error in ended] == [("j1", "job j1 cancelled while queued")]
            assert not queue.cancel("j1") and queue._placing == {}

            add(queue, "j2")                       # no node at all: it stays queued, and is tried later
            await queue.place_due()
            await asyncio.wait(queue._tasks, timeout=5)
            waiting = records.job("j2")
            assert waiting is not None and waiting["state"] == "queued" and "no node" in waiting["reason"]
            assert queue.cancel("j2")              # cancelled from the queue itself
            record = records.job("j2")
            assert record is not None and record["state"] == "cancelled"

    asyncio.run(scenario())
