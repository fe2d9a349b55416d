"""Job records: one SQLite database per node (stdlib ``sqlite3``, WAL) in its state directory.

It holds the jobs this node submitted (with every part: each chunk's attempts,
the node that ran it, times, CPU and memory used), the stdout/stderr of its
exec jobs, and the runs it hosted for peers, so an owner can see exactly what
ran on their machine.

**Durability.** A write is durable when its method returns, unless the caller passes ``defer=True``: then it
waits for the next write without ``defer``, which makes both durable at once. The rule callers keep: a
deferred write is followed by a durable one *before the event loop runs anything else* (no ``await`` between
them), and before the work it describes is offered or answered. So a job's row and its first part are durable
before its first chunk is offered; a hosted run that is answered at once (a tiny cpu chunk, run inline) is
made durable, start and end together, right after its Accept and Result are sent (so the write is not on the
submitter's wait: a crash in that instant loses the host's record of a chunk with no effects, which the
submitter's record still shows); a part's end is durable with the job's end.

"Durable" means in the write log (``NAME-writes`` beside the database), not yet committed: every write runs on
the connection at once, inside one open transaction (so every read sees it), and the statement and its
parameters are appended to the write log with one ``write()`` (a few microseconds, where a SQLite commit is
~0.1 ms on the event loop, twice per job, which a 1 ms job notices). ``commit()`` commits the transaction with
the number of the last logged write (table ``written``) and empties the log; the daemon calls it about once a
second, and ``close()`` does. Opening the database replays the logged writes the last commit did not include,
in order, on the state they were first run on: a write that returned survives SIGKILL of the daemon at any
moment. Each log entry carries its length and CRC-32, so a torn tail (a power cut in the middle of an append)
is dropped with a warning, never replayed half. Neither the log nor the WAL (``synchronous=NORMAL``) is
fsynced: a power cut can lose the last second or so of writes, and the database stays consistent. FULL would
fsync several times per job, which on a Pi's SD card costs milliseconds on the event loop. The connection
belongs to one thread (the daemon's event loop). With ``background_checkpoint`` SQLite's own checkpoints
(every ~1000 WAL pages, two fsyncs, several ms on a slow disk) leave the commit path: the owner calls
``checkpoint()`` from a worker thread instead (the daemon does, after its commits); that changes when pages
reach the main file, not what survives a crash.

**Schema.** ``PRAGMA user_version`` is the schema version; ``MIGRATIONS[i]``
takes a database from version ``i`` to ``i + 1`` in one transaction. A
database from a newer vesta is refused (upgrade vesta); a corrupt file is
moved aside (``NAME.corrupt-TIME``) with a warning and a fresh one starts,
never a crash loop.

**Restart.** Jobs, parts and hosted runs still running when the daemon died are
marked ``failed`` with reason ``daemon restarted`` when the records open (a job
that may have had effects is never re-run behind its owner's back). Jobs still
``queued`` stay queued: they never started, and ``vesta exec --queue`` promised
to place them when capacity appears.

**A full disk.** When the database cannot be opened for writing because its filesystem is full (or failing),
it is opened read-only (``read_only``): history is served, every write raises ``StateFull`` naming the
directory and the fix, and nothing on disk is touched, so the write log keeps every acknowledged write
for the start that has room (writes logged but not committed before the disk filled are not shown until then).
``reopen()`` tries to open it for writing again, once ``MIN_FREE_BYTES`` are free (the daemon tries every
few seconds).

**Artifacts.** One row per file a job sent back (``$VESTA_OUTPUT``): its path,
size and SHA-256, and whether it was ``stored`` (under ``artifacts/JOB/`` in the
state directory) or ``refused``/``corrupt``/``incomplete`` with the reason, or ``pruned`` once retention
removed it (``retention``).

**Logs.** One row per appended chunk, numbered per job (``seq``, from 1);
``log(after=seq)`` returns what came later, for ``--follow``. At most
``log_cap_bytes`` of output are kept per job; past that a single marker
``[vesta: output truncated after N bytes]`` is stored and the rest dropped
(counted in ``log_dropped``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import struct
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from vesta import outcome
from vesta.errors import RecordsError, RecordsVersionError, StateFull, TransitionError, UnknownRecord
from vesta.schema import (  # the tables and the states they hold
    ALLOWED,
    ARTIFACT_STATES,
    BUSY_TIMEOUT_S,
    HOSTED_ENDS,
    KINDS,
    MIGRATIONS,
    PART_ENDS,
    RESTARTED,
    STATES,
    STREAMS,
    TERMINAL,
)

__all__ = ["Records", "RecordsError", "RecordsVersionError", "TransitionError", "UnknownRecord"]

log = logging.getLogger(__name__)


_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_NO_ROOM_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}   # a full disk's faces
MIN_FREE_BYTES = 1 << 20   # a read-only database is opened for writing again once this much is free
WRITES_SUFFIX = "-writes"   # the write log, beside the database
_FRAME = struct.Struct("<II")   # an entry's length and CRC-32, then msgpack [seq, sql, params]
_JOB_COLS = ("id, kind, args, submitter, submitter_fp, created, started, finished, state, exit_code, reason, "
             "result, log_bytes, log_dropped")


def free_bytes(path: Path) -> int:
    """Bytes free to this user on ``path``'s filesystem (0 when it cannot be asked)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecordsError(message)


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordsError(f"{what} is not JSON-serialisable: {exc}") from None


def _row(row: sqlite3.Row, json_cols: tuple[str, ...] = ("args", "result")) -> dict[str, Any]:
    out = dict(row)
    for col in json_cols:
        if col in out:
            out[col] = None if out[col] is None else json.loads(out[col])
    return out


@dataclass(frozen=True, slots=True)
class PartEnd:
    """How an attempt at a chunk ended (``Records.add_part`` of one that is over already)."""

    state: str
    finished: float
    cpu_s: float = 0.0
    mem_mib_s: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    result: dict[str, Any] | None = None


class Records:
    """One SQLite database per node: jobs it submitted (with parts), runs it hosted for peers, logs."""

    def __init__(self, path: Path, *, log_cap_bytes: int = 1 << 20, clock: Callable[[], float] = time.time,
                 background_checkpoint: bool = False) -> None:
        _check(log_cap_bytes >= 0, f"log_cap_bytes must be >= 0 (got {log_cap_bytes})")
        self.path = Path(path)
        self.writes_path = self.path.with_name(self.path.name + WRITES_SUFFIX)
        self.log_cap_bytes = log_cap_bytes
        self.clock = clock
        self.recovered = 0   # jobs + hosted runs marked failed because the daemon had restarted
        self.replayed = 0    # logged writes the last commit had not included, run again when the records opened
        self.commits = 0     # commits so far: a checkpoint is due when this moved
        self.background_checkpoint = background_checkpoint
        self._seq = 0                      # number of the last write run (logged or still pending)
        self._pending: list[bytes] = []    # entries of deferred writes, logged with the next durable write
        self._uncommitted = False          # writes since the last commit
        self.read_only = ""                # why the database is open read-only ("" when it is writable)
        self._log = -1
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in _NO_ROOM_CODES and self.path.exists():
                self.db = self._open_read_only(exc)
                return
            if code not in _CORRUPT_CODES:
                raise RecordsError(f"records database {self.path} cannot be opened: {exc}") from exc
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
            for suffix in ("", "-wal", "-shm", "-journal", WRITES_SUFFIX):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    src.replace(aside.with_name(aside.name + suffix))
            log.warning("records database %s is corrupt (%s); moved it to %s and started a fresh one",
                        self.path, exc, aside)
            self.db = self._open()
        try:
            self._log = os.open(self.writes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.db.close()
            raise RecordsError(f"cannot open the records write log {self.writes_path}: "
                               f"{exc.strerror or exc}") from None

    def _open_read_only(self, why: sqlite3.Error) -> sqlite3.Connection:
        """The database for reading only, its files untouched (see "A full disk" above)."""
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        for mode in ("mode=ro", "immutable=1"):   # immutable: when not even the WAL index can be made
            try:
                db = sqlite3.connect(f"{uri}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S)
            except sqlite3.Error:
                continue
            try:
                db.row_factory = sqlite3.Row
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                db.execute("SELECT count(*) FROM jobs").fetchone()
            except sqlite3.Error:
                db.close()
                continue
            if version != len(MIGRATIONS):
                db.close()
                break
            self.read_only = f"{why}; {free_bytes(self.path.parent) >> 10} KiB free"
            log.error("records database %s cannot be written (%s): serving history read-only; %s", self.path,
                      self.read_only, self.room_hint())
            return db
        raise RecordsError(f"records database {self.path} cannot be opened: {why}; {self.room_hint()}") from why

    def room_hint(self) -> str:
        return (f"free some space in {self.path.parent} (its filesystem has {free_bytes(self.path.parent) >> 10} "
                f"KiB free); vestad takes jobs again once {MIN_FREE_BYTES >> 10} KiB are free")

    def reopen(self) -> bool:
        """A read-only database (a full disk) opened for writing again, when there is room now."""
        if not self.read_only or free_bytes(self.path.parent) < MIN_FREE_BYTES:
            return False
        try:
            db = self._open()
            fd = os.open(self.writes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (sqlite3.Error, OSError, RecordsError) as exc:
            log.warning("records database %s still cannot be written: %s", self.path, exc)
            return False
        self.db.close()
        self.db, self._log, self.read_only = db, fd, ""
        log.warning("records database %s is writable again", self.path)
        return True

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))   # SQLite gives -wal/-shm the same mode
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            db.row_factory = sqlite3.Row
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("records database %s: WAL unavailable, using journal_mode=%s", self.path, mode)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            if self.background_checkpoint:
                db.execute("PRAGMA wal_autocheckpoint=0")
            self._migrate(db)
            self._replay(db)
            self.recovered = self._recover(db)
        except BaseException:
            db.close()
            raise
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.writes_path, 0)   # all of it is committed now
        return db

    def _replay(self, db: sqlite3.Connection) -> None:
        """Run again, in one transaction, the logged writes the last commit did not include."""
        with db:
            self._seq, self.replayed = self._run_logged(db)
            db.execute("UPDATE written SET seq=?", (self._seq,))
        if self.replayed:
            log.warning("records: %d write(s) not yet committed when the daemon stopped were replayed from %s",
                        self.replayed, self.writes_path)

    def _run_logged(self, db: sqlite3.Connection) -> tuple[int, int]:
        """Run, in order and in the open transaction, the logged writes after the last commit's number;
        (the number of the last one, or the commit's when none, and how many ran)."""
        last = int(db.execute("SELECT seq FROM written").fetchone()[0])
        ran = 0
        for seq, sql, params in self._logged():
            if seq <= last:
                continue   # committed before the log was emptied
            try:
                db.execute(sql, params)
            except sqlite3.IntegrityError as exc:   # cannot happen on the state it first ran on; never fatal
                log.warning("records: logged write %d not replayed: %s", seq, exc)
            last, ran = seq, ran + 1
        return last, ran

    def _logged(self) -> Iterator[tuple[int, str, list[Any]]]:
        """The write log's entries, in order, up to the first torn or damaged one."""
        try:
            data = self.writes_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RecordsError(f"cannot read the records write log {self.writes_path}: "
                               f"{exc.strerror or exc}") from None
        at = 0
        while at < len(data):
            entry: Any = None
            if at + _FRAME.size <= len(data):
                size, crc = _FRAME.unpack_from(data, at)
                body = data[at + _FRAME.size: at + _FRAME.size + size]
                if len(body) == size and zlib.crc32(body) == crc:
                    with contextlib.suppress(ValueError, TypeError, msgpack.UnpackException):
                        entry = msgpack.unpackb(body, raw=False)
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                    and isinstance(entry[1], str) and isinstance(entry[2], list)):
                log.warning("records write log %s: entry at byte %d is torn or damaged; it and the %d byte(s) "
                            "after it are dropped (a crash during the write)", self.writes_path, at, len(data) - at)
                return
            yield entry[0], entry[1], entry[2]
            at += _FRAME.size + size

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise RecordsVersionError(f"records database {self.path} has schema version {version}, this vesta "
                                      f"knows up to {len(MIGRATIONS)}: upgrade vesta")
        for target in range(version + 1, len(MIGRATIONS) + 1):
            try:   # one transaction per step: user_version moves with the tables, or neither does
                db.executescript(f"BEGIN;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version={target};\nCOMMIT;")
            except BaseException:
                db.rollback()
                raise
        if version == 0:
            log.info("records database %s created (schema version %d)", self.path, len(MIGRATIONS))
        elif version < len(MIGRATIONS):
            log.info("records database %s migrated from schema version %d to %d", self.path, version, len(MIGRATIONS))

    def _recover(self, db: sqlite3.Connection) -> int:
        """Close what a previous daemon left open: nothing can still be running after a restart."""
        now = self.clock()
        with db:
            jobs = db.execute("UPDATE jobs SET state='failed', reason=?, finished=? "
                              "WHERE state='running'", (RESTARTED, now)).rowcount
            db.execute("UPDATE parts SET state='failed', reason=?, finished=? WHERE state='running'", (RESTARTED, now))
            hosted = db.execute("UPDATE hosted SET state='failed', reason=?, finished=? WHERE state='running'",
                                (RESTARTED, now)).rowcount
        if jobs or hosted:
            log.warning("records: %d unfinished job(s) and %d hosted run(s) marked failed: %s", jobs, hosted, RESTARTED)
        return int(jobs + hosted)

    def close(self) -> None:
        """Commit and close (what a crash would not do: ``abandon``)."""
        try:
            self.commit()
        except sqlite3.Error as exc:
            log.warning("records %s: could not commit at close (%s); the write log keeps the writes and the next "
                        "start replays them", self.path, exc)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without committing, as a crash would: the logged writes wait in the write log."""
        self.db.close()
        if self._log >= 0:
            with contextlib.suppress(OSError):
                os.close(self._log)

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the database file. PASSIVE: it neither waits for nor blocks the
        event loop's writes, and it uses its own connection, so it may run in a worker thread."""
        if self.read_only:
            return
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def commit(self) -> None:
        """Commit every write so far (deferred ones too) and empty the write log."""
        if not self._uncommitted:
            return
        try:
            self.db.execute("UPDATE written SET seq=?", (self._seq,))
            self.db.commit()
        except sqlite3.Error:
            if not self.db.in_transaction:
                self._resync()   # SQLite gave the transaction up: the write log still has every write
            raise
        self._pending.clear()
        self._uncommitted = False
        self.commits += 1
        try:
            os.ftruncate(self._log, 0)
        except OSError as exc:   # harmless: what is left is skipped on replay (its numbers are committed)
            log.warning("cannot empty the records write log %s: %s", self.writes_path, exc.strerror or exc)

    def flush(self) -> None:
        """Make deferred writes durable, if any (cheap when there are none)."""
        if self._pending:
            self._append(self._pending)

    def _append(self, entries: list[bytes]) -> None:
        data = b"".join(entries)
        try:
            written = os.write(self._log, data)
            if written != len(data):
                raise OSError(0, f"short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            self._resync()
            raise RecordsError(f"cannot append to the records write log {self.writes_path}: "
                               f"{exc.strerror or exc}; the last write is lost (free some disk space?)") from None
        entries.clear()

    def _resync(self) -> None:
        """Bring the open transaction back to what the write log holds: after a failed append, or an error
        that made SQLite roll the transaction back (disk full, I/O error)."""
        with contextlib.suppress(sqlite3.Error):
            self.db.rollback()
        self._pending.clear()
        self._uncommitted = self._run_logged(self.db)[1] > 0

    def _exec(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        """Run one write in the open transaction and queue its write-log entry (``_tx`` appends it)."""
        cur = self.db.execute(sql, params)
        self._seq += 1
        body = msgpack.packb([self._seq, sql, params], use_bin_type=True)
        self._pending.append(_FRAME.pack(len(body), zlib.crc32(body)) + body)
        self._uncommitted = True
        return cur

    @contextlib.contextmanager
    def _tx(self, defer: bool = False, *, atomic: bool = False) -> Iterator[None]:
        """One write, durable (in the write log) on success with any deferred before it; with ``defer`` its
        entries wait for the next durable write (see the module doc). A write of several statements passes
        ``atomic``: on error its own statements are undone, never the writes before it."""
        if self.read_only:
            raise StateFull(f"cannot record anything: the records database {self.path} is read-only "
                            f"({self.read_only}); {self.room_hint()}")
        mark = len(self._pending)
        if atomic:
            if not self.db.in_transaction:
                self.db.execute("BEGIN")
            self.db.execute("SAVEPOINT write")
        try:
            yield
            if atomic:
                self.db.execute("RELEASE write")
        except BaseException as exc:
            if atomic and self.db.in_transaction:   # its statements are undone, so are their entries
                self.db.execute("ROLLBACK TO write")
                self.db.execute("RELEASE write")
                del self._pending[mark:]
            if isinstance(exc, sqlite3.Error) and not self.db.in_transaction:
                self._resync()   # SQLite gave up the whole transaction: run the logged writes again
            if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                # callers handle VestaError; an IntegrityError is the caller's own to translate
                raise RecordsError(f"cannot write the records database {self.path}: {exc}") from exc
            raise
        if not defer:
            self._append(self._pending)

    # -- submitted jobs -------------------------------------------------------------------------------------------

    def _job_state(self, job_id: str) -> sqlite3.Row:
        row = self.db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownRecord(f"no job {job_id!r} in the records")
        return row   # type: ignore[no-any-return]

    def create_job(self, job_id: str, kind: str, args: dict[str, Any], submitter: str, submitter_fp: str,
                   state: str = "running", *, defer: bool = False, sweep: str | None = None,
                   seq: int | None = None) -> None:
        """Record a new job; ``created`` is now, and so is ``started`` when it starts running at once.
        ``sweep``, ``seq``: the sweep it belongs to and its number there."""
        _check(isinstance(job_id, str) and job_id != "", f"job id must be a non-empty string (got {job_id!r})")
        _check(kind in KINDS, f"job kind must be one of {', '.join(KINDS)} (got {kind!r})")
        _check(state in ("queued", "running"), f"a new job is queued or running (got {state!r})")
        _check(isinstance(args, dict), f"job args must be a dict (got {type(args).__name__})")
        now = self.clock()
        try:
            with self._tx(defer):
                self._exec("INSERT INTO jobs (id, kind, args, submitter, submitter_fp, created, started, state, "
                           "sweep, sweep_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (job_id, kind, _dumps(args, "job args"), submitter, submitter_fp, now,
                            now if state == "running" else None, state, sweep, seq))
        except sqlite3.IntegrityError:
            raise RecordsError(f"job {job_id!r} is already in the records") from None

    def link_rerun(self, job_id: str, rerun_of: str) -> None:
        """Record that ``job_id`` runs ``rerun_of`` again (vesta rerun)."""
        _check(job_id != rerun_of, f"job {job_id!r} cannot be a rerun of itself")
        try:
            with self._tx():
                self._exec("INSERT INTO reruns (job_id, rerun_of) VALUES (?, ?)", (job_id, rerun_of))
        except sqlite3.IntegrityError:
            raise RecordsError(f"job {job_id!r} is already linked as a rerun") from None

    def transition(self, job_id: str, to: str, *, reason: str = "", exit_code: int | None = None,
                   result: dict[str, Any] | None = None, placement: list[dict[str, Any]] | None = None) -> None:
        """Move a job to state ``to``, checked against ALLOWED; reason/exit_code/result/placement (its placement
        decision: for each node, chosen or not and why) are kept when not given."""
        _check(to in STATES, f"unknown job state {to!r} (one of {', '.join(STATES)})")
        froms = [frm for frm, tos in ALLOWED.items() if to in tos]
        now = self.clock()
        with self._tx():   # one statement: the check against ALLOWED is its WHERE clause
            cur = self._exec(
                "UPDATE jobs SET state=?, started=CASE WHEN ? THEN ? ELSE started END, finished=?, "
                "reason=CASE WHEN ?='' THEN (CASE WHEN state='queued' THEN '' ELSE reason END) ELSE ? END, "
                " exit_code=COALESCE(?, exit_code), result=COALESCE(?, result), placement=COALESCE(?, placement) "
                f"WHERE id=? AND state IN ({', '.join('?' * len(froms))})",
                (to, to == "running", now, now if to in TERMINAL else None, reason, reason, exit_code,
                 None if result is None else _dumps(result, "job result"),
                 None if placement is None else _dumps(placement, "placement"), job_id, *froms))
        if cur.rowcount != 1:
            raise TransitionError(f"job {job_id!r} cannot go from {self._job_state(job_id)['state']} to {to}")

    def add_part(self, job_id: str, *, chunk: int, attempt: int, node: str, node_fp: str, started: float,
                 end: PartEnd | None = None, defer: bool = False) -> int:
        """Record one attempt at one chunk, now running on ``node``, or (``end``) one that ran on the spot and is
        over already: one write instead of two. Returns the part id."""
        _check(chunk >= 0 and attempt >= 0, f"chunk and attempt must be >= 0 (got {chunk}, {attempt})")
        if end is not None:
            _check(end.state in PART_ENDS, f"a part ends {', '.join(sorted(PART_ENDS))} (got {end.state!r})")
        with self._tx(defer):
            try:   # the foreign key checks the job; caught in here so earlier deferred writes still commit
                if end is None:
                    cur: sqlite3.Cursor | None = self._exec(
                        "INSERT INTO parts (job_id, chunk, attempt, node, node_fp, started) VALUES (?, ?, ?, ?, ?, ?)",
                        (job_id, chunk, attempt, node, node_fp, started))
                else:
                    cur = self._exec(
                        "INSERT INTO parts (job_id, chunk, attempt, node, node_fp, started, state, finished, cpu_s, "
                        "mem_mib_s, exit_code, reason, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, chunk, attempt, node, node_fp, started, end.state, end.finished, end.cpu_s,
                         end.mem_mib_s, end.exit_code, end.reason,
                         None if end.result is None else _dumps(end.result, "part result")))
            except sqlite3.IntegrityError:
                cur = None
        if cur is None:
            raise UnknownRecord(f"no job {job_id!r} in the records")
        return int(cur.lastrowid or 0)

    def finish_part(self, part_id: int, *, state: str, finished: float, cpu_s: float = 0.0, mem_mib_s: float = 0.0,
                    exit_code: int | None = None, reason: str = "", result: dict[str, Any] | None = None,
                    defer: bool = False) -> None:
        """Close a running part: succeeded, failed, cancelled, refused or lost."""
        _check(state in PART_ENDS, f"a part ends {', '.join(sorted(PART_ENDS))} (got {state!r})")
        with self._tx(defer):
            cur = self._exec(
                "UPDATE parts SET state=?, finished=?, cpu_s=?, mem_mib_s=?, exit_code=?, reason=?, result=? "
                "WHERE id=? AND state='running'",
                (state, finished, cpu_s, mem_mib_s, exit_code, reason,
                 None if result is None else _dumps(result, "part result"), part_id))
        if cur.rowcount != 1:
            row = self.db.execute("SELECT state FROM parts WHERE id=?", (part_id,)).fetchone()
            if row is None:
                raise UnknownRecord(f"no part {part_id} in the records")
            raise TransitionError(f"part {part_id} cannot go from {row['state']} to {state}")

    def append_log(self, job_id: str, stream: str, data: bytes) -> None:
        """Store a chunk of a job's output in order; past ``log_cap_bytes`` mark truncation once, drop the rest."""
        _check(stream in STREAMS, f"log stream must be stdout or stderr (got {stream!r})")
        data = bytes(data)
        if not data:
            return
        row = self._job_state(job_id)
        kept, dropped = row["log_bytes"], row["log_dropped"]
        keep = data[: max(self.log_cap_bytes - kept, 0)]
        lost = len(data) - len(keep)
        with self._tx(atomic=True):
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM logs WHERE job_id=?", (job_id,)).fetchone()[0]
            rows = [(job_id, seq + 1, stream, keep)] if keep else []
            if lost and not dropped:
                marker = f"\n[vesta: output truncated after {self.log_cap_bytes} bytes]\n".encode()
                rows.append((job_id, seq + 1 + len(rows), stream, marker))
            for entry in rows:
                self._exec("INSERT INTO logs (job_id, seq, stream, data) VALUES (?, ?, ?, ?)", entry)
            self._exec("UPDATE jobs SET log_bytes=?, log_dropped=? WHERE id=?", (kept + len(keep), dropped + lost,
                                                                                  job_id))

    def log(self, job_id: str, stream: str | None = None, after: int = 0) -> tuple[bytes, int]:
        """Output stored after sequence number ``after`` (both streams interleaved when ``stream`` is None),
        and the sequence number to pass next time."""
        _check(stream is None or stream in STREAMS, f"log stream must be stdout or stderr (got {stream!r})")
        self._job_state(job_id)
        rows = self.db.execute("SELECT seq, data FROM logs WHERE job_id=? AND seq>? AND (? IS NULL OR stream=?) "
                               "ORDER BY seq", (job_id, after, stream, stream)).fetchall()
        return b"".join(r["data"] for r in rows), (rows[-1]["seq"] if rows else after)

    def wait_reason(self, job_id: str, reason: str, placement: list[dict[str, Any]] | None = None) -> None:
        """Why a queued job is still waiting (shown by ``vesta show`` and ``vesta jobs``), and the placement
        decision that left it waiting."""
        with self._tx():
            self._exec("UPDATE jobs SET reason=?, placement=COALESCE(?, placement) WHERE id=? AND state='queued'",
                       (reason, None if placement is None else _dumps(placement, "placement"), job_id))

    def queued(self) -> list[dict[str, Any]]:
        """Queued jobs, oldest first: the order they are placed in."""
        rows = self.db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE state='queued' ORDER BY created, rowid")
        return [self._job_dict(r) for r in rows]

    def add_artifact(self, job_id: str, *, path: str, size: int, sha256: str, state: str, reason: str = "",
                     node: str = "") -> None:
        """Record one file a job sent back (a later attempt's file of the same path replaces it)."""
        _check(state in ARTIFACT_STATES, f"an artifact is {', '.join(ARTIFACT_STATES)} (got {state!r})")
        self._job_state(job_id)
        with self._tx():
            self._exec("INSERT OR REPLACE INTO artifacts (job_id, path, size, sha256, state, reason, node) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (job_id, path, size, sha256, state, reason, node))

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """A job's artifacts by path."""
        rows = self.db.execute("SELECT path, size, sha256, state, reason, node FROM artifacts WHERE job_id=? "
                               "ORDER BY path", (job_id,))
        return [dict(r) for r in rows]

    # -- retention (``retention.Pruner``: vesta gc) ---------------------------------------------------------------
    # A job is prunable once it ended and none of its parts runs: a part's end is what the ledger charges, so a
    # record with a part still running is one the ledger still needs. Queued and running jobs never are.

    def old_jobs(self, before: float, after: tuple[float, str], limit: int) -> list[dict[str, Any]]:
        """Prunable jobs that ended before ``before``, oldest first, from just past ``after`` (created, id):
        ``id``, ``created``, ``log_bytes``."""
        rows = self.db.execute(
            "SELECT id, created, log_bytes FROM jobs j WHERE created < ? AND (created, id) > (?, ?) "
            f"AND state IN ({', '.join('?' * len(TERMINAL))}) AND COALESCE(finished, created) < ? "
            "AND NOT EXISTS (SELECT 1 FROM parts p WHERE p.job_id = j.id AND p.state = 'running') "
            "ORDER BY created, id LIMIT ?", (before, *after, *sorted(TERMINAL), before, limit))
        return [dict(r) for r in rows]

    def old_hosted(self, before: float, after: tuple[float, int], limit: int) -> list[dict[str, Any]]:
        """Hosted runs that ended before ``before``, oldest first, from just past ``after`` (started, id)."""
        rows = self.db.execute(
            "SELECT id, started FROM hosted WHERE started < ? AND (started, id) > (?, ?) AND state != 'running' "
            "AND COALESCE(finished, started) < ? ORDER BY started, id LIMIT ?", (before, *after, before, limit))
        return [dict(r) for r in rows]

    def ended(self, job_ids: list[str]) -> dict[str, float]:
        """Of these jobs, the prunable ones and when each ended (a job not on record is absent)."""
        out: dict[str, float] = {}
        for at in range(0, len(job_ids), 500):
            batch = job_ids[at: at + 500]
            marks = ", ".join("?" * len(batch))
            rows = self.db.execute(
                f"SELECT id, COALESCE(finished, created) AS ended FROM jobs j WHERE id IN ({marks}) "
                f"AND state IN ({', '.join('?' * len(TERMINAL))}) "
                "AND NOT EXISTS (SELECT 1 FROM parts p WHERE p.job_id = j.id AND p.state = 'running')",
                (*batch, *sorted(TERMINAL)))
            out.update((r["id"], float(r["ended"])) for r in rows)
        return out

    def known(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs are on record."""
        out: set[str] = set()
        for at in range(0, len(job_ids), 500):
            batch = job_ids[at: at + 500]
            out.update(r[0] for r in self.db.execute(
                f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(batch))})", batch))
        return out

    def delete_jobs(self, job_ids: list[str]) -> int:
        """Remove these ended jobs with their parts, output and artifact rows; returns how many went."""
        if not job_ids:
            return 0
        marks = ", ".join("?" * len(job_ids))
        with self._tx(atomic=True):
            self._exec(f"DELETE FROM reruns WHERE job_id IN ({marks})", tuple(job_ids))
            cur = self._exec(f"DELETE FROM jobs WHERE id IN ({marks}) "
                             f"AND state IN ({', '.join('?' * len(TERMINAL))})", (*job_ids, *sorted(TERMINAL)))
        return int(cur.rowcount)

    def delete_hosted(self, run_ids: list[int]) -> int:
        """Remove these ended hosted runs; returns how many went."""
        if not run_ids:
            return 0
        with self._tx():
            cur = self._exec(f"DELETE FROM hosted WHERE id IN ({', '.join('?' * len(run_ids))}) "
                             "AND state != 'running'", tuple(run_ids))
        return int(cur.rowcount)

    def prune_artifacts(self, job_id: str, reason: str) -> None:
        """A job's stored files are about to be removed: its rows say ``pruned`` and why."""
        with self._tx():
            self._exec("UPDATE artifacts SET state='pruned', reason=? WHERE job_id=? AND state='stored'",
                       (reason, job_id))

    def _job_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        out = _row(row)
        out["log_truncated"] = out["log_dropped"] > 0
        out["outcome"] = outcome.of_job(out)
        return out

    def _ran_on(self, job_ids: list[str]) -> dict[str, list[str]]:
        """The nodes where each job's attempts ran (not those that refused), in order of first attempt."""
        if not job_ids:
            return {}
        marks = ",".join("?" * len(job_ids))
        rows = self.db.execute(f"SELECT job_id, node FROM parts WHERE job_id IN ({marks}) AND state != 'refused' "
                               "ORDER BY id", job_ids)
        out: dict[str, list[str]] = {}
        for r in rows:
            nodes = out.setdefault(r["job_id"], [])
            if r["node"] not in nodes:
                nodes.append(r["node"])
        return out

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The whole record of one job, with its parts (by chunk, then attempt), or None."""
        row = self.db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        out = self._job_dict(row)
        parts = self.db.execute("SELECT id, chunk, attempt, node, node_fp, started, finished, state, cpu_s, "
                                "mem_mib_s, exit_code, reason, result FROM parts WHERE job_id=? "
                                "ORDER BY chunk, attempt, id", (job_id,))
        out["parts"] = [_row(p) for p in parts]
        for p in out["parts"]:
            p["outcome"] = outcome.of_job(p)
        out["ran_on"] = self._ran_on([job_id]).get(job_id, [])
        link = self.db.execute("SELECT rerun_of FROM reruns WHERE job_id=?", (job_id,)).fetchone()
        out["rerun_of"] = link["rerun_of"] if link is not None else None
        out["reruns"] = [r["job_id"] for r in self.db.execute("SELECT job_id FROM reruns WHERE rerun_of=? "
                                                              "ORDER BY rowid", (job_id,))]
        out["artifacts"] = self.artifacts(job_id)
        placed = self.db.execute("SELECT placement FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
        out["placement"] = json.loads(placed) if placed else []
        return out

    def jobs(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Jobs newest first, without parts, optionally only those in ``state``."""
        _check(state is None or state in STATES, f"unknown job state {state!r} (one of {', '.join(STATES)})")
        _check(limit > 0, f"limit must be > 0 (got {limit})")
        rows = self.db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE (? IS NULL OR state=?) AND sweep IS NULL "
                               "ORDER BY created DESC, rowid DESC LIMIT ?", (state, state, limit))
        out = [self._job_dict(r) for r in rows]
        ran_on = self._ran_on([j["id"] for j in out])
        for j in out:
            j["ran_on"] = ran_on.get(j["id"], [])
        return out

    # -- sweeps (vesta map) -----------------------------------------------------------------------------------------

    def create_sweep(self, sweep_id: str, args: dict[str, Any], submitter: str) -> None:
        """Record a new sweep, running."""
        try:
            with self._tx():
                self._exec("INSERT INTO sweeps (id, args, submitter, created, state) VALUES (?, ?, ?, ?, 'running')",
                           (sweep_id, _dumps(args, "sweep args"), submitter, self.clock()))
        except sqlite3.IntegrityError:
            raise RecordsError(f"sweep {sweep_id!r} is already in the records") from None

    def end_sweep(self, sweep_id: str, state: str, reason: str = "") -> None:
        """A sweep ended: succeeded (every job did), failed or cancelled."""
        _check(state in TERMINAL, f"a sweep ends {', '.join(sorted(TERMINAL))} (got {state!r})")
        with self._tx():
            self._exec("UPDATE sweeps SET state=?, reason=?, finished=? WHERE id=? AND state='running'",
                       (state, reason, self.clock(), sweep_id))

    def sweep(self, sweep_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM sweeps WHERE id=?", (sweep_id,)).fetchone()
        return None if row is None else _row(row, ("args",))

    def sweeps(self, *, running: bool = False, limit: int = 50) -> list[dict[str, Any]]:
        """Sweeps newest first (``running``: only those still running), each with its jobs counted by outcome."""
        rows = self.db.execute("SELECT * FROM sweeps WHERE (? = 0 OR state='running') "
                               "ORDER BY created DESC, rowid DESC LIMIT ?", (int(running), limit))
        out = [_row(r, ("args",)) for r in rows]
        for s in out:
            s["counts"] = self.sweep_counts(s["id"])
        return out

    def sweep_counts(self, sweep_id: str) -> dict[str, int]:
        """A sweep's job numbers by where they stand: each number counted once, by its latest job."""
        counts = {"succeeded": 0, "failed": 0, "cancelled": 0, "running": 0, "queued": 0}
        for r in self.db.execute(
                "SELECT state, exit_code FROM jobs j WHERE sweep=? AND rowid = (SELECT max(rowid) FROM jobs "
                "WHERE sweep=j.sweep AND sweep_seq=j.sweep_seq)", (sweep_id,)):
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        return counts

    def sweep_jobs(self, sweep_id: str) -> list[dict[str, Any]]:
        """Every job of a sweep, by number then in the order they were made."""
        rows = self.db.execute(f"SELECT {_JOB_COLS}, sweep_seq, reported FROM jobs WHERE sweep=? "
                               "ORDER BY sweep_seq, rowid", (sweep_id,))
        return [self._job_dict(r) for r in rows]

    def mark_reported(self, job_id: str) -> None:
        """This job's end was given out as its sweep number's result."""
        with self._tx():
            self._exec("UPDATE jobs SET reported=1 WHERE id=?", (job_id,))

    # -- runs hosted for peers ------------------------------------------------------------------------------------

    def start_hosted(self, *, job_id: str, chunk: int, peer: str, peer_fp: str, kind: str, args: dict[str, Any],
                     started: float, defer: bool = False) -> int:
        """Record a run this node started for a peer; returns the run id."""
        _check(kind in KINDS, f"job kind must be one of {', '.join(KINDS)} (got {kind!r})")
        _check(isinstance(args, dict), f"hosted run args must be a dict (got {type(args).__name__})")
        with self._tx(defer):
            cur = self._exec("INSERT INTO hosted (job_id, chunk, peer, peer_fp, kind, args, started) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (job_id, chunk, peer, peer_fp, kind, _dumps(args, "hosted run args"), started))
        return int(cur.lastrowid or 0)

    def finish_hosted(self, run_id: int, *, state: str, finished: float, cpu_s: float, mem_mib_s: float = 0.0,
                      exit_code: int | None = None, reason: str = "") -> None:
        """Close a hosted run: succeeded, failed or cancelled, with what it used."""
        _check(state in HOSTED_ENDS, f"a hosted run ends {', '.join(sorted(HOSTED_ENDS))} (got {state!r})")
        with self._tx():
            cur = self._exec("UPDATE hosted SET state=?, finished=?, cpu_s=?, mem_mib_s=?, exit_code=?, "
                                  "reason=? WHERE id=? AND state='running'",
                                  (state, finished, cpu_s, mem_mib_s, exit_code, reason, run_id))
        if cur.rowcount != 1:
            row = self.db.execute("SELECT state FROM hosted WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise UnknownRecord(f"no hosted run {run_id} in the records")
            raise TransitionError(f"hosted run {run_id} cannot go from {row['state']} to {state}")

    def hosted(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """Runs hosted for peers, newest first."""
        _check(limit > 0, f"limit must be > 0 (got {limit})")
        rows = self.db.execute("SELECT * FROM hosted ORDER BY started DESC, id DESC LIMIT ?", (limit,))
        return [_row(r, ("args",)) for r in rows]
