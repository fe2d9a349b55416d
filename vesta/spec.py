"""Job types: what a job is, declared once and carried whole from the CLI to the process on a peer.

A job is a ``JobRequest``: a specification of the work (``CpuSpec``, ``MemSpec`` or ``ExecSpec``) and
where it may go (``on``, ``split``, ``retries``, ``queue``). Each type checks its own fields in
``validate()`` (an ``InvalidJob`` naming the field and what it may be: the CLI, the control socket and a
peer's offer all get the same message) and has one ``to_wire()``/``from_wire()`` pair, used by the
control socket, the records (a job's ``args``) and, inside ``proto.Offer``, the peer protocol. An input
file is a ``FileInfo`` everywhere: announced in an offer, staged for a queued job, kept by a ``Sink``.

    vesta exec --timeout 5 -- CMD        JobRequest(ExecSpec(argv, timeout_s=5), on=None, ...)
      -> control socket (to_wire)        validated again by from_wire: one message, one place
      -> ops: stage --put files          ExecSpec.inputs = (FileInfo, ...)
      -> records / queue (to_wire)       the job's args; a queued job is rebuilt by from_wire
      -> submitter                       proto.Offer(spec=ExecSpec, output_cap=...)
      -> peer (proto.encode/decode)      the same flat fields as before this type existed
      -> host                            runs offer.spec
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from vesta.checks import check_bool, check_rel_path, check_sha256_hex
from vesta.errors import InvalidJob

MAX_ITERATIONS = 1 << 50          # per job; ~3.6e15 hashes is years of work
MAX_MILLIONS = 1e9                # `vesta cpu MILLIONS`
MAX_ARGV = 256                    # arguments of an exec job
MAX_ARG = 4096                    # bytes per argument
MAX_MEM_MIB = 1 << 22
MAX_HOLD_MS = 86_400_000          # a mem job holds its memory at most a day
MAX_TIMEOUT_S = 7 * 86400         # an exec job runs at most a week
MAX_RETRIES = 10
MAX_FILE_BYTES = 1 << 40          # one input or artifact, whole (each node has its own, smaller cap)
MAX_INPUTS = 64                   # files shipped with one exec job (vesta exec --put)
MAX_NODE_ARG = 64                 # length of an --on name or fingerprint prefix
MAX_NEED = 16                     # labels a job may need (--need), as many as a node may advertise
MAX_LABEL = 32                    # characters of one label
MAX_SHARE = 32                    # characters of a sweep id that shares inputs between jobs (ExecSpec.share)

STORED = "stored"                 # a FileInfo's state once a Sink kept it


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file that travels with an exec job: announced in an offer, staged for a queued job, or kept (or
    not, with the reason) by a ``Sink``. On the wire and in the records: ``[path, size, sha256, executable]``."""

    path: str
    size: int
    sha256: str          # hex
    executable: bool = False
    state: str = STORED
    reason: str = ""

    def validate(self) -> None:
        check_rel_path("input path", self.path, exc=InvalidJob)
        if not _whole(self.size) or not 0 <= self.size <= MAX_FILE_BYTES:
            raise InvalidJob(f"input {self.path}: size must be from 0 to {MAX_FILE_BYTES} bytes")
        check_sha256_hex(f"input {self.path}: sha256", self.sha256, exc=InvalidJob)
        check_bool(f"input {self.path}: executable", self.executable, exc=InvalidJob)

    def to_wire(self) -> list[Any]:
        return [self.path, self.size, self.sha256, self.executable]

    @classmethod
    def from_wire(cls, value: object) -> FileInfo:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise InvalidJob("an input must be [path, size, sha256, executable]")
        info = cls(*value)
        info.validate()
        return info


@dataclass(frozen=True, slots=True)
class CpuSpec:
    """Hash ``iterations`` SHA-256 blocks (``vesta cpu``): see ``workloads``."""

    KIND: ClassVar[str] = "cpu"
    iterations: int

    def validate(self) -> None:
        if not _whole(self.iterations) or not 1 <= self.iterations <= MAX_ITERATIONS:
            raise InvalidJob("cpu needs a positive number of million iterations (e.g. vesta cpu 200)")

    def describe(self) -> str:
        return f"{self.iterations / 1e6:g}M iterations"

    def to_wire(self) -> dict[str, Any]:
        return {"iterations": self.iterations}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> CpuSpec:
        if "iterations" not in body and "millions" in body:   # `vesta cpu MILLIONS` on the control socket
            millions = body["millions"]
            if not _number(millions) or not 0 < millions <= MAX_MILLIONS:
                raise InvalidJob("cpu needs a positive number of million iterations (e.g. vesta cpu 200)")
            spec = cls(max(1, int(round(millions * 1_000_000))))
        else:
            spec = cls(body.get("iterations"))  # type: ignore[arg-type]
        spec.validate()
        return spec


@dataclass(frozen=True, slots=True)
class MemSpec:
    """Allocate ``mib`` MiB, touch every page, hold it ``ms`` milliseconds (``vesta mem``)."""

    KIND: ClassVar[str] = "mem"
    mib: int
    ms: int

    def validate(self) -> None:
        if not _whole(self.mib) or not 0 < self.mib <= MAX_MEM_MIB:
            raise InvalidJob(f"mem needs a size in MiB from 1 to {MAX_MEM_MIB} (e.g. vesta mem 512 5000)")
        if not _whole(self.ms) or not 0 <= self.ms <= MAX_HOLD_MS:
            raise InvalidJob(f"mem needs a hold time in milliseconds from 0 to {MAX_HOLD_MS}")

    def describe(self) -> str:
        return f"{self.mib} MiB"

    def to_wire(self) -> dict[str, Any]:
        return {"mib": self.mib, "ms": self.ms}

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> MemSpec:
        spec = cls(body.get("mib"), body.get("ms"))  # type: ignore[arg-type]
        spec.validate()
        return spec


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """Run ``argv`` (``vesta exec``): at most ``timeout_s`` seconds (0: the host's exec_timeout_s), in at
    most ``mem_mib`` MiB (0: the host's mem_offer_mb), with ``inputs`` in its working directory."""

    KIND: ClassVar[str] = "exec"
    argv: tuple[str, ...]
    timeout_s: float = 0.0
    mem_mib: int = 0
    inputs: tuple[FileInfo, ...] = ()
    stdin: str = ""               # the input the program reads as its standard input ("": /dev/null)
    share: str = ""               # a sweep's id: a node may keep the job's first ``shared`` inputs, by SHA-256,
    shared: int = 0               # for the sweep's next jobs (its --put files, the same in every job)

    def validate(self) -> None:
        argv = self.argv
        if not isinstance(argv, tuple) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise InvalidJob("exec needs a command: vesta exec -- CMD ARGS...")
        if len(argv) > MAX_ARGV or any(len(a) > MAX_ARG or "\x00" in a for a in argv):
            raise InvalidJob(f"command too long: at most {MAX_ARGV} arguments of {MAX_ARG} bytes, without NUL bytes")
        if not _number(self.timeout_s) or not 0 <= self.timeout_s <= MAX_TIMEOUT_S:
            raise InvalidJob(f"--timeout must be from 1 to {MAX_TIMEOUT_S} seconds")
        if not _whole(self.mem_mib) or not 0 <= self.mem_mib <= MAX_MEM_MIB:
            raise InvalidJob(f"--mem must be a whole number of MiB, at most {MAX_MEM_MIB}")
        if not isinstance(self.inputs, tuple) or len(self.inputs) > MAX_INPUTS:
            raise InvalidJob(f"--put takes at most {MAX_INPUTS} files")
        seen = set()
        for info in self.inputs:
            if not isinstance(info, FileInfo):
                raise InvalidJob("an input must be [path, size, sha256, executable]")
            info.validate()
            if info.path in seen:
                raise InvalidJob(f"inputs name {info.path!r} twice")
            seen.add(info.path)
        if not isinstance(self.stdin, str):
            raise InvalidJob("stdin must name one of the job's input files")
        if self.stdin:
            check_rel_path("stdin", self.stdin, exc=InvalidJob)
        if not isinstance(self.share, str) or len(self.share) > MAX_SHARE or (
                self.share and not (self.share.isascii() and self.share.isalnum())):
            raise InvalidJob(f"share must be a sweep id (letters and digits, at most {MAX_SHARE})")
        if not _whole(self.shared) or not 0 <= self.shared <= (len(self.inputs) if self.share else 0):
            raise InvalidJob("shared must count the job's first inputs, and needs a share")

    def describe(self) -> str:
        return " ".join(self.argv)[:60]

    def to_wire(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "timeout_s": self.timeout_s, "mem_mib": self.mem_mib,
                "inputs": [i.to_wire() for i in self.inputs]} | ({"stdin": self.stdin} if self.stdin else {}) | (
                {"share": self.share, "shared": self.shared} if self.share else {})

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ExecSpec:
        argv, inputs = body.get("argv"), body.get("inputs") or []
        if not isinstance(argv, (list, tuple)):
            raise InvalidJob("exec needs a command: vesta exec -- CMD ARGS...")
        if not isinstance(inputs, (list, tuple)) or len(inputs) > MAX_INPUTS:
            raise InvalidJob(f"--put takes at most {MAX_INPUTS} files")
        # "timeout" and "mem": the control requests and records of vesta before the typed job path
        timeout = body.get("timeout_s", body.get("timeout"))
        spec = cls(tuple(argv), 0.0 if timeout is None else timeout, body.get("mem_mib", body.get("mem")) or 0,
                   tuple(FileInfo.from_wire(i) for i in inputs), body.get("stdin", ""), body.get("share", ""),
                   body.get("shared", 0))
        spec.validate()
        return spec


Spec = CpuSpec | MemSpec | ExecSpec
SPECS: dict[str, type[CpuSpec] | type[MemSpec] | type[ExecSpec]] = {c.KIND: c for c in (CpuSpec, MemSpec, ExecSpec)}
JOB_KINDS = tuple(SPECS)


def spec_from_wire(kind: object, body: Mapping[str, Any]) -> Spec:
    cls = SPECS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidJob(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}")
    return cls.from_wire(body)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A job as it is submitted: the work and where it may go.

    ``on``: only this node (name, or fingerprint prefix of 8+ characters). ``split``: a cpu job may be cut
    over several nodes. ``retries``: an exec job may run again elsewhere this many times when its node dies
    or the link drops. ``queue``: wait for a node instead of failing when none can take it now. ``puts``:
    absolute paths of files to ship with an exec job; the daemon stages them into ``spec.inputs``. ``need``:
    labels a node must advertise to be chosen (``arch:aarch64``, ``gpu``, an owner's ``-label``)."""

    spec: Spec
    on: str | None = None
    need: tuple[str, ...] = ()
    split: bool = True
    retries: int = 0
    queue: bool = False
    puts: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.spec.KIND

    def validate(self) -> None:
        self.spec.validate()
        if self.on is not None and (not isinstance(self.on, str) or not 0 < len(self.on) <= MAX_NODE_ARG):
            raise InvalidJob(f"--on must be a node name or a fingerprint prefix of at most {MAX_NODE_ARG} "
                             "characters")
        if (not isinstance(self.need, tuple) or len(self.need) > MAX_NEED
                or not all(isinstance(n, str) and 0 < len(n) <= MAX_LABEL and n.strip() == n for n in self.need)):
            raise InvalidJob(f"--need takes at most {MAX_NEED} labels of at most {MAX_LABEL} characters each")
        check_bool("split", self.split, exc=InvalidJob)
        check_bool("queue", self.queue, exc=InvalidJob)
        if not _whole(self.retries) or not 0 <= self.retries <= MAX_RETRIES:
            raise InvalidJob(f"--retries must be from 0 to {MAX_RETRIES}")
        if not isinstance(self.puts, tuple) or not all(isinstance(p, str) and p and "\x00" not in p
                                                          for p in self.puts):
            raise InvalidJob("puts must be a list of file paths")
        if self.kind != "exec" and (self.puts or self.queue or self.retries):
            raise InvalidJob("--put, --queue and --retries are for exec jobs")
        if isinstance(self.spec, ExecSpec) and self.spec.stdin:
            shipped = {i.path for i in self.spec.inputs} | {p.rstrip("/").rpartition("/")[2] for p in self.puts}
            if self.spec.stdin not in shipped:
                raise InvalidJob(f"stdin names {self.spec.stdin!r}, which is not one of the job's input files")

    def with_inputs(self, inputs: tuple[FileInfo, ...]) -> JobRequest:
        """The request once its --put files are staged: their manifest in the spec, no local paths."""
        assert isinstance(self.spec, ExecSpec)
        return replace(self, spec=replace(self.spec, inputs=inputs), puts=())

    def to_control(self) -> dict[str, Any]:
        """The request as the control socket takes it: ``to_wire()``, plus the keys a vestad from before the typed
        job path reads (a daemon not restarted after an upgrade still gets the same job)."""
        body = self.to_wire()
        if isinstance(self.spec, CpuSpec):
            body["millions"] = self.spec.iterations / 1e6
        elif isinstance(self.spec, ExecSpec):
            body |= {"timeout": self.spec.timeout_s or None, "mem": self.spec.mem_mib or None}
        return body

    def to_wire(self) -> dict[str, Any]:
        """The request as a map (control socket, a job's args in the records); the kind goes beside it."""
        body = self.spec.to_wire() | {"on": self.on} | ({"need": list(self.need)} if self.need else {})
        if self.kind == "cpu":
            body["split"] = self.split
        if self.kind == "exec":
            body |= {"retries": self.retries, "queue": self.queue}
            if self.puts:
                body["puts"] = list(self.puts)
        return body

    @classmethod
    def from_wire(cls, kind: object, body: object) -> JobRequest:
        if not isinstance(body, Mapping):
            raise InvalidJob("a job must be a map of its fields")
        puts = body.get("puts") or []
        if not isinstance(puts, (list, tuple)) or len(puts) > MAX_INPUTS:
            raise InvalidJob(f"--put takes at most {MAX_INPUTS} files")
        need = body.get("need") or ()
        if not isinstance(need, (list, tuple)):
            raise InvalidJob(f"--need takes at most {MAX_NEED} labels of at most {MAX_LABEL} characters each")
        request = cls(spec_from_wire(kind, body), on=body.get("on"), need=tuple(need), split=body.get("split", True),
                      retries=body.get("retries") or 0, queue=bool(body.get("queue")), puts=tuple(puts))
        request.validate()
        return request
