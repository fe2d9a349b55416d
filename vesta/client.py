"""Vesta from Python: many jobs in flight over one control connection.

``AsyncClient`` (asyncio) and ``Client`` (blocking; an ``AsyncClient`` on a thread of its own) talk to the
local vestad over its control socket, pipelined: every request carries an id, and the daemon's events and
answers come back tagged with it, so a thousand jobs need one connection, not a thousand. ``submit`` runs a
command on the federation and returns a ``Job`` (a ``concurrent.futures.Future``; ``AsyncJob``, awaitable,
from the async client) whose result is a ``JobResult``: exit code, stdout and stderr, the node that ran it,
timings and artifacts. ``Executor`` is a ``concurrent.futures.Executor`` for commands.

    with vesta.Client() as client:
        jobs = [client.submit(["piwork", "1", "--seed", str(i)]) for i in range(30)]
        for job in vesta.as_completed(jobs):
            print(job.result().node, job.result().stdout.decode())

Errors are the classes of ``vesta.errors``: ``DaemonNotRunning``, ``InvalidJob`` (a bad argument, before
anything is sent), ``JobFailed`` (no node could run it), ``JobCancelled``, ``Refused``; a program that exits
non-zero is not an error: its ``JobResult.exit_code`` says so (``JobResult.check()`` raises for it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from vesta import outcome as outcomes
from vesta.control import find_socket
from vesta.errors import DaemonNotRunning, InvalidJob, JobFailed, ProtocolError, VestaError, remote
from vesta.spec import ExecSpec, JobRequest, MemSpec

__all__ = ["Artifact", "AsyncClient", "AsyncJob", "Client", "Executor", "Job", "JobResult", "as_completed", "wait"]

_HEADER = struct.Struct(">I")
MAX_REPLY = 64 << 20          # bytes of one frame from the daemon
OUTPUT_CAP = 1 << 20          # bytes of stdout (and of stderr) a JobResult keeps, as the records do
TRUNCATED = b"\n[vesta: output truncated after %d bytes]\n"

as_completed = concurrent.futures.as_completed
wait = concurrent.futures.wait


@dataclass(frozen=True, slots=True)
class Artifact:
    """A file the job left in $VESTA_OUTPUT, as the submitting node stored it."""

    path: str
    size: int
    sha256: str
    state: str                 # stored | refused | corrupt | incomplete
    reason: str = ""
    stored_in: Path | None = None   # the job's artifact directory on this machine

    def fetch(self, dest: str | os.PathLike[str]) -> Path:
        """Copy the stored file to ``dest`` (a directory, or a new file's path), checking its SHA-256."""
        if self.state != "stored" or self.stored_in is None:
            raise VestaError(f"artifact {self.path} was not stored ({self.state}: {self.reason})")
        target = Path(dest)
        if target.is_dir():
            target = target / Path(self.path).name
        if target.exists():
            raise VestaError(f"{target} exists: choose another destination or remove it")
        partial = target.with_name(target.name + ".vesta-partial")
        digest = hashlib.sha256()
        with open(self.stored_in / self.path, "rb") as src, open(partial, "xb") as out:
            while piece := src.read(1 << 20):
                digest.update(piece)
                out.write(piece)
        if digest.hexdigest() != self.sha256:
            partial.unlink()
            raise VestaError(f"stored artifact {self.path} no longer matches its SHA-256: not copied")
        partial.replace(target)
        return target


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a job ended. ``stdout``/``stderr`` hold at most OUTPUT_CAP bytes each (exec jobs)."""

    job_id: str
    kind: str
    node: str                 # where it ran (a split cpu job: the node that did most of it)
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""          # why it ended as it did (a limit it hit, a timeout), "" when it simply exited
    stdout: bytes = b""
    stderr: bytes = b""
    elapsed_s: float = 0.0    # from submission to the answer
    run_s: float = 0.0        # the program's own run time (exec)
    cpu_s: float = 0.0
    artifacts: tuple[Artifact, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.kind != "exec" or self.exit_code == 0

    @property
    def outcome(self) -> str:
        """How it ended, in the words of `vesta jobs` and vestatop: ``succeeded``, ``failed, exit 4``,
        ``failed, signal 9``, ``timed out``, ``cancelled``."""
        if self.kind != "exec":
            return outcomes.SUCCEEDED
        return outcomes.of_result({"exit_code": self.exit_code, "signal": self.signal, "reason": self.reason})

    def check(self) -> JobResult:
        """This result, or JobFailed if the program did not exit 0."""
        if not self.ok:
            why = f"exit {self.exit_code}" if self.exit_code is not None else f"signal {self.signal}"
            raise JobFailed(f"job {self.job_id} on {self.node}: {why}" + (f" ({self.reason})" if self.reason else ""))
        return self

    @classmethod
    def from_answer(cls, answer: dict[str, Any], stdout: bytes = b"", stderr: bytes = b"") -> JobResult:
        parts = answer.get("parts") or []
        node = str(answer.get("node") or (parts[0]["node"] if parts else ""))
        stored_in = Path(answer["artifacts_dir"]) if answer.get("artifacts_dir") else None
        artifacts = tuple(Artifact(f["path"], f["size"], f.get("sha256", ""), f["state"], f.get("reason", ""),
                                   stored_in) for f in answer.get("artifacts") or [])
        return cls(job_id=str(answer.get("job_id", "")), kind=str(answer.get("kind", "exec")), node=node,
                   exit_code=answer.get("exit_code"), signal=answer.get("signal"),
                   reason=str(answer.get("reason") or ""), stdout=stdout, stderr=stderr,
                   elapsed_s=float(answer.get("elapsed_s") or 0.0), run_s=float(answer.get("run_s") or 0.0),
                   cpu_s=float(answer.get("cpu_s") or sum(p.get("cpu_s", 0.0) for p in parts)),
                   artifacts=artifacts, raw=answer)


class _Output:
    """A job's stdout and stderr as they stream in, each bounded by OUTPUT_CAP."""

    def __init__(self) -> None:
        self.streams = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped = {"stdout": 0, "stderr": 0}

    def feed(self, stream: str, data: bytes) -> None:
        buf = self.streams.get(stream)
        if buf is None:
            return
        room = OUTPUT_CAP - len(buf)
        buf.extend(data[: max(room, 0)])
        self.dropped[stream] += max(0, len(data) - max(room, 0))

    def take(self, stream: str) -> bytes:
        data = bytes(self.streams[stream])
        return data + (TRUNCATED % OUTPUT_CAP if self.dropped[stream] else b"")


class AsyncJob:
    """A job submitted through an ``AsyncClient``: await it for its ``JobResult``."""

    def __init__(self, client: AsyncClient, future: asyncio.Future[JobResult]) -> None:
        self.client = client
        self.future = future
        self.job_id: str | None = None    # known once the daemon has it on record
        self.cancel_requested = False

    def __await__(self) -> Generator[Any, None, JobResult]:
        return self.future.__await__()

    def done(self) -> bool:
        return self.future.done()

    def request_cancel(self) -> bool:
        """Cancel the job: its future at once, the job on the daemon as soon as the daemon has named it (now, or
        with its first event). False if it had ended already. Call it on the client's event loop."""
        if self.future.done():
            return False
        self.cancel_requested = True
        if self.job_id is not None:
            self.client._cancel_remote(self.job_id)
        return self.future.cancel()

    def named(self, job_id: str) -> None:
        """The daemon named the job (its first event): a cancel asked for before then goes out now."""
        if self.job_id is None:
            self.job_id = job_id
            if self.cancel_requested:
                self.client._cancel_remote(job_id)

    async def cancel(self) -> bool:
        """Stop the job wherever it runs; False if it had ended already."""
        return self.request_cancel()


class AsyncClient:
    """One pipelined connection to the local vestad (asyncio). ``async with await AsyncClient.connect():``"""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], Callable[[dict[str, Any]], None] | None]] = {}
        self._out: list[bytes] = []
        self._closed: BaseException | None = None
        self._cancels: set[asyncio.Task[Any]] = set()   # cancels on their way to the daemon
        self._jobs: set[asyncio.Task[Any]] = set()      # jobs waiting for their answer
        self._read_task = asyncio.get_running_loop().create_task(self._read(), name="vesta-client-read")

    @classmethod
    async def connect(cls, name: str | None = None, directory: Path | None = None) -> AsyncClient:
        """Connect to the vestad named ``name`` (or $VESTA_NAME, or the only one running for this user)."""
        path = find_socket(name, directory)
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REPLY)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"vestad is not running (socket {path} does not answer)") from exc
        except PermissionError as exc:
            raise DaemonNotRunning(f"not allowed to use {path}: run as the user that runs vestad") from exc
        return cls(reader, writer)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._cancels:   # a cancel asked for must reach the daemon before the connection goes
            await asyncio.wait(self._cancels, timeout=5)
        self._fail(DaemonNotRunning("the client was closed"))
        self._writer.close()
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._read_task

    # ------------------------------------------------------------ the protocol

    async def call(self, op: str, on_event: Callable[[dict[str, Any]], None] | None = None, **args: Any) -> Any:
        """One request; events the daemon streams before its answer go to ``on_event``."""
        if self._closed is not None:
            raise DaemonNotRunning(f"no connection to vestad: {self._closed}")
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (future, on_event)
        payload = msgpack.packb({"op": op, "args": args, "id": rid})
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(_HEADER.pack(len(payload)) + payload)
        try:
            return await future
        finally:
            self._waiting.pop(rid, None)

    def _cancel_remote(self, job_id: str) -> None:
        async def cancel() -> None:
            with contextlib.suppress(VestaError):
                await self.call("cancel", job_id=job_id)

        task = asyncio.get_running_loop().create_task(cancel(), name="vesta-cancel")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    def _flush(self) -> None:
        if self._out and self._closed is None:
            self._writer.write(b"".join(self._out))
        self._out.clear()

    async def _read(self) -> None:
        try:
            while True:
                (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                if size > MAX_REPLY:
                    raise ProtocolError(f"vestad sent a frame of {size} bytes")
                self._dispatch(msgpack.unpackb(await self._reader.readexactly(size), raw=False))
        except asyncio.IncompleteReadError:
            self._fail(DaemonNotRunning("vestad closed the connection (did it stop?)"))
        except Exception as exc:   # a broken frame, a reset connection: every request waiting is told
            self._fail(DaemonNotRunning(f"lost the connection to vestad ({type(exc).__name__}: {exc})"))

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        rid = frame.get("id")
        waiting = self._waiting.get(rid) if isinstance(rid, int) else None
        if waiting is None:
            return   # an answer to a request given up on
        future, on_event = waiting
        if "event" in frame:
            if on_event is not None and isinstance(frame["event"], dict):
                on_event(frame["event"])
        elif future.done():
            return
        elif frame.get("ok"):
            future.set_result(frame.get("result"))
        else:
            future.set_exception(remote(frame.get("type"))(str(frame.get("error", "unknown error"))))

    def _fail(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        for future, _ in list(self._waiting.values()):
            if not future.done():
                future.set_exception(exc)

    # ------------------------------------------------------------ jobs

    def submit(self, argv: str | Sequence[str], *, put: Iterable[str | os.PathLike[str]] = (), on: str | None = None,
               need: Iterable[str] = (), timeout: float | None = None, mem: int | None = None, retries: int = 0,
               queue: bool = True) -> AsyncJob:
        """Run a command on the best node that allows exec. It waits for a free node (``queue``) rather than
        failing when none can take it now. ``put``: files shipped into its working directory; ``need``: labels
        a node must have (``vesta peers`` lists them)."""
        return self._start(exec_request(argv, put=put, on=on, need=need, timeout=timeout, mem=mem, retries=retries,
                                        queue=queue))

    def cpu(self, millions: float, *, on: str | None = None, need: Iterable[str] = (),
            split: bool = True) -> AsyncJob:
        """Hash ``millions`` million SHA-256 blocks on the nodes with spare capacity."""
        return self._start(cpu_request(millions, on=on, need=need, split=split))

    def mem(self, mib: int, ms: int, *, on: str | None = None, need: Iterable[str] = ()) -> AsyncJob:
        """Hold ``mib`` MiB for ``ms`` milliseconds on a node with room for it."""
        return self._start(mem_request(mib, ms, on=on, need=need))

    def map(self, template: str | Sequence[str] | Callable[[Any], Sequence[str]], items: Iterable[Any],
            **options: Any) -> list[AsyncJob]:
        """One job per item: ``template`` is an argv whose ``{}`` parts are replaced by the item (appended when
        none has one), or a function from an item to an argv."""
        return [self.submit(command_for(template, item), **options) for item in items]

    def _start(self, request: JobRequest) -> AsyncJob:
        """Send a checked request (see ``exec_request``)."""
        loop = asyncio.get_running_loop()
        job = AsyncJob(self, loop.create_future())
        output = _Output()

        def event(ev: dict[str, Any]) -> None:
            kind = ev.get("type")
            if kind == "output" and isinstance(ev.get("data"), bytes):
                output.feed(str(ev.get("stream")), ev["data"])
            elif kind in ("start", "queued") and isinstance(ev.get("job_id"), str):
                job.named(ev["job_id"])

        async def run() -> None:
            # Runs to the daemon's answer even after the job's future was cancelled: its events name the job,
            # so a cancel asked for before then still reaches the daemon.
            try:
                answer = await self.call(request.kind, on_event=event, **request.to_control())
                result = JobResult.from_answer(answer, output.take("stdout"), output.take("stderr"))
            except Exception as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
                return
            if not job.future.done():
                job.future.set_result(result)

        task = loop.create_task(run(), name="vesta-job")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return job

    async def as_completed(self, jobs: Iterable[AsyncJob]) -> AsyncIterator[AsyncJob]:
        """The jobs, as each ends."""
        pending = {job.future: job for job in jobs}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future)


def exec_request(argv: str | Sequence[str], *, put: Iterable[str | os.PathLike[str]] = (), on: str | None = None,
                 need: Iterable[str] = (), timeout: float | None = None, mem: int | None = None, retries: int = 0,
                 queue: bool = True) -> JobRequest:
    """The request ``submit`` sends, checked (a bad argument raises InvalidJob here, before anything is sent)."""
    args = [argv] if isinstance(argv, str) else list(argv)
    request = JobRequest(ExecSpec(tuple(args), timeout_s=_positive("timeout", timeout),
                                  mem_mib=int(_positive("mem", mem))),
                         on=on, need=tuple(need), retries=retries, queue=queue,
                         puts=tuple(_put_path(p) for p in put))
    request.validate()
    return request


def cpu_request(millions: float, *, on: str | None = None, need: Iterable[str] = (), split: bool = True) -> JobRequest:
    return JobRequest.from_wire("cpu", {"millions": millions, "on": on, "split": split, "need": list(need)})


def mem_request(mib: int, ms: int, *, on: str | None = None, need: Iterable[str] = ()) -> JobRequest:
    request = JobRequest(MemSpec(mib, ms), on=on, need=tuple(need))
    request.validate()
    return request


def command_for(template: str | Sequence[str] | Callable[[Any], Sequence[str]], item: Any) -> list[str]:
    """The argv of one job of a ``map``: see ``AsyncClient.map``."""
    if callable(template):
        return [str(a) for a in template(item)]
    parts = [template] if isinstance(template, str) else list(template)
    if any("{}" in p for p in parts):
        return [p.replace("{}", str(item)) for p in parts]
    return [*parts, str(item)]


def _positive(what: str, value: float | None) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidJob(f"--{what} must be a positive number")
    return float(value)


def _put_path(path: str | os.PathLike[str]) -> str:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise InvalidJob(f"--put {path}: " + ("not a regular file (ship a directory as an archive: tar czf)"
                                              if os.path.exists(full) else "no such file"))
    return full


class Job(concurrent.futures.Future[JobResult]):
    """A job submitted through a ``Client``: a ``concurrent.futures.Future`` of its ``JobResult``. ``cancel()``
    stops it wherever it runs."""

    def __init__(self, client: Client, source: Job | None = None) -> None:
        super().__init__()
        self.client = client
        self.source = source               # the job this one mirrors (Executor's checked results)
        self._inner: AsyncJob | None = None   # set on the client's loop once the request is on its way

    @property
    def inner(self) -> AsyncJob | None:
        return self.source.inner if self.source is not None else self._inner

    @property
    def job_id(self) -> str | None:
        inner = self.inner
        return inner.job_id if inner is not None else None

    def cancel(self) -> bool:
        """Cancel this future and, without waiting (so it may be called from a done callback), the job on the
        daemon: it is told as soon as it has named the job; a job not sent yet is never sent."""
        if self.done():
            return False
        if self.source is not None:
            self.source.cancel()
        with _CANCELLING:   # against _begin on the loop: the job is either not started, or its inner is seen
            inner = self._inner
            if inner is not None:
                self.client._loop.call_soon_threadsafe(inner.request_cancel)
            return _cancel(self, super().cancel)

    def _begin(self, start: Callable[[], AsyncJob]) -> None:
        """On the client's loop: send the job, unless it was cancelled first."""
        with _CANCELLING:
            if self.done():
                return
            self._inner = start()
        self._inner.future.add_done_callback(lambda f: _settle(self, f))


class Client:
    """A blocking client: an ``AsyncClient`` served by a thread of its own. ``with Client() as client:``"""

    def __init__(self, name: str | None = None, directory: Path | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vesta-client", daemon=True)
        self._starts: list[Callable[[], None]] = []   # jobs to send, handed to the loop in one wake-up
        self._starts_lock = threading.Lock()
        self._thread.start()
        try:
            self._async = self._run(AsyncClient.connect(name, directory)).result()
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Any) -> concurrent.futures.Future[Any]:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking vesta.Client call from one of its own done callbacks would wait for "
                               "itself: call it from another thread (Job.cancel is fine)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._async.close()).result(timeout=5)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def call(self, op: str, **args: Any) -> Any:
        """One control request (``status``, ``peers``, ``jobs``, ...): its answer."""
        return self._run(self._async.call(op, **args)).result()

    def submit(self, argv: str | Sequence[str], **options: Any) -> Job:
        """Run a command on the federation; see ``AsyncClient.submit``."""
        return self._send(exec_request(argv, **options))

    def cpu(self, millions: float, **options: Any) -> Job:
        return self._send(cpu_request(millions, **options))

    def mem(self, mib: int, ms: int, **options: Any) -> Job:
        return self._send(mem_request(mib, ms, **options))

    def map(self, template: str | Sequence[str] | Callable[[Any], Sequence[str]], items: Iterable[Any],
            **options: Any) -> list[Job]:
        """One job per item, in the items' order; see ``AsyncClient.map``."""
        return [self.submit(command_for(template, item), **options) for item in items]

    def cancel(self, job: Job) -> bool:
        return job.cancel()

    def _send(self, request: JobRequest) -> Job:
        """A checked request goes to the loop without waiting for it: a batch submitted from this thread
        reaches the loop in a few wake-ups, and the jobs are sent in the order they were submitted."""
        if self._loop.is_closed():
            raise DaemonNotRunning("this vesta.Client is closed")
        job = Job(self)
        start = functools.partial(self._async._start, request)
        with self._starts_lock:
            first = not self._starts
            self._starts.append(functools.partial(job._begin, start))
        if first:
            try:
                self._loop.call_soon_threadsafe(self._run_starts)
            except RuntimeError:   # closed meanwhile
                raise DaemonNotRunning("this vesta.Client is closed") from None
        return job

    def _run_starts(self) -> None:
        with self._starts_lock:
            starts, self._starts = self._starts, []
        for begin in starts:
            begin()


def _cancel(future: concurrent.futures.Future[Any], cancel: Callable[[], bool]) -> bool:
    """Cancel a future no executor will ever run, and tell those waiting on it (wait(), as_completed()): a plain
    Future.cancel leaves it CANCELLED, which they wait on for ever, until set_running_or_notify_cancel."""
    with _CANCELLING:   # notified once: a second notify is an error
        if future.cancelled():
            return True
        if not cancel():
            return False
        future.set_running_or_notify_cancel()
        return True


_CANCELLING = threading.RLock()   # cancelling one future may cancel another from its callbacks


def _settle(job: Job, done: asyncio.Future[JobResult] | concurrent.futures.Future[JobResult],
            check: bool = False) -> None:
    """Give ``job`` the outcome of ``done``: its cancel, its error or its result (with ``check``, a program that
    did not exit 0 is a JobFailed)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):   # the user cancelled it meanwhile
        if done.cancelled():
            _cancel(job, lambda: concurrent.futures.Future.cancel(job))
        elif done.exception() is not None:
            job.set_exception(done.exception())
        else:
            try:
                job.set_result(done.result().check() if check else done.result())
            except JobFailed as exc:
                job.set_exception(exc)


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose work items are commands run on the federation.

    ``submit(cmd, *args)`` runs ``[cmd, *args]`` (``cmd`` a program name or an argv list) and returns a
    ``Job``; ``map(cmd, *iterables)`` runs one command per item and yields the results in the items' order.
    ``shutdown(wait=True)`` waits for every job; ``cancel_futures=True`` cancels those not finished."""

    def __init__(self, name: str | None = None, *, directory: Path | None = None, check: bool = True,
                 **options: Any) -> None:
        self._client = Client(name, directory)
        self._options = options
        self._check = check        # results of programs that exit non-zero raise JobFailed
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, cmd: str | Sequence[str], /, *args: Any, **kwargs: Any) -> Job:  # type: ignore[override]
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            argv = ([cmd] if isinstance(cmd, str) else list(cmd)) + [str(a) for a in args]
            job = self._client.submit(argv, **(self._options | kwargs))
            self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        if not self._check:
            return job
        checked = Job(self._client, source=job)
        job.add_done_callback(lambda done: _settle(checked, done, check=True))
        return checked

    def map(self, cmd: str | Sequence[str], *iterables: Iterable[Any],  # type: ignore[override]
            timeout: float | None = None, chunksize: int = 1) -> Iterator[JobResult]:
        """Run ``[cmd, *items]`` for each set of items, all at once; the results in the items' order. A job
        still running when the iterator is dropped (or ``timeout`` runs out) is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        jobs = [self.submit(cmd, *items) for items in zip(*iterables, strict=False)]

        def results() -> Iterator[JobResult]:
            try:
                for job in jobs:
                    yield job.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                for job in jobs:
                    job.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            jobs = list(self._jobs)
        if cancel_futures:
            for job in jobs:
                job.cancel()
        if wait:
            concurrent.futures.wait(jobs)
            self._client.close()
        else:   # the jobs go on: the connection closes once the last has its answer
            def close_when_done() -> None:
                concurrent.futures.wait(jobs)
                self._client.close()

            threading.Thread(target=close_when_done, name="vesta-executor-shutdown", daemon=True).start()

