"""One exception tree: every class lives in vesta/errors.py and has one exit code, and an error the daemon
raises reaches the CLI (and a Python caller) as the same class, with that code."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tests.helpers import Cluster
from vesta import errors
from vesta.cli.common import EXIT_CODES, EXIT_ERROR, EXIT_USAGE, exit_code
from vesta.control import RemoteError

PACKAGE = Path(errors.__file__).parent


def error_classes() -> list[type[errors.VestaError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.VestaError) and c.__module__ == errors.__name__]


def test_no_module_but_errors_declares_an_exception() -> None:
    """A class deriving from an exception anywhere else in the package is a second tree."""
    exception_names = {"Exception", "BaseException", "ValueError", "OSError", "RuntimeError", "LookupError",
                       *(c.__name__ for c in error_classes())}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                         for b in node.bases}
                if bases & exception_names or any(b.endswith(("Error", "Exception")) for b in bases):
                    found.append(f"{path.relative_to(PACKAGE)}: class {node.name}")
    assert found == []


def test_every_error_class_maps_to_one_exit_code() -> None:
    classes = error_classes()
    assert len(classes) >= 20
    assert sorted(c.__name__ for c in classes) == sorted(c.__name__ for c in EXIT_CODES)
    assert exit_code(errors.InvalidJob("x")) == EXIT_USAGE
    assert exit_code(errors.JobFailed("x")) == EXIT_ERROR
    assert exit_code(errors.DaemonNotRunning("x")) == 3


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__ or ""
    tree = " " + doc.replace("─", " ").replace("\n", " \n ")
    missing = [c.__name__ for c in error_classes() if f" {c.__name__} " not in tree]
    assert missing == []


@pytest.mark.parametrize("name", [c.__name__ for c in error_classes()])
def test_a_remote_error_is_both_the_daemons_class_and_remote_error(name: str) -> None:
    cls = errors.remote(name)
    exc = cls("said the daemon")
    assert isinstance(exc, RemoteError) and str(exc) == "said the daemon"
    if name != "RemoteError":
        assert isinstance(exc, getattr(errors, name))
        assert exit_code(exc) == EXIT_CODES[getattr(errors, name)]


def test_an_unknown_or_hostile_error_name_is_a_plain_remote_error() -> None:
    for name in ("NoSuchError", "Exception", "Path", None, 5, "__builtins__"):
        assert errors.remote(name) is RemoteError


def test_daemon_side_errors_reach_the_cli_with_their_exit_code(cluster: Cluster) -> None:
    a = cluster.add("a")
    bad_limit = a.vesta("jobs", "--limit", "0")            # the daemon refuses the request: a usage error
    assert bad_limit.returncode == EXIT_USAGE and "--limit must be from 1 to 10000" in bad_limit.stderr
    missing = a.vesta("show", "jnothere")                  # no such job: an error, not a usage error
    assert missing.returncode == EXIT_ERROR and "no job 'jnothere'" in missing.stderr
    nowhere = a.vesta("exec", "--on", "nowhere", "--", "true")   # the job fails
    assert nowhere.returncode == EXIT_ERROR and "no node named 'nowhere'" in nowhere.stderr
    with a.client() as c:                                  # a Python caller catches the class itself
        with pytest.raises(errors.InvalidJob, match="exec needs a command"):
            c.call("exec", argv=[])
        with pytest.raises(errors.NotFound, match="no peer named 'zed'"):
            c.call("ping", node="zed")
        with pytest.raises(errors.JobFailed):
            c.call("cpu", millions=1, on="nowhere")
