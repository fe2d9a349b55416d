"""config: defaults, precedence, and a one-line ConfigError naming the field for every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import free_udp_port, new_key, short_tmpdir, tool
from vesta import config, proto
from vesta.checks import MAX_NAME
from vesta.config import Config, parse_seed, sanitize_name
from vesta.errors import ConfigError

KEY = "k" * 32


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, **kw: Any) -> Config:
    """config.load with a name and key unless the test says otherwise, and never the real environment."""
    merged: dict[str, Any] = {"name": "node", "key": KEY}
    merged.update(flags or {})
    merged.update(kw)
    return config.load({k: v for k, v in merged.items() if v is not ...}, env={} if env is None else env)


def write_config(tmp_path: Path, data: object, name: str = "vesta.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def config_error(**flags: Any) -> str:
    """The message of the ConfigError that ``load(**flags)`` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load(**flags)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- defaults and sources


def test_defaults_are_the_seeds() -> None:
    cfg = load()
    assert cfg.cpu_offer_pct == 75
    assert cfg.mem_offer_mb == 1024
    assert cfg.reserve_pct == 20
    assert cfg.spill_cpu_pct == 80
    assert cfg.allow_exec is False
    assert cfg.exec_allowlist == ()
    assert cfg.max_borrow_ratio == 5
    assert cfg.battery_min_pct == 15
    assert cfg.port == 7777
    assert cfg.dport == 7778
    assert cfg.advertise_spare_ms == 1000
    assert cfg.beacon_interval == 1.0
    assert cfg.power == "auto"
    assert cfg.seeds == () and cfg.labels == ()
    assert cfg.suspect_after < cfg.expire_after
    assert cfg.keep_days == 90 and cfg.keep_artifacts_mb == 2048


def test_key_is_not_in_repr() -> None:
    cfg = load()
    assert KEY not in repr(cfg)


def test_for_tests_is_valid_and_fast() -> None:
    cfg = Config.for_tests(dport=free_udp_port())
    assert cfg.port == 0 and cfg.bind == "127.0.0.1"
    assert cfg.beacon_interval < 1.0


def test_load_from_json_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "name": "from-file", "port": 9000, "cpu_offer_pct": 50, "allow_exec": True,
        "exec_allowlist": ["python3", "sha256sum"], "seeds": ["10.0.0.2:7778", "[::1]:7779", "nas"],
        "labels": ["gpu"], "max_borrow_ratio": 2.5, "power": "solar", "state_dir": str(tmp_path / "st"),
    })
    cfg = load(config=str(path), name=...)
    assert cfg.name == "from-file"
    assert cfg.port == 9000 and cfg.cpu_offer_pct == 50
    assert cfg.allow_exec is True and cfg.exec_allowlist == ("python3", "sha256sum")
    assert cfg.seeds == ("10.0.0.2:7778", "[::1]:7779", "nas")
    assert cfg.labels == ("gpu",) and cfg.max_borrow_ratio == 2.5 and cfg.power == "solar"
    assert cfg.state_dir == tmp_path / "st"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"name": "file-name", "port": 1111, "cpu_offer_pct": 50})
    cfg = load(config=str(path), name="flag-name", port=2222)
    assert (cfg.name, cfg.port, cfg.cpu_offer_pct) == ("flag-name", 2222, 50)


def test_flags_given_as_none_do_not_override(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"port": 1111})
    assert load(config=str(path), port=None).port == 1111


def test_comment_keys_are_ignored(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"_comment": "lend less at night", "_port": "not a port", "port": 1234})
    assert load(config=str(path)).port == 1234


def test_key_from_env(tmp_path: Path) -> None:
    env_key = "e" * 20
    assert load(key=..., env={"VESTA_KEY": env_key}).key == env_key
    path = write_config(tmp_path, {"key": "f" * 20})
    assert load(config=str(path), key=..., env={"VESTA_KEY": env_key}).key == env_key  # env beats the file
    assert load(key="g" * 20, env={"VESTA_KEY": env_key}).key == "g" * 20  # a flag beats env


def test_empty_env_key_is_ignored(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"key": "f" * 20})
    assert load(config=str(path), key=..., env={"VESTA_KEY": ""}).key == "f" * 20


def test_key_file_flag(tmp_path: Path) -> None:
    key_file = tmp_path / "fed.key"
    key_file.write_text("  " + "s" * 40 + "\n\n")
    key_file.chmod(0o600)
    assert load(key=..., key_file=str(key_file)).key == "s" * 40


def test_key_file_in_the_config_file(tmp_path: Path) -> None:
    key_file = tmp_path / "fed.key"
    key_file.write_text("t" * 40 + "\n")
    key_file.chmod(0o600)
    path = write_config(tmp_path, {"key_file": str(key_file)})
    assert load(config=str(path), key=...).key == "t" * 40


def test_load_uses_os_environ_when_no_env_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESTA_KEY", "o" * 20)
    assert config.load({"name": "n"}).key == "o" * 20


def test_name_defaults_to_the_sanitized_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vesta.config.socket.gethostname", lambda: "Bob's MacBook Pro")
    assert load(name=...).name == "Bob-s-MacBook-Pro"


def test_control_socket_follows_the_socket_dir(tmp_path: Path) -> None:
    cfg = load(name="desk", socket_dir=str(tmp_path))
    assert cfg.control_socket == tmp_path / "vestad-desk.sock"


# ---------------------------------------------------------------- bad input


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"cpu_offer": 50})
    message = config_error(config=str(path))
    assert "unknown field 'cpu_offer'" in message
    assert "did you mean 'cpu_offer_pct'" in message
    assert str(path) in message


def test_unknown_field_without_a_close_match(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"zzz": 1})
    message = config_error(config=str(path))
    assert "'zzz'" in message and "did you mean" not in message


def test_unknown_flag_setting() -> None:
    assert "nmae" in config_error(nmae="x")


BAD_FIELDS: list[tuple[str, object, str]] = [
    # wrong type
    ("port", "7777", "whole number"),
    ("port", True, "whole number"),
    ("port", 7777.0, "whole number"),
    ("cpu_offer_pct", 75.5, "whole number"),
    ("reserve_pct", None, "whole number"),
    ("allow_exec", "yes", "true or false"),
    ("allow_exec", 1, "true or false"),
    ("max_borrow_ratio", "5", "number"),
    ("max_borrow_ratio", True, "number"),
    ("name", 5, "string"),
    ("exec_allowlist", [1, 2], "list of non-empty strings"),
    ("exec_allowlist", ["ok", ""], "list of non-empty strings"),
    ("labels", {"gpu": True}, "list of non-empty strings"),
    ("state_dir", "", "path"),
    ("state_dir", 5, "path"),
    # out of range
    ("port", -1, "0 to 65535"),
    ("port", 65536, "0 to 65535"),
    ("dport", 0, "1 to 65535"),
    ("cpu_offer_pct", 101, "0 to 100"),
    ("cpu_offer_pct", -1, "0 to 100"),
    ("spill_cpu_pct", 0, "1 to 100"),
    ("battery_min_pct", 101, "0 to 100"),
    ("advertise_spare_ms", 5, "20 to 60000"),
    ("mem_offer_mb", -1, "0 to"),
    ("max_borrow_ratio", -0.5, "0 to 1000"),
    ("max_borrow_ratio", float("nan"), "number"),
    ("max_borrow_ratio", float("inf"), "number"),
    ("handshake_timeout_s", 0.0, "0.1 to 120"),
    ("keep_days", 0, "1 to 36500"),
    ("keep_days", "90", "number"),
    ("keep_artifacts_mb", -1, "0 to"),
    ("keep_artifacts_mb", 1.5, "whole number"),
    # choices
    ("power", "nuclear", "auto, grid, solar, battery"),
    ("power", "GRID", "auto, grid, solar, battery"),
    ("power", 1, "auto, grid, solar, battery"),
]


@pytest.mark.parametrize(("field", "value", "expect"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_field_in_the_file(tmp_path: Path, field: str, value: object, expect: str) -> None:
    path = tmp_path / "vesta.json"
    path.write_text(json.dumps({field: value}, allow_nan=True))
    message = config_error(config=str(path), **{field: ...} if field == "name" else {})  # no name flag over it
    assert f"field '{field}'" in message and str(path) in message
    assert expect in message


BAD_FLAGS = [case for case in BAD_FIELDS if case[1] is not None]  # a flag given as None means "not given"


@pytest.mark.parametrize(("field", "value", "expect"), BAD_FLAGS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FLAGS])
def test_bad_field_as_a_flag(field: str, value: object, expect: str) -> None:
    message = config_error(**{field: value})
    assert message.startswith("-" + field.replace("_", "-") + " ")
    assert expect in message


@pytest.mark.parametrize(
    "seed",
    ["host:99999", "host:0", "host:abc", ":7778", "a:b:c", "[::1", "[a:b:c]:7778", "a b:7778", "", "[]:7778"],
)
def test_bad_seed(seed: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_seed(seed, "-seed")
    assert repr(seed) in str(info.value) and str(info.value).startswith("-seed")
    message = config_error(seeds=[seed, "10.0.0.1:7778"])
    assert "seeds" in message


@pytest.mark.parametrize(
    ("seed", "parsed"),
    [
        ("192.168.1.20:7778", ("192.168.1.20", 7778)),
        ("nas.local", ("nas.local", 7778)),
        ("[::1]:9000", ("::1", 9000)),
        ("[fe80::1]", ("fe80::1", 7778)),
        ("fe80::1", ("fe80::1", 7778)),
        ("host:65535", ("host", 65535)),
    ],
)
def test_good_seed(seed: str, parsed: tuple[str, int]) -> None:
    assert parse_seed(seed) == parsed


def test_seed_flag_comma_separated() -> None:
    assert load(seeds="10.0.0.1:7778, nas ,").seeds == ("10.0.0.1:7778", "nas")


def test_missing_key() -> None:
    message = config_error(key=...)
    assert "no federation key" in message and "vesta keygen" in message


def test_empty_key() -> None:
    assert "no federation key" in config_error(key="")


def test_short_key() -> None:
    message = config_error(key="short")
    assert "too short" in message and "5 characters" in message and str(config.MIN_KEY_CHARS) in message


def test_key_at_the_minimum_length_is_accepted() -> None:
    assert load(key="x" * config.MIN_KEY_CHARS).key == "x" * config.MIN_KEY_CHARS


def test_short_key_from_env_or_file(tmp_path: Path) -> None:
    assert "too short" in config_error(key=..., env={"VESTA_KEY": "abc"})
    key_file = tmp_path / "k"
    key_file.write_text("abc\n")
    key_file.chmod(0o600)
    assert "too short" in config_error(key=..., key_file=str(key_file))


def test_unreadable_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    message = config_error(key=..., key_file=str(missing))
    assert "-key-file" in message and str(missing) in message
    message = config_error(key=..., key_file=str(tmp_path))  # a directory
    assert str(tmp_path) in message


def test_key_file_that_is_not_text(tmp_path: Path) -> None:
    key_file = tmp_path / "bin.key"
    key_file.write_bytes(b"\xff\xfe\x00binary" * 4)
    assert "not text" in config_error(key=..., key_file=str(key_file))


def test_key_file_named_in_the_config_file_is_missing(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"key_file": str(tmp_path / "gone.key")})
    message = config_error(config=str(path), key=...)
    assert "key_file" in message and "gone.key" in message


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, '{\n  "port": 1,\n}\n')
    message = config_error(config=str(path))
    assert "not valid JSON" in message and str(path) in message
    assert "line 3 column 1" in message


@pytest.mark.parametrize("content", ["[1, 2]", '"port"', "7777", "null"])
def test_json_that_is_not_an_object(tmp_path: Path, content: str) -> None:
    path = write_config(tmp_path, content)
    assert "JSON object" in config_error(config=str(path))


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    message = config_error(config=str(missing))
    assert str(missing) in message and "cannot read" in message


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    assert "UTF-8" in config_error(config=str(path))


def test_reserve_pct_100() -> None:
    assert "reserve_pct" in config_error(reserve_pct=100)


def test_expire_after_must_exceed_suspect_after() -> None:
    message = config_error(suspect_after=5, expire_after=5)
    assert "expire_after" in message and "suspect_after" in message


def test_too_many_or_too_long_labels() -> None:
    assert "label" in config_error(labels=["l"] * 17)
    assert "label" in config_error(labels=["l" * 33])
    assert load(labels=["l" * 32] * 16).labels == ("l" * 32,) * 16


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("My Laptop!", "My-Laptop"),
        ("../../etc", "etc"),
        ("  desk  ", "desk"),
        (".hidden", "hidden"),
        ("-lead", "lead"),
        ("a--b", "a-b"),
        ("ok_name.v2", "ok_name.v2"),
        ("a/../b", "a-..-b"),
        ("trailing-.", "trailing"),
        ("Bob's MacBook Pro", "Bob-s-MacBook-Pro"),
        ("\u65e5\u672cpc", "pc"),
        ("x" * 40, "x" * 32),
    ],
)
def test_sanitize_name(raw: str, name: str) -> None:
    assert sanitize_name(raw) == name


@pytest.mark.parametrize("raw", ["\u00c4\u00d6", "", "   ", "!!!", "../..", "/", "-._"])
def test_sanitize_name_without_usable_characters(raw: str) -> None:
    with pytest.raises(ConfigError, match="no usable characters"):
        sanitize_name(raw)


def test_load_sanitizes_the_name() -> None:
    assert load(name="My Laptop!").name == "My-Laptop"
    assert "no usable characters" in config_error(name="\u00c4\u00d6")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_sanitized_names_are_always_safe(raw: str) -> None:
    try:
        name = sanitize_name(raw)
    except ConfigError:
        return
    assert 0 < len(name) <= MAX_NAME
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)
    assert "/" not in name and not name.startswith(".")
    assert sanitize_name(name) == name  # idempotent, so validate() accepts what load() produced
    assert proto.check_name("name", name) == name  # and peers accept it on the wire


# ---------------------------------------------------------------- the real vestad


@pytest.fixture
def runtime() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_vestad(args: list[str], runtime: Path, state: Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VESTA_KEY", "VESTA_NAME")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    env["XDG_STATE_HOME"] = str(state)
    if key is not None:
        env["VESTA_KEY"] = key
    cmd = tool("vestad") + ["-state-dir", str(state), "-dport", str(free_udp_port()), "-port", "0",
                            "-bind", "127.0.0.1", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def assert_usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vestad: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-name", "n", "-port", "abc"], ["-port", "'abc'"]),
        (["-name", "n", "-nmae", "x"], ["unknown flag", "-nmae"]),
        (["-name", "n", "-power", "nuclear"], ["-power", "nuclear"]),
        (["-name", "n", "-seed", "a:b:c"], ["a:b:c"]),
        (["-name", "\u00c4\u00d6"], ["no usable characters"]),
    ],
    ids=["bad-port", "unknown-flag", "bad-power", "bad-seed", "bad-name"],
)
def test_vestad_bad_flags_exit_2_with_one_line(
    tmp_path: Path, runtime: Path, args: list[str], needles: list[str]
) -> None:
    assert_usage_error(run_vestad(args, runtime, tmp_path / "state", key=new_key()), *needles)


def test_vestad_bad_config_file_field(tmp_path: Path, runtime: Path) -> None:
    path = write_config(tmp_path, {"cpu_offer": 50})
    proc = run_vestad(["-name", "n", "-config", str(path)], runtime, tmp_path / "state", key=new_key())
    assert_usage_error(proc, "cpu_offer", "did you mean 'cpu_offer_pct'")


def test_vestad_short_key(tmp_path: Path, runtime: Path) -> None:
    proc = run_vestad(["-name", "n"], runtime, tmp_path / "state", key="short")
    assert_usage_error(proc, "too short")


def test_vestad_missing_key(tmp_path: Path, runtime: Path) -> None:
    proc = run_vestad(["-name", "n"], runtime, tmp_path / "state", key=None)
    assert_usage_error(proc, "no federation key", "vesta keygen")
    assert list(runtime.iterdir()) == []  # no control socket was ever created
