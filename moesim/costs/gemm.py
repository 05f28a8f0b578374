"""Dense GEMM ``[m, k] x [k, n]`` on one GPU: roofline with tile/wave quantisation.

Compute time follows NVIDIA's "Matrix Multiplication Background User Guide" (tile and wave
quantisation): the output is cut into ``tile_m x tile_n`` CTA tiles, tiles run in waves of
``sm_count``, and each wave costs one tile's FLOPs at the per-SM peak rate. Memory time streams A,
B and C once from HBM (C's share as written bytes). The kernel family (bf16 / fp8 / block-scaled
fp8) sets the efficiencies and, where the profile has them, the GEMM terms of
:func:`moesim.costs.op.kernel_time_us`: the wave fill (partial-wave gain), the waves (per-wave
fill/drain time), the write share (HBM write cost), the activations' share of the bytes and the
working set over the L2 size (the L2 term: activations the previous kernel just wrote are read
from L2 while the working set fits); ``m_granularity`` sets how far cuBLAS pads M.
"""

from __future__ import annotations

import math

from dataclasses import replace

from ..spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES, gemm_compute_dtype
from ..spec.hardware import HardwareProfile
from .elementwise import memory_op
from .op import Category, OpCost, roofline

# TMA (cuTensorMapEncodeTiled) needs every global stride to be a multiple of 16 bytes; DeepGEMM
# reads the per-row fp32 activation scales column-major, whose stride is M x 4 bytes.
TMA_STRIDE_ALIGN_BYTES = 16
SCALE_BYTES = 4  # fp32 scale per 128-element activation group


def _tile_m(m: int, tile_m: int) -> int:
    # Small-M GEMMs run with short tiles (cuBLAS / CUTLASS pick 64-row tiles or split-K there);
    # a 128-row tile for m=8 would overstate the padded FLOPs 16x.
    return max(16, min(tile_m, 1 << max(0, math.ceil(math.log2(max(m, 1))))))


def _cutlass_fp8_tile(m: int) -> tuple[int, int]:
    """CTA tile (rows, columns) of vLLM's CUTLASS 3.x sm90 fp8 GEMM (``cutlass_scaled_mm``) for
    ``m`` rows: its dispatch picks by the next power of two of m a 64x64 tile up to 64 rows,
    64x128 up to 128, else 128x128 (vllm csrc/quantization/cutlass_w8a8/c3x/
    scaled_mm_sm90_fp8_dispatch.cuh: sm90_fp8_config_M64 / _M128 / _default). The H100
    reference table shows the steps: at n=32, k=65536 the time doubles from m=64 to m=65."""
    if m <= 64:
        return 64, 64
    return (64, 128) if m <= 128 else (128, 128)


def _tiling(m: int, n: int, k: int, hw: HardwareProfile, compute_dtype: str,
            family: str) -> tuple[float, float, float]:
    """(tile-quantised compute time in µs at tensor-core peak, fraction of the waves' SM slots
    the tiles fill, waves of tiles); see :func:`gemm_ideal_compute_us`."""
    sms = int(hw.compute.sm_count.value)
    peak = hw.peak_flops_per_us(compute_dtype)
    if family == "gemm_fp8":
        tm, tn = _cutlass_fp8_tile(m)
        tiles = math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / sms)
        return waves * 2.0 * tm * tn * k / (peak / sms), tiles / (waves * sms), waves
    tm = _tile_m(m, int(hw.compute.gemm_tile_m.value))
    tn = int(hw.compute.gemm_tile_n.value)
    gran = hw.kernel(family).m_granularity
    if gran is not None:
        # The library picks among tile shapes (and swaps operands for thin GEMMs) so M is padded
        # only to this many rows: measured cuBLAS times show no step at m = 128 -> 129 or
        # 1024 -> 1025, where a fixed 128-row tile would add a whole tile row.
        tm = min(tm, int(gran.value))
        # Thin N gets a thin tile too (the swapped operand order makes N the tile's row side):
        # a 128-column tile for n = 32 would overstate the padded FLOPs 4x, and the measured
        # times at n = 32 and 64 sit far below that.
        tn = _tile_m(n, tn)
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    tile_flops = 2.0 * tm * tn * k
    if tiles < sms or family == "gemm_bf16":
        # split-K / stream-K spread the work over every SM: no idle slots, and the waves are
        # the output's full-size tiles over the SMs (at least one: every CTA fills and drains)
        full_tiles = m * n / (hw.compute.gemm_tile_m.value * hw.compute.gemm_tile_n.value)
        return tiles * tile_flops / peak, 1.0, max(1.0, full_tiles / sms)
    # A partial wave still takes one tile's time on the SMs it occupies.
    waves = math.ceil(tiles / sms)
    return waves * tile_flops / (peak / sms), tiles / (waves * sms), waves


def gemm_ideal_compute_us(m: int, n: int, k: int, hw: HardwareProfile, compute_dtype: str,
                          family: str = "gemm_bf16") -> float:
    """Tile-quantised compute time in µs of an ``m x n x k`` GEMM at tensor-core peak.

    The output is cut into CTA tiles; how the tiles meet the SMs depends on the library:

    - cuBLAS (``gemm_bf16``) and DeepGEMM (``gemm_fp8_block``): with fewer tiles than SMs the K
      loop is split (split-K / stream-K) so every SM works; cuBLAS on Hopper also balances the
      last partial wave (stream-K), so only the tile padding of m and n is wasted;
    - vLLM's CUTLASS fp8 kernel (``gemm_fp8``): a data-parallel tile scheduler without split-K,
      so tiles run in whole waves of ``sm_count`` and a thin GEMM walks all of K on few SMs.
    """
    return _tiling(m, n, k, hw, compute_dtype, family)[0]


def gemm_wave_fill(m: int, n: int, k: int, hw: HardwareProfile, compute_dtype: str,
                   family: str = "gemm_bf16") -> float:
    """Fraction (0-1] of the SM slots of a GEMM's waves that its tiles fill: tiles / (waves x
    sm_count), 1 where the library splits K or balances the last wave (NVIDIA Matrix
    Multiplication Background User Guide, wave quantisation)."""
    return _tiling(m, n, k, hw, compute_dtype, family)[1]


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
    family = gemm_family(weight_dtype, act_dtype)
    ideal_us, fill, waves = _tiling(m, n, k, hw, cd, family)
    # The activations X were just written by the kernel before (in a kernel benchmark: read by
    # the previous iteration), so they may still sit in L2 (hardware.kernels.<family>.l2_*).
    op = roofline(name, category, family, flops, bytes_, ideal_us, hw, kernels, k_loop=k,
                  wave_fill=fill, write_fraction=m * n * ELEMENT_BYTES[out_dtype] / bytes_,
                  waves=waves, warm_fraction=m * k * ELEMENT_BYTES[act_dtype] / bytes_,
                  working_set_l2=bytes_ / hw.memory.l2_bytes.value)
    if family == "gemm_fp8_block" and scales_unaligned(m):
        extra = hw.kernel(family).unaligned_m_floor_us
        op = replace(op, host_floor_us=op.host_floor_us + (extra.value if extra else 0.0),
                     unaligned_m=True)
    return op


def scales_unaligned(m: int) -> bool:
    """True when ``m`` per-row fp32 scales, stored column-major, break TMA's 16-byte stride
    rule, so DeepGEMM copies them into an aligned tensor before the GEMM (an extra op on the
    host: hardware.kernels.gemm_fp8_block.unaligned_m_floor_us)."""
    return (m * SCALE_BYTES) % TMA_STRIDE_ALIGN_BYTES != 0


def quant_family(weight_dtype: str, hw: HardwareProfile) -> str:
    """Kernel family of the activation quantisation before an fp8 GEMM: the per-token-group
    kernel of block-scaled fp8 (a 128-element absmax per scale, scales stored column-major for
    DeepGEMM's TMA) is its own family where the profile has one."""
    if weight_dtype == "fp8_block" and hw.kernels.quant_fp8_group is not None:
        return "quant_fp8_group"
    return "quant_fp8"


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
    bytes_ = m * k * (2.0 + ELEMENT_BYTES[act_dtype]) + m * k * 2.0 * per_tensor
    if hw.kernels.quant_fp8 is None:
        q = memory_op(f"{name}_quant", bytes_, hw, kernels=2 if per_tensor else 1,
                      category=category)
    else:
        # The per-tensor scale is a max over the whole input: vLLM's segmented_max_reduction
        # runs one block per row, each ending in an atomicMax on the same float, and those m
        # atomics serialise (one step each: hardware.kernels.quant_fp8.step_us). Each block
        # walks its row in passes of chunk_elems, one load latency each: m x passes latency-
        # bound steps (the K-loop term) that overlap the HBM streaming (the roofline's max).
        fit = hw.kernels.quant_fp8
        passes = math.ceil(k / fit.chunk_elems.value) if fit.chunk_elems is not None else 0
        q = roofline(f"{name}_quant", category, quant_family(weight_dtype, hw), 0.0, bytes_, 0.0,
                     hw, kernels=2 if per_tensor else 1, steps=m if per_tensor else 0,
                     k_loop=m * passes if per_tensor else 0.0)
    return [q, g]
