"""Where Vesta keeps things on this machine: its config and key, its state, and the daemons' control sockets.

A daemon's control socket is ``$XDG_RUNTIME_DIR/vestad-NAME.sock`` (``/tmp`` without one), and vestad keeps a
link to it at the seed's ``/tmp/vestad-NAME.sock`` (0600, its own; never one another user planted), so a shell
with another XDG_RUNTIME_DIR, or sudo, still finds it. ``locate_socket`` looks in every such place and says
where it looked when it finds none.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from vesta.checks import MAX_NAME
from vesta.errors import ConfigError, DaemonNotRunning

TMP_SOCKET_DIR = Path("/tmp")


def config_home() -> Path:
    """$XDG_CONFIG_HOME/vesta, or ~/.config/vesta."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vesta"


def default_key_file() -> Path:
    """Where vestad looks for the federation key when none is given."""
    return config_home() / "federation.key"


def default_config_file() -> Path:
    """Where vestad looks for its config file when none is given."""
    return config_home() / "vestad.json"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vesta"


def socket_dir() -> Path:
    """Where control sockets live: $XDG_RUNTIME_DIR when set, else /tmp (as the seed has it)."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp")


def socket_path(name: str, directory: Path | None = None) -> Path:
    return (directory or socket_dir()) / f"vestad-{name}.sock"


def socket_dirs() -> list[Path]:
    """Where a client looks for control sockets, in order: $XDG_RUNTIME_DIR (when set), then /tmp."""
    dirs = [socket_dir()]
    if TMP_SOCKET_DIR not in dirs:
        dirs.append(TMP_SOCKET_DIR)
    return dirs


def owned_by_me(path: Path) -> bool:
    """``path`` itself (not what a link points to) belongs to this user: a link in /tmp that another user
    planted is never followed."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.getuid()


def usable_socket(path: Path) -> bool:
    """A control socket this user may use: ours, reached directly or through a link that is ours too."""
    if not owned_by_me(path):
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()


def locate_socket(name: str | None, directories: list[Path], hint: str) -> Path:
    """The control socket of vestad ``name`` (the first directory that has it), or with no name the only
    one of this user (in the first directory that has any). Says where it looked when there is none."""
    where = " and ".join(str(d) for d in directories)
    if name:
        for directory in directories:
            path = socket_path(sanitize_name(name), directory)
            if usable_socket(path):
                return path
        raise DaemonNotRunning(f"vestad {name!r} is not running (no vestad-{sanitize_name(name)}.sock in {where}): "
                               f"{hint}")
    for directory in directories:
        found: dict[Path, Path] = {}
        try:
            for p in sorted(directory.glob("vestad-*.sock")):
                with contextlib.suppress(OSError):
                    if usable_socket(p):
                        found.setdefault(p.resolve(), p)
        except OSError:
            continue
        candidates = list(found.values())
        if len(candidates) > 1:
            names = ", ".join(p.name[len("vestad-"):-len(".sock")] for p in candidates)
            raise ConfigError(f"several vestad are running ({names}): choose one with -name or VESTA_NAME")
        if candidates:
            return candidates[0]
    raise DaemonNotRunning(f"vestad is not running (no vestad-*.sock in {where}): {hint}")


def link_tmp_socket(sock: Path, name: str) -> Path | None:
    """Keep the seed's ``/tmp/vestad-NAME.sock`` as a link to ``sock`` (made with a private umask), so a client
    with another $XDG_RUNTIME_DIR (a service and a shell, sudo) still finds this daemon. Returns the link, or
    None when ``sock`` is already in /tmp or the place belongs to someone else (never touched then)."""
    import logging  # only the daemon links (the CLIs import this module and start faster without logging)

    log = logging.getLogger(__name__)
    link = socket_path(name, TMP_SOCKET_DIR)
    if os.environ.get("VESTA_TMP_LINK", "1") == "0":   # turned off (a test suite's many short-lived daemons)
        return None
    if sock.parent.resolve() == TMP_SOCKET_DIR.resolve() or link == sock:
        return None
    try:
        st = link.lstat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        log.warning("not linking %s: %s", link, exc.strerror)
        return None
    if st is not None and (st.st_uid != os.getuid() or not stat.S_ISLNK(st.st_mode)):
        log.warning("not linking %s to the control socket: something else is there (owner uid %d); "
                    "clients find the socket in %s", link, st.st_uid, sock.parent)
        return None
    if st is not None and usable_socket(link) and os.readlink(link) != str(sock):
        log.warning("not linking %s: it leads to another running vestad's socket (%s)", link, os.readlink(link))
        return None
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(sock, tmp)
        os.replace(tmp, link)   # /tmp is sticky: only we can replace or remove our own link
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not link %s to the control socket: %s", link, exc.strerror)
        return None
    return link


def unlink_tmp_socket(link: Path | None, sock: Path) -> None:
    """Remove our /tmp link at shutdown, if it is still ours and still leads to ``sock``."""
    if link is None:
        return
    try:
        if owned_by_me(link) and link.is_symlink() and os.readlink(link) == str(sock):
            link.unlink()
    except OSError:
        pass


def sanitize_name(raw: str) -> str:
    """Make a node name safe for file names, sockets and tables: [A-Za-z0-9_.-], at most 32.

    Other characters become '-', runs of '-' collapse, and the name must start
    with a letter or digit ("My Laptop!" -> "My-Laptop").
    """
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw.strip())
    name = re.sub(r"-{2,}", "-", name)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:MAX_NAME].rstrip("-.")
    if not name:
        raise ConfigError(f"name {raw!r} has no usable characters: use letters, digits, '-', '_' or '.'")
    return name
