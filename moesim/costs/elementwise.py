"""Memory-bound kernels (norms, activations, gathers, reductions): bytes over achieved HBM
bandwidth, with the per-kernel floor. FLOPs are counted but never bind on a GPU."""

from __future__ import annotations

from ..spec.hardware import HardwareProfile
from .op import Category, OpCost, roofline


def memory_op(name: str, bytes_: float, hw: HardwareProfile, kernels: int = 1,
              flops: float = 0.0, category: Category = "elementwise") -> OpCost:
    return roofline(name, category, flops, bytes_, compute_us=0.0,
                    memory_us=bytes_ / hw.hbm_bytes_per_us,
                    min_us=hw.overheads.kernel_min_gpu_us.value, kernels=kernels)
