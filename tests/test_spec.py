"""The job types on their own, without a daemon: every bad field is refused with its one-line message, and
a job survives the trip through the control socket, the records and the peer protocol unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest

from vesta import proto, spec
from vesta.errors import ConfigError, InvalidJob, ProtocolError
from vesta.records import Records
from vesta.spec import CpuSpec, ExecSpec, FileInfo, JobRequest, MemSpec

SHA = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(("kind", "body", "message"), [
    ("cpu", {"millions": 0}, "cpu needs a positive number of million iterations"),
    ("cpu", {"millions": -5}, "cpu needs a positive number of million iterations"),
    ("cpu", {"millions": "many"}, "cpu needs a positive number of million iterations"),
    ("cpu", {"millions": float("nan")}, "cpu needs a positive number of million iterations"),
    ("cpu", {"iterations": 0}, "cpu needs a positive number of million iterations"),
    ("cpu", {"iterations": True}, "cpu needs a positive number of million iterations"),
    ("cpu", {"iterations": spec.MAX_ITERATIONS + 1}, "cpu needs a positive number of million iterations"),
    ("mem", {"mib": 0, "ms": 1}, "mem needs a size in MiB from 1"),
    ("mem", {"mib": 1.5, "ms": 1}, "mem needs a size in MiB from 1"),
    ("mem", {"mib": 1, "ms": -1}, "mem needs a hold time in milliseconds from 0"),
    ("mem", {"mib": 1}, "mem needs a hold time in milliseconds from 0"),
    ("exec", {}, "exec needs a command"),
    ("exec", {"argv": []}, "exec needs a command"),
    ("exec", {"argv": [""]}, "exec needs a command"),
    ("exec", {"argv": [1, 2]}, "exec needs a command"),
    ("exec", {"argv": "true"}, "exec needs a command"),
    ("exec", {"argv": ["sh", "a\x00b"]}, "command too long"),
    ("exec", {"argv": ["x"] * (spec.MAX_ARGV + 1)}, "command too long"),
    ("exec", {"argv": ["x", "y" * (spec.MAX_ARG + 1)]}, "command too long"),
    ("exec", {"argv": ["true"], "timeout_s": -1}, "--timeout must be from 1 to 604800 seconds"),
    ("exec", {"argv": ["true"], "timeout_s": 7 * 86400 + 1}, "--timeout must be from 1 to 604800 seconds"),
    ("exec", {"argv": ["true"], "timeout_s": "soon"}, "--timeout must be from 1 to 604800 seconds"),
    ("exec", {"argv": ["true"], "mem_mib": -1}, "--mem must be a whole number of MiB"),
    ("exec", {"argv": ["true"], "retries": 11}, "--retries must be from 0 to 10"),
    ("exec", {"argv": ["true"], "retries": "x"}, "--retries must be from 0 to 10"),
    ("exec", {"argv": ["true"], "on": ""}, "--on must be a node name"),
    ("exec", {"argv": ["true"], "on": 5}, "--on must be a node name"),
    ("exec", {"argv": ["true"], "puts": ["/a"] * (spec.MAX_INPUTS + 1)}, "--put takes at most 64 files"),
    ("exec", {"argv": ["true"], "puts": [3]}, "puts must be a list of file paths"),
    ("exec", {"argv": ["true"], "inputs": [["a", 1, SHA]]}, "an input must be [path, size, sha256, executable]"),
    ("exec", {"argv": ["true"], "inputs": [["../a", 1, SHA, False]]}, "input path is not a safe relative path"),
    ("exec", {"argv": ["true"], "inputs": [["a", -1, SHA, False]]}, "input a: size must be from 0"),
    ("exec", {"argv": ["true"], "inputs": [["a", 1, "beef", False]]}, "input a: sha256 is not a SHA-256 in hex"),
    ("exec", {"argv": ["true"], "inputs": [["a", 1, SHA, "yes"]]}, "input a: executable must be true or false"),
    ("exec", {"argv": ["true"], "inputs": [["a", 1, SHA, False]] * 2}, "inputs name 'a' twice"),
    ("cpu", {"millions": 1, "split": "yes"}, "split must be true or false"),
    ("cpu", {"millions": 1, "retries": 2}, "--put, --queue and --retries are for exec jobs"),
    ("gpu", {}, "unknown job kind 'gpu'"),
])
def test_every_bad_field_is_refused_with_its_one_line_message(kind: str, body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        JobRequest.from_wire(kind, body)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text
    assert isinstance(caught.value, ConfigError)   # the CLI exits 2 for it, wherever it was found


def test_a_request_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(InvalidJob, match="a job must be a map"):
        JobRequest.from_wire("exec", ["true"])


def test_the_cli_and_the_daemon_get_the_same_message() -> None:
    """The CLI builds the type and validates it; the daemon's from_wire says the very same thing."""
    built = JobRequest(ExecSpec(("true",), timeout_s=-3.0))
    with pytest.raises(InvalidJob) as here:
        built.validate()
    with pytest.raises(InvalidJob) as there:
        JobRequest.from_wire("exec", {"argv": ["true"], "timeout_s": -3.0})
    assert str(here.value) == str(there.value)


def requests() -> list[JobRequest]:
    inputs = (FileInfo("data.csv", 10, SHA), FileInfo("bin/run.sh", 0, SHA, executable=True))
    return [
        JobRequest(CpuSpec(200_000_000)),
        JobRequest(CpuSpec(1), on="b", split=False),
        JobRequest(MemSpec(mib=512, ms=5000), on="pi4"),
        JobRequest(ExecSpec(("sh", "-c", "echo hi"))),
        JobRequest(ExecSpec(("./run.sh", "x"), timeout_s=2.5, mem_mib=100, inputs=inputs), on="0123456789abcdef",
                   retries=3, queue=True),
    ]


@pytest.mark.parametrize("request_", requests(), ids=lambda r: r.kind)
def test_a_request_round_trips_through_the_control_socket_form(request_: JobRequest) -> None:
    assert JobRequest.from_wire(request_.kind, request_.to_wire()) == request_


@pytest.mark.parametrize("request_", requests(), ids=lambda r: r.kind)
def test_a_request_round_trips_through_the_records(request_: JobRequest, tmp_path: Path) -> None:
    with Records(tmp_path / "records.db") as records:
        records.create_job("j1", request_.kind, request_.to_wire(), "a", "fp")
        row = records.job("j1")
    assert row is not None
    assert JobRequest.from_wire(row["kind"], row["args"]) == request_


@pytest.mark.parametrize("request_", requests(), ids=lambda r: r.kind)
def test_a_spec_round_trips_inside_an_offer(request_: JobRequest) -> None:
    cpu = isinstance(request_.spec, CpuSpec)
    offer = proto.Offer(rid=7, job_id="j1", spec=request_.spec, chunk=1, count=1 if cpu else 0, submitter="a",
                        output_cap=0 if cpu or isinstance(request_.spec, MemSpec) else 1 << 20)
    assert proto.decode(proto.encode(offer)) == offer


def test_the_offer_keeps_the_flat_wire_form_of_earlier_versions() -> None:
    """A node of the previous version reads (and writes) an offer's fields flat beside its kind."""
    inputs = (FileInfo("a", 1, SHA),)
    offer = proto.Offer(rid=5, job_id="j1", spec=ExecSpec(("cat", "a"), timeout_s=60.0, mem_mib=10, inputs=inputs),
                        submitter="desk", output_cap=99)
    body = offer.to_wire()
    assert body == {"rid": 5, "job_id": "j1", "kind": "exec", "chunk": 0, "start": 0, "count": 0,
                    "submitter": "desk", "output_cap": 99, "argv": ["cat", "a"], "timeout_s": 60.0, "mem_mib": 10,
                    "inputs": [["a", 1, SHA, False]]}
    old = body | {"iterations": 0, "mib": 0, "ms": 0}   # an older node sent every field of every kind
    assert proto.Offer.from_wire(old) == offer


def test_a_bad_spec_from_a_peer_is_a_protocol_error_naming_it() -> None:
    offer = proto.Offer(rid=1, job_id="j1", spec=ExecSpec(("true",)))
    bad = dataclasses.replace(offer, spec=ExecSpec(("true",), mem_mib=-4))
    with pytest.raises(ProtocolError, match="offer: --mem must be a whole number of MiB"):
        proto.decode(proto.encode(bad))


def test_staged_inputs_replace_the_local_paths() -> None:
    request = JobRequest(ExecSpec(("cat", "a")), puts=("/home/me/a",))
    staged = request.with_inputs((FileInfo("a", 1, SHA),))
    assert staged.puts == () and staged.spec == ExecSpec(("cat", "a"), inputs=(FileInfo("a", 1, SHA),))
    assert "puts" not in staged.to_wire()


def test_records_of_the_previous_version_still_read() -> None:
    """A queued job stored before the typed spec (its timeout under "timeout") comes back the same."""
    old = {"argv": ["true"], "on": None, "timeout": 5.0, "mem_mib": 0, "retries": 1, "queue": True,
           "inputs": [["a", 1, SHA, False]]}
    request = JobRequest.from_wire("exec", old)
    assert request == JobRequest(ExecSpec(("true",), timeout_s=5.0, inputs=(FileInfo("a", 1, SHA),)), retries=1,
                                 queue=True)
