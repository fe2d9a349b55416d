"""What this node offers right now: power mode, willingness and spare capacity.

Rules from the seed (003): on grid or charging a node lends at 100 %
willingness; discharging at >= 50 % charge ("solar") it lends in proportion to
its charge; below 50 % ("battery") at 35 %; below ``battery_min_pct`` it lends
nothing. ``-power grid|solar|battery`` forces a mode.

Offered cores = cores x min(cpu_offer_pct, 100 - reserve_pct) % x willingness.
Spare cores   = offered cores, but never more than what is left of the
                owner's share after the current load: the owner comes first.
"""

from __future__ import annotations

from dataclasses import dataclass

from vesta.sysstat import PowerInfo

BATTERY_WILLINGNESS = 0.35
SOLAR_THRESHOLD_PCT = 50.0


@dataclass(frozen=True, slots=True)
class PowerMode:
    mode: str            # grid | solar | battery
    willingness: float   # 0..1
    forced: bool


def power_mode(setting: str, info: PowerInfo, battery_min_pct: float) -> PowerMode:
    """Decide the power mode from the setting and what sysfs says."""
    charge = info.battery_pct
    if setting == "grid":
        return PowerMode("grid", 1.0, True)
    if setting == "battery":
        return PowerMode("battery", BATTERY_WILLINGNESS, True)
    if setting == "solar":
        return PowerMode("solar", (charge if charge is not None else 100.0) / 100.0, True)
    if not info.on_battery or charge is None:
        return PowerMode("grid", 1.0, False)
    if charge < battery_min_pct:
        return PowerMode("battery", 0.0, False)
    if charge >= SOLAR_THRESHOLD_PCT:
        return PowerMode("solar", charge / 100.0, False)
    return PowerMode("battery", BATTERY_WILLINGNESS, False)


@dataclass(frozen=True, slots=True)
class Offer:
    offered_cores: float
    offered_mem_mb: int
    spare_cores: float


def compute_offer(
    *,
    cores: int,
    cpu_pct: float,
    mem_total_mb: int,
    mem_avail_mb: int,
    cpu_offer_pct: int,
    reserve_pct: int,
    mem_offer_mb: int,
    willingness: float,
) -> Offer:
    share = min(cpu_offer_pct, 100 - reserve_pct) / 100.0
    offered = cores * share * willingness
    busy = cores * cpu_pct / 100.0
    headroom = cores * (100 - reserve_pct) / 100.0 - busy
    spare = max(0.0, min(offered, headroom))
    mem_room = mem_avail_mb - mem_total_mb * reserve_pct / 100.0
    mem = max(0.0, min(float(mem_offer_mb), mem_room)) * willingness
    return Offer(offered_cores=round(offered, 3), offered_mem_mb=int(mem), spare_cores=round(spare, 3))
