"""The Prometheus endpoint of a real daemon, scraped over HTTP and read with prometheus_client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Cluster, eventually, idle_proc
from vesta import __version__
from vesta.errors import ConfigError
from vesta.metrics import parse_address

pytestmark = pytest.mark.integration


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_are_scraped_and_move_when_a_job_runs(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", args=["-metrics", "127.0.0.1:0"])
    b = cluster.add("b", args=["-proc-root", str(idle_proc(tmp_path / "proc-b"))])
    eventually(lambda: a.peer_names() == {"b"}, 5)
    address = a.status()["metrics"]
    assert address.startswith("127.0.0.1:") and not b.status()["metrics"]   # off unless asked for
    before = scrape(address)
    assert before[("vesta_build_info", (("python", __import__("platform").python_version()),
                                        ("version", __version__)))] == 1
    assert before[("vesta_peers", (("state", "alive"),))] == 1
    assert before[("vesta_beacons_total", (("way", "sent"),))] >= 1
    assert ("vesta_offered_cores", ()) in before and ("vesta_disk_bytes", (("what", "records"),)) in before
    assert a.vesta("cpu", "1").returncode == 0
    assert a.vesta("cpu", "1", "--on", "b").returncode == 0
    after = scrape(address)
    done = ("vesta_jobs_total", (("kind", "cpu"), ("side", "submitted"), ("state", "succeeded")))
    assert after[done] == before.get(done, 0) + 2
    rounds = ("vesta_chunk_round_trip_seconds_count", ())
    assert after[rounds] >= before[rounds] + 2
    lent = [k for k in after if k[0] == "vesta_ledger_borrowed_core_seconds" and ("peer", "b") in k[1]]
    assert lent and after[lent[0]] > 0                         # what b lent a, by b's name and fingerprint
    with pytest.raises(urllib.error.HTTPError, match="405"):   # it serves scrapes, nothing else
        urllib.request.urlopen(urllib.request.Request(f"http://{address}/", method="POST"), timeout=10)


def test_a_bad_metrics_address_is_a_config_error(cluster: Cluster) -> None:
    with pytest.raises(ConfigError, match="must be ADDR:PORT"):
        parse_address("localhost")
    assert parse_address("9464") == ("127.0.0.1", 9464)
    node = cluster.add("bad", args=["-metrics", "127.0.0.1:notaport"], start=False)
    node.start(wait=False)
    assert node.proc is not None and node.proc.wait(timeout=20) == 2
    assert "must be ADDR:PORT" in node.log()
