"""Fit a hardware profile's kernel and collective parameters to measured tables.

Every op moesim prices is ``kernels * t0 + max(ideal_compute / eff_c, ideal_memory / eff_m)``
plus the optional terms of :func:`moesim.costs.op.kernel_time_us` (serialised steps, K-loop
latency, overlap exponent, and for GEMMs the partial-wave gain, HBM write cost and per-wave time),
where the ideal times and each op's shape facts (waves, wave fill, write share, K loop) come from
the datasheet peaks and the op's tiling and do not depend on the parameters. So a table is turned once into ops (by the same predictors that
``moesim validate`` uses) and the fit only re-evaluates that formula: a robust least-squares fit
(scipy ``least_squares``, soft-L1 loss on log(predicted / measured)) per kernel family, with the
families a table does not exercise held at the base profile's values. No parameter is set by
hand; the overlay records which tables, how many rows and the residuals of every fit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml
from scipy.optimize import least_squares

from moesim.costs.op import OpCost, kernel_time_us
from moesim.spec.hardware import DeepEP, HardwareProfile, load_profile
from moesim.validate import table_ops

# Families fitted from each layout (a moe table also exercises the small kernels of the fused-MoE
# pipeline: alignment, activation, top-k sum).
FITTED_BY_LAYOUT = {
    "gemm": ("gemm_bf16", "gemm_fp8", "gemm_fp8_block", "quant_fp8", "quant_fp8_group"),
    "moe": ("moe_bf16", "moe_fp8", "moe_aux"),
    "attention_context": ("attention_prefill", "attention_prefill_fp8"),
    "attention_generation": ("attention_decode", "attention_decode_fp8"),
    "collective": ("all_reduce", "all_to_all", "all_gather"),
    "allreduce_custom": ("all_reduce_custom",),
}
# DeepEP dispatch / combine (moesim/costs/deepep.py): latency + NVLink bytes / (link x
# bus_efficiency), one family per moe_a2a.csv comm_backend and phase. Their fixed time is a
# whole communication call (notify, barrier, handshake: tens to hundreds of µs), so the
# kernels' 20 µs cap on t0 does not apply.
DEEPEP_FAMILIES = tuple("deepep_" + f for f in DeepEP.model_fields)
FITTED_BY_LAYOUT["moe_a2a"] = DEEPEP_FAMILIES
# Dense GEMM, attention and eager custom all-reduce tables are timed call by call: a call cannot be faster than the host's
# dispatch of it, which shows as a floor in the small shapes (DeepGEMM's ~85 µs). Fitted as its
# own parameter so that the GPU-side fixed time t0 stays what a CUDA graph would see.
HOST_FLOOR_FAMILIES = ("gemm_bf16", "gemm_fp8", "gemm_fp8_block", "attention_prefill",
                       "attention_decode", "attention_prefill_fp8", "attention_decode_fp8",
                       "all_reduce_custom")
COLLECTIVES = ("all_reduce", "all_reduce_custom", "all_to_all", "all_gather")
# Families fitted with an overlap exponent (p-norm instead of the roofline's max): dense GEMMs,
# fused-MoE expert GEMMs and attention prefill, whose tables span the ridge point densely enough to identify it (the
# decode table is memory bound throughout: no gain there, so no parameter).
OVERLAP_FAMILIES = ("gemm_bf16", "gemm_fp8", "gemm_fp8_block", "attention_prefill",
                    "attention_prefill_fp8", "moe_bf16", "moe_fp8")
# Families whose library splits K only beyond some extent (cuBLAS's split-K heuristics), so a
# thin GEMM's time grows with K up to there: fitted K-loop latency and split point. CUTLASS
# fp8 never splits (its K loop is in the wave-quantised compute time) and DeepGEMM's tables
# sit above its host floor there.
K_LOOP_FAMILIES = ("gemm_bf16",)
# Fused-MoE expert GEMMs: each tile walks all of K and tiles run in waves, so an SM walks
# waves * K elements serially (costs/moe.py); the Triton kernel never splits K, so only the
# latency per K element is fitted (k_split_above stays off).
MOE_K_LOOP_FAMILIES = ("moe_bf16", "moe_fp8")
# Attention families: the key blocks one SM walks serially (FlashAttention-3 CTA waves and
# split-KV, costs/attention.py) at a fitted latency per 1024 K and V values, and a fixed time per
# CTA wave (step_us); no split point to fit (the kernel's own split heuristic is in the ops).
KEY_CHAIN_FAMILIES = ("attention_prefill", "attention_prefill_fp8", "attention_decode",
                      "attention_decode_fp8")
# The per-tensor fp8 quantisation walks each row in latency-bound passes (one block per row):
# its latency per pass is fitted (no split point: k_loop counts row passes, not K).
ROW_PASS_FAMILIES = ("quant_fp8",)
# Families whose tiles run in whole waves (no split-K or stream-K balancing), so a partial wave
# leaves SMs idle and the busy ones run faster (fitted partial-wave gain): vLLM's CUTLASS fp8
# and DeepGEMM past one wave.
WAVE_FAMILIES = ("gemm_fp8", "gemm_fp8_block")
# Dense GEMM tables range from read-dominated (large K) to write-dominated (small K, large M x N)
# traffic, so they identify how much more an HBM write costs than a read.
WRITE_FAMILIES = ("gemm_bf16", "gemm_fp8", "gemm_fp8_block")
# Families whose tables identify a per-wave fill/drain time: cuBLAS, whose efficiency climbs with
# K at a fixed tile count (the fits of CUTLASS fp8 and DeepGEMM drive it to zero: their small-K
# times are dominated by the activation quantisation and the host floor).
WAVE_OVERHEAD_FAMILIES = ("gemm_bf16",)
# Prefill attention: its rows range from query/output-dominated traffic (many query heads per KV
# head) to K/V-dominated (one), so they identify what a paged K/V byte costs against the rest.
KV_READ_FAMILIES = ("attention_prefill", "attention_prefill_fp8")
# Families whose tables identify an L2 term: a GEMM's activations, left in L2 by the kernel
# before, are read faster while the working set fits (cuBLAS tables with small N and a
# working set on both sides of the L2 size: up to 1.8x faster than HBM streaming allows).
L2_FAMILIES = ("gemm_bf16",)
# A collective table whose transfer times span this ratio reaches from the latency-bound to the
# bandwidth-bound end, so it can identify both protocol lines (LL/LL128 and Simple).
LL_SPAN = 1000.0
# Optional KernelFit terms and the value that switches each off.
EXTRA_TERMS = {"step_us": 0.0, "k_latency_us": 0.0, "k_split_above": float("inf"),
               "overlap_exponent": 0.0, "unaligned_m_floor_us": 0.0, "partial_wave_gain": 0.0,
               "write_cost": 1.0, "wave_overhead_us": 0.0, "kv_read_cost": 1.0,
               "l2_capacity_fraction": 0.0, "l2_hit_exponent": 1.0, "l2_speedup": 1.0,
               "overlap_wave_exponent": 0.0, "split_slice_us": 0.0}
# Start (where the profile leaves a term unset) and bounds of the optional terms the fit frees;
# the fit runs in log space.
TERM_BOUNDS = {
    # A pipeline fill (one HBM latency, ~1 µs) and an epilogue: a few µs at most.
    "wave_overhead_us": (0.5, 1e-3, 20.0),
    # 0 = the same overlap at every size; 1 = p proportional to the waves.
    "overlap_wave_exponent": (0.2, 1e-3, 4.0),
    # One partial-sum tile read and added per slice: well under a µs.
    "split_slice_us": (0.1, 1e-4, 5.0),
    # Some share of the L2 size (its two partitions may hold a line twice).
    "l2_capacity_fraction": (0.7, 0.05, 1.0),
    # 1 = random replacement; tens = LRU's collapse once the working set overflows.
    "l2_hit_exponent": (4.0, 1.0, 64.0),
    # L2 read bandwidth is a few times HBM's on Hopper.
    "l2_speedup": (2.0, 1.0, 8.0),
    "write_cost": (1.0, 0.5, 4.0),
    # A gathered page costs at least a bulk byte, at most several.
    "kv_read_cost": (1.5, 0.5, 8.0),
    # A busy SM can at most reach its unthrottled peak: a few tens of percent.
    "partial_wave_gain": (0.2, 1e-3, 2.0),
    # One extra torch op dispatched from the host: a few µs.
    "unaligned_m_floor_us": (2.0, 1e-3, 100.0),
    "k_latency_us": (1.0, 1e-3, 20.0),
    "k_split_above": (2048.0, 128.0, float(1 << 20)),
}


def _unset(name: str, v: float) -> bool:
    """Whether a profile's value of an optional term is its "off" value (start elsewhere)."""
    if name in ("l2_hit_exponent", "l2_speedup"):
        return v == 1.0
    if name == "k_split_above":
        return not np.isfinite(v)
    return not v > 0


# Fused-MoE families whose serialised steps are unaligned elements (costs/moe.py).
MOE_STEP_FAMILIES = ("moe_bf16",)
LAYOUT_ORDER = ("moe", "gemm", "attention_context", "attention_generation", "collective",
                "allreduce_custom", "moe_a2a")
MAX_ROWS_PER_FIT = 6000
T0_MAX_US = 20.0  # a seeded stratified sample beyond this keeps each fit to seconds


@dataclass
class Ops:
    """A table's ops flattened to arrays: op i belongs to row ``row[i]``."""

    row: np.ndarray
    family: np.ndarray
    kernels: np.ndarray
    ideal_c: np.ndarray
    ideal_m: np.ndarray
    eager: np.ndarray  # False for ops timed inside a CUDA graph (no host floor)
    steps: np.ndarray  # serialised steps (collective rounds, same-address atomics)
    k_loop: np.ndarray  # a GEMM's K extent
    unaligned: np.ndarray  # DeepGEMM ops whose activation scales need an aligned copy first
    wave_fill: np.ndarray  # fraction of SM slots a GEMM's waves of tiles keep busy
    write_fraction: np.ndarray  # share of an op's bytes written to HBM
    waves: np.ndarray  # a GEMM's waves of tiles
    warm: np.ndarray  # share of an op's bytes the previous kernel left in L2
    ws_l2: np.ndarray  # bytes an op touches over the L2 size
    kv_fraction: np.ndarray  # share of an op's bytes that is paged K/V cache
    measured: np.ndarray
    n_rows: int

    @classmethod
    def from_lists(cls, ops_list: Sequence[Sequence[OpCost]], measured: Sequence[float]) -> "Ops":
        row, fam, ker, ic, im, eager, steps, kl, un, wf, wr, wv, wm, ws, kv = (
            [] for _ in range(15))
        for r, ops in enumerate(ops_list):
            for o in ops:
                row.append(r)
                fam.append(o.family)
                ker.append(o.kernels)
                ic.append(o.ideal_compute_us)
                im.append(o.ideal_memory_us)
                eager.append(not o.in_graph)
                steps.append(o.steps)
                kl.append(o.k_loop)
                un.append(o.unaligned_m)
                wf.append(o.wave_fill)
                wr.append(o.write_fraction)
                wv.append(o.waves)
                wm.append(o.warm_fraction)
                ws.append(o.working_set_l2)
                kv.append(o.kv_fraction)
        return cls(np.array(row), np.array(fam), np.array(ker, float), np.array(ic),
                   np.array(im), np.array(eager, bool), np.array(steps, float),
                   np.array(kl, float), np.array(un, bool), np.array(wf, float),
                   np.array(wr, float), np.array(wv, float), np.array(wm, float),
                   np.array(ws, float), np.array(kv, float), np.asarray(measured, float),
                   len(ops_list))

    def subset(self, rows: np.ndarray) -> "Ops":
        keep = np.isin(self.row, rows)
        remap = np.full(self.n_rows, -1)
        remap[rows] = np.arange(len(rows))
        return Ops(remap[self.row[keep]], self.family[keep], self.kernels[keep],
                   self.ideal_c[keep], self.ideal_m[keep], self.eager[keep], self.steps[keep],
                   self.k_loop[keep], self.unaligned[keep], self.wave_fill[keep],
                   self.write_fraction[keep], self.waves[keep], self.warm[keep],
                   self.ws_l2[keep], self.kv_fraction[keep], self.measured[rows], len(rows))


Params = dict[str, dict[str, float]]  # family -> {t0_us, compute_efficiency, memory_efficiency}


def profile_params(hw: HardwareProfile) -> Params:
    out: Params = {}
    for fam, fit in hw.kernels:
        if fit is not None:
            out[fam] = {"t0_us": fit.t0_us.value,
                        "compute_efficiency": fit.compute_efficiency.value
                        if fit.compute_efficiency is not None else 1.0,
                        "memory_efficiency": fit.memory_efficiency.value,
                        "host_floor_us": fit.host_floor_us.value if fit.host_floor_us else 0.0}
            for name, off in EXTRA_TERMS.items():
                q = getattr(fit, name)
                out[fam][name] = q.value if q is not None else off
    for fam in COLLECTIVES:
        c = getattr(hw.collectives, fam)
        out[fam] = {"t0_us": c.latency_us.value, "compute_efficiency": 1.0,
                    "memory_efficiency": c.bus_efficiency.value,
                    "host_floor_us": c.host_floor_us.value if c.host_floor_us else 0.0,
                    "step_us": c.latency_per_step_us.value if c.latency_per_step_us else 0.0,
                    # 0 = no low-latency protocol line
                    "ll_latency_us": c.ll_latency_us.value if c.ll_latency_us else 0.0,
                    "ll_bus_efficiency": c.ll_bus_efficiency.value
                    if c.ll_bus_efficiency else 0.0}
    for fam in DEEPEP_FAMILIES:
        d = getattr(hw.deepep, fam[len("deepep_"):]) if hw.deepep is not None else None
        # An uncalibrated family starts where fit_families puts it (t0 0 = the fastest row,
        # efficiency 0 = half the link); it prices nothing until fitted.
        out[fam] = {"t0_us": d.latency_us.value if d else 0.0, "compute_efficiency": 1.0,
                    "memory_efficiency": d.bus_efficiency.value if d else 0.0,
                    "host_floor_us": 0.0}
    return out


def predict_rows(ops: Ops, params: Params) -> np.ndarray:
    """Per-row predicted µs of one eager call: the cost model's formula summed over the row's
    ops, or the host floor of its slowest-to-dispatch op (:func:`moesim.costs.op.eager_time_us`)."""
    t = np.zeros(len(ops.row))
    floor = np.zeros(len(ops.row))
    for fam in np.unique(ops.family):
        sel = ops.family == fam
        p = params[fam]
        t[sel] = kernel_time_us(p["t0_us"], p["compute_efficiency"], p["memory_efficiency"],
                                ops.ideal_c[sel], ops.ideal_m[sel], ops.kernels[sel],
                                ops.steps[sel], p.get("step_us", 0.0), ops.k_loop[sel],
                                p.get("k_latency_us", 0.0),
                                p.get("k_split_above", float("inf")),
                                p.get("overlap_exponent") or None, ops.wave_fill[sel],
                                p.get("partial_wave_gain", 0.0), ops.write_fraction[sel],
                                p.get("write_cost", 1.0), ops.waves[sel],
                                p.get("wave_overhead_us", 0.0), ops.warm[sel], ops.ws_l2[sel],
                                p.get("l2_capacity_fraction", 0.0),
                                p.get("l2_hit_exponent", 1.0), p.get("l2_speedup", 1.0),
                                p.get("overlap_wave_exponent", 0.0),
                                p.get("split_slice_us", 0.0), ops.kv_fraction[sel],
                                p.get("kv_read_cost", 1.0))
        if p.get("ll_latency_us", 0.0) > 0 and p.get("ll_bus_efficiency", 0.0) > 0:
            # Second protocol line (hardware.CollectiveFit): the faster one is used.
            t[sel] = np.minimum(t[sel], kernel_time_us(
                p["ll_latency_us"], 1.0, p["ll_bus_efficiency"], 0.0, ops.ideal_m[sel],
                ops.kernels[sel], ops.steps[sel], p.get("step_us", 0.0)))
        floor[sel] = (p.get("host_floor_us", 0.0) + p.get("unaligned_m_floor_us", 0.0)
                      * ops.unaligned[sel]) * ops.eager[sel]
    row_floor = np.zeros(ops.n_rows)
    np.maximum.at(row_floor, ops.row, floor)
    return np.maximum(np.bincount(ops.row, weights=t, minlength=ops.n_rows), row_floor)


def _free_params(ops: Ops, families: Sequence[str]) -> list[tuple[str, str]]:
    """The (family, parameter) pairs a table can identify: a family's compute efficiency only
    where its ops have compute work, none for collectives."""
    free = []
    for fam in families:
        sel = ops.family == fam
        if not sel.any():
            continue
        free.append((fam, "t0_us"))
        free.append((fam, "memory_efficiency"))
        if fam not in COLLECTIVES and ops.ideal_c[sel].max() > 0:
            free.append((fam, "compute_efficiency"))
        if fam in HOST_FLOOR_FAMILIES:
            free.append((fam, "host_floor_us"))
        if fam in COLLECTIVES and ops.steps[sel].max() > ops.steps[sel].min():
            free.append((fam, "step_us"))
        if fam in COLLECTIVES and ops.ideal_m[sel].max() > LL_SPAN * ops.ideal_m[sel].min():
            # Sizes from latency- to bandwidth-bound: both protocol lines are identifiable.
            free += [(fam, "ll_latency_us"), (fam, "ll_bus_efficiency")]
        if fam not in COLLECTIVES and ops.steps[sel].max() > 0:
            free.append((fam, "step_us"))
        if fam in K_LOOP_FAMILIES and ops.k_loop[sel].max() > 0:
            free += [(fam, "k_latency_us"), (fam, "k_split_above"), (fam, "split_slice_us")]
        if (fam in MOE_K_LOOP_FAMILIES + KEY_CHAIN_FAMILIES + ROW_PASS_FAMILIES
                and ops.k_loop[sel].max() > 0):
            free.append((fam, "k_latency_us"))
        if fam in OVERLAP_FAMILIES:
            free.append((fam, "overlap_exponent"))
        if fam in WRITE_FAMILIES and np.ptp(ops.write_fraction[sel]) > 0.5:
            # Read- and write-dominated ops both present: the write cost is identifiable.
            free.append((fam, "write_cost"))
        if fam in KV_READ_FAMILIES and np.ptp(ops.kv_fraction[sel]) > 0.25:
            # Query/output- and K/V-dominated ops both present: the K/V cost is identifiable.
            free.append((fam, "kv_read_cost"))
        if fam in WAVE_OVERHEAD_FAMILIES and ops.waves[sel].max() > 2 * ops.waves[sel].min() > 0:
            free.append((fam, "wave_overhead_us"))
        if (fam in L2_FAMILIES and ops.warm[sel].max() > 0.5
                and ops.ws_l2[sel].min() < 0.5 < 2.0 < ops.ws_l2[sel].max()):
            # Activation-dominated ops that fit in L2 and ones far beyond it: identifiable.
            free += [(fam, "l2_capacity_fraction"), (fam, "l2_hit_exponent"),
                     (fam, "l2_speedup")]
        if fam in WAVE_OVERHEAD_FAMILIES and fam in OVERLAP_FAMILIES and \
                ops.waves[sel].max() > 2 * ops.waves[sel].min() > 0:
            free.append((fam, "overlap_wave_exponent"))
        if fam in WAVE_FAMILIES and ops.wave_fill[sel].min() < 1.0:
            free.append((fam, "partial_wave_gain"))
        if fam in HOST_FLOOR_FAMILIES and 0 < ops.unaligned[sel].sum() < sel.sum():
            # Both aligned and unaligned M: the extra host op's time is identifiable.
            free.append((fam, "unaligned_m_floor_us"))
    return free


def fit_families(ops: Ops, base: Params, families: Sequence[str]) -> tuple[Params, dict]:
    """Least-squares fit of ``families``' parameters; returns new params and fit statistics."""
    free = _free_params(ops, families)
    params = {f: dict(v) for f, v in base.items()}
    if not free:
        return params, {}

    # Parameters live in log space: positivity for free, and efficiencies stay <= 1 by bounds.
    def unpack(x: np.ndarray) -> Params:
        p = {f: dict(v) for f, v in params.items()}
        for (fam, name), v in zip(free, x):
            p[fam][name] = float(np.exp(v))
        return p

    def resid(x: np.ndarray) -> np.ndarray:
        return np.log(predict_rows(ops, unpack(x)) / ops.measured)

    x0, lo, hi = [], [], []
    for fam, name in free:
        v = params[fam][name]
        if name == "host_floor_us" and v <= 0.0:
            # A floor only moves the fit once it binds: start at the family's fastest row.
            v = float(ops.measured[np.unique(ops.row[(ops.family == fam) & ops.eager])].min())
        if name == "step_us" and v <= 0.0:
            # A start where the term moves the fit (the base profiles have none): a collective
            # round is ~0.5 µs, a same-address atomic a few ns.
            v = 0.5 if fam in COLLECTIVES else 0.005
        if name in ("ll_latency_us", "ll_bus_efficiency") and v <= 0.0:
            # Start the low-latency line below the Simple one on both counts (NCCL: LL runs at
            # up to half the link bandwidth, with a fraction of Simple's latency).
            base_name = "t0_us" if name == "ll_latency_us" else "memory_efficiency"
            v = 0.5 * params[fam][base_name]
        if fam in DEEPEP_FAMILIES and v <= 0.0:
            # Not in the base profile: start at the family's fastest row, half the link.
            v = float(ops.measured[np.unique(ops.row[ops.family == fam])].min()) \
                if name == "t0_us" else 0.5
        if name == "step_us" and fam in MOE_STEP_FAMILIES:
            # µs per wave of tiles of an unaligned expert GEMM (costs/moe.py): a wave of
            # latency-bound narrow-access tiles takes on the order of a µs.
            x0.append(np.log(1.0 if params[fam][name] <= 0.0 else v))
            lo.append(np.log(1e-3))
            hi.append(np.log(100.0))
        elif name == "step_us" and fam in KEY_CHAIN_FAMILIES:
            # µs per CTA wave of FlashAttention-3 (a CTA's prologue and epilogue: loads of its
            # query tile, output writes): a few µs.
            x0.append(np.log(2.0 if params[fam][name] <= 0.0 else v))
            lo.append(np.log(0.01))
            hi.append(np.log(T0_MAX_US))
        elif name == "step_us" and fam not in COLLECTIVES:
            x0.append(np.log(v))
            lo.append(np.log(1e-4))
            hi.append(np.log(1.0))
        elif name == "overlap_exponent":
            # p = 1 adds the times (no overlap); p = 16 is the maximum within 5 %.
            x0.append(np.log(min(max(v, 1.0), 16.0) if v > 0 else 4.0))
            lo.append(0.0)
            hi.append(np.log(16.0))
        elif name in TERM_BOUNDS:
            default, low, high = TERM_BOUNDS[name]
            x0.append(np.log(default if _unset(name, v) else v))
            lo.append(np.log(low))
            hi.append(np.log(high))
        elif name in ("t0_us", "host_floor_us", "step_us", "ll_latency_us"):
            # GPU-side fixed time per kernel is launch latency plus prologue and tail: a few µs,
            # never tens. Longer floors in a table belong to the host (host_floor_us).
            top = T0_MAX_US if name == "t0_us" and fam not in COLLECTIVES + DEEPEP_FAMILIES \
                else 500.0
            x0.append(np.log(min(max(v, 0.05), top)))
            lo.append(np.log(0.01))
            hi.append(np.log(top))
        else:
            x0.append(np.log(min(max(v, 0.02), 1.0)))
            lo.append(np.log(0.005))
            hi.append(0.0)
    sol = least_squares(resid, np.array(x0), bounds=(np.array(lo), np.array(hi)),
                        loss="soft_l1", f_scale=0.1, x_scale=1.0, max_nfev=400)
    fitted = unpack(sol.x)
    ape = np.abs(np.exp(sol.fun) - 1.0) * 100
    stats = {"rows": int(ops.n_rows), "median_ape_pct": round(float(np.median(ape)), 2),
             "p90_ape_pct": round(float(np.percentile(ape, 90)), 2),
             "parameters": [f"{f}.{n}" for f, n in free]}
    return fitted, stats


def sample_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_ops(table: Path, hardware: Optional[str], time_unit: Optional[str] = None
             ) -> tuple[str, list[dict], Ops]:
    """A table's rows and ops, built on the uncalibrated base profile: the ops' structure
    (tiles, waves, L2 working sets) must not depend on the overlay being fitted, else a refit
    moves with the previous fit and leave-one-shape-out sees the held-out shape through it."""
    layout, rows, ops_list, measured = table_ops(str(table), hardware, time_unit,
                                                 calibrated=False)
    return layout, rows, Ops.from_lists(ops_list, measured)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def find_tables(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.glob("*.csv"))


def _sms_by_family(rows: list[dict]) -> dict[str, list[int]]:
    """SM counts (``sms`` column) of a moe_a2a table's rows, per DeepEP family."""
    out: dict[str, set] = {}
    for r in rows:
        fam = f"{r['comm_backend'].strip().lower()}_{r['phase'].strip().lower()}"
        out.setdefault(fam, set()).add(int(r.get("sms") or 0))
    return {f: sorted(v) for f, v in out.items()}


def fit_tables(tables: Sequence[Path], base: HardwareProfile, hardware: Optional[str] = None,
               limit: int = MAX_ROWS_PER_FIT, time_units: Optional[dict[str, str]] = None
               ) -> tuple[Params, dict]:
    """Fit every family the tables exercise, in :data:`LAYOUT_ORDER`. Returns the fitted params
    and per-table statistics. ``time_units``: table file name -> unit of its ``latency_us``
    column (``moesim validate --time-unit``); a moe_a2a table implausible in µs is skipped with
    the reason unless named here."""
    params = profile_params(base)
    time_units = time_units or {}
    loaded = {}
    sms: dict[Path, dict] = {}
    for t in tables:
        try:
            layout, rows, ops = load_ops(t, hardware or base.id, time_units.get(t.name))
        except Exception as exc:  # a table this fit cannot use is reported, not fatal
            # validate's option is --time-unit UNIT; this command's is --time-unit TABLE=UNIT
            why = str(exc).splitlines()[0].replace("--time-unit ns", f"--time-unit {t.name}=ns")
            loaded[t] = (None, why)
            continue
        loaded[t] = (layout, ops)
        if layout == "moe_a2a":
            sms[t] = _sms_by_family(rows)
    report: dict = {}
    for layout in LAYOUT_ORDER:
        for t, (lay, ops) in loaded.items():
            if lay != layout:
                continue
            sub = ops.subset(sample_rows(ops.n_rows, limit))
            params, stats = fit_families(sub, params, FITTED_BY_LAYOUT[layout])
            full_ape = np.abs(predict_rows(ops, params) / ops.measured - 1) * 100
            stats.update(all_rows=int(ops.n_rows),
                         all_rows_median_ape_pct=round(float(np.median(full_ape)), 2),
                         all_rows_p90_ape_pct=round(float(np.percentile(full_ape, 90)), 2),
                         sha256=_sha256(t))
            if t.name in time_units:
                stats["time_unit"] = time_units[t.name]
            if t in sms:
                stats["sms"] = sms[t]
            report[t.name] = {"layout": layout, **stats}
    for t, (lay, why) in loaded.items():
        if lay is None:
            report[t.name] = {"skipped": why}
    return params, report


def overlay(base: HardwareProfile, params: Params, report: dict, tables: Sequence[Path],
            transferred_from: Optional[str] = None) -> dict:
    """The calibrated overlay: only fitted fields, each with its provenance."""
    fitted_by: dict[str, str] = {}
    for name, st in report.items():
        for p in st.get("parameters", []):
            fitted_by[p] = (f"{name}: {st['rows']} rows fitted, median APE "
                            f"{st['median_ape_pct']}%, p90 {st['p90_ape_pct']}% "
                            f"(sha256 {st['sha256']})")
    kind = "estimate" if transferred_from else "calibrated"

    def q(fam: str, name: str, value: float) -> dict:
        src = f"python -m calibration fit on {fitted_by[f'{fam}.{name}']}"
        if transferred_from:
            src = (f"transferred from {transferred_from}'s fit (same SM architecture and kernel "
                   f"libraries): {src}")
        return {"value": float(f"{value:.5g}"), "kind": kind, "source": src}

    kernels: dict = {}
    collectives: dict = {}
    deepep: dict = {}
    for fam, vals in params.items():
        fields = {}
        for name in ("t0_us", "compute_efficiency", "memory_efficiency", "host_floor_us",
                     "step_us", "k_latency_us", "k_split_above", "overlap_exponent",
                     "unaligned_m_floor_us", "partial_wave_gain", "write_cost", "wave_overhead_us",
                     "kv_read_cost", "l2_capacity_fraction", "l2_hit_exponent", "l2_speedup",
                     "overlap_wave_exponent", "split_slice_us",
                     "ll_latency_us",
                     "ll_bus_efficiency"):
            if f"{fam}.{name}" in fitted_by:
                fields[name] = q(fam, name, vals[name])
        if not fields:
            continue
        if fam in COLLECTIVES:
            ren = {"t0_us": "latency_us", "memory_efficiency": "bus_efficiency",
                   "host_floor_us": "host_floor_us", "step_us": "latency_per_step_us",
                   "ll_latency_us": "ll_latency_us", "ll_bus_efficiency": "ll_bus_efficiency"}
            collectives[fam] = {ren[k]: v for k, v in fields.items()}
        elif fam in DEEPEP_FAMILIES and transferred_from:
            continue  # measured on this node's NVLink fabric (H800's differs): not carried over
        elif fam in DEEPEP_FAMILIES:
            name = fam[len("deepep_"):]
            entry = {"latency_us": fields["t0_us"], "bus_efficiency": fields["memory_efficiency"]}
            for table, st in report.items():
                counts = st.get("sms", {}).get(fam)
                if counts and len(counts) == 1:  # the SM count the efficiency was fitted at
                    entry["sms"] = {"value": float(counts[0]), "kind": "derived",
                                    "source": f"{table}: sms column of the rows fitted "
                                              "(0 = the backend's default)"}
            deepep[name] = entry
        elif getattr(base.kernels, fam, None) is not None:
            kernels[fam] = fields
    out: dict = {}
    if kernels:
        out["kernels"] = kernels
    if collectives:
        out["collectives"] = collectives
    if deepep:
        out["deepep"] = deepep
    out["provenance"] = {
        "tool": "python -m calibration fit",
        "date": _dt.date.today().isoformat(),
        "base_profile": base.id,
        "tables": [str(t) for t in tables],
        "fits": report,
    }
    if transferred_from:
        out["provenance"]["transferred_from"] = transferred_from
    return out


def write_overlay(data: dict, path: Path, header: str) -> None:
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100))


def run_fit(source: Path, base_path: Path, out: Path, transfer: Sequence[str] = (),
            hardware: Optional[str] = None, time_units: Optional[dict[str, str]] = None) -> dict:
    tables = find_tables(source)
    base = load_profile(str(base_path), calibrated=False)
    params, report = fit_tables(tables, base, hardware, time_units=time_units)
    header = (f"# Calibrated overlay for {base.id}, written by `python -m calibration fit "
              f"--from {source} --base {base_path}`.\n# Fields here replace the base profile's "
              "one by one; every value says which table and fit produced it.\n")
    write_overlay(overlay(base, params, report, tables), out, header)
    for target in transfer:
        tgt = load_profile(target, calibrated=False)
        path = out.parent / f"{tgt.id}.calibrated.yaml"
        head = (f"# Overlay for {tgt.id}: {base.id}'s fitted kernel parameters, carried over as "
                "estimates (same SM architecture and kernel libraries).\n# Replace with a fit on "
                f"{tgt.id} measurements when they exist.\n")
        write_overlay(overlay(tgt, params, report, tables, transferred_from=base.id), path, head)
    return report
