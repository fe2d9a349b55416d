"""Numbers a monitoring system can scrape: ``vestad -metrics 127.0.0.1:9464`` serves Prometheus text format.

The exposition is ``prometheus_client``'s own (``generate_latest`` over a registry of this node). The figures
are read from the daemon's parts when a scrape comes (``NodeCollector``), on the event loop, so nothing is
read while the loop changes it; the chunk round trip is a histogram the submitter feeds as chunks end. The
endpoint is unauthenticated: it binds to loopback unless the owner names another address.

Names follow Prometheus conventions: ``vesta_..._total`` for counters, ``_seconds``, ``_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from vesta import __version__
from vesta.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUND_TRIP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
MAX_REQUEST = 8192      # bytes of an HTTP request we read before answering (a scrape is a short GET)


def parse_address(value: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``PORT`` alone means loopback) as the metrics endpoint binds it."""
    host, _, port = value.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"metrics {value!r} must be ADDR:PORT, e.g. 127.0.0.1:9464") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"metrics port {number} must be from 0 to 65535")
    return host.strip("[]") or "127.0.0.1", number


@dataclass
class Sources:
    """Where the figures come from (the daemon's parts, each read at scrape time)."""

    counters: Counter[str]
    peers: Callable[[], tuple[int, int]]                      # (alive, suspect)
    capacity: Callable[[], dict[str, float]]                   # offered/spare/busy cores, offered memory
    jobs: Callable[[], list[tuple[str, str, str, int]]]        # (side, kind, state, count): submitted and hosted
    exec_running: Callable[[], int]
    queue: Callable[[], tuple[int, float]]                     # (queued jobs, age of the oldest, s)
    ledger: Callable[[], list[dict[str, Any]]]
    disk: Callable[[], dict[str, int]]                         # bytes of records and artifacts


class NodeCollector(Collector):
    """Every figure of one node, worked out when a scrape asks."""

    def __init__(self, sources: Sources) -> None:
        self.s = sources

    def collect(self) -> Iterator[Metric]:
        s = self.s
        info = InfoMetricFamily("vesta_build", "This vestad's version and Python.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        alive, suspect = s.peers()
        peers = GaugeMetricFamily("vesta_peers", "Known peers by state.", labels=["state"])
        peers.add_metric(["alive"], alive)
        peers.add_metric(["suspect"], suspect)
        yield peers
        cap = s.capacity()
        for key, help_text in (("offered_cores", "Cores this node offers its peers now."),
                               ("spare_cores", "Offered cores not busy now."),
                               ("busy_cores", "Cores busy now (the owner's load and lent work).")):
            yield GaugeMetricFamily(f"vesta_{key}", help_text, value=cap[key])
        yield GaugeMetricFamily("vesta_offered_memory_bytes", "Memory this node offers.", value=cap["offered_mem_b"])
        jobs = CounterMetricFamily("vesta_jobs", "Jobs by side (submitted here, hosted for peers), kind and state.",
                                   labels=["side", "kind", "state"])
        for side, kind, state, count in s.jobs():
            jobs.add_metric([side, kind, state], count)
        yield jobs
        yield GaugeMetricFamily("vesta_exec_runs_running", "Exec runs running here now.", value=s.exec_running())
        queued, oldest = s.queue()
        yield GaugeMetricFamily("vesta_queue_jobs", "Jobs waiting in the exec queue.", value=queued)
        yield GaugeMetricFamily("vesta_queue_oldest_seconds", "Age of the oldest queued job.", value=oldest)
        yield from self._ledger()
        yield from self._counters()
        disk = GaugeMetricFamily("vesta_disk_bytes", "Bytes on disk by what holds them.", labels=["what"])
        for what, size in s.disk().items():
            disk.add_metric([what], size)
        yield disk

    def _ledger(self) -> Iterator[Metric]:
        lent = GaugeMetricFamily("vesta_ledger_lent_core_seconds", "Core-seconds lent to each peer (decaying).",
                                 labels=["peer", "fingerprint"])
        borrowed = GaugeMetricFamily("vesta_ledger_borrowed_core_seconds",
                                     "Core-seconds borrowed from each peer (decaying).", labels=["peer", "fingerprint"])
        for row in self.s.ledger():
            lent.add_metric([row["name"], row["fingerprint"]], row["lent"])
            borrowed.add_metric([row["name"], row["fingerprint"]], row["borrowed"])
        yield lent
        yield borrowed

    def _counters(self) -> Iterator[Metric]:
        counters = self.s.counters
        dropped = CounterMetricFamily("vesta_dropped_packets", "Packets dropped, by reason.", labels=["reason"])
        for key, value in sorted(counters.items()):
            if key.startswith("dropped_"):
                dropped.add_metric([key.removeprefix("dropped_")], value)
        yield dropped
        beacons = CounterMetricFamily("vesta_beacons", "Beacons sent and accepted.", labels=["way"])
        beacons.add_metric(["sent"], counters.get("beacons_sent", 0))
        beacons.add_metric(["accepted"], counters.get("beacons_accepted", 0))
        yield beacons
        links = CounterMetricFamily("vesta_link_handshakes", "Peer-link handshakes by outcome.", labels=["outcome"])
        links.add_metric(["opened"], counters.get("links_opened", 0))
        links.add_metric(["accepted"], counters.get("tcp_accepted", 0))
        links.add_metric(["failed"], counters.get("tcp_handshake_failed", 0))
        links.add_metric(["bad_auth"], counters.get("tcp_bad_auth", 0))
        yield links
        pruned = CounterMetricFamily("vesta_pruned", "Removed by retention (vesta gc) since start: job records, "
                                     "hosted-run records, jobs whose files went.", labels=["what"])
        for what in ("jobs", "hosted", "artifact_jobs"):
            pruned.add_metric([what], counters.get(f"gc_pruned_{what}", 0))
        yield pruned
        yield CounterMetricFamily("vesta_pruned_artifact_bytes", "Bytes of artifacts removed by retention since start.",
                                  value=counters.get("gc_pruned_artifact_bytes", 0))


class Metrics:
    """This node's registry and its HTTP endpoint (asyncio, on the daemon's loop)."""

    def __init__(self, sources: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(sources))
        self.round_trip = Histogram("vesta_chunk_round_trip_seconds", "From offering a chunk to its end.",
                                    buckets=ROUND_TRIP_BUCKETS, registry=self.registry)
        self.server: asyncio.Server | None = None
        self.address = ""

    def observe_chunk(self, seconds: float) -> None:
        self.round_trip.observe(max(0.0, seconds))

    async def serve(self, host: str, port: int) -> None:
        try:
            self.server = await asyncio.start_server(self._answer, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}: choose another "
                              "-metrics ADDR:PORT") from exc
        bound = self.server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        if host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("metrics on %s are readable by anyone who can reach it (no authentication)", self.address)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One scrape: any GET gets the whole exposition; nothing else is served."""
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST or not head.startswith(b"GET "):
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                body = generate_latest(self.registry)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + CONTENT_TYPE.encode()
                             + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                             + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


def disk_use(paths: dict[str, list[Path]]) -> dict[str, int]:
    """Bytes under each named set of files or directories (a directory counted whole, links not followed)."""
    out: dict[str, int] = {}
    for what, where in paths.items():
        total = 0
        for path in where:
            total += _size(path)
        out[what] = total
    return out


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path):
            return st.st_size
        total = 0
        for top, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(top, name)).st_size
        return total
    return 0


def age(since: float | None) -> float:
    return max(0.0, time.time() - since) if since else 0.0
