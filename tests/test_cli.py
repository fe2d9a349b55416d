"""The command-line tools as a user meets them: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import Cluster, eventually, free_udp_port, short_tmpdir, tool
from vesta.cli.tables import peers_table
from vesta.cli.vesta import cli as vesta_cli
from vesta.control import find_socket
from vesta.errors import ConfigError, DaemonNotRunning


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith(f"{prog}: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_vesta_without_a_daemon_says_so_and_exits_3(runtime_dir: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    for args in (["peers"], ["status", "--json"], ["-name", "ghost", "peers"]):
        out = run(tool("vesta") + args, env)
        assert out.returncode == 3, out
        line = one_error_line(out.stderr, "vesta")
        assert "not running" in line and "vestad -name" in line
        assert out.stdout == ""


def test_find_socket_rules(runtime_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning):
        find_socket(None, runtime_dir)
    socks = []
    for name in ("a", "b"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(runtime_dir / f"vestad-{name}.sock"))
        socks.append(s)
    try:
        with pytest.raises(ConfigError, match=r"several vestad are running \(a, b\)"):
            find_socket(None, runtime_dir)
        assert find_socket("b", runtime_dir) == runtime_dir / "vestad-b.sock"
        os.environ["VESTA_NAME"] = "a"
        try:
            assert find_socket(None, runtime_dir) == runtime_dir / "vestad-a.sock"
        finally:
            del os.environ["VESTA_NAME"]
        (runtime_dir / "vestad-b.sock").unlink()
        assert find_socket(None, runtime_dir) == runtime_dir / "vestad-a.sock"
    finally:
        for s in socks:
            s.close()


@pytest.mark.integration
def test_several_daemons_need_a_name(cluster: Cluster) -> None:
    a = cluster.add("one")
    cluster.add("two")
    env = dict(a.env)
    out = run(tool("vesta") + ["peers"], env)
    assert out.returncode == 2
    assert "several vestad are running (one, two)" in one_error_line(out.stderr, "vesta")
    env["VESTA_NAME"] = "two"
    out = run(tool("vesta") + ["status", "--json"], env)
    assert out.returncode == 0 and json.loads(out.stdout)["name"] == "two"


@pytest.mark.integration
def test_second_daemon_with_the_same_name_refuses_to_start(cluster: Cluster) -> None:
    first = cluster.add("twin")
    second = cluster.add("twin", start=False)
    out = run(second.command(), second.env)
    assert out.returncode == 2
    assert "a vestad named 'twin' is already running" in out.stderr
    assert first.running() and first.status()["name"] == "twin"


@pytest.mark.integration
def test_port_in_use_is_a_clear_error(cluster: Cluster) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        node = cluster.add("blocked", start=False, port=port)
        out = run(node.command(), node.env)
        assert out.returncode == 2
        assert f"TCP port {port} is already in use" in out.stderr and "-port" in out.stderr
        assert "Traceback" not in out.stderr
        assert not (cluster.runtime_dir / "vestad-blocked.sock").exists()   # nothing left behind
    finally:
        holder.close()


@pytest.mark.integration
def test_sigint_stops_cleanly(cluster: Cluster) -> None:
    node = cluster.add("ctrlc")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGINT)
    assert node.proc.wait(timeout=10) == 0
    assert not (cluster.runtime_dir / "vestad-ctrlc.sock").exists()
    assert "stopped" in node.log()


def test_too_long_socket_path_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(deep), VESTA_KEY="k" * 20)
    out = run(tool("vestad") + ["-name", "n" * 30, "-port", "0", "-dport", str(free_udp_port()),
                                "-state-dir", str(tmp_path / "s")], env)
    assert out.returncode == 2
    assert "longer than 107 bytes" in out.stderr and "XDG_RUNTIME_DIR" in out.stderr


def test_keygen_prints_or_writes_a_private_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(vesta_cli, ["keygen"])
    assert result.exit_code == 0
    key = result.output.strip()
    assert len(key) >= 40 and key != CliRunner().invoke(vesta_cli, ["keygen"]).output.strip()

    target = tmp_path / "fed.key"
    out = run(tool("vesta") + ["keygen", "-o", str(target)])
    assert out.returncode == 0 and str(target) in out.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().strip()) >= 40
    before = target.read_text()
    out = run(tool("vesta") + ["keygen", "-o", str(target)])
    assert out.returncode == 2 and "already exists" in one_error_line(out.stderr, "vesta")
    assert target.read_text() == before   # the existing key was not overwritten


def test_unknown_command_and_flag_are_one_line(runtime_dir: Path) -> None:
    out = run(tool("vesta") + ["frobnicate"])
    assert out.returncode == 2 and "frobnicate" in one_error_line(out.stderr, "vesta")
    out = run(tool("vesta") + ["peers", "--jsn"])
    assert out.returncode == 2 and "--jsn" in one_error_line(out.stderr, "vesta")


def test_peers_table_renders_rows() -> None:
    from rich.console import Console

    rows = [
        {"name": "desk", "state": "self", "address": "*:7777", "cores": 8, "cpu_pct": 12.0, "mem_avail_mb": 11_000,
         "offered_cores": 6.0, "offered_mem_mb": 1024, "spare_cores": 5.5, "power": "grid", "battery_pct": None,
         "gpus": [{"name": "RTX 3060"}], "last_seen_s": 0.0},
        {"name": "pi4", "state": "suspect", "address": "192.168.1.31:7777", "cores": 4, "cpu_pct": 3.0,
         "mem_avail_mb": 3000, "offered_cores": 3.0, "offered_mem_mb": 1024, "spare_cores": 3.0,
         "power": "solar", "battery_pct": 72.0, "gpus": [], "last_seen_s": 2.5},
    ]
    console = Console(record=True, width=160)
    console.print(peers_table(rows))
    text = console.export_text()
    assert "desk (self)" in text and "pi4 (suspect)" in text
    assert "RTX 3060" in text and "solar 72%" in text and "192.168.1.31:7777" in text
    assert "10.7 GiB" in text and "2s ago" in text


@pytest.mark.integration
def test_stale_socket_from_a_killed_daemon_is_replaced(cluster: Cluster) -> None:
    node = cluster.add("phoenix")
    node.kill()
    sock = cluster.runtime_dir / "vestad-phoenix.sock"
    assert sock.exists()  # SIGKILL leaves it behind
    node.start()
    assert node.status()["name"] == "phoenix"
    eventually(lambda: sock.is_socket(), 2)


def test_stray_file_in_the_socket_place_is_not_clobbered(runtime_dir: Path, tmp_path: Path) -> None:
    (runtime_dir / "vestad-stray.sock").write_text("precious")
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir), VESTA_KEY="k" * 20)
    out = run(tool("vestad") + ["-name", "stray", "-port", "0", "-dport", str(free_udp_port()),
                                "-state-dir", str(tmp_path / "s")], env)
    assert out.returncode == 2 and "exists and is not a socket" in out.stderr
    assert (runtime_dir / "vestad-stray.sock").read_text() == "precious"


def test_short_tmpdir_fits_socket_paths() -> None:
    d = short_tmpdir()
    try:
        assert len(str(d / "vestad-a-long-node-name-here.sock")) < 107
    finally:
        d.rmdir()
