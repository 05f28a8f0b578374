"""The shipped hardware profiles: every one loads, every number is sourced, the numbers hang
together, and the calibrated overlay / error paths of ``load_profile`` behave."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from pydantic import BaseModel

from moesim.errors import InputError
from moesim.spec.hardware import (
    PROFILES_DIR,
    HardwareProfile,
    PerDtype,
    Quantity,
    available_profiles,
    load_profile,
)

EXPECTED_IDS = ["a100_sxm", "b200", "h100_pcie", "h100_sxm", "h200_sxm", "h800"]
VALID_KINDS = {"datasheet", "published_measurement", "calibrated", "estimate", "derived"}
DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "fp4")
REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


def quantities(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Quantity]]:
    """Every Quantity in a (nested) pydantic model, with its dotted path."""
    for name in type(model).model_fields:
        val = getattr(model, name)
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(val, Quantity):
            yield path, val
        elif isinstance(val, BaseModel):
            yield from quantities(val, path)


def per_dtype(table: PerDtype) -> dict[str, float]:
    return {d: getattr(table, d).value for d in DTYPES if getattr(table, d) is not None}


@pytest.fixture(scope="module")
def profiles() -> dict[str, HardwareProfile]:
    # calibrated=False: the tests are about the datasheet base files shipped here.
    return {pid: load_profile(pid, calibrated=False) for pid in EXPECTED_IDS}


# --- presence and provenance ------------------------------------------------------------------

def test_all_six_profiles_are_available():
    avail = available_profiles()
    assert set(EXPECTED_IDS) <= set(avail), f"missing: {set(EXPECTED_IDS) - set(avail)}"
    assert not any(".calibrated" in p for p in avail)


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_profile_loads_with_and_without_overlay(pid):
    for calibrated in (True, False):
        p = load_profile(pid, calibrated=calibrated)
        assert isinstance(p, HardwareProfile)
        assert p.id == pid, "id must equal the file stem"
        assert p.display_name.strip()
        assert p.device_names and all(n.startswith("NVIDIA ") for n in p.device_names)


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_every_quantity_is_sourced(profiles, pid):
    found = list(quantities(profiles[pid]))
    assert len(found) >= 25  # walked the whole tree, not just the top level
    for path, q in found:
        assert q.kind in VALID_KINDS, f"{pid}.{path}: kind {q.kind!r}"
        assert len(q.source.strip()) >= 10, f"{pid}.{path}: source too thin: {q.source!r}"
        assert math.isfinite(q.value), f"{pid}.{path}"
        assert q.value >= 0, f"{pid}.{path}: negative"
        # An estimate must say why; a derived value must show its arithmetic.
        if q.kind == "derived":
            assert any(c in q.source for c in "*/+-="), f"{pid}.{path}: derived without arithmetic"


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_provenance_lists_sources_and_a_note(profiles, pid):
    prov = profiles[pid].provenance
    assert isinstance(prov.get("sources"), list) and prov["sources"]
    assert all(isinstance(s, str) and s.strip() for s in prov["sources"])
    assert isinstance(prov.get("note"), str) and prov["note"].strip()


def test_device_names_are_unambiguous(profiles):
    seen: dict[str, str] = {}
    for pid, p in profiles.items():
        for name in p.device_names:
            assert name not in seen, f"{name!r} claimed by {seen.get(name)} and {pid}"
            seen[name] = pid
    assert seen["NVIDIA H100 80GB HBM3"] == "h100_sxm"
    assert seen["NVIDIA A100-SXM4-80GB"] == "a100_sxm"


# --- internal consistency ---------------------------------------------------------------------

@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_efficiencies_are_fractions(profiles, pid):
    p = profiles[pid]
    c, m, i = p.compute, p.memory, p.interconnect
    fractions = {
        **{f"gemm_efficiency.{d}": v for d, v in per_dtype(c.gemm_efficiency).items()},
        **{f"grouped_gemm_efficiency.{d}": v
           for d, v in per_dtype(c.grouped_gemm_efficiency).items()},
        "attention_efficiency": c.attention_efficiency.value,
        "hbm_efficiency": m.hbm_efficiency.value,
        "allreduce_bus_efficiency": i.allreduce_bus_efficiency.value,
        "alltoall_bus_efficiency": i.alltoall_bus_efficiency.value,
    }
    for name, v in fractions.items():
        assert 0 < v <= 1, f"{pid}.{name} = {v}"
    # A fine-grained grouped GEMM never beats a large dense GEMM of the same format.
    for d, v in per_dtype(c.grouped_gemm_efficiency).items():
        dense = per_dtype(c.gemm_efficiency).get(d, c.gemm_efficiency.bf16.value)
        assert v <= dense, f"{pid}: grouped {d} {v} > dense {dense}"


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_peak_ratios_between_formats(profiles, pid):
    peaks = per_dtype(profiles[pid].compute.peak_dense_tflops)
    assert {"bf16", "fp16", "fp32"} <= set(peaks)
    assert peaks["fp16"] == pytest.approx(peaks["bf16"])
    assert peaks["fp32"] == pytest.approx(peaks["bf16"] / 2, rel=5e-3)  # TF32 = half of BF16
    if "fp8" in peaks:
        assert peaks["fp8"] == pytest.approx(2 * peaks["bf16"], rel=5e-3)
        assert peaks["int8"] == pytest.approx(peaks["fp8"], rel=5e-3)
    if "fp4" in peaks:
        assert peaks["fp4"] == pytest.approx(2 * peaks["fp8"], rel=5e-3)
    # Efficiency tables only name formats the GPU actually has.
    c = profiles[pid].compute
    for table in (c.gemm_efficiency, c.grouped_gemm_efficiency):
        assert "bf16" in per_dtype(table)
        assert set(per_dtype(table)) <= set(peaks)


def test_format_support(profiles):
    a100 = profiles["a100_sxm"].compute.peak_dense_tflops
    assert a100.fp8 is None and a100.fp4 is None
    for pid, p in profiles.items():
        assert (p.compute.peak_dense_tflops.fp4 is not None) == (pid == "b200"), pid
        if pid != "a100_sxm":
            assert p.compute.peak_dense_tflops.fp8 is not None, pid
    with pytest.raises(InputError, match="fp8"):
        profiles["a100_sxm"].peak_flops_per_us("fp8")


def test_dense_peaks_not_sparse(profiles):
    # Datasheet with-sparsity figures would put H100 SXM at ~1979 BF16; dense is ~989.
    assert profiles["h100_sxm"].compute.peak_dense_tflops.bf16.value == pytest.approx(989.4)
    assert profiles["a100_sxm"].compute.peak_dense_tflops.bf16.value == pytest.approx(312)
    assert profiles["b200"].compute.peak_dense_tflops.bf16.value == pytest.approx(2250)


def test_cross_gpu_relations(profiles):
    h100, pcie, h200, h800, a100, b200 = (profiles[k] for k in
                                          ("h100_sxm", "h100_pcie", "h200_sxm", "h800",
                                           "a100_sxm", "b200"))
    bw = lambda p: p.memory.hbm_peak_gb_per_s.value  # noqa: E731
    cap = lambda p: p.memory.hbm_capacity_bytes.value  # noqa: E731
    bf16 = lambda p: p.compute.peak_dense_tflops.bf16.value  # noqa: E731
    nvl = lambda p: p.interconnect.nvlink_gb_per_s_per_direction.value  # noqa: E731

    assert bw(h200) > bw(h100) > bw(pcie) and bw(b200) > bw(h200) > bw(a100)
    assert cap(b200) > cap(h200) > cap(h100) == cap(h800) == cap(a100) == cap(pcie)
    assert bf16(b200) > bf16(h100) == bf16(h200) == bf16(h800) > bf16(pcie) > bf16(a100)
    assert nvl(b200) > nvl(h100) == nvl(h200) > nvl(a100) > nvl(h800)
    # H800 = H100 silicon with a cut NVLink: everything but the interconnect matches.
    assert per_dtype(h800.compute.peak_dense_tflops) == per_dtype(h100.compute.peak_dense_tflops)
    assert per_dtype(h200.compute.peak_dense_tflops) == per_dtype(h100.compute.peak_dense_tflops)
    assert h800.memory.hbm_peak_gb_per_s.value == h100.memory.hbm_peak_gb_per_s.value
    assert h800.compute.sm_count.value == h100.compute.sm_count.value == 132
    assert pcie.compute.sm_count.value < h100.compute.sm_count.value < b200.compute.sm_count.value
    assert a100.memory.l2_bytes.value < h100.memory.l2_bytes.value < b200.memory.l2_bytes.value
    # Bridged PCIe cards pair up; HGX boards have an 8-GPU NVSwitch domain.
    assert pcie.interconnect.nvlink_domain_size.value == 2
    for p in (h100, h200, h800, a100, b200):
        assert p.interconnect.nvlink_domain_size.value == 8
    assert a100.interconnect.pcie_gb_per_s_per_direction.value < \
        h100.interconnect.pcie_gb_per_s_per_direction.value


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_units_are_sane(profiles, pid):
    p = profiles[pid]
    m, o, i = p.memory, p.overheads, p.interconnect
    assert 40 * 2**30 <= m.hbm_capacity_bytes.value <= 200 * 2**30  # bytes, not GB
    assert 1000 <= m.hbm_peak_gb_per_s.value <= 10000  # GB/s, not TB/s
    assert 16 * 2**20 <= m.l2_bytes.value <= 256 * 2**20
    assert m.l2_bytes.value == int(m.l2_bytes.value)
    assert 0.5 < o.kernel_launch_host_us.value < 50  # microseconds
    assert 0 < o.graph_kernel_us.value <= o.kernel_min_gpu_us.value <= o.kernel_launch_host_us.value
    assert 2**29 <= o.runtime_reserved_bytes.value <= 8 * 2**30
    assert 1 <= i.collective_latency_us.value <= 100
    assert 1 <= i.scaleout_latency_us.value <= 20
    assert i.scaleout_gb_per_s_per_direction.value < i.nvlink_gb_per_s_per_direction.value
    assert i.pcie_gb_per_s_per_direction.value in (32, 64, 128)
    tiles = (p.compute.gemm_tile_m.value, p.compute.gemm_tile_n.value)
    assert all(t > 0 and int(t) == t and (int(t) & (int(t) - 1)) == 0 for t in tiles)
    # Convenience accessors agree with the raw fields.
    assert p.peak_flops_per_us("bf16") == pytest.approx(
        p.compute.peak_dense_tflops.bf16.value * 1e6)
    assert p.hbm_bytes_per_us == pytest.approx(
        m.hbm_peak_gb_per_s.value * 1e3 * m.hbm_efficiency.value)


# --- values traced to the reference measurements ------------------------------------------------

def _rows(name: str) -> list[dict]:
    path = REFERENCE / "measurements" / "h100_sxm" / name
    if not path.exists():
        pytest.skip(f"reference data not present: {path}")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_h100_collectives_match_reference_table(profiles):
    rows = [r for r in _rows("collective.csv") if r["dtype"] == "half" and r["num_gpus"] == "8"]
    small = [float(r["latency_us"]) for r in rows if int(r["message_bytes"]) <= 4096]
    ic = profiles["h100_sxm"].interconnect
    assert ic.collective_latency_us.value == pytest.approx(statistics.median(small), abs=0.05)

    def busbw_fraction(op: str, factor: float) -> float:
        r = max((r for r in rows if r["op"] == op), key=lambda r: int(r["message_bytes"]))
        s, t = int(r["message_bytes"]), float(r["latency_us"])
        return factor * s / t / 1e3 / ic.nvlink_gb_per_s_per_direction.value

    assert ic.allreduce_bus_efficiency.value == pytest.approx(
        busbw_fraction("all_reduce", 2 * 7 / 8), abs=2e-3)
    assert ic.alltoall_bus_efficiency.value == pytest.approx(
        busbw_fraction("alltoall", 7 / 8), abs=2e-3)


def test_h100_grouped_gemm_matches_reference_table(profiles):
    peaks = profiles["h100_sxm"].compute.peak_dense_tflops
    eff = profiles["h100_sxm"].compute.grouped_gemm_efficiency
    for dtype, peak, q in (("bfloat16", peaks.bf16, eff.bf16), ("fp8_block", peaks.fp8, eff.fp8)):
        fracs = []
        for r in _rows("moe.csv"):
            if (r["dtype"], r["num_tokens"], r["moe_tp"], r["moe_ep"], r["distribution"]) != \
                    (dtype, "16384", "1", "1", "balanced"):
                continue
            t, h, i, k = (int(r[c]) for c in ("num_tokens", "hidden_size", "inter_size", "topk"))
            fracs.append(6 * t * k * h * i / float(r["latency_us"]) / 1e6 / peak.value)
        assert fracs, dtype
        assert q.value == pytest.approx(statistics.median(fracs), abs=0.01), dtype


# --- overlay and error paths of load_profile ---------------------------------------------------

def _copy_h100(tmp_path: Path, name: str = "x") -> tuple[Path, dict]:
    data = yaml.safe_load((PROFILES_DIR / "h100_sxm.yaml").read_text())
    data["id"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def test_calibrated_overlay_replaces_one_field(tmp_path):
    path, _ = _copy_h100(tmp_path)
    overlay = {
        "memory": {"hbm_efficiency": {"value": 0.937, "kind": "calibrated",
                                      "source": "hbm_stream fit on test rig"}},
        "provenance": {"timestamp": "2026-01-01T00:00:00Z", "tool_version": "test"},
    }
    (tmp_path / "x.calibrated.yaml").write_text(yaml.safe_dump(overlay))

    base = load_profile(str(path), calibrated=False)
    cal = load_profile(str(path))
    assert base.memory.hbm_efficiency.value == pytest.approx(0.90)
    assert cal.memory.hbm_efficiency == Quantity(value=0.937, kind="calibrated",
                                                 source="hbm_stream fit on test rig")

    base_q = dict(quantities(base))
    cal_q = dict(quantities(cal))
    assert base_q.keys() == cal_q.keys()
    changed = [k for k in base_q if base_q[k] != cal_q[k]]
    assert changed == ["memory.hbm_efficiency"]
    # Sibling fields of the same section survive the merge.
    assert cal.memory.l2_bytes == base.memory.l2_bytes
    assert cal.memory.hbm_peak_gb_per_s == base.memory.hbm_peak_gb_per_s
    # Overlay provenance is filed under "calibration"; base provenance is kept.
    assert cal.provenance["calibration"]["tool_version"] == "test"
    assert cal.provenance["sources"] == base.provenance["sources"]
    assert cal.hbm_bytes_per_us == pytest.approx(3350 * 1e3 * 0.937)


def test_missing_field_names_it(tmp_path):
    path, data = _copy_h100(tmp_path, "broken")
    del data["memory"]["l2_bytes"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError) as err:
        load_profile(str(path))
    assert "l2_bytes" in str(err.value)
    assert err.value.field.endswith("memory.l2_bytes")


def test_quantity_without_source_is_rejected(tmp_path):
    path, data = _copy_h100(tmp_path, "nosource")
    del data["compute"]["sm_count"]["source"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="sm_count.source"):
        load_profile(str(path))


def test_bad_kind_and_unknown_field_are_rejected(tmp_path):
    path, data = _copy_h100(tmp_path, "badkind")
    data["memory"]["hbm_efficiency"]["kind"] = "guess"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="hbm_efficiency.kind"):
        load_profile(str(path))

    path, data = _copy_h100(tmp_path, "extra")
    data["memory"]["hbm_gb"] = {"value": 1, "kind": "estimate", "source": "typo'd field"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="unknown field"):
        load_profile(str(path))


def test_unknown_id_lists_valid_ids():
    with pytest.raises(InputError) as err:
        load_profile("h100_sxm5_typo")
    msg = str(err.value)
    assert "h100_sxm5_typo" in msg
    for pid in EXPECTED_IDS:
        assert pid in msg


def test_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_profile(str(tmp_path / "nope.yaml"))
