"""budget: power mode and willingness from the battery, and what the node offers (seed rules, 003)."""

from __future__ import annotations

from typing import Any

import pytest

from vesta.budget import BATTERY_WILLINGNESS, Offer, PowerMode, compute_offer, power_mode
from vesta.sysstat import PowerInfo

AC = PowerInfo(ac_online=True, battery_pct=None, battery_status=None)


def discharging(pct: float) -> PowerInfo:
    return PowerInfo(ac_online=False, battery_pct=pct, battery_status="Discharging")


# ---------------------------------------------------------------- power mode


def test_auto_with_ac_online_is_grid() -> None:
    assert power_mode("auto", AC, 15) == PowerMode("grid", 1.0, False)


def test_auto_charging_laptop_is_grid() -> None:
    info = PowerInfo(ac_online=True, battery_pct=40.0, battery_status="Charging")
    assert power_mode("auto", info, 15) == PowerMode("grid", 1.0, False)


def test_auto_discharging_80_is_solar_at_charge() -> None:
    mode = power_mode("auto", discharging(80), 15)
    assert mode.mode == "solar" and mode.willingness == pytest.approx(0.8) and not mode.forced


def test_auto_discharging_40_is_battery() -> None:
    assert power_mode("auto", discharging(40), 15) == PowerMode("battery", 0.35, False)
    assert BATTERY_WILLINGNESS == 0.35


def test_auto_below_battery_min_lends_nothing() -> None:
    mode = power_mode("auto", discharging(10), 15)
    assert mode.willingness == 0.0 and mode.mode == "battery"


@pytest.mark.parametrize(
    ("pct", "mode", "willingness"),
    [(100, "solar", 1.0), (50, "solar", 0.5), (49.9, "battery", 0.35), (15, "battery", 0.35), (14.9, "battery", 0.0),
     (0, "battery", 0.0)],
)
def test_auto_thresholds(pct: float, mode: str, willingness: float) -> None:
    got = power_mode("auto", discharging(pct), 15)
    assert got.mode == mode and got.willingness == pytest.approx(willingness)


def test_battery_min_is_configurable() -> None:
    assert power_mode("auto", discharging(30), 40).willingness == 0.0
    assert power_mode("auto", discharging(30), 0).willingness == 0.35


def test_mains_offline_without_status_counts_as_battery() -> None:
    info = PowerInfo(ac_online=False, battery_pct=70.0, battery_status=None)
    assert power_mode("auto", info, 15).mode == "solar"


@pytest.mark.parametrize(
    "info",
    [
        PowerInfo(ac_online=None, battery_pct=None, battery_status=None),  # desktop, nothing in sysfs
        PowerInfo(ac_online=False, battery_pct=None, battery_status=None),  # no battery at all
        PowerInfo(ac_online=True, battery_pct=90.0, battery_status="Full"),
    ],
    ids=["nothing", "no-battery", "full"],
)
def test_no_battery_or_on_mains_is_grid(info: PowerInfo) -> None:
    assert power_mode("auto", info, 15) == PowerMode("grid", 1.0, False)


def test_discharging_with_unknown_charge_is_grid() -> None:
    info = PowerInfo(ac_online=False, battery_pct=None, battery_status="Discharging")
    assert power_mode("auto", info, 15).willingness == 1.0


def test_forced_modes_ignore_the_battery() -> None:
    assert power_mode("grid", discharging(5), 15) == PowerMode("grid", 1.0, True)
    assert power_mode("battery", AC, 15) == PowerMode("battery", 0.35, True)
    solar = power_mode("solar", discharging(60), 15)
    assert solar.mode == "solar" and solar.forced and solar.willingness == pytest.approx(0.6)
    assert power_mode("solar", AC, 15) == PowerMode("solar", 1.0, True)  # no battery: full willingness


# ---------------------------------------------------------------- offer


def offer(**kw: Any) -> Offer:
    args: dict[str, Any] = {
        "cores": 8, "cpu_pct": 0.0, "mem_total_mb": 16000, "mem_avail_mb": 12000,
        "cpu_offer_pct": 75, "reserve_pct": 20, "mem_offer_mb": 1024, "willingness": 1.0,
    }
    args.update(kw)
    return compute_offer(**args)


def test_offered_cores_is_cores_times_share_times_willingness() -> None:
    # 8 cores x min(75, 100 - 20) % x 1.0 = 6.0
    assert offer().offered_cores == pytest.approx(6.0)
    # the reserve wins when it leaves less than cpu_offer_pct: 8 x min(75, 50) % = 4.0
    assert offer(reserve_pct=50).offered_cores == pytest.approx(4.0)
    # willingness scales it: 8 x 0.75 x 0.35 = 2.1
    assert offer(willingness=0.35).offered_cores == pytest.approx(2.1)
    assert offer(willingness=0.0).offered_cores == 0.0
    assert offer(cpu_offer_pct=0).offered_cores == 0.0


def test_idle_machine_has_all_of_its_offer_spare() -> None:
    o = offer(cpu_pct=0.0)
    assert o.spare_cores == pytest.approx(o.offered_cores) == pytest.approx(6.0)


def test_spare_is_limited_by_the_owners_headroom() -> None:
    # owner's share: 8 x 80 % = 6.4 cores; busy 50 % = 4 cores -> headroom 2.4 < offered 6
    assert offer(cpu_pct=50.0).spare_cores == pytest.approx(2.4)
    # offered stays what it is: it is the policy, spare is what is free right now
    assert offer(cpu_pct=50.0).offered_cores == pytest.approx(6.0)


@pytest.mark.parametrize("cpu_pct", [80.0, 95.0, 100.0])
def test_busy_machine_has_no_spare(cpu_pct: float) -> None:
    assert offer(cpu_pct=cpu_pct).spare_cores == 0.0


def test_memory_offer_capped_by_mem_offer_mb() -> None:
    assert offer(mem_offer_mb=1024).offered_mem_mb == 1024


def test_memory_offer_capped_by_available_minus_reserve() -> None:
    # 16000 total, reserve 20 % = 3200; available 4000 -> room 800 < cap 1024
    assert offer(mem_avail_mb=4000).offered_mem_mb == 800
    # less available than the reserve: nothing
    assert offer(mem_avail_mb=3000).offered_mem_mb == 0


def test_memory_offer_scaled_by_willingness() -> None:
    assert offer(willingness=0.5).offered_mem_mb == 512
    assert offer(mem_avail_mb=4000, willingness=0.5).offered_mem_mb == 400
    assert offer(willingness=0.0).offered_mem_mb == 0


def test_offer_values_are_never_negative() -> None:
    o = offer(cpu_pct=100.0, mem_avail_mb=0, reserve_pct=99, cpu_offer_pct=100)
    assert o.offered_cores >= 0 and o.spare_cores == 0.0 and o.offered_mem_mb == 0
