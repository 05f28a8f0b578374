"""Memory-bound kernels (norms, activations, gathers, reductions): bytes over HBM bandwidth plus
the family's fixed time per kernel. FLOPs are counted but never bind on a GPU."""

from __future__ import annotations

from ..spec.hardware import HardwareProfile
from .op import Category, OpCost, roofline


def memory_op(name: str, bytes_: float, hw: HardwareProfile, kernels: int = 1,
              flops: float = 0.0, category: Category = "elementwise") -> OpCost:
    return roofline(name, category, "elementwise", flops, bytes_, 0.0, hw, kernels)
