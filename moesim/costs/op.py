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
    steps: int = 0  # latency steps of a collective (hardware.collectives.*.latency_per_step_us)

    @property
    def total_us(self) -> float:
        """Time of one occurrence, launch cost included."""
        return self.time_us + self.launch_us

    def scaled(self, count: int, layer_kind: str) -> "OpCost":
        return replace(self, count=count, layer_kind=layer_kind)


def kernel_time_us(t0_us, compute_efficiency, memory_efficiency, ideal_compute_us,
                   ideal_memory_us, kernels=1, steps=0, step_us=0.0):
    """``kernels * t0 + steps * step_us + max(ideal_compute / eff_c, ideal_memory / eff_m)``;
    works on numpy arrays (calibration evaluates it over whole tables)."""
    import numpy as np

    return kernels * t0_us + steps * step_us + np.maximum(ideal_compute_us / compute_efficiency,
                                                          ideal_memory_us / memory_efficiency)


def roofline(name: str, category: Category, family: str, flops: float, bytes_: float,
             ideal_compute_us: float, hw: "HardwareProfile", kernels: int = 1) -> OpCost:
    """Price one op of ``kernels`` kernels of ``family``; memory time is ``bytes_`` at HBM peak."""
    fit = hw.kernel(family)
    ideal_memory_us = bytes_ / hw.hbm_peak_bytes_per_us
    eff_c = fit.compute_efficiency.value if fit.compute_efficiency is not None else 1.0
    t_c = ideal_compute_us / eff_c
    t_m = ideal_memory_us / fit.memory_efficiency.value
    fixed = kernels * fit.t0_us.value
    bound: Bound = "launch" if fixed > max(t_c, t_m) else "compute" if t_c >= t_m else "memory"
    return OpCost(name, category, fixed + max(t_c, t_m), flops, bytes_, bound, kernels,
                  family=family, ideal_compute_us=ideal_compute_us,
                  ideal_memory_us=ideal_memory_us,
                  host_floor_us=fit.host_floor_us.value if fit.host_floor_us else 0.0,
                  fixed_us=fixed)


def eager_time_us(ops: "list[OpCost]") -> float:
    """Time of one eager call of an op sequence (a measured kernel-table row): the GPU time,
    unless the host's floor for the slowest-to-dispatch op is longer."""
    return max(sum(o.total_us for o in ops),
               max((o.host_floor_us for o in ops if not o.in_graph), default=0.0))
