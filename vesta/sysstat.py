"""System readers: CPU, memory, load, power, thermals and GPUs.

Every reader takes the procfs or sysfs root as a parameter so tests can feed
it a fixture tree; nothing here reads the real system unless asked to.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = (
    "--query-gpu=name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
)


def _read_text(path: Path) -> str | None:
    """Return a file's stripped text, or None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _read_float(path: Path) -> float | None:
    """Return a file's content as a finite float, or None when absent or garbage."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class CpuLoad:
    """CPU utilisation since the previous sample, total and per core (0..100)."""

    total_pct: float
    per_core_pct: tuple[float, ...]


_Counters = tuple[int, ...]


def _read_stat(proc_root: Path) -> tuple[_Counters | None, dict[int, _Counters]]:
    """Parse the aggregate and per-core cpu lines of /proc/stat."""
    total: _Counters | None = None
    cores: dict[int, _Counters] = {}
    with open(proc_root / "stat", encoding="ascii", errors="replace") as f:
        for line in f:
            if not line.startswith("cpu"):
                continue
            name, *rest = line.split()
            try:
                # Only user..steal: guest and guest_nice are already included in user and nice.
                counters = tuple(int(v) for v in rest[:8])
            except ValueError:
                continue
            if len(counters) < 4:
                continue
            if name == "cpu":
                total = counters
            elif name[3:].isdigit():
                cores[int(name[3:])] = counters
    return total, cores


def _busy_pct(prev: _Counters | None, cur: _Counters) -> float:
    """Busy share between two counter sets; prev None means since boot."""
    before = prev if prev is not None and len(prev) == len(cur) else (0,) * len(cur)
    if sum(cur) - sum(before) <= 0:
        return 0.0  # counters reset or nothing elapsed
    # Clamp each field because iowait is known to step backwards slightly on NO_HZ kernels.
    deltas = [max(0, c - p) for c, p in zip(cur, before, strict=True)]
    elapsed = sum(deltas)
    idle = deltas[3] + (deltas[4] if len(deltas) > 4 else 0)
    return min(100.0, max(0.0, 100.0 * (elapsed - idle) / elapsed))


class CpuSampler:
    """Computes CPU utilisation from deltas of /proc/stat between calls."""

    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self._root = Path(proc_root)
        self._lock = threading.Lock()
        self._prev_total: _Counters | None = None
        self._prev_cores: dict[int, _Counters] = {}

    def sample(self) -> CpuLoad:
        """Return utilisation since the previous call (since boot on the first call)."""
        try:
            total, cores = _read_stat(self._root)
        except OSError as e:
            log.warning("cannot read %s: %s", self._root / "stat", e)
            return CpuLoad(0.0, ())
        with self._lock:
            # A core absent from the previous sample (hotplugged in) is measured since boot.
            per_core = tuple(_busy_pct(self._prev_cores.get(i), cores[i]) for i in sorted(cores))
            if total is not None:
                total_pct = _busy_pct(self._prev_total, total)
            else:
                total_pct = sum(per_core) / len(per_core) if per_core else 0.0
            self._prev_total = total
            self._prev_cores = cores
        return CpuLoad(total_pct, per_core)


def cpu_count(proc_root: str | Path = "/proc") -> int:
    """Number of cpuN lines in /proc/stat; os.cpu_count() or 1 if that fails."""
    try:
        _, cores = _read_stat(Path(proc_root))
    except OSError:
        cores = {}
    return len(cores) or os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class MemInfo:
    """Total and available memory in MiB."""

    total_mb: int
    available_mb: int


def read_meminfo(proc_root: str | Path = "/proc") -> MemInfo:
    """Read /proc/meminfo; raises OSError if missing, ValueError without MemTotal."""
    fields: dict[str, int] = {}
    with open(Path(proc_root) / "meminfo", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0])  # kB
    if "MemTotal" not in fields:
        raise ValueError(f"no MemTotal in {Path(proc_root) / 'meminfo'}")
    if "MemAvailable" in fields:
        available = fields["MemAvailable"]
    else:
        # Pre-3.14 kernels lack MemAvailable; this is the usual (optimistic) estimate.
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    total = fields["MemTotal"]
    return MemInfo(total // 1024, min(available, total) // 1024)


def read_loadavg(proc_root: str | Path = "/proc") -> tuple[float, float, float]:
    """Read the 1, 5 and 15 minute load averages; raises OSError or ValueError."""
    text = (Path(proc_root) / "loadavg").read_text(encoding="ascii")
    one, five, fifteen = (float(v) for v in text.split()[:3])
    return one, five, fifteen


@dataclass(frozen=True, slots=True)
class PowerInfo:
    """Mains and battery state from /sys/class/power_supply."""

    ac_online: bool | None
    battery_pct: float | None
    battery_status: str | None

    @property
    def on_battery(self) -> bool:
        """True when a battery exists and it is discharging or mains is explicitly offline."""
        has_battery = self.battery_pct is not None or self.battery_status is not None
        return has_battery and (self.battery_status == "Discharging" or self.ac_online is False)


# Most telling first: one discharging battery means the machine is drawing on batteries.
_STATUS_RANK = {s: i for i, s in enumerate(("Discharging", "Charging", "Not charging", "Full", "Unknown"))}


def _battery_capacity(supply: Path) -> float | None:
    """Charge in percent from capacity, else from energy_now/full or charge_now/full."""
    capacity = _read_float(supply / "capacity")
    if capacity is None:
        for prefix in ("energy", "charge"):
            now, full = _read_float(supply / f"{prefix}_now"), _read_float(supply / f"{prefix}_full")
            if now is not None and full:
                capacity = 100.0 * now / full
                break
    if capacity is None or capacity < 0:
        return None
    return min(capacity, 100.0)  # some firmware reports 101 while topping off


def read_power(sys_root: str | Path = "/sys") -> PowerInfo:
    """Summarise mains and battery supplies; unreadable entries count as absent."""
    base = Path(sys_root) / "class" / "power_supply"
    try:
        supplies = sorted(base.iterdir())
    except OSError:
        supplies = []
    mains: list[bool] = []
    capacities: list[tuple[float, float | None, float | None]] = []  # pct, energy_full, charge_full
    statuses: list[str] = []
    for supply in supplies:
        kind = _read_text(supply / "type")
        if kind in ("Mains", "USB"):
            online = _read_text(supply / "online")
            if online in ("0", "1", "2"):  # 2 is "online, fixed" on some USB-PD supplies
                mains.append(online != "0")
        elif kind == "Battery":
            # Peripheral batteries (mice, keyboards) say nothing about this machine's power.
            if (_read_text(supply / "scope") or "").lower() == "device":
                continue
            status = _read_text(supply / "status")
            if status:
                statuses.append(status)
            pct = _battery_capacity(supply)
            if pct is not None:
                capacities.append(
                    (pct, _read_float(supply / "energy_full"), _read_float(supply / "charge_full"))
                )
    ac_online = any(mains) if mains else None
    battery_status = min(statuses, key=lambda s: _STATUS_RANK.get(s, len(_STATUS_RANK)), default=None)
    return PowerInfo(ac_online, _weighted_capacity(capacities), battery_status)


def _weighted_capacity(caps: list[tuple[float, float | None, float | None]]) -> float | None:
    """Average battery percent weighted by energy_full, else charge_full, else plain mean."""
    if not caps:
        return None
    # Weights must share a unit across all batteries, so mixing energy and charge falls back to the mean.
    for column in (1, 2):
        weights = [c[column] for c in caps]
        if all(w is not None and w > 0 for w in weights):
            ws = [w for w in weights if w is not None]
            return sum(c[0] * w for c, w in zip(caps, ws, strict=True)) / sum(ws)
    return sum(c[0] for c in caps) / len(caps)


@dataclass(frozen=True, slots=True)
class Thermal:
    """One thermal zone's reading."""

    zone: str
    kind: str
    celsius: float


def read_thermals(sys_root: str | Path = "/sys") -> tuple[Thermal, ...]:
    """Read every thermal zone's type and temperature; unreadable zones are skipped."""
    base = Path(sys_root) / "class" / "thermal"
    try:
        # Numeric order so thermal_zone10 comes after thermal_zone2.
        zones = sorted(base.glob("thermal_zone*"), key=lambda p: (len(p.name), p.name))
    except OSError:
        return ()
    out: list[Thermal] = []
    for zone in zones:
        milli = _read_float(zone / "temp")
        # Disabled sensors can report nonsense below absolute zero.
        if milli is None or milli < -273_150:
            continue
        out.append(Thermal(zone.name, _read_text(zone / "type") or "unknown", milli / 1000.0))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU's identity, memory in MiB and utilisation in percent."""

    name: str
    mem_total_mb: int
    mem_used_mb: int
    util_pct: float


def _smi_number(value: str) -> float | None:
    """Parse one nvidia-smi field; [N/A]-style placeholders are 0, garbage is None."""
    value = value.strip()
    if (value.startswith("[") and value.endswith("]")) or value in ("N/A", "Not Supported"):
        return 0.0
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Parse nvidia-smi csv,noheader,nounits output of name,memory.total,memory.used,utilization.gpu."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        # Split from the right so a comma in a product name cannot shift the numbers.
        parts = line.rsplit(",", 3)
        if len(parts) != 4 or not parts[0].strip():
            continue
        total, used, util = (_smi_number(p) for p in parts[1:])
        if total is None or used is None or util is None:
            log.debug("skipping unparseable nvidia-smi line %r", line)
            continue
        gpus.append(Gpu(parts[0].strip(), int(total), int(used), util))
    return tuple(gpus)


def _nvml_gpus() -> tuple[Gpu, ...]:
    """Query GPUs through NVML; raises if pynvml is missing or NVML fails."""
    nvml: Any = importlib.import_module("pynvml")  # optional dependency, imported lazily
    nvml.nvmlInit()
    try:
        gpus: list[Gpu] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older bindings return bytes
                name = name.decode("utf-8", "replace")
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:
                util = 0.0  # not supported on some boards; memory is still worth reporting
            gpus.append(Gpu(str(name), int(mem.total) // 2**20, int(mem.used) // 2**20, util))
        return tuple(gpus)
    finally:
        nvml.nvmlShutdown()


def _smi_gpus(binary: str, timeout: float) -> tuple[Gpu, ...]:
    """Run nvidia-smi and parse it; any failure gives ()."""
    try:
        proc = subprocess.run(
            [binary, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.debug("nvidia-smi at %s failed: %s", binary, e)
        return ()
    if proc.returncode != 0:
        log.debug("nvidia-smi at %s exited %d: %s", binary, proc.returncode, proc.stderr.strip())
        return ()
    return parse_nvidia_smi(proc.stdout)


def detect_gpus(
    nvidia_smi: str | None = "auto", timeout: float = 5.0, use_nvml: bool = True
) -> tuple[Gpu, ...]:
    """Find GPUs via NVML, else nvidia-smi ("auto", a path, or None to skip); never raises."""
    if use_nvml:
        try:
            return _nvml_gpus()
        except Exception as e:  # NVML errors are many and untyped; any of them means fall through
            log.debug("NVML unavailable: %s", e)
    binary = shutil.which("nvidia-smi") if nvidia_smi == "auto" else nvidia_smi
    if binary is None:
        return ()
    return _smi_gpus(binary, timeout)
