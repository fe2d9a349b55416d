"""One exception tree for the whole package.

VestaError
├── ConfigError        bad file, flag or environment value; CLI exits 2
│   └── IdentityError  identity file unreadable or corrupt
├── ProtocolError      a peer or packet sent something unacceptable: drop and count
│   ├── FrameTooLarge  length prefix over the hard limit (checked before reading)
│   └── AuthError      wrong key, bad tag, bad signature, failed handshake
├── PeerUnavailable    connect/read timeout, peer gone, connection dropped
├── DaemonNotRunning   no control socket to talk to; CLI exits 3
└── Refused            the other side declined (.reason says why)

Library code raises these and never exits; ``vesta.cli`` maps them to
one-line messages and exit codes.
"""


class VestaError(Exception):
    """Base of every error Vesta raises on purpose."""


class ConfigError(VestaError):
    """A config file, flag or environment value is wrong; the message names it and the fix."""


class IdentityError(ConfigError):
    """The node identity file cannot be used."""


class ProtocolError(VestaError):
    """Something that arrived from outside is malformed or unacceptable."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix exceeds the hard limit."""


class AuthError(ProtocolError):
    """Decryption, signature or handshake failed: wrong key or tampering."""


class PeerUnavailable(VestaError):
    """A peer could not be reached or went away mid-conversation."""


class DaemonNotRunning(VestaError):
    """The local vestad is not running (no control socket)."""


class Refused(VestaError):
    """The other side declined a request; ``reason`` is a short machine-readable word."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason
