"""Files that travel with exec jobs: inputs (``vesta exec --put``) and artifacts (``$VESTA_OUTPUT``).

Both travel the same way, as ``proto.FileChunk`` messages on the job's link stream: each file in
pieces of at most ``proto.MAX_FILE_PIECE`` bytes, in order, the last piece carrying the SHA-256 of
the whole file. Inputs go submitter -> host after the host accepted the offer, and the program starts
only when every input arrived whole; artifacts go host -> submitter after the program ended, before
the Result. A run on the submitting node itself uses the same pieces without a link.

A ``Sink`` receives: it writes each file into a staging directory and moves it into place only when
its size and SHA-256 match, so a half-sent or corrupt file is never seen under its name. It enforces
the receiver's own cap on total bytes and number of files; what it did not keep is listed with the
reason (over the cap, checksum mismatch, incomplete, refused by the sender).

Security. The host reads ``$VESTA_OUTPUT`` with directory-fd-relative opens and ``O_NOFOLLOW``, so
a job cannot ship the host's own files by leaving a symlink (or swapping a directory for one while
it is read); symlinks, hard links and special files are listed as refused, never read. A receiver accepts
only relative paths without ``..`` (``proto.check_rel_path``) and writes under its own directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vesta import proto
from vesta.errors import ProtocolError
from vesta.spec import STORED, FileInfo

log = logging.getLogger(__name__)

OUTPUT_DIR = "output"          # $VESTA_OUTPUT, inside the job's working directory
MAX_ARTIFACTS = 1000           # entries (files and directories) one job may send back
MAX_WALK_DEPTH = proto.MAX_PATH_DEPTH

REFUSED, CORRUPT, INCOMPLETE = "refused", "corrupt", "incomplete"   # and spec.STORED


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
            size += len(piece)
    return size, h.hexdigest()


# ----------------------------------------------------------------------------------------------- sending


def file_pieces(rid: int, rel: str, fd: int, *, executable: bool = False,
                budget: int | None = None) -> Iterator[proto.FileChunk]:
    """The pieces of one open file (closed afterwards), then an empty last piece with its SHA-256.
    Past ``budget`` bytes the file is refused instead (the receiver drops what it got of it)."""
    h = hashlib.sha256()
    offset = 0
    try:
        while data := os.read(fd, proto.MAX_FILE_PIECE):
            if budget is not None and offset + len(data) > budget:
                yield proto.FileChunk(rid=rid, path=rel, offset=offset, eof=True,
                                      refused=f"grew past the {_size(budget)} left of the artifact cap")
                return
            h.update(data)
            yield proto.FileChunk(rid=rid, path=rel, offset=offset, data=data, executable=executable)
            offset += len(data)
        yield proto.FileChunk(rid=rid, path=rel, offset=offset, eof=True, sha256=h.digest(), executable=executable)
    finally:
        os.close(fd)


def input_pieces(rid: int, source: Path, inputs: tuple[FileInfo, ...]) -> Iterator[proto.FileChunk]:
    """The pieces of a job's inputs, read from the submitter's copy of them (``source/PATH``)."""
    for info in inputs:
        fd = os.open(source / info.path, os.O_RDONLY | os.O_NOFOLLOW)
        yield from file_pieces(rid, info.path, fd, executable=info.executable)


def no_output(workdir: Path) -> bool:
    """Whether the job left nothing to send back: its output directory there, a real directory, and empty
    (one short read, so the common case costs no worker thread; anything else goes to ``output_pieces``)."""
    try:
        fd = os.open(workdir / OUTPUT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        with os.scandir(fd) as entries:
            return next(entries, None) is None
    except OSError:
        return False
    finally:
        os.close(fd)


def output_pieces(rid: int, workdir: Path, cap: int) -> Generator[proto.FileChunk, None, None]:
    """The pieces of every file a job left in ``workdir/output``, at most ``cap`` bytes in all, in
    name order; symlinks and special files are refused, never followed. Nothing when the job made no
    output directory."""
    try:
        root = os.open(workdir / OUTPUT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        if os.path.islink(workdir / OUTPUT_DIR):
            yield proto.FileChunk(rid=rid, path=OUTPUT_DIR, eof=True,
                                  refused="$VESTA_OUTPUT is a symlink (not followed)")
        return
    left = [cap, MAX_ARTIFACTS]   # bytes, then entries (files sent or refused, and directories) still allowed
    yield from _walk(rid, root, "", 0, left)


def _walk(rid: int, dir_fd: int, prefix: str, depth: int, left: list[int]) -> Iterator[proto.FileChunk]:
    try:
        names = sorted(os.listdir(dir_fd))
        for name in names:
            if left[1] <= 0:
                if left[1] == 0:   # said once, then nothing more
                    left[1] = -1
                    yield proto.FileChunk(rid=rid, path=_printable(f"{prefix}{name}"), eof=True,
                                          refused=f"more than {MAX_ARTIFACTS} entries: this one and the rest not sent")
                return
            rel = f"{prefix}{name}"
            try:
                proto.check_rel_path("artifact", rel)
            except ProtocolError as exc:
                left[1] -= 1
                shown = _printable(rel)
                with contextlib.suppress(ProtocolError):
                    proto.check_rel_path("artifact", shown)
                    yield proto.FileChunk(rid=rid, path=shown, eof=True, refused=f"unusable name ({exc})"[:200])
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue   # gone meanwhile
            left[1] -= 1   # directories too: a million empty ones must not keep the walk going
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_WALK_DEPTH:
                    yield proto.FileChunk(rid=rid, path=rel, eof=True, refused="directory nested too deep")
                    continue
                try:
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError as exc:
                    yield proto.FileChunk(rid=rid, path=rel, eof=True, refused=f"cannot open: {exc.strerror}")
                    continue
                yield from _walk(rid, sub, rel + "/", depth + 1, left)
                continue
            if stat.S_ISLNK(st.st_mode):
                yield proto.FileChunk(rid=rid, path=rel, eof=True, refused="a symlink (not followed)")
                continue
            if not stat.S_ISREG(st.st_mode):
                yield proto.FileChunk(rid=rid, path=rel, eof=True, refused="not a regular file")
                continue
            if st.st_nlink > 1:   # may be the host's own file, linked in: never read it for the job
                yield proto.FileChunk(rid=rid, path=rel, eof=True, refused="a hard link (not sent)")
                continue
            if st.st_size > left[0]:
                yield proto.FileChunk(rid=rid, path=rel, eof=True,
                                      refused=f"{_size(st.st_size)}, over the {_size(left[0])} left of the "
                                              "submitter's artifact cap (artifact_max_mb)")
                continue
            try:   # O_NOFOLLOW: a file swapped for a symlink since the stat is not followed either
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            except OSError as exc:
                yield proto.FileChunk(rid=rid, path=rel, eof=True, refused=f"cannot open: {exc.strerror}")
                continue
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or opened.st_nlink > 1 or opened.st_ino != st.st_ino:
                os.close(fd)   # swapped since the lstat: what is open now is not what was looked at
                yield proto.FileChunk(rid=rid, path=rel, eof=True, refused="changed while being read (not sent)")
                continue
            sent = 0
            for piece in file_pieces(rid, rel, fd, executable=bool(st.st_mode & 0o100), budget=left[0]):
                sent = piece.offset + len(piece.data)
                yield piece
            left[0] -= sent
    finally:
        os.close(dir_fd)


def _printable(path: str) -> str:
    """A file name as UTF-8, undecodable bytes shown as U+FFFD (for saying what was not sent)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[: proto.MAX_PATH]


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


# --------------------------------------------------------------------------------------------- receiving


@dataclass
class _Open:
    path: str
    fd: int
    tmp: Path
    received: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    executable: bool = False


class Sink:
    """Receives the pieces of files into ``dest``, keeping each only when it arrived whole and intact.

    ``cap`` bounds the bytes kept in all and ``max_files`` the number of files; ``expect`` (inputs)
    names the only paths accepted, with their size and SHA-256. ``files`` lists every file heard of,
    as kept or not (with the reason); ``stored`` is the bytes kept."""

    def __init__(self, dest: Path, *, cap: int, max_files: int = MAX_ARTIFACTS,
                 expect: tuple[FileInfo, ...] | None = None) -> None:
        self.dest = dest
        self.cap = cap
        self.max_files = max_files
        self.expect = None if expect is None else {f.path: f for f in expect}
        self.files: dict[str, FileInfo] = {}
        self.stored = 0
        self.overflow = 0       # files not even listed: past max_files entries
        self._open: _Open | None = None
        self._staging: Path | None = None
        self._skip: str | None = None    # a file refused mid-way: ignore its remaining pieces

    def _stage(self) -> Path:
        if self._staging is None:
            self.dest.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=".vesta-incoming-", dir=self.dest.parent))
        return self._staging

    @property
    def complete(self) -> bool:
        """Every expected file has arrived whole (inputs)."""
        return self.expect is not None and all(
            p in self.files and self.files[p].state == STORED for p in self.expect)

    @property
    def problems(self) -> list[FileInfo]:
        return [f for f in self.files.values() if f.state != STORED]

    def _end(self, path: str, state: str, reason: str, size: int = 0, sha: str = "", executable: bool = False) -> None:
        if path not in self.files and len(self.files) >= self.max_files:
            self.overflow += 1   # a flood of refusals must not grow without bound either
            return
        self.files[path] = FileInfo(path, size, sha, executable, state, reason[: proto.MAX_REASON])
        if state != STORED:
            log.info("file %s not kept: %s", path, reason)

    def _drop_open(self, state: str, reason: str) -> None:
        o = self._open
        if o is None:
            return
        self._open = None
        os.close(o.fd)
        o.tmp.unlink(missing_ok=True)
        self._end(o.path, state, reason, o.received)

    def feed(self, piece: proto.FileChunk) -> None:
        """Take one piece; a bad one ends its file (recorded), never raises."""
        try:
            self._feed(piece)
        except OSError as exc:   # disk full, a directory in the way: this file is not kept, the rest may be
            self._drop_open(REFUSED, f"cannot store it: {exc.strerror or exc}")
            if piece.path not in self.files:
                self._end(piece.path, REFUSED, f"cannot store it: {exc.strerror or exc}")
            self._skip = None if piece.eof else piece.path

    def adopt(self, info: FileInfo) -> None:
        """An expected input that is in ``dest`` already (a node's kept copy of a sweep's shared file)."""
        if self.expect is not None and info.path in self.expect and info.path not in self.files:
            self.stored += info.size
            self._end(info.path, STORED, "", info.size, info.sha256, info.executable)

    def fail(self, path: str, reason: str) -> None:
        """An expected input that will not come."""
        if path not in self.files:
            self._end(path, INCOMPLETE, reason)

    def restart(self) -> None:
        """A new attempt at the job (the last one was lost): forget what the last one sent."""
        self._drop_open(INCOMPLETE, "incomplete: the attempt was lost")
        for info in self.files.values():
            if info.state == STORED:
                with contextlib.suppress(OSError):
                    (self.dest / info.path).unlink()
        self.files.clear()
        self.stored = self.overflow = 0
        self._skip = None

    def _feed(self, piece: proto.FileChunk) -> None:
        if self._skip == piece.path:
            if piece.eof:
                self._skip = None
            return
        self._skip = None
        o = self._open
        if o is not None and o.path != piece.path:
            self._drop_open(INCOMPLETE, "incomplete: the sender moved on to another file")
            o = None
        if piece.refused:
            self._drop_open(REFUSED, piece.refused)
            self._end(piece.path, REFUSED, f"not sent: {piece.refused}")
            return
        if o is None:
            why = self._admit(piece)
            if why:
                self._end(piece.path, REFUSED, why)
                self._skip = None if piece.eof else piece.path
                return
            tmp = self._stage() / f"{len(self.files)}-{os.getpid()}-{id(piece)}"
            o = self._open = _Open(piece.path, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp)
        if piece.offset != o.received:
            self._drop_open(CORRUPT, f"pieces out of order (offset {piece.offset}, expected {o.received})")
            self._skip = None if piece.eof else piece.path
            return
        if self.stored + o.received + len(piece.data) > self.cap:
            self._drop_open(REFUSED, f"over the cap of {_size(self.cap)} for this job's files")
            self._skip = None if piece.eof else piece.path
            return
        os.write(o.fd, piece.data)
        o.hasher.update(piece.data)
        o.received += len(piece.data)
        o.executable = piece.executable
        if piece.eof:
            self._close(o, piece.sha256)

    def _admit(self, piece: proto.FileChunk) -> str:
        """Why a new file is not taken, or ""."""
        try:
            proto.check_rel_path("path", piece.path)   # decode() checked it already; this Sink trusts no caller
        except ProtocolError as exc:
            return str(exc)
        if self.expect is not None and piece.path not in self.expect:
            return "not one of the announced inputs"
        if piece.path in self.files and self.files[piece.path].state == STORED:
            return "sent twice"
        if sum(1 for f in self.files.values() if f.state == STORED) >= self.max_files:
            return f"more than {self.max_files} files"
        return ""

    def _close(self, o: _Open, sha: bytes) -> None:
        self._open = None
        os.close(o.fd)
        got = o.hasher.hexdigest()
        want = self.expect.get(o.path) if self.expect is not None else None
        if got != sha.hex() or (want is not None and (want.sha256 != got or want.size != o.received)):
            o.tmp.unlink(missing_ok=True)
            self._end(o.path, CORRUPT, "checksum mismatch: the file arrived damaged", o.received, got)
            return
        final = self.dest / o.path
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.parent.resolve() != (self.dest.resolve() / o.path).parent:
                raise NotADirectoryError("a parent is not a plain directory")
            os.chmod(o.tmp, 0o700 if o.executable else 0o600)
            os.replace(o.tmp, final)
        except OSError as exc:
            o.tmp.unlink(missing_ok=True)
            self._end(o.path, REFUSED, f"cannot store it: {exc.strerror or exc}", o.received, got)
            return
        self.stored += o.received
        self._end(o.path, STORED, "", o.received, got, o.executable)

    def finish(self) -> list[FileInfo]:
        """No more pieces: a file still half-received is incomplete. Returns every file heard of (past
        ``max_files``, one last entry counts the rest)."""
        self._drop_open(INCOMPLETE, "incomplete: the transfer stopped (link dropped or job stopped)")
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        out = list(self.files.values())
        if self.overflow:
            out.append(FileInfo(f"... {self.overflow} more", 0, "", False, REFUSED,
                                f"{self.overflow} more files not kept or listed (more than {self.max_files})"))
        return out


def remove_unrecorded(root: Path, recorded: Callable[[str], bool]) -> int:
    """At start-up: remove what a submitter killed mid-transfer left under ``root`` (``artifacts/``): a
    staging directory, or a job's directory whose files were never put on record (``recorded(job_id)`` is
    False), so nothing is on disk that ``vesta artifacts`` does not list. Returns how many were removed."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if entry.name.startswith(".vesta-incoming-") or (
                entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".") and not recorded(entry.name)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed
