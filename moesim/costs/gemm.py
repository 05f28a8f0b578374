"""Dense GEMM ``[m, k] x [k, n]`` on one GPU: roofline with tile/wave quantisation.

Compute time follows NVIDIA's "Matrix Multiplication Background User Guide" (tile and wave
quantisation): the output is cut into ``tile_m x tile_n`` CTA tiles, tiles run in waves of
``sm_count``, and each wave costs one tile's FLOPs at the per-SM rate ``peak * efficiency /
sm_count``. Memory time streams A, B and C once from HBM at the achieved bandwidth.
"""

from __future__ import annotations

import math

from ..spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES, gemm_compute_dtype
from ..spec.hardware import HardwareProfile
from .op import Category, OpCost, roofline


def _tile_m(m: int, tile_m: int) -> int:
    # Small-M GEMMs run with short tiles (cuBLAS / CUTLASS pick 64-row tiles or split-K there);
    # a 128-row tile for m=8 would overstate the padded FLOPs 16x.
    return max(16, min(tile_m, 1 << max(0, math.ceil(math.log2(max(m, 1))))))


def gemm_compute_us(m: int, n: int, k: int, hw: HardwareProfile, compute_dtype: str,
                    efficiency: float) -> float:
    """Wave-quantised compute time in µs of an ``m x n x k`` GEMM."""
    sms = int(hw.compute.sm_count.value)
    tm = _tile_m(m, int(hw.compute.gemm_tile_m.value))
    tn = int(hw.compute.gemm_tile_n.value)
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    waves = math.ceil(tiles / sms)
    # A single partial wave still keeps only `tiles` SMs busy: charge per-tile time.
    per_sm_flops_per_us = hw.peak_flops_per_us(compute_dtype) * efficiency / sms
    return waves * (2.0 * tm * tn * k) / per_sm_flops_per_us


def gemm(name: str, m: int, n: int, k: int, hw: HardwareProfile, weight_dtype: str = "bf16",
         act_dtype: str = "bf16", out_dtype: str = "bf16", category: Category = "gemm",
         kernels: int = 1) -> OpCost:
    """Cost of ``Y[m, n] = X[m, k] W[k, n]``. ``m`` = tokens, ``n x k`` = the weight."""
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    eff = hw.efficiency(hw.compute.gemm_efficiency, cd)
    flops = 2.0 * m * n * k
    bytes_ = (m * k * ELEMENT_BYTES[act_dtype] + k * n * WEIGHT_BYTES[weight_dtype]
              + m * n * ELEMENT_BYTES[out_dtype])
    return roofline(name, category, flops, bytes_,
                    compute_us=gemm_compute_us(m, n, k, hw, cd, eff),
                    memory_us=bytes_ / hw.hbm_bytes_per_us,
                    min_us=hw.overheads.kernel_min_gpu_us.value, kernels=kernels)
