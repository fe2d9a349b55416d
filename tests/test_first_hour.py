"""A new user's first hour (issue 18): each numbered finding, and the CLI promises, as real processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

import vesta
from tests.helpers import Cluster, Vestad, eventually, free_udp_port, idle_proc, short_tmpdir, tool
from vesta import config, paths
from vesta.cli.vesta import cli as vesta_cli
from vesta.errors import ConfigError

TOOLS = ("vesta", "vestad", "vestatop", "piwork")


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vesta: error: "), stderr
    return lines[0]


def as_json(node: Vestad, *args: str) -> Any:
    out = node.vesta(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def exec_node(cluster: Cluster, name: str = "a") -> Vestad:
    """A node that lends exec and looks idle (a -proc-root fixture: this test machine's cores are shared)."""
    return cluster.add(name, args=["-allow-exec", "-config", str(_no_sandbox(cluster)),
                                   "-proc-root", str(idle_proc(cluster.base / f"proc-{name}"))])


def _no_sandbox(cluster: Cluster) -> Path:
    path = cluster.base / "nosandbox.json"
    path.write_text('{"sandbox": "none"}')
    return path


# ---- 1. the README's first command


def test_1_keygen_makes_the_missing_config_directory_private(tmp_path: Path) -> None:
    target = tmp_path / "home" / ".config" / "vesta" / "federation.key"
    out = run(tool("vesta") + ["keygen", "-o", str(target)])
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and len(target.read_text().strip()) >= 40


# ---- 2. --version


def test_2_every_tool_answers_version() -> None:
    for name in TOOLS:
        out = run(tool(name) + ["--version"])
        assert out.returncode == 0, (name, out.stderr)
        assert out.stdout.startswith(f"{name} {vesta.__version__}\n") and "Python 3." in out.stdout
    verbose = run(tool("vestad") + ["--version", "-v"])
    assert verbose.returncode == 0 and "cryptography " in verbose.stdout and "PyNaCl " in verbose.stdout
    assert run(tool("vesta") + ["--version", "-v"]).stdout.count("\n") > 3


# ---- 3. a mistyped option is never the command


@pytest.mark.integration
def test_3_a_mistyped_exec_option_is_a_usage_error_and_runs_nothing(cluster: Cluster) -> None:
    a = exec_node(cluster)
    out = a.vesta("exec", "--tiemout", "3", "--", "true")
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "exec" in line and "'--tiemout'" in line and "--timeout" in line and "vesta exec --help" in line
    assert as_json(a, "jobs") == []      # nothing was submitted
    echoed = a.vesta("exec", "--", "echo", "--tiemout")   # after --, it belongs to the command
    assert echoed.returncode == 0 and echoed.stdout == "--tiemout\n"


# ---- 4. options before or after the subcommand, errors that point to its help


@pytest.mark.integration
def test_4_shared_options_go_before_or_after_the_subcommand(cluster: Cluster) -> None:
    a = cluster.add("desk")
    cluster.add("other")   # two daemons: without a name vesta would have to ask which
    for args in (["peers", "-name", "desk", "--json"], ["--json", "peers", "--name", "desk"],
                 ["-name", "desk", "peers", "-json"], ["--name=desk", "status", "--json"]):
        out = run(tool("vesta") + args, a.env)
        assert out.returncode == 0, (args, out.stderr)
        assert json.loads(out.stdout)
    out = run(tool("vesta") + ["peers", "--name", "desk", "--jsn"], a.env)
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "peers" in line and "--jsn" in line and "see `vesta peers --help`" in line
    out = run(tool("vesta") + ["jobs", "--name", "desk", "--limit", "many"], a.env)
    assert out.returncode == 2 and "see `vesta jobs --help`" in one_error_line(out.stderr)


# ---- 5. one vocabulary of outcomes


def _event(node: Vestad, job_id: str) -> dict[str, Any]:
    snap = json.loads(run(tool("vestatop") + ["-name", node.name, "--json"], node.env).stdout)
    return next(e for e in snap["events"] if job_id in e["text"])


@pytest.mark.integration
def test_5_jobs_show_wait_and_vestatop_say_the_same_outcome(cluster: Cluster) -> None:
    a = exec_node(cluster)
    assert a.vesta("exec", "--", "sh", "-c", "exit 4").returncode == 4
    job = as_json(a, "jobs")[0]
    assert job["outcome"] == "failed, exit 4"
    record = as_json(a, "show", job["id"])
    assert record["outcome"] == "failed, exit 4"
    assert [p["outcome"] for p in record["parts"]] == ["failed, exit 4"]   # the attempt, too
    assert "failed, exit 4" in a.vesta("jobs").stdout and "failed, exit 4" in a.vesta("show", job["id"]).stdout
    assert a.vesta("wait", job["id"]).stdout == f"{job['id']} failed, exit 4\n"
    event = _event(a, job["id"])
    assert event["kind"] == "job_failed" and "failed, exit 4" in event["text"]

    assert a.vesta("exec", "--timeout", "1", "--", "sleep", "10").returncode == 128 + signal.SIGTERM
    timed = as_json(a, "jobs")[0]
    assert timed["outcome"] == "timed out" and _event(a, timed["id"])["kind"] == "job_timed_out"

    long = a.vesta("exec", "--detach", "--", "sleep", "30").stdout.strip()
    eventually(lambda: as_json(a, "show", long)["parts"], 10, what="the job to start")
    assert a.vesta("cancel", long).returncode == 0
    record = eventually(lambda: (r := as_json(a, "show", long))["state"] == "cancelled" and r, 10)
    assert record["outcome"] == "cancelled"
    assert [p["state"] for p in record["parts"]] == ["cancelled"]   # not "succeeded ... cancelled"


# ---- 6. promises kept: --json on logs, a cpu job has no logs


@pytest.mark.integration
def test_6_logs_takes_json_and_says_a_cpu_job_has_no_output(cluster: Cluster) -> None:
    a = exec_node(cluster)
    job = a.vesta("exec", "--detach", "--", "echo", "hi").stdout.strip()
    assert a.vesta("wait", job).returncode == 0
    data = as_json(a, "logs", job)
    assert data["output"] == "hi\n" and data["job_id"] == job
    cpu = as_json(a, "cpu", "1")["job_id"]
    out = a.vesta("logs", cpu)
    assert out.returncode == 1 and out.stdout == ""
    assert "is a cpu job: only exec jobs have output" in one_error_line(out.stderr)


# ---- 7. piped output: tab-separated, one header line, nothing else


@pytest.mark.integration
def test_7_piped_tables_are_tab_separated_with_one_header_line(cluster: Cluster) -> None:
    a = cluster.add("desk")
    status = a.vesta("status").stdout.splitlines()
    assert status[0] == "name\tdesk" and all(line.count("\t") >= 1 for line in status)
    assert not any(line != line.strip() for line in status)   # no padding to a width
    peers = a.vesta("peers").stdout.splitlines()
    assert peers[0].split("\t")[:3] == ["name", "address", "cores"] and len(peers) == 2
    assert peers[1].startswith("desk (self)\t127.0.0.1:")
    bare = a.vesta("peers", "--no-header").stdout.splitlines()
    assert len(bare) == 1 and bare[0].startswith("desk (self)\t")
    colour = run(tool("vesta") + ["-name", "desk", "status"], dict(a.env, NO_COLOR="1", TERM="xterm"))
    assert "\x1b" not in colour.stdout


# ---- 8. messages that say what is wrong


def test_8_config_typo_suggests_the_right_field(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text('{"exec_timeout": 60}')
    with pytest.raises(ConfigError, match="did you mean 'exec_timeout_s'"):
        config.load({"config": str(path), "key": "k" * 20}, env={})


def test_8_a_negative_size_is_a_bad_value_not_a_flag() -> None:
    out = run(tool("vesta") + ["cpu", "-5"])
    assert out.returncode == 2
    line = one_error_line(out.stderr)
    assert "positive number of million iterations" in line and "unknown flag" not in line


@pytest.mark.integration
def test_8_a_refused_second_daemon_does_not_say_stopped_and_a_new_database_says_created_once(
        cluster: Cluster) -> None:
    first = cluster.add("twin")
    second = cluster.add("twin", start=False)
    out = run(second.command(), second.env)
    assert out.returncode == 2 and "already running" in out.stderr
    assert "stopped" not in out.stderr
    log = first.log()
    assert log.count("records database") == 1 and "created (schema version" in log and "migrated" not in log


# ---- 9. where a job ran, waiting for several, running one again


@pytest.mark.integration
def test_9_jobs_show_the_node_wait_takes_several_and_rerun_links_the_records(cluster: Cluster) -> None:
    a = exec_node(cluster)
    ok = a.vesta("exec", "--detach", "--", "true").stdout.strip()
    bad = a.vesta("exec", "--detach", "--", "sh", "-c", "echo again; exit 3").stdout.strip()
    out = a.vesta("wait", ok, bad)
    assert out.returncode == 3, out.stderr   # the worst of theirs
    assert out.stdout.splitlines() == [f"{ok} succeeded", f"{bad} failed, exit 3"]
    rows = as_json(a, "jobs")
    assert {r["id"]: r["ran_on"] for r in rows} == {ok: ["a"], bad: ["a"]}
    table = a.vesta("jobs").stdout.splitlines()
    assert "ran on" in table[0].split("\t") and all("\ta\t" in line for line in table[1:])

    again = a.vesta("rerun", bad)
    assert again.returncode == 3 and again.stdout == "again\n"
    new = as_json(a, "jobs")[0]
    assert new["id"] not in (ok, bad) and new["args"]["argv"] == ["sh", "-c", "echo again; exit 3"]
    assert as_json(a, "show", new["id"])["rerun_of"] == bad
    assert as_json(a, "show", bad)["reruns"] == [new["id"]]
    assert f"rerun of {bad}" in a.vesta("show", new["id"]).stdout


# ---- 10. default key place, private key files, sockets in XDG_RUNTIME_DIR and /tmp


def _bare_env(tmp_path: Path, runtime: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VESTA_KEY", "VESTA_NAME", "VESTA_TMP_LINK")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_RUNTIME_DIR=str(runtime))
    return env


@pytest.mark.integration
def test_10_vestad_reads_the_default_key_refuses_a_shared_one_and_is_found_from_another_runtime_dir(
        tmp_path: Path) -> None:
    runtime, elsewhere = short_tmpdir(), short_tmpdir()
    name = f"fh{secrets.token_hex(3)}"
    env = _bare_env(tmp_path, runtime)
    key = tmp_path / "cfg" / "vesta" / "federation.key"
    assert run(tool("vesta") + ["keygen", "-o", str(key)], env).returncode == 0
    key.chmod(0o644)
    cmd = tool("vestad") + ["--name", name, "--port", "0", "--dport", str(free_udp_port()), "--bind", "127.0.0.1",
                            "--state-dir", str(tmp_path / "state")]
    refused = run(cmd, env)
    assert refused.returncode == 2 and f"chmod 600 {key}" in refused.stderr
    assert "readable by other users" in refused.stderr
    key.chmod(0o600)
    log = open(tmp_path / "vestad.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    link = Path(f"/tmp/vestad-{name}.sock")
    try:
        eventually(lambda: (runtime / f"vestad-{name}.sock").exists() and link.is_symlink(), 15,
                   what="the daemon's socket and its /tmp link")
        assert f"federation key from the default key file {key}" in (tmp_path / "vestad.log").read_text()
        assert link.lstat().st_uid == os.getuid() and os.readlink(link) == str(runtime / f"vestad-{name}.sock")
        other = dict(env, XDG_RUNTIME_DIR=str(elsewhere))   # a shell with another runtime dir (a service, sudo)
        out = run(tool("vesta") + ["status", "--json", "--name", name], other)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["name"] == name
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        log.close()
    assert not link.exists() and not link.is_symlink()   # the link goes with the daemon
    out = run(tool("vesta") + ["status", "--name", name], dict(env, XDG_RUNTIME_DIR=str(elsewhere)))
    assert out.returncode == 3 and f"in {elsewhere} and /tmp" in out.stderr   # says where it looked


@pytest.mark.skipif(os.getuid() != 0, reason="planting a link as another user needs root")
def test_10_a_link_another_user_planted_in_tmp_is_never_followed(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fh{secrets.token_hex(3)}"
    runtime = short_tmpdir()
    real = socket.socket(socket.AF_UNIX)
    real.bind(str(runtime / "bait.sock"))
    link = Path(f"/tmp/vestad-{name}.sock")
    os.symlink(runtime / "bait.sock", link)
    os.lchown(link, 65534, 65534)
    try:
        out = run(tool("vesta") + ["status", "--name", name], dict(os.environ, XDG_RUNTIME_DIR=str(short_tmpdir())))
        assert out.returncode == 3 and "not running" in out.stderr
        monkeypatch.delenv("VESTA_TMP_LINK")
        assert paths.link_tmp_socket(runtime / f"vestad-{name}.sock", name) is None   # and never replaced
        assert os.readlink(link) == str(runtime / "bait.sock")
    finally:
        link.unlink()
        real.close()


def test_10_the_shipped_config_example_works_with_the_default_key(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("HOME", str(tmp_path))
    example = tmp_path / "vestad.json"
    out = run(tool("vestad") + ["--print-config-example"])
    assert out.returncode == 0
    example.write_text(out.stdout)
    assert run(tool("vesta") + ["keygen", "-o", str(paths.default_key_file())]).returncode == 0
    cfg = config.load({"config": str(example)}, env={})
    assert cfg.key == paths.default_key_file().read_text().strip()


# ---- every command: --json parses; piped output has no escape codes and no padding


def _exercise(a: Vestad, b: Vestad, as_json: bool) -> dict[str, subprocess.CompletedProcess[str]]:
    extra = ("--json",) if as_json else ()

    def v(node: Vestad, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return node.vesta(command, *extra, *args)   # before exec's --

    out: dict[str, subprocess.CompletedProcess[str]] = {}
    out["peers"] = v(a, "peers")
    out["status"] = v(a, "status")
    out["ledger"] = v(a, "ledger")
    out["ping"] = v(a, "ping", "b")
    out["cpu"] = v(a, "cpu", "1")
    out["mem"] = v(a, "mem", "1", "10")
    out["stress"] = v(a, "stress", "1", "1")
    out["stop-stress"] = v(a, "stop-stress")
    out["exec"] = v(a, "exec", "--on", "b", "--", "sh", "-c", "echo hi; echo x > $VESTA_OUTPUT/f")
    job = json.loads(a.vesta("jobs", "--json").stdout)[0]["id"]
    out["jobs"] = v(a, "jobs")
    out["show"] = v(a, "show", job)
    out["wait"] = v(a, "wait", job)
    out["logs"] = v(a, "logs", job)
    out["artifacts"] = v(a, "artifacts", job)
    out["rerun"] = v(a, "rerun", job)
    long = a.vesta("exec", "--detach", "--on", "b", "--", "sleep", "30").stdout.strip()
    out["cancel"] = v(a, "cancel", long)
    out["keygen"] = v(a, "keygen")
    out["map"] = v(a, "map", "--on", "b", "--", "echo", ":::", "x", "y")
    out["gc"] = v(a, "gc", "--dry-run")
    return out


@pytest.mark.integration
def test_every_command_takes_json_and_pipes_plain_text(cluster: Cluster) -> None:
    a = exec_node(cluster)
    b = exec_node(cluster, "b")
    eventually(lambda: a.peer_names() == {"b"}, 10, what="a to see b")
    runs = _exercise(a, b, as_json=True)
    assert set(runs) == set(vesta_cli.commands), "every vesta command is exercised"
    for command, out in runs.items():
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.startswith(("{", "[")), (command, out.stdout)
        if command == "map":   # one JSON object a line: each job as it ends, then the sweep
            assert [json.loads(line)["seq"] for line in out.stdout.splitlines()[:-1]] in ([1, 2], [2, 1])
        else:
            json.loads(out.stdout)
    plain = _exercise(a, b, as_json=False)
    others = {
        "vestatop": run(tool("vestatop") + ["-name", "a", "--once"], a.env),
        "piwork": run(tool("piwork") + ["0.1", "--seed", "1"]),
        "vestad --help": run(tool("vestad") + ["--help"]),
        "vestad --print-config-example": run(tool("vestad") + ["--print-config-example"]),
    }
    for command, out in (plain | others).items():
        assert out.returncode == 0, (command, out.stderr)
        for stream in (out.stdout, out.stderr):
            assert "\x1b" not in stream, (command, stream)
            assert not any(line.endswith(" ") for line in stream.splitlines()), (command, stream)
        assert not out.stdout.startswith("\n"), command


@pytest.mark.integration
def test_shell_completion_offers_commands_nodes_and_job_ids_from_the_daemon(cluster: Cluster) -> None:
    a = cluster.add("desk")
    job = as_json(a, "cpu", "1")["job_id"]

    def complete(words: str, cword: int) -> list[str]:
        env = dict(a.env, _VESTA_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(cword))
        out = run(tool("vesta"), env)
        assert out.returncode == 0, out.stderr
        return [line.split(",", 1)[1] for line in out.stdout.splitlines()]

    assert {"peers", "ping"} <= set(complete("vesta p", 1))
    assert complete("vesta ping ", 2) == ["desk"]
    assert job in complete("vesta show ", 2) and job in complete("vesta wait x ", 3)
    for shell in ("bash", "zsh", "fish"):
        script = run(tool("vesta"), dict(a.env, _VESTA_COMPLETE=f"{shell}_source"))
        assert script.returncode == 0 and "_VESTA_COMPLETE" in script.stdout
