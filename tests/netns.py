"""A throw-away routed LAN made of network namespaces, for real-process discovery tests.

``with Lan() as lan:`` builds, with names unique to this run (``vt`` + 4 hex
characters + a role)::

    host a1 (10.199.1.1/24) --veth--+
    host a2 (10.199.1.2/24) --veth--+-- br0 (10.199.1.254/24) [router ns, forwarding]
    host a3 (10.199.1.3/24) --veth--+                          10.199.2.254/24 --veth-- host d4 (10.199.2.4/24)

Every namespace has ``lo`` up and every host a default route via its router
address. All of it lives only inside namespaces this helper creates: nothing
is added to the root namespace and nothing is linked to the real network, so
no packet can leave. Leaving the ``with`` block (or a set-up failing half
way) deletes every namespace created, which deletes their veths and bridge
too. Names are random per run, so a leftover of a crashed run cannot clash.

Host addresses are added without ``brd``, as plain ``ip addr add`` does: the
kernel still routes the subnet broadcast (10.199.1.255), but getifaddrs
reports no broadcast address for them, which discovery must cope with.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

TIMEOUT = 10.0         # seconds for any one `ip` command
SUBNET_A = "10.199.1"  # the bridged LAN, /24
SUBNET_B = "10.199.2"  # the other subnet behind the router, /24
ROUTER = 254           # the router's host number on both subnets
NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    """A namespace command failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Host:
    ns: str          # namespace name, for `ip netns exec` / Vestad(netns=...)
    addr: str        # its IPv4 address
    subnet: str      # "A" or "B"


def run(cmd: Sequence[str], timeout: float = TIMEOUT) -> str:
    """Run a command, check it, return its stdout; a failure raises NetnsError with stderr."""
    try:
        done = subprocess.run(list(cmd), check=True, timeout=timeout, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        raise NetnsError(f"`{' '.join(cmd)}` exited with {exc.returncode}: "
                         f"{(exc.stderr or exc.stdout or '').strip() or 'no output'}") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{' '.join(cmd)}` did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise NetnsError(f"cannot run `{' '.join(cmd)}`: {exc}") from None
    return done.stdout


def _exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def available() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "no `ip` binary on PATH (install iproute2)"
    probe = f"vt{secrets.token_hex(2)}probe"
    try:
        run(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        # The LAN needs a bridge and veth pairs: check the kernel has them, inside the probe only.
        run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
    except NetnsError as exc:
        return f"network namespaces work but bridges or veth pairs do not: {exc}"
    finally:
        try:
            run(["ip", "netns", "del", probe])
        except NetnsError:
            pass
    return None


class Lan:
    """Three hosts bridged on subnet A, one host on subnet B, and the router between them."""

    def __init__(self, hosts_a: int = 3) -> None:
        if not 1 <= hosts_a <= 200:
            raise ValueError("hosts_a must be 1-200")
        self.tag = self._free_tag(hosts_a)
        self.router = f"{self.tag}r"
        self.hosts_a = [Host(f"{self.tag}a{i}", f"{SUBNET_A}.{i}", "A") for i in range(1, hosts_a + 1)]
        self.host_b = Host(f"{self.tag}b4", f"{SUBNET_B}.4", "B")
        self.router_a = f"{SUBNET_A}.{ROUTER}"
        self.router_b = f"{SUBNET_B}.{ROUTER}"
        self._created: list[str] = []

    @staticmethod
    def _free_tag(hosts_a: int) -> str:
        for _ in range(20):
            tag = f"vt{secrets.token_hex(2)}"
            names = [f"{tag}r", f"{tag}b4"] + [f"{tag}a{i}" for i in range(1, hosts_a + 1)]
            if not any(_exists(n) for n in names):
                return tag
        raise NetnsError(f"no free namespace name under {NETNS_DIR} after 20 tries")

    @property
    def hosts(self) -> list[Host]:
        return [*self.hosts_a, self.host_b]

    @property
    def namespaces(self) -> list[str]:
        return [self.router] + [h.ns for h in self.hosts]

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        leftovers = self.close()
        if leftovers and exc is None:
            raise NetnsError(f"could not delete network namespaces {leftovers}: remove them with "
                             f"`ip netns del NAME`")

    def close(self) -> list[str]:
        """Delete every namespace created (their veths and bridge go with them); return any left."""
        left: list[str] = []
        for ns in reversed(self._created):
            try:
                run(["ip", "netns", "del", ns])
            except NetnsError:
                if _exists(ns):
                    left.append(ns)
        self._created = []
        return left

    # ------------------------------------------------------------ set-up

    def _add_ns(self, ns: str) -> None:
        self._created.append(ns)    # before `add`: a timed-out add may still have made it
        run(["ip", "netns", "add", ns])
        self.ip(ns, "link", "set", "lo", "up")

    def ip(self, ns: str, *args: str) -> str:
        """`ip -n NS ARGS...`, checked."""
        return run(["ip", "-n", ns, *args])

    def exec(self, ns: str, *cmd: str, timeout: float = TIMEOUT) -> str:
        """`ip netns exec NS CMD...`, checked."""
        return run(["ip", "netns", "exec", ns, *cmd], timeout=timeout)

    def _enable_forwarding(self) -> None:
        if shutil.which("sysctl"):
            self.exec(self.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        else:   # /proc/sys/net shows the namespace of the process that opens it
            self.exec(self.router, sys.executable, "-c",
                      "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')")
        value = self.exec(self.router, "cat", "/proc/sys/net/ipv4/ip_forward").strip()
        if value != "1":
            raise NetnsError(f"IPv4 forwarding in {self.router} reads {value!r} after enabling it")

    def _link_host(self, host: Host, router_if: str) -> None:
        """A veth pair: `eth0` in the host, ``router_if`` in the router; both ends made in place."""
        self._add_ns(host.ns)
        run(["ip", "-n", host.ns, "link", "add", "eth0", "type", "veth",
             "peer", "name", router_if, "netns", self.router])
        self.ip(host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        self.ip(host.ns, "link", "set", "eth0", "up")

    def _build(self) -> None:
        r = self.router
        self._add_ns(r)
        self._enable_forwarding()
        self.ip(r, "link", "add", "br0", "type", "bridge")
        self.ip(r, "addr", "add", f"{self.router_a}/24", "dev", "br0")
        self.ip(r, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts_a, 1):
            port = f"a{i}"
            self._link_host(host, port)
            self.ip(r, "link", "set", port, "master", "br0")
            self.ip(r, "link", "set", port, "up")
            self.ip(host.ns, "route", "add", "default", "via", self.router_a)
        b = self.host_b
        self._link_host(b, "b4")
        self.ip(r, "addr", "add", f"{self.router_b}/24", "dev", "b4")
        self.ip(r, "link", "set", "b4", "up")
        self.ip(b.ns, "route", "add", "default", "via", self.router_b)

    def describe(self) -> str:
        """Addresses and routes of every namespace, for a failing test's output."""
        out: list[str] = []
        for ns in self.namespaces:
            out.append(f"----- {ns}")
            for what in (("-br", "addr"), ("route",)):
                try:
                    out.append(self.ip(ns, *what).rstrip())
                except NetnsError as exc:
                    out.append(str(exc))
        return "\n".join(out)
