"""Energy accounting: RAPL package counters read across a wrap, and the stated estimate where they cannot be read
(test_pretrain.py and test_zero.py check the compute section of real runs)."""

import time

import pytest
import torch

from lmforge.train.config import TrainConfig
from lmforge.train.energy import EnergyMeter, Rapl, rapl_packages


def write_zone(root, name: str, energy_uj: int, max_uj: int = 1_000_000_000) -> None:
    zone = root / name
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


@pytest.fixture
def powercap(tmp_path):
    """A powercap tree as Linux lays it out: two packages, a core subzone and an MMIO copy of package 0."""
    write_zone(tmp_path, "intel-rapl:0", 900_000_000)
    write_zone(tmp_path, "intel-rapl:1", 5_000_000)
    write_zone(tmp_path, "intel-rapl:0:0", 123)  # the cores of package 0: counted in the package already
    write_zone(tmp_path, "intel-rapl-mmio:0", 456)  # the same package through MMIO
    return tmp_path


def test_only_the_packages_are_read(powercap):
    assert [z.name for z in rapl_packages(powercap)] == ["intel-rapl:0", "intel-rapl:1"]


def test_rapl_counts_across_a_wrap(powercap):
    rapl = Rapl(rapl_packages(powercap))
    write_zone(powercap, "intel-rapl:0", 100_000_000)  # wrapped at 1e9 uJ: 100 J to the top, 100 J after
    write_zone(powercap, "intel-rapl:1", 8_000_000)  # 3 J
    assert rapl.sample() == pytest.approx(203.0)
    write_zone(powercap, "intel-rapl:0", 150_000_000)
    assert rapl.sample() == pytest.approx(253.0)


def test_meter_reads_rapl_where_readable(powercap, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    tc = TrainConfig(grid_g_co2_per_kwh=250.0)
    meter = EnergyMeter(torch.device("cpu"), tc, powercap)
    write_zone(powercap, "intel-rapl:1", 5_000_000 + 36_000_000)  # 36 J = 1e-5 kWh
    compute = meter.stop(flops=1e9)
    assert compute["energy_source"].startswith("RAPL counters of 2 CPU package(s)")
    assert compute["energy_kwh"] == pytest.approx(1e-5)
    assert compute["co2_g"] == pytest.approx(250.0 * 1e-5)
    assert compute["flops"] == 1e9 and compute["ranks"] == 1


def test_meter_estimates_from_busy_core_seconds_without_counters(tmp_path):
    tc = TrainConfig(cpu_watts_per_core=20.0)
    meter = EnergyMeter(torch.device("cpu"), tc, tmp_path)  # an empty powercap: nothing readable
    start = time.process_time()
    while time.process_time() - start < 0.2:  # keep a core busy
        torch.randn(64, 64) @ torch.randn(64, 64)
    compute = meter.stop(flops=0.0)
    assert compute["energy_source"] == "estimate: 20 W per busy CPU core (RAPL counters not readable)"
    assert compute["device_seconds"] >= 0.2
    assert compute["energy_kwh"] == pytest.approx(compute["device_seconds"] * 20.0 / 3.6e6)
    assert compute["co2_g"] == pytest.approx(compute["energy_kwh"] * 480.0)  # the documented default grid
