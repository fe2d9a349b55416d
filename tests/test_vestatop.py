"""vestatop: frames rendered from recorded snapshots, the CLI against real daemons, and a real terminal (tmux)."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shlex
import subprocess
import termios
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.helpers import Cluster, eventually, need_tool, tool
from vesta.cli.vestatop import Keys, Monitor, render
from vesta.errors import DaemonNotRunning

NOW = 1_700_000_000.0


def row(name: str, state: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name, "fingerprint": name * 4, "address": "127.0.0.1:7777", "state": state, "cores": 4,
        "cpu_pct": 10.0, "cpu_per_core": [10, 10, 10, 10], "load1": 0.4, "mem_total_mb": 8192,
        "mem_avail_mb": 6144, "offered_cores": 3.0, "offered_mem_mb": 1024, "spare_cores": 3.0, "power": "grid",
        "willingness": 1.0, "battery_pct": None, "temp_c": None, "gpus": [], "labels": [], "version": "0.1.0",
        "uptime_s": 100.0, "last_seen_s": 0.2,
    }
    return base | kw


def snapshot(**extra: Any) -> dict[str, Any]:
    """desk (self) borrows from pi4; laptop has gone quiet; desk also works on its own job."""
    nodes = [
        row("desk", "self", cores=8, cpu_pct=35.0, cpu_per_core=[90, 5, 40, 10, 0, 100, 30, 5], last_seen_s=0.0),
        row("pi4", "alive", cpu_pct=97.0, cpu_per_core=[100, 95, 99, 94], spare_cores=0.0, mem_avail_mb=2048),
        row("laptop", "suspect", power="battery", battery_pct=72.0, last_seen_s=4.2),
    ]
    return {
        "time": NOW, "self": "desk", "fingerprint": "desk" * 4, "beacon_interval_ms": 1000, "expire_after": 10,
        "suspect_after": 3, "nodes": nodes,
        "flows": [{"from": "pi4", "to": "desk", "job_id": "j1", "kind": "cpu", "chunks": 3, "done": 60_000_000,
                   "rate": 32_812_500.0}],
        "local_work": [{"from": "desk", "to": "desk", "job_id": "j1", "kind": "cpu", "chunks": 1,
                        "done": 20_000_000, "rate": 10_000_000.0}],
        "jobs": [{"job_id": "j1", "kind": "cpu", "started": NOW - 3}], "hosting": 0,
        "stress": {"active": False, "cores": 0},
        "events": [{"ts": NOW - 60, "kind": "peer_joined", "text": "pi4 joined"},
                   {"ts": NOW - 5, "kind": "peer_suspect", "text": "laptop suspect"},
                   {"ts": NOW - 1, "kind": "job_done", "text": "j0 cpu 20M iterations on desk, pi4 in 1.02s"}],
        "counters": {},
    } | extra


def frame(snap: dict[str, Any] | None, width: int, height: int, **kw: Any) -> str:
    console = Console(record=True, width=width, height=height, color_system="truecolor", file=io.StringIO())
    console.print(render(snap, width, height, **kw))
    text = console.export_text()
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= height, f"frame of {len(lines)} lines does not fit {height}:\n{text}"
    assert all(len(line) <= width for line in lines)
    return text


def line_of(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name + " "))


def test_frame_at_80x24_has_nodes_bars_flows_and_events() -> None:
    text = frame(snapshot(), 80, 24)
    assert text.splitlines()[0].startswith("vestatop  desk  3 nodes (1 suspect)  1 flow")
    desk, pi4, laptop = line_of(text, "desk"), line_of(text, "pi4"), line_of(text, "laptop")
    assert "35%" in desk and "█" in desk and "░" in desk
    assert "97%" in pi4 and "batt 72%" in laptop and "4.2s" in laptop
    assert "0.0/3.0" in desk and "3.0/3.0" in pi4          # busy/offered cores
    assert "pi4 → desk  cpu 3 chunks  2.10 GB/s" in text   # rate x 64 bytes per block
    assert "desk ⟲ desk  cpu 1 chunk  0.64 GB/s" in text and "(own)" in text
    assert "job_done" in text and "pi4 joined" in text
    assert "per core" not in text and "ledger" not in text and "lending" not in text
    assert text.index("desk ") < text.index("laptop ") < text.index("pi4 ")   # self first, then by name


def test_frame_at_160x50_adds_per_core_bars_and_sizes() -> None:
    text = frame(snapshot(), 160, 50)
    header = next(line for line in text.splitlines() if line.startswith("node"))
    assert "per core" in header and "cores" in header and "busy/offer" in header
    assert line_of(text, "desk").split("%")[1].split()[0] == "█▁▄▁▁█▃▁"   # a glyph per core, height = load
    assert line_of(text, "pi4").split("%")[1].split()[0] == "████"
    assert "suspect 4.2s" in line_of(text, "laptop") and "battery 72%" in text
    assert "2.0/8.0G" in line_of(text, "desk")
    assert "q quit  p pause  s sort  ? help" in text
    assert "pi4 → desk  cpu 3 chunks  2.10 GB/s" in text


def test_suspect_rows_are_grey() -> None:
    console = Console(record=True, width=160, height=50, color_system="truecolor", file=io.StringIO())
    console.print(render(snapshot(), 160, 50))
    html = console.export_html(inline_styles=True)
    laptop = html[html.index("laptop"):html.index("laptop") + 400]
    assert "#808080" in laptop   # grey50


def test_ledger_and_lending_columns_appear_when_the_daemon_sends_them() -> None:
    snap = snapshot()
    snap["nodes"][0]["lending"] = "closed"
    snap["nodes"][1] |= {"balance": -5400.0, "ledger_state": "capped", "lending": "open"}
    snap["nodes"][2] |= {"balance": 12.4, "ledger_state": "ok", "lending": "open"}
    wide = frame(snap, 160, 50)
    assert "ledger" in wide and "lending" in wide
    assert "-1.5ch capped" in line_of(wide, "pi4") and "+12cs" in line_of(wide, "laptop")
    assert "closed" in line_of(wide, "desk")
    narrow = frame(snap, 80, 24)
    assert "-1.5ch!" in line_of(narrow, "pi4") and " no " in line_of(narrow, "desk")


def test_sort_keeps_self_first() -> None:
    text = frame(snapshot(), 80, 24, sort="cpu")
    assert "sort cpu" in text
    assert text.index("desk ") < text.index("pi4 ") < text.index("laptop ")
    snap = snapshot()
    snap["nodes"][2]["cpu_pct"] = 99.0
    text = frame(snap, 80, 24, sort="cpu")
    assert text.index("desk ") < text.index("laptop ") < text.index("pi4 ")


def test_disconnected_paused_and_help_frames() -> None:
    error = "disconnected from vestad desk — retrying every 1s (last error: vestad closed the connection)"
    text = frame(snapshot(), 160, 50, error=error, paused=True)
    assert error in text and "PAUSED" in text and "pi4 → desk" in text   # the last snapshot, dimmed
    text = frame(None, 80, 24, error=error)
    assert text.splitlines()[1].startswith("disconnected from vestad desk") and "no data yet" in text
    assert "waiting for the first snapshot" in frame(None, 80, 24)
    text = frame(snapshot(), 80, 24, show_help=True)
    assert "q  quit" in text and "pi4 →" not in text


def test_a_crowded_federation_still_fits_80x24() -> None:
    snap = snapshot()
    snap["nodes"] += [row(f"n{i:02}", "alive") for i in range(40)]
    snap["flows"] = [dict(snap["flows"][0], **{"from": f"n{i:02}"}) for i in range(12)]
    snap["events"] = snap["events"] * 10
    text = frame(snap, 80, 24)
    assert "more" in text and "no active flows" not in text
    assert frame(snap, 160, 50).count("→") >= 2


def test_sparse_or_odd_snapshots_do_not_crash() -> None:
    frame({}, 80, 24)
    frame({"nodes": [{"name": "x"}], "flows": [{"from": "y"}], "events": [{}]}, 80, 24)
    frame({"nodes": [row("x", "alive", cpu_pct=None, cpu_per_core=["?", -5, 250], mem_total_mb=0)]}, 160, 50)
    frame(snapshot(), 40, 10)


class FakeClient:
    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.closed = False

    def call(self, op: str, **args: Any) -> Any:
        assert op == "snapshot"
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        self.closed = True


def test_monitor_reconnects_and_keeps_the_last_snapshot() -> None:
    snap = snapshot()
    clients = [FakeClient([snap, DaemonNotRunning("vestad closed the connection")]), FakeClient([snap])]
    attempts: list[str | None] = []

    def connect(name: str | None) -> Any:
        attempts.append(name)
        if len(attempts) == 2:
            raise DaemonNotRunning("no socket")
        return clients.pop(0)

    m = Monitor("desk", 0.5, connect=connect)
    m.poll()
    assert m.snapshot == snap and m.error is None
    m.poll()
    assert m.error == ("disconnected from vestad desk — retrying every 0.5s "
                       "(last error: vestad closed the connection)")
    assert m.snapshot == snap
    console = Console(record=True, width=80, height=24, file=io.StringIO())
    console.print(m.frame(80, 24))
    assert "disconnected from vestad desk" in console.export_text()
    m.poll()
    assert m.error is not None and "no socket" in m.error
    m.poll()
    assert m.error is None and len(attempts) == 3


def test_monitor_keys() -> None:
    m = Monitor(None, 1.0, connect=lambda n: FakeClient([]))   # type: ignore[arg-type,return-value]
    assert m.key("s") and m.sort == "cpu"
    assert m.key("ss") and m.sort == "spare"
    assert m.key("s") and m.sort == "name"
    assert m.key("p") and m.paused
    assert m.key("?") and m.show_help
    assert m.key("\x1b") and not m.show_help
    assert not m.key("xq")


def test_keys_reads_a_terminal_without_blocking_and_restores_it() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "r") as tty_in:
        before = termios.tcgetattr(slave)
        with Keys(tty_in) as keys:
            assert not termios.tcgetattr(slave)[3] & termios.ICANON   # cbreak: no line buffering
            assert keys.read(0.01) == ""
            os.write(master, b"q")
            assert keys.read(1.0) == "q"
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), Keys(tty_in):
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    os.close(master)


# ---------------------------------------------------------------- the CLI, real processes


def run(cmd: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_once_and_json_without_a_daemon_exit_3(runtime_dir: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    for args in (["--once"], ["--json"], ["-name", "ghost", "--once"], []):
        out = run(tool("vestatop") + args, env)
        assert out.returncode == 3, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vestatop: error: ") and "not running" in lines[0]
    out = run(tool("vestatop") + ["--interval", "0"], env)
    assert out.returncode == 2 and "--interval" in out.stderr
    out = run(tool("vestatop") + ["--frobnicate"], env)
    assert out.returncode == 2 and "--frobnicate" in out.stderr


@pytest.mark.integration
def test_once_and_json_against_a_real_pair(cluster: Cluster) -> None:
    a = cluster.add("a")
    cluster.add("b")
    eventually(lambda: a.peer_names() == {"b"}, 10, what="a to see b")
    env = a.env | {"COLUMNS": "160", "LINES": "50"}
    out = run(tool("vestatop") + ["-name", "a", "--once"], env)
    assert out.returncode == 0, out.stderr
    assert line_of(out.stdout, "a").split()[-1] == "self" and line_of(out.stdout, "b")
    assert "per core" in out.stdout and "\x1b[" not in out.stdout   # wide, and no colour into a pipe
    out = run(tool("vestatop") + ["-name", "a"], env | {"COLUMNS": "80", "LINES": "24"})  # a pipe gets one frame
    assert out.returncode == 0 and "per core" not in out.stdout and line_of(out.stdout, "b")
    out = run(tool("vestatop") + ["-name", "a", "--json"], env)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["self"] == "a" and {r["name"] for r in snap["nodes"]} == {"a", "b"}


# ---------------------------------------------------------------- a real terminal


def tmux_or_skip() -> str:
    return need_tool("tmux", "tmux")


_BAR_PCT = re.compile(r"[█▏▎▍▌▋▊▉░]+ +(\d+)%")


def cpu_of(pane: str, name: str) -> int | None:
    for line in pane.splitlines():
        if line.startswith(name + " ") and (m := _BAR_PCT.search(line)):
            return int(m.group(1))
    return None


@pytest.mark.integration
def test_live_under_tmux_shows_the_flow_the_cpu_rise_and_survives_a_restart(cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    tmux = [tmux_or_skip(), "-L", f"vestatop-{os.getpid()}-{secrets.token_hex(4)}", "-f", "/dev/null"]
    cfg = tmp_path / "lend.json"
    cfg.write_text(json.dumps({"cpu_offer_pct": 100, "reserve_pct": 0}))
    a = cluster.add("a", cpus="0", args=["-config", str(cfg)])
    # b measures its real core, so its bar rises only because it hashes for a.
    b = cluster.add("b", cpus="1", args=["-config", str(cfg)])
    eventually(lambda: a.peer_names() == {"b"} and b.peer_names() == {"a"}, 10, what="the pair to meet")
    # vestatop shares a's core, never b's, so b's bar shows b's work only.
    cmd = " ".join(shlex.quote(p) for p in ["env", f"XDG_RUNTIME_DIR={cluster.runtime_dir}", "taskset", "-c", "0",
                                             *tool("vestatop"), "-name", "a", "--interval", "0.3"])
    results: list[Any] = []

    def pane() -> str:
        out = subprocess.run(tmux + ["capture-pane", "-p", "-t", "top"], capture_output=True, text=True, timeout=10)
        return out.stdout

    try:
        subprocess.run(tmux + ["new-session", "-d", "-s", "top", "-x", "160", "-y", "50", cmd], check=True,
                       timeout=10)
        eventually(lambda: cpu_of(pane(), "a") is not None and cpu_of(pane(), "b") is not None, 15,
                   interval=0.1, what=f"both nodes on screen:\n{pane()}")
        eventually(lambda: (cpu_of(pane(), "b") or 100) < 50, 20, interval=0.1, what="b's core to look idle")
        before = cpu_of(pane(), "b")
        eventually(lambda: next(p for p in a.peers() if p["name"] == "b")["spare_cores"] >= 0.5, 10,
                   what="b to advertise a spare core")

        def submit() -> None:
            try:
                results.append(a.call("cpu", millions=300))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results.append(exc)
        job = threading.Thread(target=submit, daemon=True)
        job.start()
        seen = {"flow": "", "cpu": 0}

        def flow_and_rise() -> bool:
            text = pane()
            if re.search(r"^b → a  cpu \d+ chunks?  \d+\.\d\d GB/s", text, re.M):
                seen["flow"] = text
            seen["cpu"] = max(seen["cpu"], cpu_of(text, "b") or 0)
            return bool(seen["flow"]) and seen["cpu"] >= 80
        eventually(flow_and_rise, 30, interval=0.1, what=f"the flow b → a and b's bar to rise: {seen}\n{pane()}")
        assert before is not None and seen["cpu"] > before
        job.join(timeout=120)
        assert results and isinstance(results[0], dict), results
        assert {p["node"] for p in results[0]["parts"]} == {"a", "b"}
        eventually(lambda: "no active flows" in pane(), 10, interval=0.1, what="the flows to end")

        a.stop()
        eventually(lambda: "disconnected from vestad a" in pane(), 10, interval=0.1, what="the disconnected banner")
        assert "Traceback" not in pane()
        a.start()
        eventually(lambda: "disconnected" not in (text := pane()) and cpu_of(text, "a") is not None
                   and cpu_of(text, "b") is not None, 20, interval=0.1, what=f"recovery:\n{pane()}")

        subprocess.run(tmux + ["send-keys", "-t", "top", "q"], check=True, timeout=10)
        eventually(lambda: subprocess.run(tmux + ["has-session", "-t", "top"], capture_output=True,
                                          timeout=10).returncode != 0, 10, what="q to quit vestatop")
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=10)
        for node in (a, b):
            node.stop()
