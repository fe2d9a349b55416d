"""The one vocabulary of how work ends (vesta/outcome.py), as pure functions."""

from __future__ import annotations

from vesta import outcome
from vesta.client import JobResult


def test_a_job_record_is_described_in_the_shared_words() -> None:
    assert outcome.of_job({"state": "succeeded", "exit_code": 0}) == "succeeded"
    assert outcome.of_job({"state": "failed", "exit_code": 4}) == "failed, exit 4"
    assert outcome.of_job({"state": "failed", "exit_code": None, "result": {"signal": 9}}) == "failed, signal 9"
    assert outcome.of_job({"state": "failed", "reason": "timed out after 1s"}) == "timed out"
    assert outcome.of_job({"state": "cancelled", "reason": "cancelled"}) == "cancelled"
    assert outcome.of_job({"state": "queued"}) == "queued"
    # An attempt that delivered a run whose program exited 7 is stored "succeeded"; its outcome is not.
    assert outcome.of_job({"state": "succeeded", "exit_code": 7}) == "failed, exit 7"
    assert outcome.of_job({"state": "lost"}) == "lost"


def test_an_answer_an_event_and_an_attempt_use_the_same_words() -> None:
    assert outcome.of_result({"job_id": "j1", "digest": "ab"}) == "succeeded"                  # cpu
    assert outcome.of_result({"exit_code": 4, "signal": None, "reason": ""}) == "failed, exit 4"
    assert outcome.of_result({"exit_code": None, "signal": 15, "reason": "timed out after 1s"}) == "timed out"
    assert outcome.event_kind("failed, exit 4") == "job_failed"
    assert outcome.event_kind("timed out") == "job_timed_out"
    common = dict(ok=True, refused=False, cancelled=False, error="", has_result=True)
    assert outcome.attempt_state(**common) == "succeeded"
    assert outcome.attempt_state(**common | {"error": "cancelled"}) == "cancelled"
    assert outcome.attempt_state(**common | {"cancelled": True}) == "cancelled"
    assert outcome.attempt_state(**common | {"has_result": False, "ok": False}) == "lost"
    assert outcome.attempt_state(**common | {"refused": True, "ok": False}) == "refused"


def test_the_python_api_names_the_outcome_too() -> None:
    assert JobResult("j1", "exec", "pi4", exit_code=4).outcome == "failed, exit 4"
    assert JobResult("j1", "exec", "pi4", signal=15, reason="timed out after 2s").outcome == "timed out"
    assert JobResult("j1", "cpu", "pi4").outcome == "succeeded"
