"""Energy per generated token, read from hardware counters, never estimated.

Two sources are read when present: Intel/AMD RAPL package counters under /sys/class/powercap
(CPU sockets; the `dram` sub-zones are skipped because package zones already include them on
AMD and double-count on some Intel parts) and NVML's total-energy counter on NVIDIA GPUs.
When neither is readable (containers usually hide powercap; no GPU) the reading says
so with a reason, and benchmarks report energy as unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")


@dataclass
class _RaplZone:
    energy_file: Path
    max_uj: int  # the counter wraps around at this value


def _rapl_zones(root: Path) -> tuple[list[_RaplZone], str | None]:
    """Top-level package zones (`intel-rapl:N`), or ([], why not)."""
    if not root.is_dir():
        return [], f"{root} does not exist (RAPL not exposed on this machine or container)"
    zones = []
    for d in sorted(root.glob("intel-rapl:*")):
        if d.name.count(":") != 1:  # intel-rapl:0:0 and deeper are sub-zones of a package
            continue
        energy = d / "energy_uj"
        try:
            energy.read_text()
            max_uj = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError) as e:
            return [], f"cannot read {energy}: {e}"
        zones.append(_RaplZone(energy, max_uj))
    if not zones:
        return [], f"no intel-rapl package zones under {root}"
    return zones, None


def _nvml_handles() -> tuple[Any, list[Any], str | None]:
    try:
        import pynvml
    except ImportError:
        return None, [], "pynvml not installed"
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
        for h in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except Exception as e:  # NVMLError has many subclasses; any means "not readable"
        return None, [], f"NVML not readable: {e}"
    if not handles:
        return None, [], "NVML found no GPUs"
    return pynvml, handles, None


@dataclass
class EnergyReading:
    """Joules used between start() and stop(), per source; None with reasons when unreadable."""

    joules: float | None
    sources: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)

    def as_dict(self, tokens: int | None = None) -> dict[str, Any]:
        per_token = (self.joules / tokens if self.joules is not None and tokens else None)
        return {"energy_j": self.joules, "energy_per_token_j": per_token,
                "energy_sources": self.sources,
                "energy_unavailable_reason": None if self.joules is not None
                else "; ".join(self.unavailable) or "no energy counter readable"}


class EnergyMeter:
    """Reads every available counter at start() and stop(); use around the timed region."""

    def __init__(self, powercap_root: Path = POWERCAP, use_nvml: bool = True) -> None:
        self._zones, rapl_why = _rapl_zones(powercap_root)
        self._nvml, self._gpus, nvml_why = _nvml_handles() if use_nvml else (None, [], "NVML off")
        self._why = [w for w in (rapl_why, nvml_why) if w]
        self._start: tuple[list[int], list[int]] | None = None

    @property
    def available(self) -> bool:
        return bool(self._zones or self._gpus)

    def _read(self) -> tuple[list[int], list[int]]:
        rapl = [int(z.energy_file.read_text()) for z in self._zones]  # microjoules
        gpus = [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._gpus]  # mJ
        return rapl, gpus

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError("EnergyMeter.stop() called before start()")
        if not self.available:
            return EnergyReading(None, [], list(self._why))
        (rapl0, gpu0), (rapl1, gpu1) = self._start, self._read()
        joules = 0.0
        for z, a, b in zip(self._zones, rapl0, rapl1):
            joules += ((b - a) % (z.max_uj + 1)) / 1e6  # modulo handles one wraparound
        joules += sum(b - a for a, b in zip(gpu0, gpu1)) / 1e3
        sources = (["rapl"] if self._zones else []) + (["nvml"] if self._gpus else [])
        return EnergyReading(joules, sources, list(self._why))
