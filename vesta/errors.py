"""One exception tree for the whole package: every class Vesta raises on purpose is declared here.

VestaError
├── ConfigError          bad file, flag, environment value or request; CLI exits 2
│   ├── IdentityError    identity file unreadable or corrupt
│   ├── InvalidJob       a job specification with a bad field (from the CLI, the control socket or a peer)
│   └── RecordsVersionError  the records database is from a newer vesta
├── ProtocolError        a peer or packet sent something unacceptable: drop and count
│   ├── FrameTooLarge    length prefix over the hard limit (checked before reading)
│   ├── AuthError        wrong key, bad tag, bad signature, failed handshake
│   └── Dropped          a datagram dropped for a counted reason (.reason: stale, replay, ...)
├── PeerUnavailable      connect/read timeout, peer gone, connection dropped; CLI exits 1
├── DaemonNotRunning     no control socket to talk to; CLI exits 3
├── Refused              the other side declined (.reason says why); CLI exits 1
├── InputError           a file given with --put cannot be shipped; CLI exits 1
├── NotFound             no such job, peer or record on this node; CLI exits 1
├── JobFailed            no node could run a job, or its run failed; CLI exits 1
│   ├── NotNow           a queued job no node can take right now (it stays queued)
│   └── JobCancelled     the job was cancelled
├── RecordsError         the records database failed (disk full, I/O error); CLI exits 1
│   ├── StateFull        the state directory has no room: what needs space is refused until it has
│   ├── TransitionError  a job state change that the state machine does not allow
│   └── UnknownRecord    no such job or part in the records
├── Cancelled            a built-in workload saw its stop switch (caught inside the host)
└── RemoteError          the daemon answered with an error (see ``remote``); CLI exits 1

Library code raises these and never exits; ``vesta.cli`` maps each class to one exit code
(``cli.common.EXIT_CODES``). The control protocol carries the class name of an error, and the client
raises ``remote(name)``: a class that is both the daemon's class and RemoteError, so a caller can catch
either and the CLI exits with the daemon's class's code.
"""

from __future__ import annotations


class VestaError(Exception):
    """Base of every error Vesta raises on purpose."""


class ConfigError(VestaError):
    """A config file, flag, environment value or request is wrong; the message names it and the fix."""


class IdentityError(ConfigError):
    """The node identity file cannot be used."""


class InvalidJob(ConfigError):
    """A job specification has a bad field; the message names the field and what it may be."""


class InputError(VestaError):
    """A file given with --put cannot be shipped (the message names it and the fix)."""


class RecordsVersionError(ConfigError):
    """The records database was written by a newer vesta."""


class ProtocolError(VestaError):
    """Something that arrived from outside is malformed or unacceptable."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix exceeds the hard limit."""


class AuthError(ProtocolError):
    """Decryption, signature or handshake failed: wrong key or tampering."""


class Dropped(ProtocolError):
    """A datagram dropped for a reason that is counted by name (``reason``: oversize, stale, replay, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class PeerUnavailable(VestaError):
    """A peer could not be reached or went away mid-conversation."""


class DaemonNotRunning(VestaError):
    """The local vestad is not running (no control socket)."""


class Refused(VestaError):
    """The other side declined a request; ``reason`` is a short machine-readable word."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def message(self) -> str:
        return str(self)


class NotFound(VestaError):
    """No such job, peer or record on this node (the message says where to look)."""


class JobFailed(VestaError):
    """No node could run the job, or its run failed; the message says why for each node."""


class NotNow(JobFailed):
    """No node can take a queued job right now, for reasons that pass (busy, outside its hours, not
    around, exec off): it stays queued. The message says why for each node."""


class JobCancelled(JobFailed):
    """The job was cancelled (by `vesta cancel`, or its client went away)."""


class RecordsError(VestaError):
    """The records database could not be read or written."""


class StateFull(RecordsError):
    """The state directory's filesystem is full: what needs space is refused; the message names the fix."""


class TransitionError(RecordsError):
    """A job state change the state machine does not allow."""


class UnknownRecord(RecordsError, LookupError):
    """No such job or part in the records."""


class Cancelled(VestaError):
    """A built-in workload was stopped by its cancel switch."""


class RemoteError(VestaError):
    """The daemon answered with an error of a kind this client does not know."""


_REMOTE: dict[type[VestaError], type[RemoteError]] = {}


def _message_only(self: VestaError, message: str) -> None:
    VestaError.__init__(self, message)


def _reduce_remote(self: VestaError) -> tuple[object, tuple[str, str]]:
    """Pickled by the name of the daemon's class (a future's exception may cross a process boundary)."""
    return _rebuild_remote, (type(self).__name__.removeprefix("Remote"), str(self))


def _rebuild_remote(name: str, message: str) -> RemoteError:
    return remote(name)(message)


def remote(name: object) -> type[RemoteError]:
    """The error class a client raises for an error the daemon named: a subclass of both the daemon's class
    and RemoteError (RemoteError itself for a name this vesta does not know)."""
    cls = globals().get(name) if isinstance(name, str) else None
    if (not isinstance(cls, type) or not issubclass(cls, VestaError) or issubclass(cls, RemoteError)
            or cls is VestaError):
        return RemoteError
    if cls not in _REMOTE:   # only the message travels: a field such as Refused.reason reads "remote"
        _REMOTE[cls] = type(f"Remote{cls.__name__}", (cls, RemoteError),
                            {"__init__": _message_only, "reason": "remote", "__doc__": cls.__doc__,
                             "__reduce__": _reduce_remote})
    return _REMOTE[cls]
