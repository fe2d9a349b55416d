"""One vocabulary for how work ends, used by the records, the API, `vesta jobs/show/wait` and vestatop.

The words: ``queued``, ``running``, ``succeeded``, ``failed`` (with ``exit N`` or ``signal N``),
``cancelled``, ``timed out``, ``lost`` (an attempt whose node died or whose link dropped), and for one
attempt ``refused``. A job's or attempt's *state* in the records is one of the stored states; its
*outcome* is the state said in these words, with the exit code or signal that makes it one.
"""

from __future__ import annotations

from typing import Any

SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, LOST, REFUSED = (
    "succeeded", "failed", "cancelled", "timed out", "lost", "refused")


def _timed_out(reason: str | None) -> bool:
    return bool(reason) and "timed out" in str(reason)


def describe(state: str, exit_code: int | None = None, signal: int | None = None, reason: str | None = None) -> str:
    """The outcome in words: ``succeeded``, ``failed, exit 4``, ``failed, signal 9``, ``timed out``, ..."""
    if state == SUCCEEDED and (exit_code not in (None, 0) or signal):
        state = FAILED   # an attempt that ran a program to its non-zero end
    if state == FAILED:
        if _timed_out(reason):
            return TIMED_OUT
        if exit_code not in (None, 0):
            return f"{FAILED}, exit {exit_code}"
        if signal:
            return f"{FAILED}, signal {signal}"
    return state


def of_job(job: dict[str, Any]) -> str:
    """The outcome of a job record (as ``Records.job`` / ``jobs`` return it) or a hosted run."""
    result = job.get("result") if isinstance(job.get("result"), dict) else {}
    return describe(str(job.get("state")), job.get("exit_code"), (result or {}).get("signal"), job.get("reason"))


def of_result(result: dict[str, Any]) -> str:
    """The outcome of a finished job as the daemon answers it (cpu, mem: succeeded; exec: its exit)."""
    code, signal, reason = result.get("exit_code"), result.get("signal"), result.get("reason") or ""
    if "exit_code" not in result:
        return SUCCEEDED
    if code == 0 and not signal:
        return SUCCEEDED
    if "cancel" in reason:
        return CANCELLED
    return describe(FAILED, code, signal, reason)


def event_kind(outcome: str) -> str:
    """The vestatop event for a job that ended so: ``job_succeeded``, ``job_failed``, ``job_timed_out``..."""
    return "job_" + outcome.split(",")[0].replace(" ", "_")


def attempt_state(*, ok: bool, refused: bool, cancelled: bool, error: str, has_result: bool) -> str:
    """How one attempt at one chunk ended, for the records: one stopped by a cancel is ``cancelled``, never
    ``succeeded``."""
    if refused:
        return REFUSED
    if cancelled or "cancel" in (error or ""):
        return CANCELLED
    if not has_result:
        return LOST
    if not ok:
        return FAILED
    # An exec program that ran and exited non-zero stays a "succeeded" attempt in the stored state (the run was
    # delivered; records before this version say so too); its outcome (describe) says "failed, exit N".
    return SUCCEEDED
