"""Which programs peers may run here: the exec allowlist, resolved to files.

The exec allowlist rule
=======================

An allowlist entry names a *file*, not a word. When the daemon starts, every
entry of ``exec_allowlist`` is resolved once:

- a bare name (``make``) is looked up in ``SAFE_PATH`` as ``execvp`` would:
  the first directory that holds an executable regular file of that name;
- an absolute path (``/opt/tools/bin/render``) is taken as written;
- then every symlink is followed (``os.path.realpath``). The result, say
  ``/usr/bin/make``, is the allowed file.

An entry that resolves to nothing (or a relative path such as ``bin/make``,
which has no directory to be relative to) is kept in ``Allowlist.missing``;
the daemon warns about it and it allows nothing. Files installed or moved
after start-up count from the next start.

A peer's ``argv[0]`` is resolved exactly as the node is about to execute it:
a bare name through ``SAFE_PATH``; anything containing ``/`` relative to the
job's fresh working directory (or absolute); symlinks followed and ``..``
taken on the real tree, as the kernel does. It must be an existing,
executable regular file, else the request is refused with ``not_found``.
It runs only if it *is* an allowed file: the same real path, or the same
inode on the same device (a hard link is that file under another name, not
a copy; its bytes cannot differ). The runner then executes the allowed
file's own real path, never the peer's spelling again. So with ``make``
allowed (``/usr/bin/make`` on this node):

- ``make``, ``/usr/bin/make``, ``/bin/make`` (merged ``/usr``),
  ``../../../usr/bin/make`` and a symlink or hard link named ``make`` that
  leads to ``/usr/bin/make`` all run ``/usr/bin/make``;
- ``./make``, ``/tmp/x/make`` or ``../bin/make`` that lead to any other file
  (a copy, a script, a symlink to ``/bin/sh``) are refused with
  ``not_allowed``, whatever they are called. Relative paths and ``..`` are
  refused unless the file they reach is itself allowed.

The name matters in one case. The program sees ``argv[0]`` as the peer wrote
it, and multi-call programs (busybox, toybox, coreutils built as one binary)
choose what to be from it: if ``true`` is ``/bin/busybox``, a peer asking for
``/bin/sh`` reaches the very same file. Therefore, when an allowed file's own
name differs from every name it was allowlisted under (``true`` ->
``busybox``, ``python3`` -> ``python3.11``), the last component of the peer's
``argv[0]`` must be one of those names (``python3``, ``./python3``,
``/usr/bin/python3``; not ``python3.11``). When the names agree (``make`` ->
``/usr/bin/make``) the file is enough.

The seed matched the *basename* of the requested program against the list.
That was dropped on purpose: a basename match lets ``./make`` -- a script the
job wrote and called make -- run anything.

What the allowlist cannot do:

- It checks the program, not what the program does with its arguments.
  Allowing an interpreter or anything that runs code or other programs it is
  given (``python3``, ``sh``, ``perl``, ``node``, ``make``, ``env``,
  ``xargs``, ``find``, ``nice``, ``timeout``, ``busybox``, ``ssh``) allows
  every program.
- It pins the file, not its contents: there is nothing to swap between the
  check and ``exec`` (the runner executes the checked real path, PATH and
  symlinks are not looked at again), but whoever can write the allowed file
  or its directory decides what runs. Allow only files in directories that
  only root (or the node owner) can write.
- An empty ``exec_allowlist`` with ``allow_exec`` on means any program at all
  (``Allowlist.any``); it still has to exist and be executable.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from vesta.errors import Refused

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"   # PATH jobs see and programs are looked up in
NOT_FOUND_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ELOOP, errno.EPERM}


# Programs that run code, or other programs, named in their arguments or read from their input files:
# allowing one of them allows every program to whoever holds the federation key. Matched against the names
# an entry was allowlisted under and the allowed file's own name, with any version suffix (python3.11) off.
CODE_RUNNERS = frozenset({
    # interpreters
    "python", "python2", "python3", "pypy", "pypy3", "perl", "ruby", "irb", "node", "nodejs", "deno", "bun",
    "php", "lua", "luajit", "tclsh", "wish", "expect", "Rscript", "R", "julia", "java", "jshell", "guile",
    "racket", "ghci", "runghc", "osascript", "pwsh", "gdb", "lldb", "awk", "gawk", "mawk", "nawk", "bc",
    # shells and multi-call binaries
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "csh", "tcsh", "busybox", "toybox",
    # programs that run others, or commands in their arguments or input files
    "env", "xargs", "find", "make", "gmake", "cmake", "ninja", "meson", "git", "nice", "nohup", "timeout",
    "stdbuf", "setsid", "chroot", "flock", "watch", "time", "script", "strace", "ltrace", "taskset",
    "ionice", "chrt", "prlimit", "setpriv", "unshare", "nsenter", "sudo", "su", "doas", "runuser", "ssh",
    "parallel", "sed", "tar", "rsync", "vi", "vim", "nvim", "emacs", "ed", "less", "more", "man", "pip",
    "pip3", "npm", "npx", "cargo", "go", "gcc", "cc", "clang", "tcc", "docker", "podman", "systemd-run",
})
_VERSION_SUFFIX = re.compile(r"[-.]?[0-9][0-9.]*$")


def runs_code(name: str) -> bool:
    """Whether ``name`` (a program's file name) is a program that runs code from its arguments or inputs."""
    return name in CODE_RUNNERS or _VERSION_SUFFIX.sub("", name) in CODE_RUNNERS


def _executable_file(path: str) -> bool:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)


def _search(name: str, search_path: str) -> str | None:
    """First executable regular file called ``name`` in ``search_path``, as execvp finds it.

    Unlike execvp, empty or relative components are skipped: they would mean the job's own directory.
    """
    for directory in search_path.split(os.pathsep):
        if directory and os.path.isabs(directory):
            candidate = os.path.join(directory, name)
            if _executable_file(candidate):
                return candidate
    return None


def _real_executable(path: str) -> str | None:
    try:
        real = os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        return None
    return real if _executable_file(real) else None


class Allowlist:
    """Programs peers may run. Built once from config ``exec_allowlist`` at daemon start (rule: module doc)."""

    def __init__(self, entries: Sequence[str], search_path: str = SAFE_PATH) -> None:
        self.entries = tuple(entries)
        self.search_path = search_path
        self.any = not self.entries        # allow_exec without a list: the owner allows every program
        self.missing: list[str] = []       # entries that resolve to nothing here; they allow nothing
        names: dict[str, set[str]] = {}
        for entry in self.entries:
            real = self._resolve_entry(entry)
            if real is None:
                self.missing.append(entry)
            else:
                names.setdefault(real, set()).add(os.path.basename(entry))
        # real path of each allowed file -> the names it was allowlisted under
        self.allowed: dict[str, frozenset[str]] = {path: frozenset(n) for path, n in names.items()}

    def _resolve_entry(self, entry: str) -> str | None:
        if not entry or "\0" in entry:
            return None
        if "/" not in entry:
            found = _search(entry, self.search_path)
            return None if found is None else _real_executable(found)
        return _real_executable(entry) if os.path.isabs(entry) else None

    def resolve(self, argv0: str, cwd: Path) -> str:
        """The real path the node will execute for ``argv0`` run in ``cwd``; ``Refused`` if it may not."""
        real = self._locate(argv0, cwd)
        if self.any:
            return real
        match = self._match(real)
        if match is None:
            raise Refused(f"{argv0!r} is not in this node's exec_allowlist (it is {real}; allowed: "
                          f"{', '.join(self.names()) or 'nothing'})", reason="not_allowed")
        path, names = match
        if os.path.basename(path) not in names and os.path.basename(argv0) not in names:
            raise Refused(f"{argv0!r} is not in this node's exec_allowlist ({path} is allowed only when "
                          f"called as {' or '.join(sorted(names))})", reason="not_allowed")
        return path

    def _locate(self, argv0: str, cwd: Path) -> str:
        if not argv0 or "\0" in argv0:
            raise Refused(f"program {argv0!r} is not a valid program name", reason="not_found")
        if "/" not in argv0:
            found = _search(argv0, self.search_path)
            if found is None:
                raise Refused(f"program {argv0!r} not found on this node (looked in {self.search_path})",
                              reason="not_found")
        else:
            found = os.path.join(os.path.abspath(cwd), argv0)   # an absolute argv0 replaces cwd
        try:
            real = os.path.realpath(found, strict=True)
        except (OSError, ValueError) as exc:
            raise Refused(f"program {argv0!r} not found on this node", reason="not_found") from exc
        if not _executable_file(real):
            raise Refused(f"program {argv0!r} ({real}) is not an executable file", reason="not_found")
        return real

    def _match(self, real: str) -> tuple[str, frozenset[str]] | None:
        names = self.allowed.get(real)
        if names is not None:
            return real, names
        try:
            st = os.stat(real)
        except OSError:
            return None
        for path, names in self.allowed.items():
            try:
                allowed = os.stat(path)     # now, not at start: an inode number freed by an upgrade is reused
            except OSError:
                continue
            if (allowed.st_dev, allowed.st_ino) == (st.st_dev, st.st_ino):
                return path, names          # a hard link: run the allowed path itself, not the job's link
        return None

    def names(self) -> list[str]:
        return sorted(n for names in self.allowed.values() for n in names)

    def code_runners(self) -> list[str]:
        """The allowed programs that run code from their arguments or inputs (``CODE_RUNNERS``): each
        grants arbitrary code to every key holder. Also ``["any program"]`` for an empty list."""
        if self.any:
            return ["any program"]
        return sorted(" / ".join(sorted(names)) for path, names in self.allowed.items()
                      if any(runs_code(n) for n in (*names, os.path.basename(path))))

    def describe(self) -> list[str]:
        """One line per allowed program, then the missing entries (for status output)."""
        if self.any:
            return ["any program (exec_allowlist is empty)"]
        lines = [f"{' / '.join(sorted(names))} -> {path}" for path, names in sorted(self.allowed.items())]
        lines += [f"{entry} (not found on this node: allows nothing)" for entry in self.missing]
        return lines
