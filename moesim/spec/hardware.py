"""``HardwareProfile``: one GPU kind, every number with its source.

A profile is a YAML file in ``hardware_profiles/``: a datasheet base (``<id>.yaml``) and, optionally,
a calibrated overlay (``<id>.calibrated.yaml``) whose fields replace the base's one by one. Every
number is a :class:`Quantity` ``{value, source, kind}`` so that any prediction can be traced back
to a datasheet line, a published measurement, a fit, or an admitted estimate.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError, from_pydantic

PROFILES_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"

SourceKind = Literal["datasheet", "published_measurement", "calibrated", "estimate", "derived"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantity(_Strict):
    value: float
    source: str = Field(..., min_length=3, description="where the number comes from")
    kind: SourceKind


class PerDtype(_Strict):
    """A number per tensor-core format; a format the GPU lacks is left out (None)."""

    fp32: Optional[Quantity] = None
    bf16: Optional[Quantity] = None
    fp16: Optional[Quantity] = None
    fp8: Optional[Quantity] = None
    int8: Optional[Quantity] = None
    fp4: Optional[Quantity] = None


class Compute(_Strict):
    sm_count: Quantity
    peak_dense_tflops: PerDtype = Field(..., description="tensor-core peak without sparsity")
    gemm_tile_m: Quantity = Field(..., description="CTA tile rows assumed for wave quantisation")
    gemm_tile_n: Quantity = Field(..., description="CTA tile columns assumed for wave quantisation")
    peak_exp_tops: Optional[Quantity] = Field(
        None, description="special-function unit peak, 1e12 exp2 per second (attention's "
                          "softmax); absent = softmax not priced apart from the matmuls")


class Memory(_Strict):
    hbm_capacity_bytes: Quantity
    hbm_peak_gb_per_s: Quantity
    l2_bytes: Quantity


class Interconnect(_Strict):
    nvlink_gb_per_s_per_direction: Quantity = Field(
        ..., description="per GPU, one direction; 0 when GPUs talk over PCIe only")
    nvlink_domain_size: Quantity = Field(..., description="GPUs reachable at full link speed")
    scaleout_gb_per_s_per_direction: Quantity = Field(..., description="NIC bandwidth per GPU")
    scaleout_latency_us: Quantity
    pcie_gb_per_s_per_direction: Quantity


class CollectiveFit(_Strict):
    """t = latency_us + steps x latency_per_step_us + bytes_moved / (link bandwidth x
    bus_efficiency) (nccl-tests bus model; NCCL's tuning model for the latency).

    With ``ll_latency_us`` and ``ll_bus_efficiency`` the collective has a second protocol:
    NCCL's LL/LL128 protocols (flags travel with the data: low latency, a fraction of the link
    bandwidth) against Simple (full bandwidth, longer latency); NCCL's tuner picks the faster
    per message size, so the time is the lower envelope of the two lines. For the engines'
    custom all-reduce the pair is its one-shot / two-shot algorithm."""

    latency_us: Quantity
    latency_per_step_us: Optional[Quantity] = Field(
        None, description="latency of each of the algorithm's steps: a ring all-reduce has "
                          "2(n-1), the others n-1 (NCCL's base + steps x per-step model)")
    bus_efficiency: Quantity = Field(..., description="bus bandwidth / link bandwidth per direction")
    host_floor_us: Optional[Quantity] = Field(
        None, description="shortest eager call (host dispatch); hidden by CUDA graphs")
    ll_latency_us: Optional[Quantity] = Field(
        None, description="latency of the low-latency protocol (NCCL LL/LL128)")
    ll_bus_efficiency: Optional[Quantity] = Field(
        None, description="bus bandwidth / link bandwidth of the low-latency protocol")


class Collectives(_Strict):
    all_reduce: CollectiveFit = Field(..., description="NCCL all-reduce")
    all_reduce_custom: CollectiveFit = Field(
        ..., description="the engines' one-shot/two-shot custom all-reduce (vLLM, SGLang)")
    all_to_all: CollectiveFit
    all_gather: CollectiveFit = Field(..., description="also used for reduce-scatter")


class DeepEPFit(_Strict):
    """One DeepEP kernel (backend x phase): t = latency_us + remote bytes / (NVLink bandwidth
    per direction x bus_efficiency); bytes as in :mod:`moesim.costs.deepep`."""

    latency_us: Quantity = Field(..., description="fixed time of one call (launch, barrier, "
                                 "notify/handshake)")
    bus_efficiency: Quantity = Field(..., description="achieved NVLink bandwidth / per-direction "
                                     "link bandwidth at ``sms`` SMs")
    sms: Optional[Quantity] = Field(None, description="SMs given to communication in the rows "
                                    "fitted (0 = the backend's default)")


class DeepEP(_Strict):
    """DeepEP dispatch / combine fits, one per ``comm_backend`` of ``moe_a2a.csv`` and phase."""

    ht_dispatch: Optional[DeepEPFit] = Field(None, description="normal (high-throughput) kernels")
    ht_combine: Optional[DeepEPFit] = None
    ll_dispatch: Optional[DeepEPFit] = Field(None, description="low-latency kernels")
    ll_combine: Optional[DeepEPFit] = None
    v2_context_dispatch: Optional[DeepEPFit] = Field(None, description="V2, prefill kernels")
    v2_context_combine: Optional[DeepEPFit] = None
    v2_generation_dispatch: Optional[DeepEPFit] = Field(None, description="V2, decode kernels")
    v2_generation_combine: Optional[DeepEPFit] = None


class KernelFit(_Strict):
    """One kernel family: t = t0_us + steps x step_us + combine(ideal compute /
    compute_efficiency, ideal memory / memory_efficiency, K-loop latency), ideal times at
    datasheet peaks; ``combine`` is the maximum (a roofline) unless the family has an
    ``overlap_exponent`` (see costs/op.py :func:`kernel_time_us`)."""

    t0_us: Quantity = Field(..., description="fixed time per kernel (launch latency, prologue, tail)")
    compute_efficiency: Optional[Quantity] = Field(
        None, description="fraction of tensor-core peak reached at full waves")
    memory_efficiency: Quantity = Field(..., description="fraction of HBM peak reached")
    host_floor_us: Optional[Quantity] = Field(
        None, description="shortest time one eager call of this op takes, set by the host "
                          "(argument checks, JIT dispatch, launches); hidden by CUDA graphs")
    overlap_exponent: Optional[Quantity] = Field(
        None, description="p of the p-norm that combines the compute, memory and K-loop "
                          "times: (t_c^p + t_m^p + t_k^p)^(1/p); absent = max (perfect overlap)")
    step_us: Optional[Quantity] = Field(
        None, description="µs per serialised step of the op (e.g. one same-address atomic per "
                          "row in a dynamic per-tensor fp8 scale reduction; one wave of tiles of a "
                          "fused-MoE GEMM with unaligned rows; one wave of FlashAttention-3 CTAs, "
                          "their fixed prologue and epilogue)")
    k_latency_us: Optional[Quantity] = Field(
        None, description="µs per 1024 latency-bound serial steps: the elements of K that one "
                          "GEMM CTA walks (the K loop of small GEMMs; for fused-MoE GEMMs, the "
                          "waves x K elements an SM walks), the keys one SM walks over its attention "
                          "CTA waves and KV splits, or the row passes of the per-tensor fp8 "
                          "quantisation kernels (quant_fp8)")
    k_split_above: Optional[Quantity] = Field(
        None, description="K extent (elements) beyond which the library splits the K loop "
                          "across CTAs (split-K), so one CTA never walks more")
    partial_wave_gain: Optional[Quantity] = Field(
        None, description="relative rise of a busy SM's tensor rate when its wave leaves SMs "
                          "idle: compute efficiency x (1 + gain x idle fraction of the waves' SM "
                          "slots), at most the peak; idle SMs leave power (clock) and L2/HBM "
                          "bandwidth to the rest")
    write_cost: Optional[Quantity] = Field(
        None, description="HBM time of a written byte relative to a read byte (read/write bus "
                          "turnarounds, write recovery): memory time = (read + write_cost x "
                          "written bytes) / (peak x memory_efficiency); absent = 1")
    kv_read_cost: Optional[Quantity] = Field(
        None, description="HBM time of a paged K/V cache byte relative to another read byte: "
                          "attention kernels gather the cache page by page (vLLM's 16-token "
                          "pages, no TMA in FlashAttention-3) while queries and outputs move in "
                          "bulk: memory time = (other + kv_read_cost x K/V bytes) / (peak x "
                          "memory_efficiency); absent = 1")
    wave_overhead_us: Optional[Quantity] = Field(
        None, description="µs each wave of GEMM tiles adds to the compute time: the load "
                          "pipeline's fill before the first MMA and the epilogue's drain of "
                          "the accumulators after the last (amortised over long K loops)")
    l2_capacity_fraction: Optional[Quantity] = Field(
        None, description="share of the L2 (memory.l2_bytes) that keeps a GEMM's input, just "
                          "written by the previous kernel, resident while the GEMM streams its "
                          "working set through it; absent = no L2 term (all bytes from HBM)")
    l2_hit_exponent: Optional[Quantity] = Field(
        None, description="how sharply the warm input's L2 hit rate falls once the working set "
                          "outgrows the resident capacity: hit = min(1, capacity / working set) "
                          "^ exponent (1 = random replacement; large = LRU-like); absent = 1")
    l2_speedup: Optional[Quantity] = Field(
        None, description="rate of L2-resident reads relative to HBM reads for this family "
                          "(memory time of a hit byte = 1 / l2_speedup of a miss); absent = 1")
    overlap_wave_exponent: Optional[Quantity] = Field(
        None, description="growth of the overlap exponent with a GEMM's waves of tiles: p = "
                          "overlap_exponent x max(1, waves) ^ this (a CTA with further tiles "
                          "queued loads the next tile during this one's math, so long kernels "
                          "overlap better than one-wave ones); absent = 0")
    split_slice_us: Optional[Quantity] = Field(
        None, description="µs per K slice beyond the first once the library splits K (past "
                          "k_split_above): the slices' partial sums are reduced one after "
                          "another; absent = 0")
    chunk_elems: Optional[Quantity] = Field(
        None, description="elements of a row one thread block reads per pass (quant_fp8: vLLM's "
                          "per-tensor kernels run one block per row and walk it in passes)")
    m_granularity: Optional[Quantity] = Field(
        None, description="rows M is padded to in the compute time: the library's heuristics "
                          "pick a CTA tile (and operand order) that fits M this closely; absent "
                          "= M padded to the profile's gemm_tile_m (power-of-two tiles below it)")
    unaligned_m_floor_us: Optional[Quantity] = Field(
        None, description="extra host time of an eager call whose per-row activation scales "
                          "are not TMA aligned (M x 4 bytes not a multiple of 16): the library "
                          "first copies them into an aligned column-major tensor (DeepGEMM)")


class Kernels(_Strict):
    gemm_bf16: KernelFit = Field(..., description="dense GEMM, 16-bit (also weight-only int4/mxfp4)")
    gemm_fp8: Optional[KernelFit] = Field(None, description="dense GEMM, fp8 per-tensor scaled")
    gemm_fp8_block: Optional[KernelFit] = Field(None, description="dense GEMM, 128x128 block fp8")
    moe_bf16: KernelFit = Field(..., description="fused-MoE expert GEMMs, 16-bit activations")
    moe_fp8: Optional[KernelFit] = Field(None, description="fused-MoE expert GEMMs, fp8 activations")
    moe_aux: KernelFit = Field(..., description="the fused-MoE pipeline's small kernels: "
                               "token alignment, activation, top-k sum, quantisation")
    quant_fp8: Optional[KernelFit] = Field(
        None, description="bf16 -> fp8 activation quantisation before an fp8 linear layer "
                          "(vLLM scaled_fp8_quant / per_token_group_quant_fp8); absent = "
                          "priced as elementwise")
    quant_fp8_group: Optional[KernelFit] = Field(
        None, description="bf16 -> fp8 per-token-group quantisation (128-element groups, fp32 "
                          "scales written column-major) before a block-scaled fp8 linear layer "
                          "(vLLM per_token_group_quant_fp8 for DeepGEMM); absent = quant_fp8")
    attention_prefill: KernelFit
    attention_decode: KernelFit
    attention_prefill_fp8: Optional[KernelFit] = Field(
        None, description="prefill attention over an fp8 KV cache (FlashAttention-3's fp8 "
                          "kernel: fp8 Q/K/V with descaling); absent = attention_prefill")
    attention_decode_fp8: Optional[KernelFit] = Field(
        None, description="decode attention over an fp8 KV cache (dequantised in the kernel); "
                          "absent = attention_decode")
    attention_mla_decode: KernelFit = Field(
        ..., description="MLA decode (FlashMLA): all heads of a sequence in full tiles")
    elementwise: KernelFit = Field(..., description="memory-bound kernels: norms, activations, ...")


class Overheads(_Strict):
    kernel_launch_host_us: Quantity = Field(..., description="host cost per eager kernel launch")
    graph_kernel_us: Quantity = Field(..., description="per-kernel cost inside a CUDA graph")
    runtime_reserved_bytes: Quantity = Field(
        ..., description="CUDA context, allocator and library workspaces per GPU")


class HardwareProfile(_Strict):
    schema_version: int = 1
    id: str
    display_name: str
    device_names: list[str] = Field(default_factory=list,
                                    description="torch.cuda.get_device_name() strings")
    compute: Compute
    memory: Memory
    interconnect: Interconnect
    collectives: Collectives
    kernels: Kernels
    overheads: Overheads
    deepep: Optional[DeepEP] = Field(None, description="DeepEP dispatch/combine fits (absent: "
                                     "not calibrated on this GPU)")
    provenance: dict[str, Any] = Field(default_factory=dict,
                                       description="base sources; calibration run details")

    # Convenience accessors in the units the cost model works in (FLOP/us, bytes/us).
    def peak_flops_per_us(self, compute_dtype: str) -> float:
        q = getattr(self.compute.peak_dense_tflops, compute_dtype, None)
        if q is None:
            raise InputError(f"hardware.compute.peak_dense_tflops.{compute_dtype}",
                             f"{self.id} has no {compute_dtype} tensor cores",
                             "choose a dtype this GPU supports")
        return q.value * 1e6

    @property
    def hbm_peak_bytes_per_us(self) -> float:
        return self.memory.hbm_peak_gb_per_s.value * 1e3

    def kernel(self, family: str) -> KernelFit:
        fit = getattr(self.kernels, family)
        if fit is None:
            raise InputError(f"hardware.kernels.{family}", f"{self.id} has no {family} kernels",
                             "choose a dtype this GPU supports")
        return fit


def _deep_merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, val in overlay.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict) and "value" not in val:
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = val
    return out


def _read_yaml(path: Path, field: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(field, f"cannot read {path}: {exc}".splitlines()[0],
                         "give a readable YAML profile") from None
    if not isinstance(data, dict):
        raise InputError(field, f"{path} is not a YAML mapping", "see hardware_profiles/")
    return data


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if ".calibrated" not in p.name)


def _resolve_paths(ref: str, field: str) -> Path:
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise InputError(field, f"profile file {ref} not found", "give an existing path")
        return path.resolve()
    base_path = PROFILES_DIR / f"{ref}.yaml"
    if not base_path.exists():
        raise InputError(field, f"unknown hardware profile {ref!r}",
                         f"valid: {', '.join(available_profiles())}, or a path to a YAML file")
    return base_path


def _mtime(path: Path) -> Optional[int]:
    return path.stat().st_mtime_ns if path.exists() else None


def load_profile(ref: str, *, calibrated: bool = True, field: str = "hardware") -> HardwareProfile:
    """Load a profile by id (``h100_sxm``) or path; the id's calibrated overlay is applied when
    one exists and ``calibrated`` is true. Parsed profiles are cached until their files change
    (sweeps resolve thousands of scenarios; a profile is immutable)."""
    base_path = _resolve_paths(ref, field)
    overlay_path = base_path.with_name(base_path.stem + ".calibrated.yaml")
    use_overlay = calibrated and ".calibrated" not in base_path.name and overlay_path.exists()
    return _load(base_path, _mtime(base_path), overlay_path if use_overlay else None,
                 _mtime(overlay_path) if use_overlay else None, field)


@lru_cache(maxsize=64)
def _load(base_path: Path, base_mtime: Optional[int], overlay_path: Optional[Path],
          overlay_mtime: Optional[int], field: str) -> HardwareProfile:
    data = _read_yaml(base_path, field)
    if overlay_path is not None:
        overlay = _read_yaml(overlay_path, field)
        prov = overlay.pop("provenance", None)
        data = _deep_merge(data, overlay)
        if prov is not None:
            data.setdefault("provenance", {})
            data["provenance"] = {**data["provenance"], "calibration": prov}
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, prefix=f"{field}[{base_path.name}]") from None
