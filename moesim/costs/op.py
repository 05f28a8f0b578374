"""``OpCost``: what one op costs and why. Every cost function returns one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Bound = Literal["compute", "memory", "network", "launch"]
Category = Literal["gemm", "moe", "attention", "comm", "elementwise", "overhead"]


@dataclass(frozen=True)
class OpCost:
    """Cost of one op on one GPU (the slowest rank where ranks differ).

    ``time_us`` is GPU time for the op's kernels; ``launch_us`` is the extra time the GPU idles
    because kernels are launched from the host (eager) or replayed from a graph. ``flops`` and
    ``bytes`` are the work modelled (HBM bytes for kernels, bytes sent per GPU for collectives).
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

    @property
    def total_us(self) -> float:
        """Time of one occurrence, launch cost included."""
        return self.time_us + self.launch_us

    def scaled(self, count: int, layer_kind: str) -> "OpCost":
        return replace(self, count=count, layer_kind=layer_kind)


def roofline(name: str, category: Category, flops: float, bytes_: float, compute_us: float,
             memory_us: float, min_us: float, kernels: int = 1) -> OpCost:
    """Roofline: the op takes max(compute_us, memory_us, kernels * min_us), and says which.

    ``compute_us`` and ``memory_us`` come from achieved rates (peak x efficiency); ``min_us`` is
    the shortest kernel the GPU timeline shows (``overheads.kernel_min_gpu_us``).
    """
    t_min = kernels * min_us
    t = max(compute_us, memory_us, t_min)
    bound: Bound = "compute" if t == compute_us else "memory" if t == memory_us else "launch"
    return OpCost(name, category, t, flops, bytes_, bound, kernels)
