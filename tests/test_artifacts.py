"""Files that travel with jobs: pieces out of a real directory tree, into a Sink, checked on the way."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from pathlib import Path

import pytest

from vesta import artifacts, proto
from vesta.artifacts import CORRUPT, INCOMPLETE, REFUSED, STORED, FileInfo, Sink
from vesta.errors import ProtocolError


def tree(workdir: Path) -> dict[str, bytes]:
    """A job's $VESTA_OUTPUT: a binary file over several pieces, a nested directory, an empty file."""
    out = workdir / artifacts.OUTPUT_DIR
    (out / "deep" / "er").mkdir(parents=True)
    files = {
        "blob.bin": random.Random(7).randbytes(3 * proto.MAX_FILE_PIECE + 1234),
        "deep/er/notes.txt": b"nested\n",
        "empty": b"",
    }
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    (out / "blob.bin").chmod(0o755)
    return files


def ship(workdir: Path, dest: Path, cap: int = 1 << 30) -> tuple[Sink, list[FileInfo]]:
    sink = Sink(dest, cap=cap)
    for piece in artifacts.output_pieces(9, workdir, cap):
        piece.validate()   # everything sent would pass decode() on the other side
        assert proto.decode(proto.encode(piece)) == piece
        sink.feed(piece)
    return sink, sink.finish()


def test_round_trip_binary_nested_and_empty(tmp_path: Path) -> None:
    files = tree(tmp_path / "work")
    sink, got = ship(tmp_path / "work", tmp_path / "store" / "j1")
    assert {f.path: f.state for f in got} == dict.fromkeys(files, STORED)
    for rel, data in files.items():
        assert (tmp_path / "store" / "j1" / rel).read_bytes() == data
    blob = next(f for f in got if f.path == "blob.bin")
    assert blob.size == len(files["blob.bin"]) and blob.executable
    assert blob.sha256 == artifacts.sha256_file(tmp_path / "work" / "output" / "blob.bin")[1]
    assert os.access(tmp_path / "store" / "j1" / "blob.bin", os.X_OK)
    assert sink.stored == sum(map(len, files.values()))
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["j1"]   # the staging directory is gone


def test_a_file_over_the_cap_is_refused_with_the_reason_and_the_rest_kept(tmp_path: Path) -> None:
    files = tree(tmp_path / "work")
    _, got = ship(tmp_path / "work", tmp_path / "store", cap=1000)
    by = {f.path: f for f in got}
    assert by["blob.bin"].state == REFUSED
    assert "over the 1000 bytes left of the submitter's artifact cap (artifact_max_mb)" in by["blob.bin"].reason
    assert (by["deep/er/notes.txt"].state, by["empty"].state) == (STORED, STORED)
    assert not (tmp_path / "store" / "blob.bin").exists()
    assert (tmp_path / "store" / "deep" / "er" / "notes.txt").read_bytes() == files["deep/er/notes.txt"]


def test_the_receiver_enforces_its_cap_even_against_a_sender_that_ignores_it(tmp_path: Path) -> None:
    tree(tmp_path / "work")
    sink = Sink(tmp_path / "store", cap=100_000)
    for piece in artifacts.output_pieces(1, tmp_path / "work", 1 << 30):   # a sender told a larger cap
        sink.feed(piece)
    by = {f.path: f for f in sink.finish()}
    assert by["blob.bin"].state == REFUSED and "over the cap" in by["blob.bin"].reason
    assert by["empty"].state == STORED
    assert not (tmp_path / "store" / "blob.bin").exists()


def test_a_damaged_piece_is_detected_by_the_checksum(tmp_path: Path) -> None:
    tree(tmp_path / "work")
    sink = Sink(tmp_path / "store", cap=1 << 30)
    for piece in artifacts.output_pieces(1, tmp_path / "work", 1 << 30):
        if piece.path == "blob.bin" and piece.offset == proto.MAX_FILE_PIECE and piece.data:
            flipped = bytes([piece.data[0] ^ 1]) + piece.data[1:]
            piece = dataclasses.replace(piece, data=flipped)
        sink.feed(piece)
    by = {f.path: f for f in sink.finish()}
    assert (by["blob.bin"].state, by["blob.bin"].reason) == (CORRUPT, "checksum mismatch: the file arrived damaged")
    assert not (tmp_path / "store" / "blob.bin").exists()   # never visible under its name
    assert by["empty"].state == STORED


def test_out_of_order_and_unfinished_files_are_not_kept(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "store", cap=1 << 20)
    sink.feed(proto.FileChunk(rid=1, path="a", offset=0, data=b"abc"))
    sink.feed(proto.FileChunk(rid=1, path="a", offset=10, data=b"def"))          # a gap
    sink.feed(proto.FileChunk(rid=1, path="b", offset=0, data=b"half"))
    by = {f.path: f for f in sink.finish()}                                      # the link dropped
    assert by["a"].state == CORRUPT and "out of order" in by["a"].reason
    assert by["b"].state == INCOMPLETE
    assert list((tmp_path / "store").iterdir()) == []


def test_symlinks_in_the_output_are_listed_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "owner-secret"
    secret.write_text("the owner's private key")
    out = tmp_path / "work" / artifacts.OUTPUT_DIR
    (out / "dir").mkdir(parents=True)
    os.symlink(secret, out / "stolen")
    os.symlink(tmp_path, out / "dir" / "up")
    os.mkfifo(out / "pipe")
    os.link(secret, out / "hard")
    _, got = ship(tmp_path / "work", tmp_path / "store")
    by = {f.path: f for f in got}
    assert (by["stolen"].state, by["dir/up"].state) == (REFUSED, REFUSED)
    assert "a symlink (not followed)" in by["stolen"].reason
    assert "not a regular file" in by["pipe"].reason
    assert (by["hard"].state, by["hard"].reason) == (REFUSED, "not sent: a hard link (not sent)")
    stored = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert stored == []


def test_an_output_directory_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("not the job's")
    os.symlink(tmp_path / "elsewhere", tmp_path / "work" / artifacts.OUTPUT_DIR)
    _, got = ship(tmp_path / "work", tmp_path / "store")
    assert [(f.path, f.state) for f in got] == [("output", REFUSED)]
    _, got = ship(tmp_path / "nothing-here", tmp_path / "store2")
    assert got == []


def test_inputs_must_match_the_announced_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.csv").write_bytes(b"1,2,3\n")
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    size, sha = artifacts.sha256_file(src / "data.csv")
    rsize, rsha = artifacts.sha256_file(src / "run.sh")
    manifest = (FileInfo("data.csv", size, sha), FileInfo("run.sh", rsize, rsha, executable=True))
    sink = Sink(tmp_path / "work", cap=size + rsize, expect=manifest)
    for piece in artifacts.input_pieces(3, src, manifest):
        assert not sink.complete
        sink.feed(piece)
    assert sink.complete and sink.problems == []
    sink.finish()
    assert (tmp_path / "work" / "data.csv").read_bytes() == b"1,2,3\n"
    assert os.access(tmp_path / "work" / "run.sh", os.X_OK)
    # A file that is not the announced one (changed since, or swapped by the sender) is refused.
    other = Sink(tmp_path / "work2", cap=1 << 20, expect=(FileInfo("data.csv", size, "0" * 64),))
    for piece in artifacts.input_pieces(3, src, manifest):
        other.feed(piece)
    by = {f.path: f for f in other.finish()}
    assert by["data.csv"].state == CORRUPT and by["run.sh"].reason == "not one of the announced inputs"
    assert not other.complete and not (tmp_path / "work2" / "run.sh").exists()


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a//b", "a/./b", "a/..", "", "a/\x00", "x/" * 40 + "y"])
def test_unsafe_paths_are_refused_on_the_wire_and_by_the_sink(tmp_path: Path, path: str) -> None:
    with pytest.raises(ProtocolError, match="path"):
        proto.FileChunk(rid=1, path=path, eof=True, sha256=bytes(32)).validate()
    sink = Sink(tmp_path / "store", cap=1 << 20)
    sink.feed(proto.FileChunk(rid=1, path=path, eof=True, sha256=bytes(32)))   # a caller that skipped decode()
    assert [f.state for f in sink.finish()] == [REFUSED]
    assert not (tmp_path / "x").exists() and not (tmp_path / "store").exists()


def test_file_chunk_validation() -> None:
    with pytest.raises(ProtocolError, match="must carry its sha256"):
        proto.FileChunk(rid=1, path="a", eof=True).validate()
    with pytest.raises(ProtocolError, match="carries no data"):
        proto.FileChunk(rid=1, path="a", data=b"x", refused="no").validate()
    with pytest.raises(ProtocolError, match="at most"):
        proto.FileChunk(rid=1, path="a", data=bytes(proto.MAX_FILE_PIECE + 1)).validate()
    ok = proto.Offer(rid=1, job_id="j1", spec=proto.ExecSpec(("x",), inputs=(FileInfo("a", 1, "0" * 64),)),
                     output_cap=5)
    assert proto.decode(proto.encode(ok)) == ok
    with pytest.raises(ProtocolError, match="twice"):
        dataclasses.replace(ok, spec=proto.ExecSpec(("x",), inputs=(FileInfo("a", 1, "0" * 64),) * 2)).validate()
    with pytest.raises(ProtocolError, match="for exec jobs"):
        proto.Offer(rid=1, job_id="j1", spec=proto.MemSpec(mib=1, ms=0), output_cap=5).validate()


def test_names_that_are_not_utf8_are_refused_not_fatal(tmp_path: Path) -> None:
    out = tmp_path / "work" / artifacts.OUTPUT_DIR
    out.mkdir(parents=True)
    (out / "fine.txt").write_text("ok")
    with open(os.path.join(os.fsencode(out), b"caf\xe9.txt"), "wb") as f:   # a C-locale program's file name
        f.write(b"x")
    _, got = ship(tmp_path / "work", tmp_path / "store")
    by = {f.path: f for f in got}
    assert by["fine.txt"].state == STORED
    assert by["caf\ufffd.txt"].state == REFUSED and "not valid UTF-8" in by["caf\ufffd.txt"].reason


def test_a_flood_of_entries_is_bounded_on_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_ARTIFACTS", 5)
    out = tmp_path / "work" / artifacts.OUTPUT_DIR
    out.mkdir(parents=True)
    for i in range(40):
        os.symlink("/etc/hostname", out / f"l{i:02}")
    pieces = list(artifacts.output_pieces(1, tmp_path / "work", 1 << 20))
    assert len(pieces) == 6 and "more than 5 entries" in pieces[-1].refused
    sink = Sink(tmp_path / "store", cap=1 << 20, max_files=3)   # a hostile sender ignores any limit
    for i in range(1000):
        sink.feed(proto.FileChunk(rid=1, path=f"r{i}", eof=True, refused="no"))
    got = sink.finish()
    assert len(got) == 4 and got[-1].path == "... 997 more"


def test_a_new_attempt_starts_the_artifacts_afresh(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "store", cap=1 << 20)
    sink.feed(proto.FileChunk(rid=1, path="done", eof=True, sha256=hashlib.sha256(b"").digest()))
    sink.feed(proto.FileChunk(rid=1, path="half", offset=0, data=b"abc"))   # then the node died
    sink.restart()
    assert not (tmp_path / "store" / "done").exists()
    data = b"whole"
    sink.feed(proto.FileChunk(rid=2, path="half", offset=0, data=data))
    sink.feed(proto.FileChunk(rid=2, path="half", offset=len(data), eof=True, sha256=hashlib.sha256(data).digest()))
    assert [(f.path, f.state) for f in sink.finish()] == [("half", STORED)]
    assert (tmp_path / "store" / "half").read_bytes() == data


def test_a_file_that_cannot_be_stored_is_refused_and_the_rest_kept(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "store", cap=1 << 20)
    empty = hashlib.sha256(b"").digest()
    sink.feed(proto.FileChunk(rid=1, path="a", eof=True, sha256=empty))
    sink.feed(proto.FileChunk(rid=1, path="a/b", eof=True, sha256=empty))   # "a" is a file: no directory there
    sink.feed(proto.FileChunk(rid=1, path="c", eof=True, sha256=empty))
    by = {f.path: f for f in sink.finish()}
    assert (by["a"].state, by["c"].state) == (STORED, STORED)
    assert by["a/b"].state == REFUSED and "cannot store it" in by["a/b"].reason


def test_no_output_is_only_an_empty_real_output_directory(tmp_path: Path) -> None:
    assert artifacts.no_output(tmp_path) is False            # no output directory: output_pieces decides
    out = tmp_path / artifacts.OUTPUT_DIR
    out.mkdir()
    assert artifacts.no_output(tmp_path) is True
    (out / "f").write_text("x")
    assert artifacts.no_output(tmp_path) is False
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "f").unlink()
    out.rmdir()
    out.symlink_to(elsewhere)                                # empty, but a symlink: output_pieces refuses it
    assert artifacts.no_output(tmp_path) is False
