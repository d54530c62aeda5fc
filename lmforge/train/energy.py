"""Compute and energy of a training loop: FLOPs, device-seconds, kWh and CO2, measured by the CPU's RAPL counters or
the GPU's NVML counter where this process can read them, else estimated from a stated power per device."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.train.config import TrainConfig

POWERCAP = Path("/sys/class/powercap")


def rapl_packages(root: Path = POWERCAP) -> list[Path]:
    """The CPU package zones (intel-rapl:N) whose energy counter this process can read; their core and dram subzones
    (intel-rapl:N:M) are left out, the package counts its cores. Since 2020 most kernels let only root read them."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and _read_int(zone / "energy_uj") is not None:
            zones.append(zone)
    return zones


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class Rapl:
    """Joules of the CPU packages since the start, from their microjoule counters, which wrap at max_energy_range_uj
    (every ~20 minutes at 200 W): sample() more often than that."""

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.ranges = [_read_int(z / "max_energy_range_uj") or 2**32 for z in zones]
        self.last = [self._read(z) for z in zones]
        self.joules = 0.0

    @staticmethod
    def _read(zone: Path) -> int:
        return _read_int(zone / "energy_uj") or 0

    def sample(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._read(zone)
            self.joules += ((now - self.last[i]) % self.ranges[i]) / 1e6
            self.last[i] = now
        return self.joules


def _nvml_energy(device: torch.device):
    """A function returning the GPU's energy counter in joules (NVML, Volta and newer), or None where pynvml or the
    counter is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))  # CUDA_VISIBLE_DEVICES
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # ImportError, NVMLError_NotSupported, a driver without NVML: fall back to the estimate
        return None
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # millijoules


class EnergyMeter:
    """This rank's energy from construction to stop(), which sums every rank's. On a CPU, RAPL counts whole packages
    (every process on them), so only the first rank of each machine reads it; otherwise each busy core-second costs
    train.cpu_watts_per_core. On a GPU, NVML counts the rank's own GPU; otherwise each second costs train.gpu_watts."""

    def __init__(self, device: torch.device, tc: TrainConfig, powercap: Path = POWERCAP):
        self.device, self.tc = device, tc
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.rapl, self.nvml = None, None
        self.counted_elsewhere = False  # another rank of this machine reads its RAPL packages
        if device.type == "cuda":
            self.nvml = _nvml_energy(device)
            self.source = "NVML energy counter" if self.nvml else f"estimate: {tc.gpu_watts:g} W per GPU"
            self.joules0 = self.nvml() if self.nvml else 0.0
        elif zones := rapl_packages(powercap):
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                self.rapl = Rapl(zones)
            else:
                self.counted_elsewhere = True
            self.source = f"RAPL counters of {len(zones)} CPU package(s), every process on them"
        else:
            self.source = f"estimate: {tc.cpu_watts_per_core:g} W per busy CPU core (RAPL counters not readable)"

    def sample(self) -> None:
        """Read the RAPL counters before they wrap; call it every step."""
        if self.rapl is not None:
            self.rapl.sample()

    def stop(self, flops: float) -> dict[str, float | int | str]:
        """The compute section of a stage's summary for `flops` model FLOPs trained; every rank calls this."""
        wall = time.perf_counter() - self.wall0
        if self.device.type == "cuda":
            device_seconds = wall
            joules = self.nvml() - self.joules0 if self.nvml else wall * self.tc.gpu_watts
        else:  # the cores this process kept busy, all its threads together
            device_seconds = time.process_time() - self.cpu0
            if self.rapl is not None:
                joules = self.rapl.sample()
            elif self.counted_elsewhere:
                joules = 0.0
            else:
                joules = device_seconds * self.tc.cpu_watts_per_core
        totals = torch.tensor([joules, device_seconds], dtype=torch.float64, device=self.device)
        ranks = 1
        if dist.is_initialized():
            dist.all_reduce(totals)
            ranks = dist.get_world_size()
        joules, device_seconds = totals.tolist()
        kwh = joules / 3.6e6
        return {
            "flops": flops,
            "device": self.device.type,
            "ranks": ranks,
            "wall_seconds": wall,
            # GPU-seconds, or on a CPU the seconds of core time the ranks used
            "device_seconds": device_seconds,
            "energy_source": self.source,
            "energy_kwh": kwh,
            "grid_g_co2_per_kwh": self.tc.grid_g_co2_per_kwh,
            "co2_g": kwh * self.tc.grid_g_co2_per_kwh,
        }
