"""``OpCost``: what one op costs and why. Every cost function returns one.

Every kernel is priced by one formula (:func:`kernel_time_us`): a fixed time per kernel plus the
larger of its compute time and its memory time, each the ideal time at the datasheet peak divided
by the efficiency its kernel family reaches on this GPU (``hardware.kernels.<family>``). The ideal
times are kept on the op, so calibration can refit the efficiencies without re-deriving the ops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..spec.hardware import HardwareProfile

Bound = Literal["compute", "memory", "network", "launch"]
Category = Literal["gemm", "moe", "attention", "comm", "elementwise", "overhead"]


@dataclass(frozen=True)
class OpCost:
    """Cost of one op on one GPU (the slowest rank where ranks differ).

    ``time_us`` is GPU time for the op's kernels; ``launch_us`` is the extra time the GPU idles
    because kernels are launched from the host (eager) or replayed from a graph. ``flops`` and
    ``bytes`` are the work modelled (HBM bytes for kernels, bytes sent per GPU for collectives).
    ``family`` names the kernel family whose fit priced it; ``ideal_*_us`` are its compute and
    memory times at datasheet peak (wave quantisation included).
    """

    name: str
    category: Category
    time_us: float
    flops: float
    bytes: float
    bound: Bound
    kernels: int = 1
    launch_us: float = 0.0
    layer_kind: str = ""
    count: int = 1  # identical layers this op stands for
    family: str = ""
    ideal_compute_us: float = 0.0
    ideal_memory_us: float = 0.0
    host_floor_us: float = 0.0  # eager calls take at least this long (hardware.kernels.*)
    fixed_us: float = 0.0  # the kernels' fixed time (kernels * t0) inside time_us
    in_graph: bool = False  # replayed from a CUDA graph: no host dispatch per call
    steps: int = 0  # serialised latency steps: collective rounds, same-address atomics
    k_loop: float = 0.0  # K elements one CTA of a GEMM walks before any split-K
    unaligned_m: bool = False  # per-row scales not TMA aligned: the extra host floor applies
    host_us: float = 0.0  # host time dispatching the kernels eagerly (0: replayed in a graph)
    wave_fill: float = 1.0  # fraction of the SM slots a GEMM's waves of tiles keep busy
    write_fraction: float = 0.0  # share of ``bytes`` written to HBM (the rest is read)
    waves: float = 0.0  # waves of GEMM tiles: each pays a pipeline fill and an epilogue
    kv_fraction: float = 0.0  # share of ``bytes`` that is paged K/V cache (attention)
    warm_fraction: float = 0.0  # share of ``bytes`` the previous kernel left in L2 (its output)
    working_set_l2: float = 0.0  # bytes the kernel touches, in units of the GPU's L2 size

    @property
    def total_us(self) -> float:
        """Time of one occurrence, launch cost included."""
        return self.time_us + self.launch_us

    def scaled(self, count: int, layer_kind: str) -> "OpCost":
        return replace(self, count=count, layer_kind=layer_kind)


def kernel_time_us(t0_us, compute_efficiency, memory_efficiency, ideal_compute_us,
                   ideal_memory_us, kernels=1, steps=0, step_us=0.0, k_loop=0.0,
                   k_latency_us=0.0, k_split_above=float("inf"), overlap_exponent=None,
                   wave_fill=1.0, partial_wave_gain=0.0, write_fraction=0.0, write_cost=1.0,
                   waves=0.0, wave_overhead_us=0.0, warm_fraction=0.0, working_set_l2=0.0,
                   l2_capacity_fraction=0.0, l2_hit_exponent=1.0, l2_speedup=1.0,
                   overlap_wave_exponent=0.0, split_slice_us=0.0, kv_fraction=0.0,
                   kv_read_cost=1.0):
    """``kernels * t0 + steps * step_us + combine(t_c, t_m, t_k)`` with ``t_c = ideal_compute /
    min(1, eff_c * (1 + partial_wave_gain * (1 - wave_fill))))`` (SMs a partial wave leaves idle leave
    their share of power, hence clock, and of L2/HBM bandwidth to the busy ones: a busy SM runs
    faster than at full load) ``+ waves * wave_overhead_us`` (each wave of tiles fills its
    load pipeline before the first MMA and drains its accumulators after the last), ``t_m =
    ideal_memory * (1 + (write_cost - 1) * write_fraction + (kv_read_cost - 1) * kv_fraction -
    l2_saving) / eff_m`` (HBM writes cost ``write_cost`` reads: bus turnarounds and write
    recovery; paged K/V cache bytes, ``kv_fraction`` of them, cost ``kv_read_cost`` reads:
    gathered page by page; :func:`l2_saving`: the ``warm_fraction`` of the bytes the previous
    kernel left in L2 is read faster while the working set fits) and ``t_k = k_latency_us *
    min(k_loop, k_split_above) / 1024 + split_slice_us * max(0, k_loop / k_split_above - 1)``
    (the K loop one CTA walks serially: each K block waits on its loads, so a thin GEMM is
    latency bound however little it moves; past the split point the K slices' partial sums are
    reduced one after another, one step per further slice). ``combine`` is the roofline's
    maximum, or with an ``overlap_exponent`` p the p-norm ``(t_c^p + t_m^p + t_k^p)^(1/p)``: a
    kernel overlaps its compute and memory phases imperfectly, most visibly near the ridge
    point, and p -> inf recovers the maximum. With an ``overlap_wave_exponent`` g, p grows
    with the waves of tiles, ``p x max(1, waves)^g``: a CTA with further tiles queued loads the
    next one during this one's math, so a long GEMM hides its memory phase better than a
    one-wave one (fitted on the cuBLAS tables: one p over-predicts large ridge-point GEMMs and
    under-predicts small ones). Works on numpy arrays (calibration evaluates it over whole
    tables)."""
    import numpy as np

    # A busy SM's rate can rise up to the tensor-core peak, not beyond.
    t_c = np.asarray(ideal_compute_us) / np.minimum(1.0, compute_efficiency * (
        1.0 + partial_wave_gain * (1.0 - np.asarray(wave_fill)))) + \
        np.asarray(waves) * wave_overhead_us
    t_m = np.asarray(ideal_memory_us) * (1.0 + (write_cost - 1.0) * np.asarray(
        write_fraction) + (kv_read_cost - 1.0) * np.asarray(kv_fraction) - l2_saving(
        warm_fraction, working_set_l2, l2_capacity_fraction, l2_hit_exponent, l2_speedup,
        np.minimum)) / memory_efficiency
    t_k = k_latency_us * np.minimum(k_loop, k_split_above) / 1024.0 + split_slice_us * \
        np.maximum(0.0, np.asarray(k_loop) / k_split_above - 1.0)
    if overlap_exponent and overlap_wave_exponent:
        p = overlap_exponent * np.maximum(1.0, np.asarray(waves)) ** overlap_wave_exponent
        body = scaled_p_norm(t_c, t_m, t_k, p, np.maximum)
    elif overlap_exponent:
        p = overlap_exponent
        body = (t_c ** p + t_m ** p + t_k ** p) ** (1.0 / p)
    else:
        body = np.maximum(np.maximum(t_c, t_m), t_k)
    return kernels * t0_us + steps * step_us + body


def scaled_p_norm(t_c, t_m, t_k, p, maximum):
    """``(t_c^p + t_m^p + t_k^p)^(1/p)`` computed as ``t_max x (sum (t / t_max)^p)^(1/p)``: a
    p that grows with a GEMM's waves reaches the hundreds, where ``t^p`` overflows a float.
    ``maximum``: ``max`` or ``np.maximum``."""
    top = maximum(maximum(maximum(t_c, t_m), t_k), 1e-30)
    return top * ((t_c / top) ** p + (t_m / top) ** p + (t_k / top) ** p) ** (1.0 / p)


def l2_saving(warm_fraction, working_set_l2, l2_capacity_fraction, l2_hit_exponent, l2_speedup,
              minimum):
    """Share of a kernel's HBM time saved because part of its input is still in L2 (0 where the
    family has no L2 term): ``warm_fraction x hit x (1 - 1 / l2_speedup)``. The warm bytes are
    what the previous kernel just wrote (a GEMM's activations: the producing op's output, or in a
    kernel benchmark the previous iteration's read of the same input); they are read at
    ``l2_speedup`` x the HBM rate when they hit. ``hit = min(1, l2_capacity_fraction /
    working_set_l2) ** l2_hit_exponent``: the share of L2 that holds reusable lines
    (``l2_capacity_fraction`` x the datasheet size: H100's L2 is two partitions that may
    duplicate lines) over the bytes the kernel streams through it (weights, activations and
    output); exponent 1 is random replacement, large exponents an LRU-like collapse once the
    working set no longer fits. Dimensionless; ``minimum``: ``min`` or ``np.minimum``."""
    if not l2_capacity_fraction:
        return 0.0
    import numpy as np

    ws = np.maximum(working_set_l2, 1e-12)
    hit = minimum(1.0, l2_capacity_fraction / ws) ** l2_hit_exponent
    return warm_fraction * hit * (1.0 - 1.0 / l2_speedup)


def _opt(q, default):
    return q.value if q is not None else default


def fit_terms(fit) -> dict:
    """A kernel family's optional parameters as :func:`kernel_time_us` keyword arguments."""
    return {"step_us": _opt(fit.step_us, 0.0), "k_latency_us": _opt(fit.k_latency_us, 0.0),
            "k_split_above": _opt(fit.k_split_above, float("inf")),
            "overlap_exponent": _opt(fit.overlap_exponent, None),
            "partial_wave_gain": _opt(fit.partial_wave_gain, 0.0),
            "write_cost": _opt(fit.write_cost, 1.0),
            "kv_read_cost": _opt(fit.kv_read_cost, 1.0),
            "wave_overhead_us": _opt(fit.wave_overhead_us, 0.0),
            "l2_capacity_fraction": _opt(fit.l2_capacity_fraction, 0.0),
            "l2_hit_exponent": _opt(fit.l2_hit_exponent, 1.0),
            "l2_speedup": _opt(fit.l2_speedup, 1.0),
            "overlap_wave_exponent": _opt(fit.overlap_wave_exponent, 0.0),
            "split_slice_us": _opt(fit.split_slice_us, 0.0)}


def roofline_terms(fit, hw: "HardwareProfile", bytes_, ideal_compute_us, kernels, steps, k_loop,
                   maximum, minimum, wave_fill=1.0, write_fraction=0.0, waves=0.0,
                   warm_fraction=0.0, working_set_l2=0.0, kv_fraction=0.0):
    """:func:`kernel_time_us` of one kernel family's fit, and its parts: (time, fixed time,
    ideal memory time, compute, memory and K-loop time), all us. ``maximum`` / ``minimum``:
    the builtins for plain floats (predict prices thousands of ops per second), ``np.maximum``
    / ``np.minimum`` for arrays (the sweep's step pricer)."""
    ideal_memory_us = bytes_ / hw.hbm_peak_bytes_per_us
    eff_c = fit.compute_efficiency.value if fit.compute_efficiency is not None else 1.0
    extra = fit_terms(fit)
    t_c = ideal_compute_us / minimum(1.0, eff_c * (
        1.0 + extra["partial_wave_gain"] * (1.0 - wave_fill))) + waves * extra["wave_overhead_us"]
    t_m = ideal_memory_us * (1.0 + (extra["write_cost"] - 1.0) * write_fraction
                             + (extra["kv_read_cost"] - 1.0) * kv_fraction - l2_saving(
        warm_fraction, working_set_l2, extra["l2_capacity_fraction"], extra["l2_hit_exponent"],
        extra["l2_speedup"], minimum)) / fit.memory_efficiency.value
    t_k = extra["k_latency_us"] * minimum(k_loop, extra["k_split_above"]) / 1024.0
    if extra["split_slice_us"]:
        t_k = t_k + extra["split_slice_us"] * maximum(0.0, k_loop / extra["k_split_above"] - 1.0)
    fixed = kernels * fit.t0_us.value  # what a CUDA graph replaces (step.py): t0 only
    p = extra["overlap_exponent"]
    if p and extra["overlap_wave_exponent"]:
        # The overlap improves with the waves of tiles (see kernel_time_us).
        body = scaled_p_norm(t_c, t_m, t_k, p * maximum(1.0, waves) **
                             extra["overlap_wave_exponent"], maximum)
    else:
        body = (t_c ** p + t_m ** p + t_k ** p) ** (1.0 / p) if p else \
            maximum(maximum(t_c, t_m), t_k)
    time = fixed + steps * extra["step_us"] + body
    return time, fixed, ideal_memory_us, t_c, t_m, t_k


def roofline(name: str, category: Category, family: str, flops: float, bytes_: float,
             ideal_compute_us: float, hw: "HardwareProfile", kernels: int = 1, steps: int = 0,
             k_loop: float = 0.0, wave_fill: float = 1.0,
             write_fraction: float = 0.0, waves: float = 0.0, warm_fraction: float = 0.0,
             working_set_l2: float = 0.0, kv_fraction: float = 0.0) -> OpCost:
    """Price one op of ``kernels`` kernels of ``family``; memory time is ``bytes_`` at HBM peak.
    ``steps``: serialised steps (the family's ``step_us`` each); ``k_loop``: a GEMM's K extent
    (the family's K-loop latency, where it has one); ``wave_fill``: the fraction of SM slots its
    waves of tiles keep busy (the family's partial-wave gain, where it has one);
    ``write_fraction``: the share of ``bytes_`` written (the family's write cost, where it has
    one); ``waves``: a GEMM's waves of tiles (the family's per-wave overhead, where it has one);
    ``warm_fraction`` / ``working_set_l2``: the share of ``bytes_`` left in L2 by the previous
    kernel and the bytes touched over the L2 size (the family's L2 term, where it has one);
    ``kv_fraction``: the share of ``bytes_`` that is paged K/V cache (the family's K/V read cost,
    where it has one)."""
    fit = hw.kernel(family)
    time, fixed, ideal_memory_us, t_c, t_m, t_k = roofline_terms(
        fit, hw, bytes_, ideal_compute_us, kernels, steps, k_loop, max, min, wave_fill,
        write_fraction, waves, warm_fraction, working_set_l2, kv_fraction)
    # The K-loop latency is a memory-pipeline stall: reported as memory bound.
    bound: Bound = "launch" if fixed > time - fixed else "compute" if t_c >= max(t_m, t_k) \
        else "memory"
    return OpCost(name, category, time, flops, bytes_, bound, kernels,
                  family=family, ideal_compute_us=ideal_compute_us,
                  ideal_memory_us=ideal_memory_us,
                  host_floor_us=fit.host_floor_us.value if fit.host_floor_us else 0.0,
                  fixed_us=fixed, steps=steps, k_loop=k_loop, wave_fill=wave_fill,
                  write_fraction=write_fraction, waves=waves, warm_fraction=warm_fraction,
                  working_set_l2=working_set_l2, kv_fraction=kv_fraction)


def eager_time_us(ops: "list[OpCost]") -> float:
    """Time of one eager call of an op sequence (a measured kernel-table row): the GPU time,
    unless the host's floor for the slowest-to-dispatch op is longer."""
    return max(sum(o.total_us for o in ops),
               max((o.host_floor_us for o in ops if not o.in_graph), default=0.0))
