"""Shared test helpers: real vestad processes, free ports, bounded waiting."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from vesta.control import ControlClient

BIN = Path(sys.executable).parent


def tool(name: str) -> list[str]:
    """The installed console script (what users run), or the module as a fallback."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    return [sys.executable, "-m", f"vesta.cli.{name}"]


class FakeClock:
    """Time that moves only when a test says so (for the pure units that take a ``clock``)."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    @property
    def now(self) -> float:
        return self.t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def new_key() -> str:
    return secrets.token_hex(24)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir(prefix: str = "vt") -> Path:
    """A short directory under /tmp: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def eventually(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the predicate may fail until the condition holds
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


async def eventually_async(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            value = pred()
            if value:
                return value
            await asyncio.sleep(interval)


class Vestad:
    """One real vestad process, stopped by ``stop()`` / ``kill()`` (the fixture does it for you)."""

    def __init__(self, name: str, key: str, dport: int, state_dir: Path, runtime_dir: Path,
                 args: Sequence[str] = (), netns: str | None = None, interval_ms: int = 200,
                 bind: str | None = "127.0.0.1", port: int = 0, cpus: str | None = None) -> None:
        self.name = name
        self.key = key
        self.dport = dport
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.args = list(args)
        self.netns = netns
        self.interval_ms = interval_ms
        self.bind = bind
        self.port = port
        self.cpus = cpus          # e.g. "0": pin the daemon (taskset) as if it were a one-core machine
        self.log_path = runtime_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"XDG_RUNTIME_DIR": str(self.runtime_dir), "VESTA_KEY": self.key})
        env.pop("VESTA_NAME", None)
        return env

    def command(self) -> list[str]:
        cmd = tool("vestad") + ["-name", self.name, "-dport", str(self.dport), "-port", str(self.port),
                                "-state-dir", str(self.state_dir), "-advertise-spare", str(self.interval_ms),
                                "-v"]
        if self.bind:
            cmd += ["-bind", self.bind]
        cmd += self.args
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def start(self, wait: bool = True) -> Vestad:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"vestad {self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return bool(self.status())
        eventually(ready, timeout, what=f"vestad {self.name} to answer on its control socket")

    def client(self) -> ControlClient:
        return ControlClient.connect(self.name, self.runtime_dir, timeout=10.0)

    def call(self, op: str, **args: Any) -> Any:
        with self.client() as c:
            return c.call(op, **args)

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def peers(self) -> list[dict[str, Any]]:
        return [r for r in self.call("peers") if r["state"] != "self"]

    def peer_names(self) -> set[str]:
        return {r["name"] for r in self.peers()}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def vesta(self, *args: str, timeout: float = 30.0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real `vesta` CLI against this daemon (``stdin``: what it reads on its standard input)."""
        cmd = tool("vesta") + ["-name", self.name, *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL if stdin is None else None, input=stdin)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash or power cut would leave it."""
        if self.running():
            assert self.proc is not None
            self._signal_tree(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_tree(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_tree(signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def _signal_tree(self, sig: int) -> None:
        assert self.proc is not None
        if self.netns:
            # `ip netns exec` execs the daemon, so the pid is the daemon's own.
            pass
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def idle_proc(root: Path, cores: int = 2, mem_total_mb: int = 8192, mem_avail_mb: int = 6144) -> Path:
    """A /proc fixture of an idle machine (static counters: 0 % busy) for a daemon's -proc-root.

    On this 2-core test machine every process shares the cores, so "a peer machine that is idle"
    cannot be real; this makes it so, for the daemon that plays the peer.
    """
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"cpu  {100 * cores} 0 {100 * cores} {10000 * cores} 0 0 0 0 0 0"]
    lines += [f"cpu{i} 100 0 100 10000 0 0 0 0 0 0" for i in range(cores)]
    (root / "stat").write_text("\n".join(lines) + "\n")
    (root / "meminfo").write_text(f"MemTotal: {mem_total_mb * 1024} kB\nMemFree: {mem_avail_mb * 1024} kB\n"
                                  f"MemAvailable: {mem_avail_mb * 1024} kB\n")
    (root / "loadavg").write_text("0.00 0.00 0.00 1/100 1\n")
    return root


class Cluster:
    """Factory for vestad processes sharing one key, discovery port and runtime dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runtime_dir = short_tmpdir()
        self.key = new_key()
        self.dport = free_udp_port()
        self.nodes: list[Vestad] = []

    def add(self, name: str, *, key: str | None = None, start: bool = True, **kw: Any) -> Vestad:
        node = Vestad(name, key or self.key, kw.pop("dport", self.dport), self.base / name,
                      self.runtime_dir, **kw)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"===== {n.name}\n{n.log()}" for n in self.nodes)


def need_tool(name: str, what: str) -> str:
    """The path of a system tool a test needs. Missing: a failure in CI (scripts/setup installs it), a skip
    on a developer's machine without it."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is required in CI (scripts/setup installs it)")
        pytest.skip(f"{what} is not installed")
    return found
