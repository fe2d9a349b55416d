"""The sweep's declaration, pure: replacement strings, the inputs' product, --halt, the joblog and --resume."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vesta.errors import InvalidJob
from vesta.sweep import exit_code
from vesta.sweepspec import (
    JOBLOG_HEADER,
    Halt,
    SweepSpec,
    check_template,
    fill,
    joblog_line,
    read_joblog,
    resume_seqs,
)


def spec(*template: str, sources: tuple[tuple[str, ...], ...] = (("a", "b"),), **kw: object) -> SweepSpec:
    s = SweepSpec(template=template, sources=sources, **kw)  # type: ignore[arg-type]
    s.validate()
    return s


@pytest.mark.parametrize(("part", "want"), [
    ("{}", "dir/sub/file.tar.gz x"),
    ("{1}", "dir/sub/file.tar.gz"),
    ("{2}", "x"),
    ("{.}", "dir/sub/file.tar"),   # as parallel: the last extension of the whole input goes
    ("{1.}", "dir/sub/file.tar"),
    ("{/}", "file.tar.gz x"),
    ("{1/}", "file.tar.gz"),
    ("{1//}", "dir/sub"),
    ("{2//}", "."),
    ("{1/.}", "file.tar"),
    ("{#}", "7"),
    ("pre-{1/.}-{#}.out", "pre-file.tar-7.out"),
    ("no strings", "no strings"),
    ("{nope}", "{nope}"),
])
def test_every_replacement_string(part: str, want: str) -> None:
    assert fill(part, ("dir/sub/file.tar.gz", "x"), 7) == want


def test_no_replacement_string_appends_the_inputs() -> None:
    s = spec("echo", "hi", sources=(("a", "b"), ("1", "2")))
    assert s.argv(1) == ("echo", "hi", "a", "1")
    assert s.argv(4) == ("echo", "hi", "b", "2")


def test_the_product_numbers_jobs_as_parallel_does() -> None:
    s = spec("echo", "{1}{2}", sources=(("a", "b", "c"), ("1", "2")))
    assert s.total == 6
    assert [s.argv(i)[1] for i in range(1, 7)] == ["a1", "a2", "b1", "b2", "c1", "c2"]
    assert s.to_run() == [1, 2, 3, 4, 5, 6]
    assert s.with_(seqs=(2, 5)).to_run() == [2, 5]


def test_a_replacement_string_with_no_source_is_refused() -> None:
    with pytest.raises(InvalidJob, match=r"replacement string \{3\} names input source 3, but there are only 2"):
        spec("echo", "{3}", sources=(("a",), ("b",)))
    with pytest.raises(InvalidJob, match=r"\{2/\} names input source 2, but there is only 1"):
        check_template("x{2/}", 1)
    with pytest.raises(InvalidJob, match="--put-each"):   # in a --put-each template too
        spec("cat", put_each=("{0}",))


@pytest.mark.parametrize(("bad", "match"), [
    ({"template": ()}, "needs a command"),
    ({"sources": ()}, "needs inputs"),
    ({"sources": ((),)}, "input source 1 is empty"),
    ({"sources": (tuple(map(str, range(400))), tuple(map(str, range(400))))}, "160,000 jobs"),
    ({"jobs": -1}, "-j must be"),
    ({"retries": 11}, "--retries"),
    ({"puts": ("relative.txt",)}, "absolute"),
    ({"seqs": (3,)}, "job numbers from 1 to 2"),
])
def test_bad_sweeps_are_refused_by_name(bad: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"template": ("echo",), "sources": (("a", "b"),)} | bad
    with pytest.raises(InvalidJob, match=match):
        SweepSpec(**base).validate()  # type: ignore[arg-type]


def test_the_wire_form_round_trips() -> None:
    s = spec("echo", "{}", sources=(("a", "b"), ("x",)), jobs=3, on="b", need=("gpu",), timeout_s=5.0, mem_mib=64,
             retries=2, halt=Halt.parse("soon,fail=10%"), results="/r", joblog="/j", seqs=(2,), cwd="/w")
    assert SweepSpec.from_wire(s.to_wire()) == s
    with pytest.raises(InvalidJob):
        SweepSpec.from_wire({"template": ["echo"], "sources": "abc"})


def test_halt() -> None:
    assert not Halt.parse(None).reached(100, 100)
    now = Halt.parse("now,fail=2")
    assert (now.when, now.reached(1, 10), now.reached(2, 10)) == ("now", False, True)
    soon = Halt.parse("soon,fail=10%")
    assert (soon.when, soon.reached(9, 100), soon.reached(10, 100), soon.reached(1, 5)) == ("soon", False, True, True)
    for bad in ("later,fail=1", "now,fail=0", "now,fail=0%", "now,fail=101%", "now"):
        with pytest.raises(InvalidJob, match="--halt"):
            Halt.parse(bad)


def test_joblog_lines_read_back_and_resume() -> None:
    lines = [JOBLOG_HEADER + "\n",
             joblog_line(1, "a", 1.5, 0.25, 10, 3, 0, 0, "echo 1"),
             joblog_line(2, "b", 1.6, 0.25, 0, 0, 1, 0, "false\twith\ttabs"),
             joblog_line(3, ":", 1.7, 0.25, 0, 0, -1, 9, "sleep 9"),
             "garbage line\n",
             joblog_line(2, "a", 2.0, 0.1, 0, 0, 0, 0, "false"),   # run again: the last line wins
             joblog_line(4, "a", 2.0, 0.1, 0, 0, 2, 0, "x")]
    cols = lines[1].rstrip("\n").split("\t")
    assert len(cols) == 9 and cols[2] == "1.500" and float(cols[3]) == 0.25
    assert len(lines[2].split("\t")) == 9   # tabs in a command never add columns
    logged = read_joblog(lines)
    assert logged == {1: (0, 0), 2: (0, 0), 3: (-1, 9), 4: (2, 0)}
    assert resume_seqs(6, logged, failed_too=False) == (5, 6)
    assert resume_seqs(6, logged, failed_too=True) == (3, 4, 5, 6)


@given(st.integers(0, 500), st.integers(0, 500))
def test_exit_status_counts_failures_up_to_101(failed: int, not_run: int) -> None:
    code = exit_code(failed, not_run)
    assert code == min(101, failed + not_run)
    assert (code == 0) == (failed + not_run == 0)
