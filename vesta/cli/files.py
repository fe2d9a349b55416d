"""Files the vesta CLI writes on this machine: a new key file, and artifacts copied out of the node's store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vesta.errors import ConfigError, VestaError

STDIN_NAME = ".vesta-stdin"   # the input a job's standard input travels as (in its working directory)
STDIN_CAP = 256 << 20         # bytes of standard input vesta exec reads (the node's exec_max_input_mb bounds it too)


@contextlib.contextmanager
def stdin_file(wanted: bool) -> Iterator[str | None]:
    """This process's standard input, read to its end into a private temporary file (removed afterwards) to
    ship with an exec job; None when not ``wanted`` or empty. More than STDIN_CAP bytes is an error."""
    if not wanted:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="vesta-stdin-"))
    try:
        path = tmp / STDIN_NAME
        size = 0
        with open(path, "wb") as out:
            while piece := sys.stdin.buffer.read(1 << 20):
                size += len(piece)
                if size > STDIN_CAP:
                    raise ConfigError(f"standard input is larger than {STDIN_CAP >> 20} MiB: ship it as a file with "
                                      "--put, or pass --no-stdin")
                out.write(piece)
        yield str(path) if size else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_key_file(output_path: Path, key: str) -> None:
    """A new key file, mode 0600, never over an existing one; its directory is made (0700) when missing."""
    parent = output_path.expanduser().parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(f"cannot make the directory {parent}: {exc.strerror}") from None
    try:
        fd = os.open(output_path.expanduser(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{output_path} already exists: choose another file or delete it first") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {output_path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")


def copy_artifacts(src: Path, files: list[dict[str, Any]], out: Path) -> list[str]:
    """Copy stored artifacts to ``out``, refusing to overwrite, each checked against its recorded SHA-256."""
    for f in files:
        if os.path.lexists(out / f["path"]):
            raise ConfigError(f"{out / f['path']} exists: choose another -o directory or remove it")
    done = []
    for f in files:
        dest = out / f["path"]
        h = hashlib.sha256()
        tmp = dest.with_name(dest.name + ".vesta-partial")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(src / f["path"], "rb") as fin, open(tmp, "xb") as fout:
                while piece := fin.read(1 << 20):
                    h.update(piece)
                    fout.write(piece)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise VestaError(f"cannot copy {f['path']}: {exc.strerror or exc}") from None
        if h.hexdigest() != f["sha256"]:
            tmp.unlink(missing_ok=True)
            raise VestaError(f"stored artifact {f['path']} no longer matches its SHA-256 (changed or damaged on "
                             f"disk in {src}): not copied")
        tmp.replace(dest)
        done.append(f["path"])
    return done
