"""A name is bound to the first identity seen with it; another identity with that name is NAME~fp8."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Cluster, Vestad, eventually, idle_proc, short_tmpdir
from vesta import names
from vesta.names import Names

A = "a" * 64
B = "b" * 64
C = "c" * 64


def test_first_identity_keeps_the_name_and_another_is_tagged(tmp_path: Path) -> None:
    book = Names(tmp_path / "names.json", "desk", A)
    assert book.shown("laptop", B) == "laptop"
    assert book.shown("laptop", C) == "laptop~cccccccc"
    assert book.shown("laptop", B) == "laptop"
    assert book.shown("desk", C) == "desk~cccccccc"      # this node's own name is never another's
    book.save()
    again = Names(tmp_path / "names.json", "desk", A)     # kept across restarts
    assert again.shown("laptop", C) == "laptop~cccccccc"
    assert again.owner("laptop") == B


def test_a_flood_of_names_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "MAX_NAMES", 5)
    book = Names(tmp_path / "names.json", "desk", A)
    # one identity renaming itself binds at most MAX_PER_IDENTITY names
    assert [book.shown(f"n{i}", B) for i in range(6)] == ["n0", "n1", "n2", "n3", "n4~bbbbbbbb", "n5~bbbbbbbb"]
    assert book.shown("m", C) == "m~cccccccc"   # the book is full
    book.save()
    assert len(json.loads((tmp_path / "names.json").read_text())["names"]) == 5


def test_an_unreadable_file_starts_empty_and_is_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "names.json").write_text("{not json")
    book = Names(tmp_path / "names.json", "desk", A)
    assert book.shown("laptop", B) == "laptop"
    assert "unreadable" in caplog.text
    book.save()
    assert json.loads((tmp_path / "names.json").read_text())["names"] == {"desk": A, "laptop": B}


@pytest.fixture
def dirs() -> Iterator[list[Path]]:
    made = [short_tmpdir() for _ in range(2)]
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.integration
def test_two_machines_named_laptop_are_both_usable(cluster: Cluster, dirs: list[Path]) -> None:
    def idle(tag: str) -> list[str]:   # machines with room to lend, on this shared test machine
        return ["-proc-root", str(idle_proc(dirs[0] / f"proc-{tag}"))]

    a = cluster.add("a", args=idle("a"))
    first = cluster.add("laptop", args=idle("first"))
    eventually(lambda: "laptop" in a.peer_names(), 10, what="a to see the first laptop")
    # a second machine called laptop (its own state and control socket directories)
    second = Vestad("laptop", cluster.key, cluster.dport, dirs[0] / "state", dirs[1], args=idle("second"))
    cluster.nodes.append(second)
    second.start()
    fp1, fp2 = first.status()["fingerprint"], second.status()["fingerprint"]
    other = f"laptop~{fp2[:8]}"
    eventually(lambda: a.peer_names() == {"laptop", other}, 10, what="a to list both laptops")

    # --on NAME reaches the bound identity only; --on NAME~fp8 the other one
    assert a.call("cpu", millions=1, on="laptop", split=False)["parts"][0]["node"] == "laptop"
    assert a.call("cpu", millions=1, on=other, split=False)["parts"][0]["node"] == other
    assert first.call("jobs", hosted=True)[0]["peer"] == "a"
    assert second.call("jobs", hosted=True)[0]["peer"] == "a"
    parts = {p["node"]: p["node_fp"] for job in a.call("jobs") for p in a.call("show", job_id=job["id"])["parts"]}
    assert parts == {"laptop": fp1, other: fp2}
    ping = a.call("ping", node=other)
    assert ping["fingerprint"] == fp2 and ping["node"] == other

    # records and ledger on the host side show the authenticated identity, not the claimed name
    second.call("cpu", millions=1, on="a", split=False)
    eventually(lambda: a.call("jobs", hosted=True)[0]["peer"] == other, 5, what="a's hosted record of laptop #2")
    assert a.call("jobs", hosted=True)[0]["peer_fp"] == fp2
    ledger = {r["fingerprint"]: r["name"] for r in a.call("ledger")["peers"]}
    assert ledger[fp1] == "laptop" and ledger[fp2] == other

    # the binding outlives a restart, even when the other laptop is the only one seen afterwards
    first.stop()
    a.stop()
    a.start()
    eventually(lambda: a.peer_names() == {other}, 10, what="a to see laptop #2 alone after its restart")
    out = a.vesta("cpu", "1", "--on", "laptop", "--no-split")
    assert out.returncode != 0 and "laptop" in out.stderr and "Traceback" not in out.stderr
