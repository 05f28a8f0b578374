"""Dense GEMM ``[m, k] x [k, n]`` on one GPU: roofline with tile/wave quantisation.

Compute time follows NVIDIA's "Matrix Multiplication Background User Guide" (tile and wave
quantisation): the output is cut into ``tile_m x tile_n`` CTA tiles, tiles run in waves of
``sm_count``, and each wave costs one tile's FLOPs at the per-SM peak rate. Memory time streams A,
B and C once from HBM. The kernel family (bf16 / fp8 / block-scaled fp8) sets the efficiencies.
"""

from __future__ import annotations

import math

from ..spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES, gemm_compute_dtype
from ..spec.hardware import HardwareProfile
from .elementwise import memory_op
from .op import Category, OpCost, roofline


def _tile_m(m: int, tile_m: int) -> int:
    # Small-M GEMMs run with short tiles (cuBLAS / CUTLASS pick 64-row tiles or split-K there);
    # a 128-row tile for m=8 would overstate the padded FLOPs 16x.
    return max(16, min(tile_m, 1 << max(0, math.ceil(math.log2(max(m, 1))))))


def gemm_ideal_compute_us(m: int, n: int, k: int, hw: HardwareProfile, compute_dtype: str) -> float:
    """Wave-quantised compute time in µs of an ``m x n x k`` GEMM at tensor-core peak."""
    sms = int(hw.compute.sm_count.value)
    tm = _tile_m(m, int(hw.compute.gemm_tile_m.value))
    tn = int(hw.compute.gemm_tile_n.value)
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    tile_flops = 2.0 * tm * tn * k
    peak = hw.peak_flops_per_us(compute_dtype)
    if tiles < sms:
        # Fewer output tiles than SMs: cuBLAS / CUTLASS split the K loop (split-K, stream-K)
        # so all SMs work; only the tile padding of m and n is wasted.
        return tiles * tile_flops / peak
    # A partial wave still takes one tile's time on the SMs it occupies.
    return math.ceil(tiles / sms) * tile_flops / (peak / sms)


def gemm_family(weight_dtype: str, act_dtype: str) -> str:
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    if cd == "fp8":
        return "gemm_fp8_block" if weight_dtype == "fp8_block" else "gemm_fp8"
    return "gemm_bf16"


def gemm(name: str, m: int, n: int, k: int, hw: HardwareProfile, weight_dtype: str = "bf16",
         act_dtype: str = "bf16", out_dtype: str = "bf16", category: Category = "gemm",
         kernels: int = 1) -> OpCost:
    """Cost of ``Y[m, n] = X[m, k] W[k, n]``. ``m`` = tokens, ``n x k`` = the weight."""
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    flops = 2.0 * m * n * k
    bytes_ = (m * k * ELEMENT_BYTES[act_dtype] + k * n * WEIGHT_BYTES[weight_dtype]
              + m * n * ELEMENT_BYTES[out_dtype])
    return roofline(name, category, gemm_family(weight_dtype, act_dtype), flops, bytes_,
                    gemm_ideal_compute_us(m, n, k, hw, cd), hw, kernels)


def linear(name: str, m: int, n: int, k: int, hw: HardwareProfile, weight_dtype: str = "bf16",
           act_dtype: str = "bf16", out_dtype: str = "bf16",
           category: Category = "gemm") -> list[OpCost]:
    """A linear layer as the engines run it: with fp8 activations the bf16 input is quantised
    first (vLLM ``scaled_fp8_quant``: a max-reduction and a cast kernel for per-tensor scales;
    one per-token-group kernel for 128-block scales), then the GEMM."""
    g = gemm(name, m, n, k, hw, weight_dtype, act_dtype, out_dtype, category)
    if gemm_family(weight_dtype, act_dtype) == "gemm_bf16":
        return [g]
    per_tensor = weight_dtype != "fp8_block"
    q = memory_op(f"{name}_quant", m * k * (2.0 + ELEMENT_BYTES[act_dtype]) + m * k * 2.0 *
                  per_tensor, hw, kernels=2 if per_tensor else 1, category=category)
    return [q, g]
