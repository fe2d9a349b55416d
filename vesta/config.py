"""Node configuration: defaults < JSON file (-config) < VESTA_KEY < flags.

Every field is checked here, once, with a one-line error that names the
field, where it came from and how to fix it. Keys of the JSON file that start
with ``_`` are comments; any other unknown key is an error (a typo must not
silently fall back to a default).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vesta.errors import ConfigError
from vesta.paths import default_config_file, default_key_file, default_state_dir, sanitize_name, socket_path
from vesta.spec import MAX_TIMEOUT_S

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
POWER_CHOICES = ("auto", "grid", "solar", "battery")
KEY_HINT = ("generate one with `vesta keygen -o ~/.config/vesta/federation.key` (read there by default), "
            "or pass it with --key-file PATH or VESTA_KEY")


@dataclass(frozen=True)
class Config:
    """Everything a vestad needs. Field comments give unit and trade-off."""

    name: str
    key: str = field(repr=False)
    # Network
    port: int = 7777                 # TCP peer protocol; 0 = pick a free port (tests)
    dport: int = 7778                # UDP discovery; shared by every daemon on a host (SO_REUSEPORT)
    bind: str = "0.0.0.0"            # TCP listen address; a loopback address keeps beacons on loopback
    advertise: str = ""              # TCP host peers should dial; "" = the address our beacons come from
    seeds: tuple[str, ...] = ()      # host:port of peers outside broadcast reach (other subnets, VPN)
    advertise_spare_ms: int = 1000   # beacon interval: lower = fresher load view, more packets
    # Lending (names and defaults from the seed)
    cpu_offer_pct: int = 75          # share of cores offered for lending
    mem_offer_mb: int = 1024         # hard cap on RAM lent, MiB
    reserve_pct: int = 20            # share of CPU and RAM kept for the owner, never lent
    spill_cpu_pct: int = 80          # local CPU % above which new work goes to peers
    allow_exec: bool = False         # let peers run commands here
    exec_allowlist: tuple[str, ...] = ()  # if non-empty, only these programs may be exec'd
    exec_timeout_s: float = 3600.0   # an exec job without --timeout is stopped after this
    log_cap_bytes: int = 1 << 20     # stdout+stderr kept per job in the records; the rest is cut, marked
    exec_max_file_mb: int = 1024     # largest file an exec job may write (RLIMIT_FSIZE)
    exec_max_disk_mb: int = 2048     # all the files of one exec run (work dir, HOME, sandbox /tmp), MiB
    exec_max_files: int = 20000      # files + directories one exec run may make (a bigger bound costs a longer count)
    sandbox: str = "auto"            # exec isolation: auto (bubblewrap when installed), bwrap (required), none
    allow_network: bool = False      # let sandboxed exec jobs use the network
    exec_user: str = "nobody"        # who exec jobs run as when vestad runs as root ("" = root itself: unsafe)
    exec_max_procs: int = 256        # processes + threads one exec job may have (RLIMIT_NPROC); 0 = no bound
    exec_max_input_mb: int = 256     # files a peer may ship with one exec job (--put), MiB in all
    artifact_max_mb: int = 256       # files this node takes back from one of its exec jobs ($VESTA_OUTPUT), MiB
    keep_runs: bool = False          # keep each exec run's working directory afterwards (debugging; uses disk)
    warm_runners: str = "auto"       # exec runners kept ready in their sandbox: auto (one per core lent), 0 = off, N;
                                     # each ~5 MiB RSS (mostly shared), no CPU while waiting
    keep_days: float = 90.0          # job records and hosted runs that ended longer ago are pruned (vesta gc)
    keep_artifacts_mb: int = 2048    # artifacts kept in all, MiB; past it the oldest jobs' files are pruned
    max_attempts: int = 3            # runs of one cpu/mem chunk lost to a node or link failure before the job fails
    max_borrow_ratio: float = 5.0    # leeching cap: borrow up to ratio x goodwill without lending
    battery_min_pct: int = 15        # stop lending below this battery charge
    goodwill_core_s: float = 720.0   # what a new peer may borrow x max_borrow_ratio before it lends (core-s)
    ledger_half_life_days: float = 7.0  # every ledger amount halves this often: old debts fade
    lend_hours: tuple[str, ...] = ()    # windows when peers may use this node, e.g. "Mon-Fri 18:00-08:00"
    lend_grace_s: float = 300.0      # running work may finish this long after a window closes
    power: str = "auto"              # auto follows /sys/class/power_supply; or force grid|solar|battery
    labels: tuple[str, ...] = ()     # free-form tags shown to peers (e.g. "gpu", "arm64")
    metrics: str = ""                # ADDR:PORT of a Prometheus endpoint (e.g. 127.0.0.1:9464); "" = off
    # Places
    state_dir: Path = field(default_factory=default_state_dir)
    socket_dir: Path | None = None   # None = $XDG_RUNTIME_DIR or /tmp
    sys_root: str = "/sys"           # read power/thermals from here (tests point it at fixtures)
    proc_root: str = "/proc"         # read cpu/memory from here
    # Protocol timing and bounds
    suspect_after: int = 3           # missed beacons before a peer is shown as suspect
    expire_after: int = 10           # missed beacons before a peer is removed
    max_clock_skew_s: float = 30.0   # beacons older or newer than this are dropped (replay window)
    handshake_timeout_s: float = 5.0  # a TCP peer must finish the handshake within this
    link_idle_s: float = 300.0       # an inbound peer link with nothing running or heard this long is closed
    max_peers: int = 256             # peer table bound; beacons from further nodes are dropped

    @property
    def beacon_interval(self) -> float:
        return self.advertise_spare_ms / 1000.0

    @property
    def control_socket(self) -> Path:
        return socket_path(self.name, self.socket_dir)

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @classmethod
    def for_tests(cls, **overrides: Any) -> Config:
        """Short intervals, loopback, free TCP port; callers give key, dport and state_dir."""
        base: dict[str, Any] = {
            "name": "test",
            "key": "test-key-" + "0" * 24,
            "port": 0,
            "bind": "127.0.0.1",
            "advertise_spare_ms": 100,
            "handshake_timeout_s": 2.0,
        }
        base.update(overrides)
        cfg = cls(**base)
        validate(cfg)
        return cfg


# ---------------------------------------------------------------- validation

Check = Callable[[str, Any], Any]


def _int(lo: int, hi: int) -> Check:
    def check(where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where} must be a whole number from {lo} to {hi} (got {v!r})")
        if not lo <= v <= hi:
            raise ConfigError(f"{where} must be from {lo} to {hi} (got {v})")
        return v
    return check


def _float(lo: float, hi: float) -> Check:
    def check(where: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where} must be a number from {lo:g} to {hi:g} (got {v!r})")
        if not lo <= v <= hi:
            raise ConfigError(f"{where} must be from {lo:g} to {hi:g} (got {v:g})")
        return float(v)
    return check


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false (got {v!r})")
    return v


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{where} must be a string (got {v!r})")
    return v


def _choice(*choices: str) -> Check:
    def check(where: str, v: Any) -> str:
        if v not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)} (got {v!r})")
        return str(v)
    return check


MAX_WARM_RUNNERS = 64


def _warm_runners(where: str, v: Any) -> str:
    """"auto", or a whole number of runners (a number from a flag or a file comes as text or as a number)."""
    text = str(v).strip() if isinstance(v, (str, int)) and not isinstance(v, bool) else ""
    if text == "auto" or (text.isdigit() and int(text) <= MAX_WARM_RUNNERS):
        return text if text == "auto" else str(int(text))
    raise ConfigError(f"{where} must be auto, 0 (off) or a number of runners up to {MAX_WARM_RUNNERS} (got {v!r})")


def warm_runner_count(cfg: Config, cores: int) -> int:
    """How many warm runners a node keeps: none without exec; auto is one per core it may lend, at most 8."""
    if not cfg.allow_exec:
        return 0
    if cfg.warm_runners == "auto":
        return max(1, min(8, cores * cfg.cpu_offer_pct // 100))
    return int(cfg.warm_runners)


def _str_list(where: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):  # from a flag: comma separated
        v = [part for part in v.split(",") if part.strip()]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in v):
        raise ConfigError(f"{where} must be a list of non-empty strings (got {v!r})")
    return tuple(s.strip() for s in v)


def _path(where: str, v: Any) -> Path:
    if not isinstance(v, (str, Path)) or not str(v):
        raise ConfigError(f"{where} must be a path (got {v!r})")
    return Path(v).expanduser()


def _hours(where: str, v: Any) -> tuple[str, ...]:
    from vesta.hours import parse_hours  # checked here so a bad window is a config error at start-up

    entries = _str_list(where, v)
    try:
        parse_hours(entries)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return entries


def _seeds(where: str, v: Any) -> tuple[str, ...]:
    seeds = _str_list(where, v)
    for seed in seeds:
        parse_seed(seed, where)
    return seeds


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_seed(seed: str, where: str = "seed", default_port: int = 7778) -> tuple[str, int]:
    """'host:port', '[v6]:port' or bare 'host' (discovery port assumed)."""
    host, port_text, closed = seed, "", "]"
    if seed.startswith("["):
        host, closed, rest = seed[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif seed.count(":") == 1:
        host, port_text = seed.split(":")
    # A host with ':' must be an IPv6 address ("a:b:c" is a typo, not a host name).
    if not host or not closed or not re.fullmatch(r"[A-Za-z0-9_.:-]+", host) or (":" in host and not _is_ipv6(host)):
        raise ConfigError(f"{where}: {seed!r} is not host:port (e.g. 192.168.1.20:7778)")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: {seed!r} has a bad port (use 1-65535, usually 7778)")
    return host, int(port_text)


_CHECKS: dict[str, Check] = {
    "name": _str,
    "key": _str,
    "port": _int(0, 65535),
    "dport": _int(1, 65535),
    "bind": _str,
    "advertise": _str,
    "seeds": _seeds,
    "advertise_spare_ms": _int(20, 60_000),
    "cpu_offer_pct": _int(0, 100),
    "mem_offer_mb": _int(0, 1 << 24),
    "reserve_pct": _int(0, 100),
    "spill_cpu_pct": _int(1, 100),
    "allow_exec": _bool,
    "exec_allowlist": _str_list,
    "exec_timeout_s": _float(1.0, float(MAX_TIMEOUT_S)),
    "log_cap_bytes": _int(0, 1 << 30),
    "exec_max_file_mb": _int(1, 1 << 24),
    "exec_max_disk_mb": _int(1, 1 << 24),
    "exec_max_files": _int(1, 10_000_000),
    "sandbox": _choice("auto", "bwrap", "none"),
    "allow_network": _bool,
    "exec_user": _str,
    "exec_max_procs": _int(0, 1 << 20),
    "exec_max_input_mb": _int(0, 1 << 20),
    "artifact_max_mb": _int(0, 1 << 20),
    "keep_runs": _bool,
    "warm_runners": _warm_runners,
    "keep_days": _float(1.0, 36500.0),
    "keep_artifacts_mb": _int(0, 1 << 30),
    "max_attempts": _int(1, 100),
    "max_borrow_ratio": _float(0.0, 1000.0),
    "battery_min_pct": _int(0, 100),
    "goodwill_core_s": _float(0.0, 1e9),
    "ledger_half_life_days": _float(0.0, 3650.0),
    "lend_hours": _hours,
    "lend_grace_s": _float(0.0, 86400.0),
    "power": _choice(*POWER_CHOICES),
    "labels": _str_list,
    "metrics": _str,
    "state_dir": _path,
    "socket_dir": _path,
    "sys_root": _str,
    "proc_root": _str,
    "suspect_after": _int(1, 1000),
    "expire_after": _int(2, 10000),
    "max_clock_skew_s": _float(1.0, 86400.0),
    "handshake_timeout_s": _float(0.1, 120.0),
    "link_idle_s": _float(1.0, 86400.0),
    "max_peers": _int(1, 100_000),
}
# Only in the file: where to read the key from.
_FILE_ONLY = {"key_file"}


def validate(cfg: Config) -> None:
    """Cross-field rules; single fields were checked on the way in."""
    if not cfg.key:
        raise ConfigError(f"no federation key: {KEY_HINT}")
    if len(cfg.key) < MIN_KEY_CHARS:
        raise ConfigError(f"federation key is too short ({len(cfg.key)} characters, need at least "
                          f"{MIN_KEY_CHARS}): {KEY_HINT}")
    if cfg.reserve_pct >= 100:
        raise ConfigError("reserve_pct must be below 100, or nothing could ever be lent")
    if cfg.expire_after <= cfg.suspect_after:
        raise ConfigError("expire_after must be larger than suspect_after")
    if cfg.name != sanitize_name(cfg.name):
        raise ConfigError(f"name {cfg.name!r} is not sanitized")
    for label in cfg.labels:
        if len(label) > 32:
            raise ConfigError(f"label {label!r} is longer than 32 characters")
    if len(cfg.labels) > 16:
        raise ConfigError("at most 16 labels")


def check_private(path: Path, where: str) -> None:
    """Refuse a key file that other users may read, as OpenSSH does, with the fix in the message."""
    try:
        mode = stat.S_IMODE(path.expanduser().stat().st_mode)
    except OSError:
        return   # reading it says what is wrong
    if mode & 0o077:
        raise ConfigError(f"{where}: key file {path} is readable by other users (mode {mode:04o}); "
                          f"make it private with: chmod 600 {path}")


def read_key_file(path: Path, where: str) -> str:
    try:
        text = path.expanduser().read_text().strip()
    except OSError as exc:
        fix = f"create it with `vesta keygen -o {path}`" if isinstance(exc, FileNotFoundError) else \
            "check its permissions"
        raise ConfigError(f"{where}: cannot read key file {path}: {exc.strerror}: {fix}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: key file {path} is not text") from exc
    if not text:
        raise ConfigError(f"{where}: key file {path} is empty: {KEY_HINT}")
    check_private(path, where)
    return text


def read_file(path: Path) -> dict[str, Any]:
    """Parse a JSON config file into {field: value}; comments (keys with '_') dropped."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object {{...}}")
    out: dict[str, Any] = {}
    known = set(_CHECKS) | _FILE_ONLY
    for k, v in data.items():
        if k.startswith("_"):
            continue
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown field {k!r}{hint}; `vestad --print-config-example` lists the fields")
        out[k] = v
    return out


def load(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build the config from flags (only those given), the file they name, and the environment."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    used: list[str] = []   # said once the config is known to be good

    config_path = flags.get("config")
    if not config_path and default_config_file().is_file():
        config_path = str(default_config_file())
    if config_path:
        path = Path(config_path).expanduser()
        used.append(f"config file {path}")
        for k, v in read_file(path).items():
            values[k], origin[k] = v, f"{path}: field {k!r}"
        if "key_file" in values:  # relative to the config file, like any path a user writes there
            values["key_file"] = str(path.parent / _path(origin["key_file"], values["key_file"]))
    # The key: the first of -key / -key-file, VESTA_KEY, the file's key / key_file. Only that one is read.
    file_key_file = values.pop("key_file", None)
    file_key_origin = origin.pop("key_file", "")
    if flags.get("key"):
        values["key"], origin["key"] = flags["key"], "-key"
    elif flags.get("key_file"):
        values["key"], origin["key"] = read_key_file(Path(flags["key_file"]), "-key-file"), "-key-file"
    elif env.get("VESTA_KEY"):
        values["key"], origin["key"] = env["VESTA_KEY"], "VESTA_KEY"
    elif "key" not in values and file_key_file is not None:
        values["key"] = read_key_file(Path(file_key_file), file_key_origin)
        origin["key"] = file_key_origin
    elif "key" not in values and default_key_file().exists():
        values["key"] = read_key_file(default_key_file(), "default key file")
        origin["key"] = f"the default key file {default_key_file()}"
    if "key" in values:
        where = {"-key": "-key (visible in ps)", "VESTA_KEY": "VESTA_KEY"}.get(origin["key"], origin["key"])
        if origin["key"] == "-key-file":
            where = f"-key-file {flags['key_file']}"
        elif file_key_file is not None and origin["key"] == file_key_origin:
            where = f"{file_key_file} (key_file in the config)"
        used.append(f"federation key from {where}")
    for k, v in flags.items():
        if k in ("config", "key", "key_file") or v is None:
            continue
        if k not in _CHECKS:
            raise ConfigError(f"unknown setting {k!r}")
        values[k], origin[k] = v, "-" + k.replace("_", "-")

    checked: dict[str, Any] = {}
    for k, v in values.items():
        checked[k] = _CHECKS[k](origin[k], v)
    raw_name = checked.get("name") or socket.gethostname()
    checked["name"] = sanitize_name(raw_name)
    if checked["name"] != raw_name:
        log.warning("node name %r sanitized to %r", raw_name, checked["name"])
    checked.setdefault("key", "")
    cfg = Config(**checked)
    validate(cfg)
    for what in used:
        log.info("%s", what)
    return cfg



# ------------------------------------------------------------------------------- the key out of /proc

_KEY_FLAGS = (b"-key", b"--key")


def _mask_key_args(block: bytes) -> tuple[bytes, int]:
    """The command line (NUL-separated) with the value of every -key/--key (also -key=V) overwritten."""
    parts = block.split(b"\0")
    hidden = 0
    for i, part in enumerate(parts):
        if part in _KEY_FLAGS and i + 1 < len(parts) and parts[i + 1]:
            parts[i + 1] = b"x" * len(parts[i + 1])
            hidden += 1
        elif part.startswith(tuple(flag + b"=" for flag in _KEY_FLAGS)):
            flag, _, value = part.partition(b"=")
            parts[i] = flag + b"=" + b"x" * len(value)
            hidden += 1
    return b"\0".join(parts), hidden


def _mask_key_env(block: bytes) -> tuple[bytes, int]:
    """The environment block with the value of VESTA_KEY overwritten."""
    parts = block.split(b"\0")
    hidden = 0
    for i, part in enumerate(parts):
        if part.startswith(b"VESTA_KEY=") and len(part) > len(b"VESTA_KEY="):
            parts[i] = b"VESTA_KEY=" + b"x" * (len(part) - len(b"VESTA_KEY="))
            hidden += 1
    return b"\0".join(parts), hidden


def hide_key_from_proc(proc_self: Path = Path("/proc/self")) -> int:
    """Overwrite the federation key where other processes can read it: this process's original command
    line (``-key SECRET``, ``/proc/PID/cmdline``, readable by every user of the machine, so by a job that
    runs as ``exec_user`` without the sandbox) and environment (``VESTA_KEY``, ``/proc/PID/environ``,
    readable by processes of the same user). Python works from its own copies of both, read at start, so
    the originals can go. Returns how many values were hidden; 0 where ``/proc`` cannot be written."""
    try:
        fields = (proc_self / "stat").read_text().rsplit(")", 1)[1].split()
        # proc(5): arg_start, arg_end, env_start, env_end are fields 48 to 51; the list starts at field 3
        arg_start, arg_end, env_start, env_end = (int(fields[n - 3]) for n in (48, 49, 50, 51))
    except (OSError, ValueError, IndexError):
        return 0
    hidden = 0
    try:
        with open(proc_self / "mem", "r+b", buffering=0) as mem:
            for start, end, mask in ((arg_start, arg_end, _mask_key_args), (env_start, env_end, _mask_key_env)):
                if not 0 < start < end:
                    continue
                mem.seek(start)
                block = mem.read(end - start)
                masked, n = mask(block)
                if n and len(masked) == len(block):
                    mem.seek(start)
                    mem.write(masked)
                    hidden += n
    except OSError as exc:
        log.debug("could not hide the key in /proc/self: %s", exc)
    return hidden
