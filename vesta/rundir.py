"""Where and with what an exec run starts: its fresh working directory and HOME, and its scrubbed environment.

A run gets a directory of its own under the node's runs directory (``runs_dir``), a fresh empty HOME beside it
(``make_home``: never a place an input can land), and an environment built from nothing (``scrubbed_env``: no
variable of the daemon's own, which may hold ``VESTA_KEY``; the hooks common programs read their own code or
configuration from turned off). ``remove_workdir`` takes a run's tree down through ``O_NOFOLLOW`` descriptors, so a
job that swaps a directory for a symlink cannot make the daemon touch anything else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vesta.allowlist import SAFE_PATH
from vesta.errors import Refused

log = logging.getLogger(__name__)

# What turns off the places where common programs look for code or configuration of their own beside
# HOME (which is a fresh empty directory anyway): Python's per-user site directory (usercustomize.py) and the
# script's or working directory first on sys.path (a shipped json.py), git's global and system config (an
# alias or core.pager runs a shell).
HOOKS_OFF = {
    "PYTHONNOUSERSITE": "1",
    "PYTHONSAFEPATH": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
# Set by the node, never by a caller's ``extra``.
_FIXED_ENV = frozenset({"PATH", "HOME", "TMPDIR", "VESTA_JOB_ID", "VESTA_NODE", "VESTA_NODE_ID", *HOOKS_OFF})
# Variables that change how the dynamic loader or libc behave (glibc's "unsecure" list): with them, an
# allowlisted binary would load code of the job's choosing.
_LOADER_ENV = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE", "NIS_PATH",
    "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR",
})
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def scrubbed_env(*, job_id: str, node: str, workdir: Path, extra: Mapping[str, str] | None = None,
                 node_id: str = "") -> dict[str, str]:
    """The whole environment a job sees: nothing is inherited from the daemon (it may hold VESTA_KEY).
    ``HOME`` is a fresh empty directory beside ``workdir`` (``home_of``), made here, never the working
    directory: a peer's input files land in the working directory, and a file shipped as
    ``.local/lib/python3.11/site-packages/usercustomize.py`` or ``.gitconfig`` there would otherwise be read
    as the program's own configuration and run code of the peer's choosing in an allowlisted program
    (``HOOKS_OFF`` turns off the same hooks by variable). ``node_id`` (the node's fingerprint, as
    VESTA_NODE_ID) also marks the job's processes as this node's, so a vestad that died can find them when it
    comes back (``proctree.kill_leftovers``).

    ``extra`` may not set the node's own variables (PATH, HOME, TMPDIR, VESTA_*) nor loader variables
    (LD_*, GCONV_PATH, ...), which would let an allowlisted binary load code of the job's choosing.
    """
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    home = make_home(workdir)
    env = {
        "PATH": SAFE_PATH,
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "VESTA_JOB_ID": job_id,
        "VESTA_NODE": node,
        **HOOKS_OFF,
    }
    if node_id:
        env["VESTA_NODE_ID"] = node_id
    for name, value in (extra or {}).items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise Refused(f"environment variable {name!r} is not a valid name=value", reason="policy")
        if name in _FIXED_ENV or name.startswith(("LD_", "VESTA_")) or name in _LOADER_ENV:
            raise Refused(f"environment variable {name} may not be set by a job", reason="policy")
        env[name] = value
    return env


def home_of(workdir: Path) -> Path:
    """The run's HOME: ``WORKDIR.home``, beside its working directory (so no input file can land in it),
    removed with it (``remove_workdir``)."""
    return workdir.with_name(workdir.name + ".home")


def make_home(workdir: Path) -> Path:
    """Make the run's empty HOME (0700); ``Refused`` if something else is in its place."""
    home = home_of(workdir)
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(home)
    owners = {os.geteuid(), os.lstat(workdir).st_uid}   # the run's own user, once give_workdir handed both over
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o077:
        raise Refused(f"{home} is in the way of this run's home directory (someone else made it?): "
                      "remove it and try again", reason="policy")
    return home


def make_workdir(base: Path | None, job_id: str) -> Path:
    """A fresh private directory (0700) for one run, under ``base`` or the system temp dir."""
    safe = _UNSAFE_NAME_CHARS.sub("_", job_id)[:48].strip("._") or "job"
    if base is not None:
        base.mkdir(mode=0o711, parents=True, exist_ok=True)   # 0711: a job user may reach its own run in it
        st = os.lstat(base)   # at a guessable path in /tmp: it must be ours, or someone could swap runs in it
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise Refused(f"{base} is not a private directory of this node's user (someone else made it?): "
                          "remove it and try again", reason="policy")
    return Path(tempfile.mkdtemp(prefix=f"vesta-{safe}-", dir=base))


def runs_dir(node: str, fingerprint: str) -> Path:
    """Where one node makes its runs' working directories: ``$TMPDIR/vesta-runs-NODE-FINGERPRINT8`` (two nodes
    of one name on a machine do not share it). A restarted daemon empties it (nothing can still be
    running), so a crash leaves no job trees behind."""
    return Path(tempfile.gettempdir()) / f"vesta-runs-{_UNSAFE_NAME_CHARS.sub('_', node)}-{fingerprint[:8]}"


def remove_if_empty(runs: Path | None) -> None:
    """At a clean stop: the node's ``runs_dir``, unless something is still in it (``keep_runs``)."""
    if runs is not None:
        with contextlib.suppress(OSError):
            runs.rmdir()


def remove_workdir(path: Path) -> None:
    """rm -rf ``path`` and its run's HOME (``home_of``), also where the job took away its own permissions;
    failures are logged."""
    home = home_of(path)
    try:   # ours or the run's (give_workdir), not what another user put there
        owners = {os.geteuid(), os.lstat(path).st_uid}
        ours = os.lstat(home).st_uid in owners
    except OSError:
        ours = False
    if ours:
        try:
            _remove_tree(home)
        except OSError as exc:
            log.warning("could not remove %s: %s", home, exc)
    _remove_tree(path)


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
        return
    if not path.is_dir():
        return
    _unlock_dirs(path)
    shutil.rmtree(path, ignore_errors=True)   # rmtree itself walks by descriptors and never follows a link
    if os.path.lexists(path):
        log.warning("could not remove job directory %s completely", path)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None) -> int:
    """A descriptor of directory ``name`` (in ``dir_fd``), never through a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        # Not root: the job runs as this very user (confine), so whatever chmod reaches through a link
        # the job swapped in, the job could have changed itself.
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _subdirs(fd: int) -> list[str]:
    with os.scandir(fd) as entries:
        return [e.name for e in entries if e.is_dir(follow_symlinks=False)]


def _unlock_dirs(path: Path) -> None:
    """Give every directory under ``path`` back u+rwx, top-down, so rmtree can list and empty it.

    Only through descriptors opened with O_NOFOLLOW: a job still running (it left the group, or it is
    another job of the same job user) may swap a directory for a symlink at any moment, and a root
    daemon that chmods by path would then chmod whatever the link points to."""
    try:
        top = _open_dir(str(path), None)
    except OSError:
        return
    stack: list[tuple[int, list[str]]] = []
    try:
        try:
            os.fchmod(top, 0o700)
            stack.append((top, _subdirs(top)))
        except OSError:
            os.close(top)
            return
        while stack:
            fd, names = stack[-1]
            if not names:
                os.close(fd)
                stack.pop()
                continue
            try:
                child = _open_dir(names.pop(), fd)   # a link swapped in since the listing: ELOOP/ENOTDIR
            except OSError:
                continue
            try:
                os.fchmod(child, 0o700)
                stack.append((child, _subdirs(child)))
            except OSError:
                os.close(child)
    finally:
        for fd, _ in stack:
            os.close(fd)
