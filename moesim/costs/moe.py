"""MoE layer ops on one GPU: router, top-k, token alignment, expert GEMMs, activation, combine.

The fused path follows vLLM's Triton fused-MoE pipeline (research notes §2.1): ``topk_softmax``,
``moe_align_block_size``, GEMM1 (gate+up), ``silu_and_mul``, GEMM2 (down), ``moe_sum``. Expert
GEMMs are priced at tile level (notes §2.2, §6.2 "tile/wave model"): each expert's token count is
padded to a multiple of BLOCK_M, the padded M-blocks times the N-blocks are the tiles, tiles run
in waves over the SMs, and only experts that received tokens stream their weights from HBM.
"""

from __future__ import annotations

import math

import numpy as np

from ..spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES, gemm_compute_dtype
from ..spec.hardware import HardwareProfile
from .gemm import gemm
from .op import OpCost, roofline

# BLOCK_M / BLOCK_N chosen by vLLM's tuned fused-MoE configs as a function of the number of
# tokens M entering the kernel (configs/E=128,N=384,device_name=NVIDIA_H100_80GB_HBM3.json as
# summarised in the research notes §2.3): small M uses 16-row tiles, large M 128-row tiles.
def _mem(name: str, bytes_: float, hw: HardwareProfile, kernels: int = 1,
         flops: float = 0.0) -> OpCost:
    """A small memory-bound kernel of the MoE pipeline (its own fitted family: these kernels
    gather and scatter by token ids, which streams less efficiently than a plain copy)."""
    return roofline(name, "moe", "moe_aux", flops, bytes_, 0.0, hw, kernels)

_BLOCK_M_BY_TOKENS = ((128, 16, 64), (256, 32, 64), (1024, 64, 64), (math.inf, 128, 128))


def block_shape(num_tokens: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the fused-MoE kernel for ``num_tokens`` tokens (vLLM's choice)."""
    for limit, bm, bn in _BLOCK_M_BY_TOKENS:
        if num_tokens <= limit:
            return bm, bn
    raise AssertionError("unreachable")


def router(num_tokens: int, hidden: int, num_experts: int, top_k: int, hw: HardwareProfile,
           scoring: str = "softmax", act_dtype: str = "bf16") -> list[OpCost]:
    """Router GEMM (kept in bf16 by every quantised checkpoint) and the top-k selection kernel.

    Sigmoid scoring with grouped top-k (DeepSeek-V3 style) runs as several small torch ops
    rather than one fused kernel (notes §2.1 step 2): counted as 4 kernels.
    """
    ops = [gemm("router_gemm", num_tokens, num_experts, hidden, hw, "bf16", act_dtype, "fp32",
                category="moe")]
    bytes_ = num_tokens * num_experts * 4.0 + num_tokens * top_k * 8.0
    ops.append(_mem("topk", bytes_, hw, kernels=1 if scoring == "softmax" else 4,
                    flops=num_tokens * num_experts * 5.0))
    return ops


def grouped_gemm_ideal_us(loads: np.ndarray, n: int, k: int, block_m: int, block_n: int,
                          hw: HardwareProfile, compute_dtype: str) -> float:
    """Tile/wave compute time in µs at tensor-core peak of one grouped expert GEMM
    (``[n_e, k] x [k, n]`` per expert, each ``n_e`` padded to ``block_m`` rows)."""
    sms = int(hw.compute.sm_count.value)
    m_blocks = int(np.sum(-(-loads // block_m)))
    tiles = m_blocks * math.ceil(n / block_n)
    if tiles == 0:
        return 0.0
    per_sm = hw.peak_flops_per_us(compute_dtype) / sms
    return math.ceil(tiles / sms) * (2.0 * block_m * block_n * k) / per_sm


def expert_ops(loads: np.ndarray, num_tokens: int, top_k: int, hidden: int, inter: int,
               hw: HardwareProfile, weight_dtype: str, act_dtype: str, gated: bool = True,
               strategy: str = "fused") -> list[OpCost]:
    """Expert FFN ops on one rank.

    ``loads``: tokens routed to each expert held by this rank (int array, one per local expert);
    ``num_tokens``: tokens entering the rank's MoE kernel (all of them, including those routed
    elsewhere); ``inter``: this rank's share of the expert intermediate size (after moe_tp).
    """
    loads = np.asarray(loads, dtype=np.int64)
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    ab, wb = ELEMENT_BYTES[act_dtype], WEIGHT_BYTES[weight_dtype]
    up_n = (2 if gated else 1) * inter
    slots = int(loads.sum())
    active = int(np.count_nonzero(loads))
    family = "moe_fp8" if act_dtype in ("fp8", "fp8_block") else "moe_bf16"
    quant = act_dtype in ("fp8", "fp8_block")
    ops: list[OpCost] = []

    if strategy == "naive":
        # Every local expert runs on every token, results masked by the routing weights.
        e_local = len(loads)
        for name, n, k in (("experts_up", up_n, hidden), ("experts_down", hidden, inter)):
            g = gemm(name, num_tokens, n, k, hw, weight_dtype, act_dtype, category="moe")
            ops.append(OpCost(name, "moe", g.time_us * e_local, g.flops * e_local,
                              g.bytes * e_local, g.bound, e_local))
        ops.append(_mem("activation", e_local * num_tokens * (up_n + inter) * 2.0, hw,
                             kernels=e_local))
        ops.append(_mem("masked_sum", (e_local + 1) * num_tokens * hidden * 2.0, hw,
                             kernels=e_local))
        return ops

    if strategy == "grouped":
        # Explicit permutation into expert-contiguous rows, one GEMM per active expert.
        ops.append(_mem("permute", slots * hidden * ab * 2.0 + slots * 8.0, hw, kernels=2))
        for name, n, k in (("experts_up", up_n, hidden), ("experts_down", hidden, inter)):
            t = fl = by = 0.0
            bounds: dict[str, float] = {}
            for n_e in loads[loads > 0]:
                g = gemm(name, int(n_e), n, k, hw, weight_dtype, act_dtype, category="moe")
                t, fl, by = t + g.time_us, fl + g.flops, by + g.bytes
                bounds[g.bound] = bounds.get(g.bound, 0.0) + g.time_us
            bound = max(bounds, key=bounds.get) if bounds else "launch"
            ops.append(OpCost(name, "moe", t, fl, by, bound, max(active, 1)))
        ops.append(_mem("activation", slots * (up_n + inter) * 2.0, hw, kernels=max(active, 1)))
        ops.append(_mem("unpermute", slots * hidden * 2.0 * 2 + num_tokens * hidden * 2.0, hw,
                             kernels=2))
        return ops

    bm, bn = block_shape(num_tokens)
    padded = int(np.sum(-(-loads // bm) * bm))
    ops.append(_mem("moe_align", slots * 4.0 * 3 + len(loads) * 8.0, hw, kernels=1))
    if quant:
        ops.append(_mem("quant_in", num_tokens * hidden * (2.0 + ab), hw))
    for name, n, k in (("experts_up", up_n, hidden), ("experts_down", hidden, inter)):
        flops = 2.0 * slots * n * k  # useful work; padding shows up in the time only
        bytes_ = active * n * k * wb + padded * k * ab + slots * n * 2.0
        ops.append(roofline(name, "moe", family, flops, bytes_,
                            grouped_gemm_ideal_us(loads, n, k, bm, bn, hw, cd), hw))
        if name == "experts_up":
            ops.append(_mem("activation", slots * (up_n + inter) * 2.0, hw))
            if quant:
                ops.append(_mem("quant_mid", slots * inter * (2.0 + ab), hw))
    ops.append(_mem("moe_sum", num_tokens * top_k * hidden * 2.0 + num_tokens * hidden * 2.0,
                         hw))
    return ops
