"""The shipped hardware profiles: every one loads, every number is sourced, the numbers hang
together, and the calibrated overlay / error paths of ``load_profile`` behave."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from pydantic import BaseModel

from moesim.errors import InputError
from moesim.spec.hardware import (
    PROFILES_DIR,
    CollectiveFit,
    Collectives,
    HardwareProfile,
    KernelFit,
    Kernels,
    PerDtype,
    Quantity,
    available_profiles,
    load_profile,
)

EXPECTED_IDS = ["a100_sxm", "b200", "h100_pcie", "h100_sxm", "h200_sxm", "h800"]
VALID_KINDS = {"datasheet", "published_measurement", "calibrated", "estimate", "derived"}
DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "fp4")
REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"

KERNEL_FAMILIES = ("gemm_bf16", "gemm_fp8", "gemm_fp8_block", "moe_bf16", "moe_fp8", "moe_aux",
                   "quant_fp8", "quant_fp8_group", "attention_prefill", "attention_decode", "attention_prefill_fp8",
                   "attention_decode_fp8", "attention_mla_decode", "elementwise")
FP8_FAMILIES = ("gemm_fp8", "gemm_fp8_block", "moe_fp8", "quant_fp8", "quant_fp8_group",
                "attention_prefill_fp8",
                "attention_decode_fp8")
# Families whose kernels do tensor-core work: the cost model needs a compute efficiency for them.
COMPUTE_FAMILIES = ("gemm_bf16", "gemm_fp8", "gemm_fp8_block", "moe_bf16", "moe_fp8",
                    "attention_prefill", "attention_decode", "attention_prefill_fp8",
                    "attention_decode_fp8", "attention_mla_decode")
COLLECTIVE_OPS = ("all_reduce", "all_reduce_custom", "all_to_all", "all_gather")


def quantities(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Quantity]]:
    """Every Quantity in a (nested) pydantic model, with its dotted path."""
    for name in type(model).model_fields:
        val = getattr(model, name)
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(val, Quantity):
            yield path, val
        elif isinstance(val, BaseModel):
            yield from quantities(val, path)


def yaml_quantity_paths(data: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every ``{value: ...}`` mapping in raw YAML data (provenance excluded)."""
    out: set[str] = set()
    if isinstance(data, dict):
        if "value" in data:
            return {prefix}
        for key, val in data.items():
            if not prefix and key == "provenance":
                continue
            out |= yaml_quantity_paths(val, f"{prefix}.{key}" if prefix else str(key))
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested dict/list, keyed by dotted path."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, val in data.items():
            out.update(flatten(val, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list):
        out = {}
        for i, val in enumerate(data):
            out.update(flatten(val, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def per_dtype(table: PerDtype) -> dict[str, float]:
    return {d: getattr(table, d).value for d in DTYPES if getattr(table, d) is not None}


def kernel_fits(p: HardwareProfile) -> dict[str, KernelFit]:
    return {f: getattr(p.kernels, f) for f in KERNEL_FAMILIES if getattr(p.kernels, f) is not None}


def fit_values(fit: BaseModel) -> dict[str, float]:
    """A KernelFit/CollectiveFit as plain numbers (sources and kinds dropped)."""
    return {k: q.value for k, q in quantities(fit)}


@pytest.fixture(scope="module")
def profiles() -> dict[str, HardwareProfile]:
    # calibrated=False: the tests are about the datasheet base files shipped here.
    return {pid: load_profile(pid, calibrated=False) for pid in EXPECTED_IDS}


# --- presence and provenance ------------------------------------------------------------------

def test_all_six_profiles_are_available():
    avail = available_profiles()
    assert set(EXPECTED_IDS) <= set(avail), f"missing: {set(EXPECTED_IDS) - set(avail)}"
    assert not any(".calibrated" in p for p in avail)


def test_schema_names_the_expected_families_and_ops():
    # Guards this file's constants (and the cost model's family names) against schema drift.
    assert set(Kernels.model_fields) == set(KERNEL_FAMILIES)
    assert set(Collectives.model_fields) == set(COLLECTIVE_OPS)
    assert set(KernelFit.model_fields) == {"t0_us", "compute_efficiency", "memory_efficiency",
                                           "host_floor_us", "overlap_exponent", "step_us",
                                           "k_latency_us", "k_split_above", "m_granularity",
                                           "unaligned_m_floor_us", "partial_wave_gain", "write_cost",
                                           "wave_overhead_us", "chunk_elems", "l2_capacity_fraction",
                                           "l2_hit_exponent", "l2_speedup",
                                           "overlap_wave_exponent", "split_slice_us",
                                           "kv_read_cost"}
    assert set(CollectiveFit.model_fields) == {"latency_us", "bus_efficiency", "host_floor_us",
                                               "latency_per_step_us", "ll_latency_us",
                                               "ll_bus_efficiency"}


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_profile_loads_with_and_without_overlay(pid):
    for calibrated in (True, False):
        p = load_profile(pid, calibrated=calibrated)
        assert isinstance(p, HardwareProfile)
        assert p.id == pid, "id must equal the file stem"
        assert p.display_name.strip()
        assert p.device_names and all(n.startswith("NVIDIA ") for n in p.device_names)


def _check_sourced(pid: str, p: HardwareProfile) -> list[tuple[str, Quantity]]:
    found = list(quantities(p))
    for path, q in found:
        assert q.kind in VALID_KINDS, f"{pid}.{path}: kind {q.kind!r}"
        assert len(q.source.strip()) >= 10, f"{pid}.{path}: source too thin: {q.source!r}"
        assert math.isfinite(q.value), f"{pid}.{path}"
        assert q.value >= 0, f"{pid}.{path}: negative"
        # An estimate must say why; a derived value must show its arithmetic.
        if q.kind == "derived":
            assert any(c in q.source for c in "*/+-="), f"{pid}.{path}: derived without arithmetic"
    return found


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_every_quantity_is_sourced(profiles, pid):
    found = _check_sourced(pid, profiles[pid])
    paths = {path for path, _ in found}
    # The walk reached every number in the YAML file, nested kernel/collective fits included.
    raw = yaml.safe_load((PROFILES_DIR / f"{pid}.yaml").read_text())
    assert paths == yaml_quantity_paths(raw)
    for fam in kernel_fits(profiles[pid]):
        assert {f"kernels.{fam}.t0_us", f"kernels.{fam}.memory_efficiency"} <= paths, fam
    for op in COLLECTIVE_OPS:
        assert {f"collectives.{op}.latency_us", f"collectives.{op}.bus_efficiency"} <= paths, op
    assert len(found) >= 40


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_provenance_lists_sources_and_a_note(profiles, pid):
    prov = profiles[pid].provenance
    assert isinstance(prov.get("sources"), list) and prov["sources"]
    assert all(isinstance(s, str) and s.strip() for s in prov["sources"])
    assert isinstance(prov.get("note"), str) and prov["note"].strip()
    assert "calibration" not in prov, "a base file carries no calibration provenance"


def test_device_names_are_unambiguous(profiles):
    seen: dict[str, str] = {}
    for pid, p in profiles.items():
        for name in p.device_names:
            assert name not in seen, f"{name!r} claimed by {seen.get(name)} and {pid}"
            seen[name] = pid
    assert seen["NVIDIA H100 80GB HBM3"] == "h100_sxm"
    assert seen["NVIDIA A100-SXM4-80GB"] == "a100_sxm"


# --- internal consistency ---------------------------------------------------------------------

def _check_fractions(pid: str, p: HardwareProfile, t0_max: float = 200.0) -> None:
    for fam, fit in kernel_fits(p).items():
        assert 0 <= fit.t0_us.value < t0_max, f"{pid}.kernels.{fam}.t0_us = {fit.t0_us.value}"
        assert 0 < fit.memory_efficiency.value <= 1, f"{pid}.kernels.{fam}.memory_efficiency"
        if fit.compute_efficiency is not None:
            assert 0 < fit.compute_efficiency.value <= 1, f"{pid}.kernels.{fam}.compute_efficiency"
    for op in COLLECTIVE_OPS:
        c = getattr(p.collectives, op)
        assert 0 < c.bus_efficiency.value <= 1, f"{pid}.collectives.{op}.bus_efficiency"
        assert 0 <= c.latency_us.value < t0_max, f"{pid}.collectives.{op}.latency_us"


@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_efficiencies_are_fractions(profiles, pid):
    p = profiles[pid]
    _check_fractions(pid, p)
    # Datasheet base: fixed costs are microseconds, not milliseconds or nanoseconds-as-us.
    for fam, fit in kernel_fits(p).items():
        assert 0.5 <= fit.t0_us.value <= 50, f"{pid}.kernels.{fam}.t0_us"
    for op in COLLECTIVE_OPS:
        assert 1 <= getattr(p.collectives, op).latency_us.value <= 100, f"{pid}.{op}.latency_us"
    # Every tensor-core family has a compute efficiency; the cost model would otherwise assume 1.
    for fam in COMPUTE_FAMILIES:
        fit = getattr(p.kernels, fam)
        if fit is not None:
            assert fit.compute_efficiency is not None, f"{pid}.kernels.{fam}"
    # A fine-grained grouped (MoE) GEMM never beats a large dense GEMM of the same format.
    k = p.kernels
    pairs = [("moe_bf16", "gemm_bf16"), ("moe_fp8", "gemm_fp8"), ("moe_fp8", "gemm_fp8_block")]
    for moe, dense in pairs:
        m, d = getattr(k, moe), getattr(k, dense)
        if m is None:
            continue
        assert m.compute_efficiency.value <= d.compute_efficiency.value, \
            f"{pid}: {moe} {m.compute_efficiency.value} > {dense} {d.compute_efficiency.value}"
    # Block-scaled fp8 carries extra scale traffic: never faster than per-tensor fp8.
    if k.gemm_fp8 is not None:
        assert k.gemm_fp8_block.compute_efficiency.value <= k.gemm_fp8.compute_efficiency.value


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
    # fp8 kernel families exist exactly when the GPU has fp8 tensor cores; the others always do.
    k = profiles[pid].kernels
    for fam in KERNEL_FAMILIES:
        present = getattr(k, fam) is not None
        expected = ("fp8" in peaks) if fam in FP8_FAMILIES else True
        assert present == expected, f"{pid}.kernels.{fam}: present={present}"


def test_format_support(profiles):
    a100 = profiles["a100_sxm"]
    assert a100.compute.peak_dense_tflops.fp8 is None and a100.compute.peak_dense_tflops.fp4 is None
    for fam in FP8_FAMILIES:
        assert getattr(a100.kernels, fam) is None, fam
    for pid, p in profiles.items():
        assert (p.compute.peak_dense_tflops.fp4 is not None) == (pid == "b200"), pid
        if pid != "a100_sxm":
            assert p.compute.peak_dense_tflops.fp8 is not None, pid
            for fam in FP8_FAMILIES:
                assert p.kernel(fam) is getattr(p.kernels, fam), (pid, fam)
    with pytest.raises(InputError, match="fp8"):
        a100.peak_flops_per_us("fp8")
    for fam in FP8_FAMILIES:
        with pytest.raises(InputError, match=fam) as err:
            a100.kernel(fam)
        assert err.value.field == f"hardware.kernels.{fam}"
    assert a100.kernel("gemm_bf16") is a100.kernels.gemm_bf16


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
    # H800 = H100 silicon with a cut NVLink: everything but the interconnect matches,
    # including the kernel fits (same SMs, same HBM, same kernel libraries).
    assert per_dtype(h800.compute.peak_dense_tflops) == per_dtype(h100.compute.peak_dense_tflops)
    assert per_dtype(h200.compute.peak_dense_tflops) == per_dtype(h100.compute.peak_dense_tflops)
    assert h800.memory.hbm_peak_gb_per_s.value == h100.memory.hbm_peak_gb_per_s.value
    assert {f: fit_values(v) for f, v in kernel_fits(h800).items()} == \
        {f: fit_values(v) for f, v in kernel_fits(h100).items()}
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
    assert 0 < o.graph_kernel_us.value <= o.kernel_launch_host_us.value
    assert 2**29 <= o.runtime_reserved_bytes.value <= 8 * 2**30
    assert 1 <= i.scaleout_latency_us.value <= 20
    assert i.scaleout_gb_per_s_per_direction.value < i.nvlink_gb_per_s_per_direction.value
    assert i.pcie_gb_per_s_per_direction.value in (32, 64, 128)
    tiles = (p.compute.gemm_tile_m.value, p.compute.gemm_tile_n.value)
    assert all(t > 0 and int(t) == t and (int(t) & (int(t) - 1)) == 0 for t in tiles)
    # Convenience accessors agree with the raw fields (peaks only: efficiencies live per family).
    assert p.peak_flops_per_us("bf16") == pytest.approx(
        p.compute.peak_dense_tflops.bf16.value * 1e6)
    assert p.hbm_peak_bytes_per_us == pytest.approx(m.hbm_peak_gb_per_s.value * 1e3)
    for fam, fit in kernel_fits(p).items():
        assert p.kernel(fam) is fit


# --- calibrated overlays, where one has been written ------------------------------------------

@pytest.mark.parametrize("pid", EXPECTED_IDS)
def test_calibrated_overlay_keeps_the_schema_promises(profiles, pid):
    if not (PROFILES_DIR / f"{pid}.calibrated.yaml").exists():
        pytest.skip(f"no calibrated overlay for {pid} (optional)")
    base, cal = profiles[pid], load_profile(pid)
    _check_sourced(pid, cal)
    _check_fractions(pid, cal, t0_max=501.0)  # the fit bounds t0_us to [0.01, 500]
    assert "calibration" in cal.provenance
    assert cal.provenance["sources"] == base.provenance["sources"]
    # A calibration run fits kernel families, collectives and DeepEP only; datasheet numbers
    # stay put.
    b, c = flatten(base.model_dump(exclude={"provenance"})), \
        flatten(cal.model_dump(exclude={"provenance"}))
    missing = object()
    changed = {k for k in b.keys() | c.keys() if b.get(k, missing) != c.get(k, missing)}
    assert changed, "an overlay that changes nothing"
    assert all(k.startswith(("kernels.", "collectives.", "deepep")) for k in changed), \
        sorted(changed)


# --- values traced to the reference measurements ------------------------------------------------
# The base files keep the pre-calibration values derived from these tables; a calibrated overlay
# (tested above, where present) may replace them.

def _rows(name: str) -> list[dict]:
    path = REFERENCE / "measurements" / "h100_sxm" / name
    if not path.exists():
        pytest.skip(f"reference data not present: {path}")
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_h100_collectives_match_reference_table(profiles):
    rows = [r for r in _rows("collective.csv") if r["dtype"] == "half" and r["num_gpus"] == "8"]
    small = [float(r["latency_us"]) for r in rows if int(r["message_bytes"]) <= 4096]
    p = profiles["h100_sxm"]
    col, nvlink = p.collectives, p.interconnect.nvlink_gb_per_s_per_direction.value
    for op in ("all_reduce", "all_to_all", "all_gather"):
        assert getattr(col, op).latency_us.value == pytest.approx(
            statistics.median(small), abs=0.05), op

    def busbw_fraction(op: str, factor: float) -> float:
        r = max((r for r in rows if r["op"] == op), key=lambda r: int(r["message_bytes"]))
        s, t = int(r["message_bytes"]), float(r["latency_us"])
        return factor * s / t / 1e3 / nvlink

    assert col.all_reduce.bus_efficiency.value == pytest.approx(
        busbw_fraction("all_reduce", 2 * 7 / 8), abs=2e-3)
    assert col.all_to_all.bus_efficiency.value == pytest.approx(
        busbw_fraction("alltoall", 7 / 8), abs=2e-3)
    # Until calibrated, the custom all-reduce is assumed to be NCCL's.
    assert fit_values(col.all_reduce_custom) == fit_values(col.all_reduce)


def test_h100_moe_matches_reference_table(profiles):
    p = profiles["h100_sxm"]
    peaks, k = p.compute.peak_dense_tflops, p.kernels
    for dtype, peak, fit in (("bfloat16", peaks.bf16, k.moe_bf16),
                             ("fp8_block", peaks.fp8, k.moe_fp8)):
        fracs = []
        for r in _rows("moe.csv"):
            if (r["dtype"], r["num_tokens"], r["moe_tp"], r["moe_ep"], r["distribution"]) != \
                    (dtype, "16384", "1", "1", "balanced"):
                continue
            t, h, i, topk = (int(r[c]) for c in ("num_tokens", "hidden_size", "inter_size", "topk"))
            fracs.append(6 * t * topk * h * i / float(r["latency_us"]) / 1e6 / peak.value)
        assert fracs, dtype
        assert fit.compute_efficiency.value == pytest.approx(statistics.median(fracs),
                                                             abs=0.01), dtype


def test_h100_dense_gemm_agrees_with_reference_table(profiles):
    # gemm_bf16 comes from the MAMF table; the reference torch linear rows cross-check it.
    peak = profiles["h100_sxm"].compute.peak_dense_tflops.bf16.value
    fracs = [2 * int(r["m"]) * int(r["n"]) * int(r["k"]) / float(r["latency_us"]) / 1e6 / peak
             for r in _rows("gemm.csv")
             if (r["kernel"], r["dtype"]) == ("torch.nn.functional.linear", "bfloat16")
             and min(int(r["m"]), int(r["n"]), int(r["k"])) >= 4096]
    assert len(fracs) > 100
    eff = profiles["h100_sxm"].kernels.gemm_bf16.compute_efficiency.value
    assert eff == pytest.approx(statistics.median(fracs), abs=0.015)


# --- overlay and error paths of load_profile ---------------------------------------------------

def _copy_h100(tmp_path: Path, name: str = "x") -> tuple[Path, dict]:
    data = yaml.safe_load((PROFILES_DIR / "h100_sxm.yaml").read_text())
    data["id"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def test_calibrated_overlay_replaces_one_field(tmp_path):
    path, _ = _copy_h100(tmp_path)
    new = {"value": 0.937, "kind": "calibrated", "source": "elementwise fit on test rig"}
    overlay = {
        "kernels": {"elementwise": {"memory_efficiency": new}},
        "provenance": {"timestamp": "2026-01-01T00:00:00Z", "tool_version": "test"},
    }
    (tmp_path / "x.calibrated.yaml").write_text(yaml.safe_dump(overlay))

    base = load_profile(str(path), calibrated=False)
    cal = load_profile(str(path))
    assert base.kernels.elementwise.memory_efficiency.value == pytest.approx(0.90)
    assert cal.kernels.elementwise.memory_efficiency == Quantity(**new)

    # Exactly that field changed: compare the whole dumped models, provenance aside.
    b = flatten(base.model_dump(exclude={"provenance"}))
    c = flatten(cal.model_dump(exclude={"provenance"}))
    assert b.keys() == c.keys()
    changed = sorted(k for k in b if b[k] != c[k])
    assert changed == [f"kernels.elementwise.memory_efficiency.{f}"
                       for f in ("kind", "source", "value")]
    assert [k for k, _ in quantities(base) if dict(quantities(base))[k] !=
            dict(quantities(cal))[k]] == ["kernels.elementwise.memory_efficiency"]
    # Sibling fields of the same family and the same field of other families survive the merge.
    assert cal.kernels.elementwise.t0_us == base.kernels.elementwise.t0_us
    assert cal.kernels.moe_aux.memory_efficiency == base.kernels.moe_aux.memory_efficiency
    assert cal.memory == base.memory and cal.collectives == base.collectives
    assert cal.hbm_peak_bytes_per_us == base.hbm_peak_bytes_per_us == pytest.approx(3350 * 1e3)
    # Overlay provenance is filed under "calibration"; base provenance is kept.
    assert cal.provenance["calibration"]["tool_version"] == "test"
    assert cal.provenance["sources"] == base.provenance["sources"]
    assert "calibration" not in base.provenance


def test_calibrated_flag_and_overlay_file_alone(tmp_path):
    path, _ = _copy_h100(tmp_path)
    overlay = {"kernels": {"gemm_bf16": {"t0_us": {"value": 7.5, "kind": "calibrated",
                                                   "source": "gemm fit on test rig"}}}}
    (tmp_path / "x.calibrated.yaml").write_text(yaml.safe_dump(overlay))
    assert load_profile(str(path)).kernels.gemm_bf16.t0_us.value == 7.5
    assert load_profile(str(path), calibrated=False).kernels.gemm_bf16.t0_us.value == 2.0
    # An overlay alone is not a profile.
    with pytest.raises(InputError):
        load_profile(str(tmp_path / "x.calibrated.yaml"))


def test_missing_field_names_it(tmp_path):
    path, data = _copy_h100(tmp_path, "broken")
    del data["memory"]["l2_bytes"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError) as err:
        load_profile(str(path))
    assert "l2_bytes" in str(err.value)
    assert err.value.field.endswith("memory.l2_bytes")


@pytest.mark.parametrize("where", [("kernels", "elementwise"), ("kernels", "moe_aux"),
                                   ("collectives", "all_to_all")])
def test_missing_required_family_names_it(tmp_path, where):
    path, data = _copy_h100(tmp_path, "nofamily")
    del data[where[0]][where[1]]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError) as err:
        load_profile(str(path), calibrated=False)
    assert err.value.field.endswith(".".join(where))


def test_missing_fit_field_names_it(tmp_path):
    path, data = _copy_h100(tmp_path, "nofit")
    del data["kernels"]["gemm_bf16"]["t0_us"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError) as err:
        load_profile(str(path))
    assert err.value.field.endswith("kernels.gemm_bf16.t0_us")


def test_quantity_without_source_is_rejected(tmp_path):
    path, data = _copy_h100(tmp_path, "nosource")
    del data["compute"]["sm_count"]["source"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="sm_count.source"):
        load_profile(str(path))

    path, data = _copy_h100(tmp_path, "nosource2")
    del data["collectives"]["all_reduce"]["bus_efficiency"]["source"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="collectives.all_reduce.bus_efficiency.source"):
        load_profile(str(path))


def test_bad_kind_and_unknown_field_are_rejected(tmp_path):
    path, data = _copy_h100(tmp_path, "badkind")
    data["kernels"]["gemm_bf16"]["compute_efficiency"]["kind"] = "guess"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="kernels.gemm_bf16.compute_efficiency.kind"):
        load_profile(str(path))

    path, data = _copy_h100(tmp_path, "extra")
    data["memory"]["hbm_gb"] = {"value": 1, "kind": "estimate", "source": "typo'd field"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="unknown field"):
        load_profile(str(path))


@pytest.mark.parametrize("section,old", [
    ("memory", "hbm_efficiency"),
    ("compute", "gemm_efficiency"),
    ("interconnect", "allreduce_bus_efficiency"),
    ("interconnect", "collective_latency_us"),
    ("overheads", "kernel_min_gpu_us"),
])
def test_pre_migration_fields_are_rejected(tmp_path, section, old):
    # Efficiencies and fixed kernel times live in kernels.<family> / collectives.<op> now; a
    # profile still carrying the old fields must fail loudly rather than be silently ignored.
    path, data = _copy_h100(tmp_path, "old")
    data[section][old] = {"value": 0.9, "kind": "estimate", "source": "old schema field"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InputError, match="unknown field") as err:
        load_profile(str(path))
    assert err.value.field.endswith(f"{section}.{old}")


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
