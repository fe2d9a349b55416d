"""The distributables: `python -m build` makes an sdist and a wheel (from the sdist, so the sdist is complete);
the wheel installed into a fresh venv runs a daemon that answers `vesta status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import vesta
from tests.helpers import eventually, free_udp_port, new_key, short_tmpdir

pytestmark = [pytest.mark.packaging, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # Never from the checkout: its vesta/ would shadow the installed one.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                         cwd="/")
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out


def test_wheel_and_sdist_build_and_the_wheel_runs_a_node_from_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # The build tools come from the test venv (scripts/setup installs them): no network needed.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)])
    wheels, sdists = list(dist.glob("vesta-*.whl")), list(dist.glob("vesta-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    with tarfile.open(sdists[0]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "vesta/data/config.example.json", "vesta/data/vestad.service"} <= names
    with zipfile.ZipFile(wheels[0]) as wheel:
        files = set(wheel.namelist())
        metadata = wheel.read(next(n for n in files if n.endswith(".dist-info/METADATA"))).decode()
    assert {"vesta/data/config.example.json", "vesta/data/vestad.service", "vesta/__main__.py"} <= files
    assert "License-Expression: MIT" in metadata

    fresh = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(fresh)])
    run([str(fresh / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])])
    # vesta's dependencies come from the test venv (a .pth line), vesta itself only from the wheel.
    site = run([str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
               ).stdout.strip()
    Path(site, "deps-from-test-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = run([str(fresh / "bin" / "python"), "-c", "import vesta; print(vesta.__file__)"]).stdout
    assert where.startswith(str(fresh)), where

    bin_ = fresh / "bin"
    assert run([str(bin_ / "vestad"), "--version"]).stdout.startswith(f"vestad {vesta.__version__}\n")
    example = json.loads(run([str(bin_ / "vestad"), "--print-config-example"]).stdout)
    assert "cpu_offer_pct" in example
    unit = run([str(bin_ / "vestad"), "--print-systemd-unit"]).stdout
    assert "RestartPreventExitStatus=2" in unit and f"ExecStart={bin_ / 'vestad'}" in unit
    assert run([str(bin_ / "python"), "-m", "vesta", "--version"]).stdout.startswith("vesta ")

    runtime = short_tmpdir()
    env = {k: v for k, v in os.environ.items() if k != "VESTA_NAME"}
    env.update(XDG_RUNTIME_DIR=str(runtime), VESTA_KEY=new_key(), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    log = open(tmp_path / "vestad.log", "wb")
    proc = subprocess.Popen([str(bin_ / "vestad"), "--name", "fromwheel", "--port", "0", "--dport",
                             str(free_udp_port()), "--bind", "127.0.0.1", "--state-dir", str(tmp_path / "state")],
                            env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd="/")
    try:
        def status() -> dict[str, object] | None:
            out = subprocess.run([str(bin_ / "vesta"), "status", "--json"], env=env, capture_output=True, text=True,
                                 cwd="/")
            return json.loads(out.stdout) if out.returncode == 0 else None
        answer = eventually(status, 20, what="the wheel's vestad to answer `vesta status`")
        assert answer["name"] == "fromwheel" and answer["version"] == vesta.__version__
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        log.close()
