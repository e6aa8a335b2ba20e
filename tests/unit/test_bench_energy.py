"""EnergyMeter over a fake RAPL powercap tree: package zones only, wraparound, unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest

from servelm.bench.energy import EnergyMeter, EnergyReading


def _zone(root: Path, name: str, energy_uj: int, max_uj: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_package_zones_summed_subzones_ignored(tmp_path):
    pkg0 = _zone(tmp_path, "intel-rapl:0", 1_000_000, 10**9)
    pkg1 = _zone(tmp_path, "intel-rapl:1", 5_000_000, 10**9)
    dram = _zone(tmp_path, "intel-rapl:0:0", 0, 10**9)  # sub-zone: already inside package 0
    meter = EnergyMeter(powercap_root=tmp_path, use_nvml=False)
    assert meter.available
    meter.start()
    _set(pkg0, 3_500_000)  # +2.5 J
    _set(pkg1, 5_500_000)  # +0.5 J
    _set(dram, 9_000_000)  # would add 9 J if counted
    r = meter.stop()
    assert r.joules == pytest.approx(3.0)
    assert r.sources == ["rapl"]
    d = r.as_dict(tokens=10)
    assert d["energy_j"] == pytest.approx(3.0) and d["energy_per_token_j"] == pytest.approx(0.3)
    assert d["energy_unavailable_reason"] is None and d["energy_sources"] == ["rapl"]


def test_counter_wraparound(tmp_path):
    max_uj = 262_143_328_850
    pkg = _zone(tmp_path, "intel-rapl:0", max_uj - 1_000_000, max_uj)
    meter = EnergyMeter(powercap_root=tmp_path, use_nvml=False)
    meter.start()
    _set(pkg, 2_000_000)  # wrapped: 1 J to the top, then 0 -> 2 J (the top value is max_uj)
    assert meter.stop().joules == pytest.approx((1_000_000 + 1 + 2_000_000) / 1e6)


def test_unavailable_gives_reason_not_a_number(tmp_path):
    meter = EnergyMeter(powercap_root=tmp_path / "missing", use_nvml=False)
    assert not meter.available
    meter.start()
    r = meter.stop()
    assert r.joules is None and r.sources == []
    d = r.as_dict(tokens=100)
    assert d["energy_j"] is None and d["energy_per_token_j"] is None
    assert "does not exist" in d["energy_unavailable_reason"]
    assert "NVML off" in d["energy_unavailable_reason"]


def test_empty_or_unreadable_tree(tmp_path):
    (tmp_path / "intel-rapl").mkdir()  # the control node only, no numbered zones
    r = EnergyMeter(powercap_root=tmp_path, use_nvml=False)
    assert not r.available
    r.start()
    assert "no intel-rapl package zones" in r.stop().as_dict()["energy_unavailable_reason"]
    bad = tmp_path / "bad"
    d = bad / "intel-rapl:0"
    d.mkdir(parents=True)
    (d / "energy_uj").write_text("1\n")  # max_energy_range_uj missing
    m = EnergyMeter(powercap_root=bad, use_nvml=False)
    m.start()
    assert "cannot read" in m.stop().as_dict()["energy_unavailable_reason"]


def test_stop_before_start_and_default_reason():
    with pytest.raises(RuntimeError, match="before start"):
        EnergyMeter(powercap_root=Path("/nonexistent-powercap"), use_nvml=False).stop()
    assert EnergyReading(None).as_dict()["energy_unavailable_reason"] == "no energy counter readable"
