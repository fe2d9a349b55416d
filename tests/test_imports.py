"""Every module imports alone (as python-zeroconf checks), and imports only flow downward."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import vesta
from tests.helpers import Cluster

PACKAGE_DIR = Path(vesta.__file__).parent

# Low -> high. A module imports from lower layers; within its own layer only along SAME_LAYER.
# Modules named in STYLE.md but not written yet (ledger, records, executor, autopilot) have their place
# already, so they land in the right layer when they arrive.
LAYERS: list[set[str]] = [
    {"vesta", "vesta.errors"},
    {"vesta.checks"},
    {"vesta.spec", "vesta.status", "vesta.paths", "vesta.schema"},
    {"vesta.sweepspec"},
    {"vesta.proto", "vesta.crypto", "vesta.wire", "vesta.identity", "vesta.config", "vesta.tasks", "vesta.logs",
     "vesta.hours", "vesta.proctree", "vesta.runfiles", "vesta.cgroup", "vesta.outcome"},
    {"vesta.allowlist"},
    {"vesta.rundir"},
    {"vesta.sysstat", "vesta.budget", "vesta.peertable", "vesta.ledger", "vesta.names", "vesta.records",
     "vesta.execrun", "vesta.artifacts", "vesta.workloads", "vesta.inputcache", "vesta.membership"},
    {"vesta.warm"},
    {"vesta.discovery", "vesta.link", "vesta.confine", "vesta.controlserver", "vesta.metrics",
     "vesta.retention"},
    {"vesta.autopilot"},
    {"vesta.placement"},
    {"vesta.hostexec", "vesta.capacity", "vesta.simnet"},
    {"vesta.host", "vesta.chunks"},
    {"vesta.submitter"},
    {"vesta.jobqueue"},
    {"vesta.sweep"},
    {"vesta.ops"},
    {"vesta.daemon", "vesta.control"},
    {"vesta.client"},
    {"vesta.cli"},  # and every vesta.cli.* module
    {"vesta.__main__"},  # python -m vesta: the vesta command
]
SAME_LAYER: dict[str, set[str]] = {
    "vesta.wire": {"vesta.proto", "vesta.crypto"},   # frames carry messages and sealed sessions
    "vesta.identity": {"vesta.crypto"},              # the fingerprint function
    "vesta.budget": {"vesta.sysstat"},               # PowerInfo
    "vesta.config": {"vesta.hours"},                 # lend_hours are checked when the config is read
}
# The package itself re-exports the Python API (vesta.Client, ...), imported lazily on first use.
PUBLIC_API = {"vesta": {"vesta.client"}}
# The control client is what the CLIs import: it must stay clear of the daemon and everything under it.
ONLY: dict[str, set[str]] = {
    "vesta.control": {"vesta.paths", "vesta.checks", "vesta.errors"},
}


def all_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


MODULES = all_modules()


def layer_of(module: str) -> int:
    if module == "vesta.cli" or module.startswith("vesta.cli."):
        return len(LAYERS) - 2   # the cli layer (only python -m vesta is above it)
    for rank, members in enumerate(LAYERS):
        if module in members:
            return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_imports.py (and STYLE.md)")


def module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = PACKAGE_DIR / rel / "__init__.py"
    return pkg if pkg.exists() else (PACKAGE_DIR / rel).with_suffix(".py")


def vesta_imports(module: str) -> set[str]:
    """Every vesta module ``module`` imports, anywhere in the file (lazy imports included)."""
    path = module_path(module)
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from vesta import proto" imports the module vesta.proto; "from vesta import __version__" the package.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "vesta" or t.startswith("vesta."))
    found.discard(module)
    return found


def test_every_module_has_a_layer() -> None:
    assert "vesta.daemon" in MODULES and "vesta.cli.vestad" in MODULES
    for module in MODULES:
        layer_of(module)


def test_the_import_scanner_sees_known_edges() -> None:
    """Guards the checker itself: it must find imports written in each style this package uses."""
    assert {"vesta.proto", "vesta.crypto", "vesta.errors"} <= vesta_imports("vesta.wire")   # from vesta import proto
    assert {"vesta", "vesta.sysstat", "vesta.link"} <= vesta_imports("vesta.daemon")        # __version__, modules
    assert "vesta.cli.common" in vesta_imports("vesta.cli.vestad")
    assert vesta_imports("vesta.errors") == set()


def violations(module: str, targets: set[str]) -> list[str]:
    """What is wrong with ``module`` importing ``targets``, per the layer rules above."""
    rank = layer_of(module)
    wrong = []
    for target in sorted(targets):
        if module in ONLY and target not in ONLY[module]:
            wrong.append(f"{module} may import only {sorted(ONLY[module])}, not {target}")
        elif module.startswith("vesta.cli.") and target.startswith("vesta.cli"):
            continue  # the CLIs share vesta.cli.common
        elif target in PUBLIC_API.get(module, set()):
            continue
        elif layer_of(target) == rank and target not in SAME_LAYER.get(module, set()):
            wrong.append(f"{module} imports {target} from its own layer")
        elif layer_of(target) > rank:
            wrong.append(f"{module} (layer {rank}) imports {target} (higher layer {layer_of(target)})")
    return wrong


def test_the_rules_catch_violations() -> None:
    assert violations("vesta.proto", {"vesta.daemon"})          # upward
    assert violations("vesta.errors", {"vesta.proto"})          # upward by one
    assert violations("vesta", {"vesta.daemon"})                # the package re-exports only the client
    assert violations("vesta.crypto", {"vesta.proto"})          # same layer, not allowed
    assert violations("vesta.control", {"vesta.daemon"})        # control stays clear of the daemon
    assert violations("vesta.control", {"vesta.crypto"})
    assert not violations("vesta.wire", {"vesta.proto", "vesta.crypto", "vesta.errors"})
    assert not violations("vesta.daemon", {"vesta.discovery", "vesta.errors", "vesta"})
    assert not violations("vesta.cli.vesta", {"vesta.cli.common", "vesta.control"})


@pytest.mark.parametrize("module", MODULES)
def test_imports_flow_downward(module: str) -> None:
    assert violations(module, vesta_imports(module)) == []


@pytest.fixture(scope="module")
def imported_alone() -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """Import every module in its own fresh interpreter, all at once to keep the suite fast."""
    procs = {
        m: subprocess.Popen([sys.executable, "-W", "error", "-c", f"import {m}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for m in MODULES
    }
    results = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=60)
        results[m] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    yield results


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str, imported_alone: dict[str, subprocess.CompletedProcess[str]]) -> None:
    proc = imported_alone[module]
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr}"
    assert proc.stderr == "", proc.stderr


_RECORD_IMPORTS = """
import sys

class Recorder:
    seen = []

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        cls.seen.append(name)
        return None

sys.meta_path.insert(0, Recorder)
import vesta.daemon
heavy = sorted({n.split(".")[0] for n in Recorder.seen} & {"numpy", "pandas", "scipy", "torch"})
print("numpy" in sys.modules, heavy)
"""


def test_daemon_does_not_import_numpy() -> None:
    """The idle daemon stays small: no numpy even attempted at import (it may be missing, too)."""
    proc = subprocess.run([sys.executable, "-c", _RECORD_IMPORTS], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "[]"], proc.stdout


# The `vesta` entry point as the console script runs it; at exit (after the command ran, whatever its exit
# code) it prints the top-level packages it loaded.
_CLI_PROBE = """
import atexit, json, sys
atexit.register(lambda: print("modules:", json.dumps(sorted({m.split(".")[0] for m in sys.modules})),
                              file=sys.stderr))
from vesta.cli.vesta import main
sys.argv = ["vesta", *sys.argv[1:]]
main()
"""
# What a command that only talks to the control socket must not import: the crypto libraries and numpy are
# most of a process's start-up time; rich is for drawing on a terminal, and JSON or a pipe needs none.
NOT_FOR_CONTROL = {"cryptography", "nacl", "numpy"}
NOT_FOR_JSON = NOT_FOR_CONTROL | {"rich"}


def cli_modules(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `vesta ARGS` (stdout a pipe) in a fresh interpreter: the process and the packages it had loaded."""
    proc = subprocess.run([sys.executable, "-c", _CLI_PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modules: ")]
    assert lines, proc.stderr
    return proc, set(json.loads(lines[-1].removeprefix("modules: ")))


def test_vesta_status_json_without_a_daemon_stays_light(tmp_path: Path) -> None:
    """The probe itself works (it sees what vesta loads), and `vesta status --json` that finds no daemon loads
    neither the crypto libraries, numpy nor rich."""
    env = dict(os.environ) | {"XDG_RUNTIME_DIR": str(tmp_path), "VESTA_NAME": "nosuch-probe"}
    proc, loaded = cli_modules(["status", "--json"], env)
    assert proc.returncode == 3 and "not running" in proc.stderr, proc.stderr
    assert {"vesta", "click", "msgpack"} <= loaded, loaded
    assert loaded & NOT_FOR_JSON == set(), proc.stderr


# Commands that only use the control socket, as a script runs them (stdout a pipe).
CONTROL_COMMANDS = [["status", "--json"], ["peers", "--json"], ["jobs", "--json"], ["ledger", "--json"],
                    ["show", "j0000000000"], ["cancel", "j0000000000"],
                    ["status"], ["jobs"]]   # in a pipe: tab-separated lines, no rich table


def test_the_cli_talks_to_its_daemon_without_the_crypto_libraries_numpy_or_rich(cluster: Cluster) -> None:
    """`vesta status` and the other commands that only use the control socket: importing cryptography, PyNaCl
    or numpy would be most of their start-up time, and rich is for a terminal (checked in the real process,
    against a real daemon, after the command ran)."""
    a = cluster.add("a")
    env = a.env | {"VESTA_NAME": "a"}
    for args in CONTROL_COMMANDS:
        proc, loaded = cli_modules(args, env)
        if "j0000000000" in args:
            assert proc.returncode == 1 and "j0000000000" in proc.stderr, proc.stderr   # the daemon answered
        else:
            assert proc.returncode == 0, proc.stderr
        if args == ["status", "--json"]:
            assert json.loads(proc.stdout)["name"] == "a"
        assert loaded & NOT_FOR_JSON == set(), f"vesta {' '.join(args)} loaded {sorted(loaded & NOT_FOR_JSON)}"
