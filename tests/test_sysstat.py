"""Tests for vesta.sysstat against fixture procfs/sysfs trees built in tmp_path."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from vesta.sysstat import (
    CpuLoad,
    CpuSampler,
    Gpu,
    MemInfo,
    PowerInfo,
    Thermal,
    cpu_count,
    detect_gpus,
    parse_nvidia_smi,
    read_loadavg,
    read_meminfo,
    read_power,
    read_thermals,
)

# --- fixture builders ----------------------------------------------------------


def cpu_line(
    name: str, user: int = 0, system: int = 0, idle: int = 0, iowait: int = 0, guest: int = 0
) -> str:
    """One /proc/stat cpu line: user nice system idle iowait irq softirq steal guest guest_nice."""
    return f"{name} {user} 0 {system} {idle} {iowait} 0 0 0 {guest} 0"


def write_stat(proc: Path, *lines: str) -> None:
    """Write /proc/stat with the given cpu lines plus the usual non-cpu noise."""
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "stat").write_text("\n".join([*lines, "intr 1234 0 0", "ctxt 99", "btime 1700000000"]) + "\n")


def write_files(directory: Path, **files: str) -> Path:
    """Create directory and write each keyword as a file holding its value."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(content + "\n")
    return directory


def supply(sys_root: Path, name: str, **files: str) -> Path:
    """Create /sys/class/power_supply/<name> with the given attribute files."""
    return write_files(sys_root / "class" / "power_supply" / name, **files)


def zone(sys_root: Path, n: int, **files: str) -> Path:
    """Create /sys/class/thermal/thermal_zone<n> with the given attribute files."""
    return write_files(sys_root / "class" / "thermal" / f"thermal_zone{n}", **files)


def fake_binary(tmp_path: Path, body: str, name: str = "nvidia-smi") -> Path:
    """Write an executable /bin/sh script and return its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


# --- CPU -----------------------------------------------------------------------


def test_cpu_first_sample_is_since_boot(tmp_path: Path) -> None:
    write_stat(
        tmp_path,
        cpu_line("cpu", user=150, idle=450, iowait=50),
        cpu_line("cpu0", user=100, idle=300),
        cpu_line("cpu1", user=50, idle=150, iowait=50),
    )
    load = CpuSampler(tmp_path).sample()
    assert load.total_pct == pytest.approx(100 * 150 / 650)
    assert load.per_core_pct == pytest.approx((25.0, 20.0))


def test_cpu_deltas_between_samples(tmp_path: Path) -> None:
    write_stat(
        tmp_path,
        cpu_line("cpu", user=150, idle=450, iowait=50),
        cpu_line("cpu0", user=100, idle=300),
        cpu_line("cpu1", user=50, idle=150, iowait=50),
    )
    sampler = CpuSampler(tmp_path)
    sampler.sample()
    # cpu0: +50 user +50 idle -> 50%; cpu1: +30 system +60 idle +10 iowait -> 30%.
    write_stat(
        tmp_path,
        cpu_line("cpu", user=200, system=30, idle=560, iowait=60),
        cpu_line("cpu0", user=150, idle=350),
        cpu_line("cpu1", user=50, system=30, idle=210, iowait=60),
    )
    load = sampler.sample()
    assert load.total_pct == pytest.approx(40.0)
    assert load.per_core_pct == pytest.approx((50.0, 30.0))


def test_cpu_guest_time_is_not_counted_twice(tmp_path: Path) -> None:
    # guest is already part of user; adding it to the total would halve the busy share.
    write_stat(tmp_path, cpu_line("cpu", user=100, idle=100, guest=100), cpu_line("cpu0", user=100, idle=100))
    assert CpuSampler(tmp_path).sample().total_pct == pytest.approx(50.0)


def test_cpu_cores_sorted_numerically(tmp_path: Path) -> None:
    lines = [cpu_line(f"cpu{i}", user=i, idle=100 - i) for i in (10, 2, 0, 1)]
    write_stat(tmp_path, cpu_line("cpu", user=13, idle=387), *lines)
    assert CpuSampler(tmp_path).sample().per_core_pct == pytest.approx((0.0, 1.0, 2.0, 10.0))


def test_cpu_counters_backwards_or_unchanged_give_zero(tmp_path: Path) -> None:
    write_stat(tmp_path, cpu_line("cpu", user=500, idle=500), cpu_line("cpu0", user=500, idle=500))
    sampler = CpuSampler(tmp_path)
    assert sampler.sample().total_pct == pytest.approx(50.0)
    assert sampler.sample() == CpuLoad(0.0, (0.0,))  # zero delta
    write_stat(tmp_path, cpu_line("cpu", user=10, idle=10), cpu_line("cpu0", user=10, idle=10))
    assert sampler.sample() == CpuLoad(0.0, (0.0,))  # went backwards


def test_cpu_iowait_stepping_back_is_clamped(tmp_path: Path) -> None:
    write_stat(tmp_path, cpu_line("cpu", user=100, idle=100, iowait=50), cpu_line("cpu0"))
    sampler = CpuSampler(tmp_path)
    sampler.sample()
    # +50 user, +50 idle, iowait -5 (a known NO_HZ quirk) -> 50%, not more.
    write_stat(tmp_path, cpu_line("cpu", user=150, idle=150, iowait=45), cpu_line("cpu0"))
    assert sampler.sample().total_pct == pytest.approx(50.0)


def test_cpu_hotplug_does_not_crash(tmp_path: Path) -> None:
    two = [cpu_line("cpu0", user=10, idle=10), cpu_line("cpu1", user=10, idle=10)]
    write_stat(tmp_path, cpu_line("cpu", user=20, idle=20), *two)
    sampler = CpuSampler(tmp_path)
    assert len(sampler.sample().per_core_pct) == 2
    write_stat(tmp_path, cpu_line("cpu", user=40, idle=30), *two, cpu_line("cpu2", user=20, idle=20))
    grown = sampler.sample()
    assert grown.per_core_pct == pytest.approx((0.0, 0.0, 50.0))  # new core measured since boot
    assert grown.total_pct == pytest.approx(100 * 20 / 30)
    write_stat(tmp_path, cpu_line("cpu", user=40, idle=40), cpu_line("cpu0", user=10, idle=20))
    shrunk = sampler.sample()
    assert shrunk.per_core_pct == pytest.approx((0.0,))
    assert shrunk.total_pct == 0.0


def test_cpu_missing_stat_is_empty_not_an_error(tmp_path: Path) -> None:
    assert CpuSampler(tmp_path / "nowhere").sample() == CpuLoad(0.0, ())


def test_cpu_count(tmp_path: Path) -> None:
    write_stat(tmp_path, cpu_line("cpu"), *(cpu_line(f"cpu{i}") for i in range(6)))
    assert cpu_count(tmp_path) == 6
    assert cpu_count(tmp_path / "nowhere") == (os.cpu_count() or 1)


# --- memory and load -----------------------------------------------------------


def test_meminfo_uses_memavailable(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(
        "MemTotal:       16384000 kB\nMemFree:         1024000 kB\n"
        "MemAvailable:    8192000 kB\nBuffers:          102400 kB\nCached:          2048000 kB\n"
        "HugePages_Total:       0\n"
    )
    assert read_meminfo(tmp_path) == MemInfo(total_mb=16000, available_mb=8000)


def test_meminfo_without_memavailable_sums_free_buffers_cached(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(
        "MemTotal:        4096000 kB\nMemFree:          512000 kB\nBuffers:          102400 kB\n"
        "Cached:           409600 kB\n"
    )
    assert read_meminfo(tmp_path) == MemInfo(total_mb=4000, available_mb=1000)


def test_meminfo_without_memtotal_raises(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemFree: 100 kB\n")
    with pytest.raises(ValueError, match="MemTotal"):
        read_meminfo(tmp_path)


def test_loadavg(tmp_path: Path) -> None:
    (tmp_path / "loadavg").write_text("0.52 1.25 3.00 2/467 12345\n")
    assert read_loadavg(tmp_path) == (0.52, 1.25, 3.0)


# --- power ---------------------------------------------------------------------


def test_power_ac_online_battery_charging(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Charging", scope="System")
    info = read_power(tmp_path)
    assert info == PowerInfo(ac_online=True, battery_pct=80.0, battery_status="Charging")
    assert not info.on_battery


def test_power_on_battery_discharging(tmp_path: Path) -> None:
    supply(tmp_path, "ADP1", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="42", status="Discharging")
    info = read_power(tmp_path)
    assert info == PowerInfo(ac_online=False, battery_pct=42.0, battery_status="Discharging")
    assert info.on_battery


def test_power_desktop_without_any_supply(tmp_path: Path) -> None:
    info = read_power(tmp_path)
    assert info == PowerInfo(ac_online=None, battery_pct=None, battery_status=None)
    assert not info.on_battery


def test_power_desktop_with_mains_only(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    info = read_power(tmp_path)
    assert (info.ac_online, info.battery_pct, info.on_battery) == (True, None, False)


def test_power_usb_supply_counts_as_mains(tmp_path: Path) -> None:
    supply(tmp_path, "ucsi-source-psy-USBC000:001", type="USB", online="1")
    supply(tmp_path, "BAT0", type="Battery", capacity="99", status="Not charging")
    info = read_power(tmp_path)
    assert info.ac_online is True
    assert not info.on_battery


@pytest.mark.parametrize(
    ("full0", "full1", "expected"),
    [
        ({"energy_full": "30000000"}, {"energy_full": "10000000"}, 85.0),  # (100*30 + 40*10) / 40
        ({"charge_full": "1000000"}, {"charge_full": "3000000"}, 55.0),  # (100*1 + 40*3) / 4
        ({"energy_full": "30000000"}, {"charge_full": "3000000"}, 70.0),  # mixed units: plain mean
        ({}, {}, 70.0),
    ],
)
def test_power_two_batteries_weighted(
    tmp_path: Path, full0: dict[str, str], full1: dict[str, str], expected: float
) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="100", status="Full", **full0)
    supply(tmp_path, "BAT1", type="Battery", capacity="40", status="Discharging", **full1)
    info = read_power(tmp_path)
    assert info.battery_pct == pytest.approx(expected)
    assert info.battery_status == "Discharging"  # one draining battery is the telling one
    assert info.on_battery


def test_power_device_scope_battery_ignored(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity="5", status="Discharging")
    info = read_power(tmp_path)
    assert info == PowerInfo(ac_online=True, battery_pct=None, battery_status=None)
    assert not info.on_battery


def test_power_garbage_files_are_ignored(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="garbage", status="Discharging")
    supply(tmp_path, "BAT1", type="Battery", capacity="60", status="Discharging")
    supply(tmp_path, "AC", type="Mains", online="maybe")
    (supply(tmp_path, "weird") / "type").mkdir()  # unreadable type file
    info = read_power(tmp_path)
    assert info == PowerInfo(ac_online=None, battery_pct=60.0, battery_status="Discharging")


def test_power_lone_garbage_battery_still_reports_status(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="", status="Discharging")
    info = read_power(tmp_path)
    assert info.battery_pct is None
    assert info.on_battery


def test_power_capacity_from_energy_counters(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", energy_now="25000000", energy_full="50000000", status="Full")
    assert read_power(tmp_path).battery_pct == pytest.approx(50.0)


# --- thermals ------------------------------------------------------------------


def test_thermals_skip_unreadable_zones(tmp_path: Path) -> None:
    zone(tmp_path, 0, type="x86_pkg_temp", temp="45500")
    zone(tmp_path, 1, type="acpitz", temp="27800")
    (zone(tmp_path, 2, type="broken") / "temp").mkdir()  # reading raises IsADirectoryError
    zone(tmp_path, 3, type="garbage", temp="n/a")
    zone(tmp_path, 10, temp="-5000")  # no type file
    assert read_thermals(tmp_path) == (
        Thermal("thermal_zone0", "x86_pkg_temp", 45.5),
        Thermal("thermal_zone1", "acpitz", 27.8),
        Thermal("thermal_zone10", "unknown", -5.0),
    )


def test_thermals_absent(tmp_path: Path) -> None:
    assert read_thermals(tmp_path) == ()


# --- GPUs ----------------------------------------------------------------------

SMI_OUTPUT = """\
NVIDIA H100 80GB HBM3, 81559, 1024, 37
NVIDIA GeForce RTX 3090, 24576, [N/A], [Not Supported]

No devices were found
Tesla K80, lots, 0, 0
"""


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi(SMI_OUTPUT) == (
        Gpu("NVIDIA H100 80GB HBM3", 81559, 1024, 37.0),
        Gpu("NVIDIA GeForce RTX 3090", 24576, 0, 0.0),
    )
    assert parse_nvidia_smi("") == ()


def test_detect_gpus_with_fake_nvidia_smi(tmp_path: Path) -> None:
    # The script checks it was called with the documented query, so a wrong argv yields ().
    lines = " ".join(f"'{line}'" for line in SMI_OUTPUT.splitlines())
    body = (
        '[ "$1" = "--query-gpu=name,memory.total,memory.used,utilization.gpu" ] || exit 2\n'
        '[ "$2" = "--format=csv,noheader,nounits" ] || exit 2\n'
        f"printf '%s\\n' {lines}"
    )
    smi = fake_binary(tmp_path, body)
    assert detect_gpus(str(smi), use_nvml=False) == parse_nvidia_smi(SMI_OUTPUT)
    assert len(detect_gpus(str(smi), use_nvml=False)) == 2


def test_detect_gpus_auto_finds_nvidia_smi_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_binary(tmp_path, "printf 'Fake GPU, 1000, 10, 5\\n'")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus("auto", use_nvml=False) == (Gpu("Fake GPU", 1000, 10, 5.0),)


def test_detect_gpus_failures_give_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = fake_binary(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 1", name="failing")
    slow = fake_binary(tmp_path, "exec sleep 10", name="slow")
    assert detect_gpus(str(failing), use_nvml=False) == ()
    assert detect_gpus(str(tmp_path / "missing"), use_nvml=False) == ()
    assert detect_gpus(str(slow), timeout=0.2, use_nvml=False) == ()
    assert detect_gpus(None, use_nvml=False) == ()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_gpus("auto", use_nvml=False) == ()


class _NVMLError(Exception):
    pass


def fake_pynvml(init_fails: bool = False) -> types.ModuleType:
    """A stand-in pynvml module with one GPU whose utilisation is not supported."""
    mod = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise _NVMLError("driver not loaded")

    def utilisation(handle: int) -> object:
        raise _NVMLError("not supported")

    mod.__dict__.update(
        NVMLError=_NVMLError,
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA A100-SXM4-40GB",  # older bindings return bytes
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=40 * 2**30, used=512 * 2**20),
        nvmlDeviceGetUtilizationRates=utilisation,
    )
    return mod


def test_detect_gpus_prefers_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    smi = fake_binary(tmp_path, "printf 'Wrong GPU, 1, 1, 1\\n'")
    assert detect_gpus(str(smi)) == (Gpu("NVIDIA A100-SXM4-40GB", 40960, 512, 0.0),)
    assert nvml.__dict__["calls"] == ["init", "shutdown"]


def test_detect_gpus_nvml_error_falls_through_to_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    smi = fake_binary(tmp_path, "printf 'Fallback GPU, 2048, 100, 12\\n'")
    assert detect_gpus(str(smi)) == (Gpu("Fallback GPU", 2048, 100, 12.0),)


# --- the real machine ----------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux procfs")
def test_real_proc() -> None:
    assert cpu_count() >= 1
    sampler = CpuSampler()
    first, second = sampler.sample(), sampler.sample()
    for load in (first, second):
        assert 0.0 <= load.total_pct <= 100.0
        assert all(0.0 <= pct <= 100.0 for pct in load.per_core_pct)
    assert len(first.per_core_pct) == cpu_count()
    mem = read_meminfo()
    assert 0 < mem.available_mb <= mem.total_mb
    assert all(v >= 0.0 for v in read_loadavg())
