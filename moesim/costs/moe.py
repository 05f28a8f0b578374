"""MoE layer ops on one GPU: router, top-k, token alignment, expert GEMMs, activation, combine.

The fused path follows vLLM's Triton fused-MoE pipeline (research notes §2.1): ``topk_softmax``,
``moe_align_block_size``, GEMM1 (gate+up), ``silu_and_mul``, GEMM2 (down), ``moe_sum``, and the
engine's copies of the combined output into the caller's buffer, where it makes them. Expert
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
from .op import OpCost, fit_terms, kernel_time_us, roofline

# BLOCK_M / BLOCK_N chosen by vLLM's tuned fused-MoE configs as a function of the number of
# tokens M entering the kernel (configs/E=128,N=384,device_name=NVIDIA_H100_80GB_HBM3.json as
# summarised in the research notes §2.3): small M uses 16-row tiles, large M 128-row tiles.
def _mem(name: str, bytes_: float, hw: HardwareProfile, kernels: int = 1,
         flops: float = 0.0) -> OpCost:
    """A small memory-bound kernel of the MoE pipeline (its own fitted family: these kernels
    gather and scatter by token ids, which streams less efficiently than a plain copy)."""
    return roofline(name, "moe", "moe_aux", flops, bytes_, 0.0, hw, kernels)

_BLOCK_M_BY_TOKENS = ((128, 16, 64), (256, 32, 64), (1024, 64, 64), (math.inf, 128, 128))


def block_shape(num_tokens):
    """(BLOCK_M, BLOCK_N) of the fused-MoE kernel for ``num_tokens`` tokens (vLLM's choice);
    works element-wise on arrays."""
    t = np.asarray(num_tokens)
    bm = np.select([t <= lim for lim, _, _ in _BLOCK_M_BY_TOKENS[:-1]],
                   [b for _, b, _ in _BLOCK_M_BY_TOKENS[:-1]], _BLOCK_M_BY_TOKENS[-1][1])
    bn = np.select([t <= lim for lim, _, _ in _BLOCK_M_BY_TOKENS[:-1]],
                   [b for _, _, b in _BLOCK_M_BY_TOKENS[:-1]], _BLOCK_M_BY_TOKENS[-1][2])
    if t.ndim == 0:
        return int(bm), int(bn)
    return bm, bn


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


def grouped_gemm_ideal_us(loads: np.ndarray, n: int, k: int, block_m, block_n,
                          hw: HardwareProfile, compute_dtype: str, m_blocks=None):
    """Tile/wave compute time in µs at tensor-core peak of one grouped expert GEMM
    (``[n_e, k] x [k, n]`` per expert, each ``n_e`` padded to ``block_m`` rows). ``loads`` is
    ``[..., E_local]``; ``block_m``/``block_n`` broadcast over the leading axes. ``m_blocks``:
    the M-blocks summed over the experts, where the caller has them."""
    sms = int(hw.compute.sm_count.value)
    bm, bn = np.asarray(block_m), np.asarray(block_n)
    per_sm = hw.peak_flops_per_us(compute_dtype) / sms
    return tile_waves(loads, n, bm, bn, sms, m_blocks) * (2.0 * bm * bn * k) / per_sm


def tile_waves(loads: np.ndarray, n: int, block_m, block_n, sms: int, m_blocks=None):
    """Waves of output tiles of one grouped expert GEMM: ``ceil(sum_e ceil(n_e / BLOCK_M) *
    ceil(n / BLOCK_N) / SMs)`` (research notes §2.2; one tile per SM per wave). ``m_blocks``:
    the M-blocks summed over the experts, where the caller has them."""
    bm, bn = np.asarray(block_m), np.asarray(block_n)
    if m_blocks is None:
        m_blocks = np.sum(-(-np.asarray(loads) // bm[..., None]), axis=-1)
    return np.ceil(m_blocks * np.ceil(n / bn) / sms)


# Triton specialises an integer argument that is a multiple of 16 (the JIT's divisibility
# hint); that is what lets it prove 16-byte alignment of every row and vectorise tile loads and
# stores. A 16-bit expert GEMM whose K (row stride of the activations and of the weights) or N
# (row stride of the output) is not a multiple of 16 elements loads its tiles with narrow,
# latency-bound accesses: each tile then takes a roughly fixed time whatever its size, so the
# kernel costs one serialised step per wave of tiles, at the family's fitted ``step_us`` (µs
# per wave). The measured excess of such shapes over their aligned neighbours is flat per
# wave across 16..16384 tokens (moe.csv, H=2048 I=24: ~1.7 µs per wave), not per element.
ALIGN_ELEMENTS = 16
#: Weight-only 4-bit expert formats, run as 16-bit GEMMs with in-kernel dequantisation where the
#: GPU has no 4-bit tensor cores (Hopper): their rate is the engine's kernel's
#: (``framework.w4a16_moe_efficiency``).
W4_WEIGHT_ONLY = ("mxfp4", "int4", "nvfp4")
# vLLM tunes no config for such shapes (its tuned files are per (E, N) of real checkpoints at
# power-of-two TP), so the kernel runs vLLM's default config (fused_moe.get_default_config,
# 16-bit): BLOCK_M x BLOCK_N = 16 x 32 while the tokens M <= local experts E, else 64 x 64.
DEFAULT_SMALL_BLOCK = (16, 32)
DEFAULT_LARGE_BLOCK = (64, 64)
# Engines do not run 4-bit weight-only experts through the fused-MoE Triton kernel whose tiles
# :func:`block_shape` describes, but through Marlin-style mixed-input kernels (vLLM's
# moe_wna16_marlin; on Hopper also OAI's triton_kernels matmul_ogs for mxfp4), which tile N far
# wider: Marlin's thread configs are thread_n 128 for a block of <= 16 rows ("small batch") and
# 256 above (csrc/moe/marlin_moe_wna16/ops.cu, small_/large_batch_thread_configs). The 16-bit
# table's 16 x 64 tiles would make a decode step's few-token experts walk K in twice the waves
# the kernel does (e2e_serving.csv, gpt-oss-120b on vLLM, N tiles alone, overheads refitted
# with the soft_l1 loss of the time: TPOT median 7.0 -> 3.5 %, the fit's loss 9.38 -> 9.29).
W4_BLOCK_N_SMALL, W4_BLOCK_N_LARGE = 128, 256
# Marlin's M block is chosen from the mean rows per expert, not from a tuned table: the first of
# 8, 16, 32, 48, 64 that the mean fills less than 0.9 times, else 64 (vLLM fused_marlin_moe,
# "M block size selection logic"); so a prefill pads each expert to at most 64 rows, not 128.
W4_BLOCK_M_CHOICES = (8, 16, 32, 48, 64)


def w4_block_shape(num_tokens, top_k: int, local_experts: int):
    """(BLOCK_M, BLOCK_N) of the Marlin-style 4-bit weight-only expert kernel for
    ``num_tokens`` tokens (element-wise on arrays): see :data:`W4_BLOCK_M_CHOICES`."""
    mean = np.asarray(num_tokens, dtype=np.float64) * top_k / local_experts
    bm = np.full(mean.shape, W4_BLOCK_M_CHOICES[-1])
    for choice in reversed(W4_BLOCK_M_CHOICES):
        bm = np.where(mean / choice < 0.9, choice, bm)
    return bm, np.where(bm <= 16, W4_BLOCK_N_SMALL, W4_BLOCK_N_LARGE)


# Block-fp8 experts (128 x 128 weight scales): vLLM's default config (get_default_config,
# fp8_w8a8 with a block shape; notes §2.3) is BLOCK_M 64 at every M, with BLOCK_N and BLOCK_K
# equal to the quantisation block, so that each K step reads one scale per tile. It applies where
# vLLM has no tuned block-fp8 file under the GPU's device name (its configs/ folder lists, e.g.,
# E=128,N=384 block-fp8 only as "NVIDIA_H100", not H100 SXM's "NVIDIA_H100_80GB_HBM3"). On
# moe.csv's block-fp8 rows this predicts held-out shapes better than the 16-bit tuned table
# (leave-one-shape-out p90 fp8_block 25.1 -> 23.2 %).
FP8_BLOCK_DEFAULT_BLOCK = (64, 128)


def default_block_shape(num_tokens, local_experts: int):
    """(BLOCK_M, BLOCK_N) of vLLM's default 16-bit fused-MoE config for ``num_tokens`` tokens and
    ``local_experts`` experts on the GPU (element-wise on arrays)."""
    small = np.asarray(num_tokens) <= local_experts
    return (np.where(small, DEFAULT_SMALL_BLOCK[0], DEFAULT_LARGE_BLOCK[0]),
            np.where(small, DEFAULT_SMALL_BLOCK[1], DEFAULT_LARGE_BLOCK[1]))


def _skipped_block_waves(tokens, top_k: int, local_slots, local_experts: int,
                         num_experts: int, block_m, block_n, ns, sms: int):
    """Waves of the expert GEMMs' programs on other EP ranks' experts, summed over both GEMMs.
    ``moe_align_block_size`` runs over the global expert ids (notes §2.1 step 3), so every
    expert that received tokens anywhere owns padded M-blocks in ``sorted_token_ids``, and the
    GEMM grid (``cdiv(EM, BLOCK_M) x cdiv(N, BLOCK_N)`` programs) covers them; a program whose
    block's expert is not local (id -1 after the EP map) stores a zero tile and returns. It
    moves little data but holds an SM slot for its prologue and its store: a fixed time per
    wave. (The grid's programs past ``num_tokens_post_padded`` return before any load; they
    are taken as free: moe.csv's 6144/2048/256/8 rows at EP 64 take 64-66 µs at 1 and 2
    tokens, although GEMM2's grid grows from 8 to 248 M-blocks between the two.) The other
    ranks' loads are not known here, so their ``tokens * top_k - local_slots`` slots are
    spread evenly over the other experts (the balanced case)."""
    other = np.maximum(np.asarray(tokens, dtype=np.float64) * top_k - local_slots, 0.0)
    bm, bn = np.asarray(block_m), np.asarray(block_n)
    busy = np.minimum(float(num_experts - local_experts), other)
    blocks = busy * np.ceil(other / np.maximum(busy, 1.0) / bm)
    waves = 0.0
    for n in ns:
        waves = waves + np.ceil(blocks * np.ceil(n / bn) / sms)
    return waves


def fused_terms(loads: np.ndarray, num_tokens, top_k: int, hidden: int, inter: int,
                hw: HardwareProfile, weight_dtype: str, act_dtype: str, gated: bool = True,
                w4_efficiency: float = 1.0
                ) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """The fused pipeline's kernels as ``(name, family, flops, bytes, ideal_compute_us)``, each
    value an array over the leading axes of ``loads`` (``[..., E_local]``: one row per rank).
    :func:`fused_terms_steps` adds each kernel's serialised steps and kernel count."""
    return [t[:5] for t in fused_terms_steps(loads, num_tokens, top_k, hidden, inter, hw,
                                             weight_dtype, act_dtype, gated, w4_efficiency)]


def fused_terms_steps(loads: np.ndarray, num_tokens, top_k: int, hidden: int, inter: int,
                      hw: HardwareProfile, weight_dtype: str, act_dtype: str, gated: bool = True,
                      w4_efficiency: float = 1.0, num_experts=None,
                      output_copies: int = 0) -> list[tuple]:
    """:func:`fused_terms` with three more values per kernel: its serialised steps (priced at
    the family's ``step_us``; tile waves of 16-bit GEMMs with unaligned rows), its kernel count
    per row (0 where a row does not run it) and its K loop (elements of K one SM walks
    serially, priced at the family's ``k_latency_us`` per 1024: non-zero for the GEMMs).
    ``w4_efficiency``: the serving engine's 4-bit weight-only expert GEMMs' share of the 16-bit
    kernel's tensor-core rate (``framework.w4a16_moe_efficiency``). ``num_experts``: the
    model's experts on all EP ranks (None: only the local ones, i.e. no EP); it sizes the
    GEMMs' grids, whose programs on other ranks' experts cost time (the first kernel's
    steps). ``output_copies``: copies of the combined ``[tokens, hidden]`` output the engine
    makes after the top-k sum (``framework.moe_output_copies``)."""
    loads = np.asarray(loads, dtype=np.int64)
    tokens = np.broadcast_to(np.asarray(num_tokens, dtype=np.float64), loads.shape[:-1])
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    ab, wb = ELEMENT_BYTES[act_dtype], WEIGHT_BYTES[weight_dtype]
    up_n = (2 if gated else 1) * inter
    slots = loads.sum(axis=-1).astype(np.float64)
    # Every token entering the kernel brings top_k slots; those routed to experts held elsewhere
    # (EP) still run through the activation over the whole [tokens * top_k, 2I] cache and the
    # top-k sum (notes §2.1 step 4). The expert GEMMs move only the local slots' rows: pricing
    # the non-local blocks' zero writes as well predicts the EP >= 32 rows of moe.csv worse
    # (leave-one-shape-out p90 25.8 % vs 24.4 %), so they are taken as skipped.
    all_slots = np.maximum(tokens * top_k, slots)
    active = np.count_nonzero(loads, axis=-1).astype(np.float64)
    family = "moe_fp8" if act_dtype in ("fp8", "fp8_block") else "moe_bf16"
    quant = act_dtype in ("fp8", "fp8_block")
    # 4-bit weights dequantised to a 16-bit MMA (Hopper): Marlin's kernel, tiles and rate
    w4a16 = weight_dtype in W4_WEIGHT_ONLY and cd in ("bf16", "fp16")
    if weight_dtype == "fp8_block":
        bm = np.full(tokens.shape, FP8_BLOCK_DEFAULT_BLOCK[0])
        bn = np.full(tokens.shape, FP8_BLOCK_DEFAULT_BLOCK[1])
    elif w4a16:
        bm, bn = w4_block_shape(tokens, top_k, loads.shape[-1])
    else:
        bm, bn = block_shape(tokens)
    # each expert's M-blocks, once for the padding and both GEMMs (integer division is slow)
    blocks = -(-loads // np.asarray(bm)[..., None])
    padded = np.sum(blocks * np.asarray(bm)[..., None], axis=-1)
    m_blocks = np.sum(blocks, axis=-1)
    zero = np.zeros_like(slots)
    one = np.ones_like(slots)
    sms = int(hw.compute.sm_count.value)
    zero_waves = zero
    if num_experts is not None and num_experts > loads.shape[-1]:
        # The GEMMs' programs on other ranks' experts (see _skipped_block_waves); they run
        # inside the two GEMM launches but cost a fixed time per wave, not bandwidth or FLOPs,
        # so they are carried as serialised steps of the pipeline's small-kernel family
        # (moe_aux.step_us, fitted: ~0.13 µs a wave).
        zero_waves = _skipped_block_waves(tokens, top_k, slots, loads.shape[-1], num_experts,
                                          bm, bn, (up_n, hidden), sms)
    terms = [("moe_align", "moe_aux", zero, slots * 4.0 * 3 + loads.shape[-1] * 8.0, zero,
              zero_waves, one, zero)]
    if quant:
        terms.append(("quant_in", "moe_aux", zero, tokens * hidden * (2.0 + ab), zero, zero, one,
                      zero))
    for name, n, k in (("experts_up", up_n, hidden), ("experts_down", hidden, inter)):
        flops = 2.0 * slots * n * k  # useful work; padding shows up in the time only
        bytes_ = active * n * k * wb + padded * k * ab + slots * n * 2.0
        steps = zero
        # Only 16-bit weights keep the checkpoint's row strides: vLLM's quantised-expert methods
        # (mxfp4, int4, fp8) repack the weights at load and pad the intermediate size to their
        # kernels' block multiple (e.g. gpt-oss-120b's 2880 / TP8 = 360 -> 384), so their rows
        # are aligned.
        if not quant and weight_dtype in ("bf16", "fp16") and (n % ALIGN_ELEMENTS
                                                                 or k % ALIGN_ELEMENTS):
            steps = tile_waves(loads, n, *default_block_shape(tokens, loads.shape[-1]), sms)
        # Each tile walks all of K (the Triton kernel never splits K) and the tiles run in
        # waves, so one SM walks waves * K elements serially, each K block waiting on its loads:
        # what bounds a thin-K or few-token GEMM whose data and FLOPs are small (same K-loop
        # latency term as the dense GEMMs, costs/op.py).
        k_loop = tile_waves(loads, n, bm, bn, sms, m_blocks) * k
        ideal_c = grouped_gemm_ideal_us(loads, n, k, bm, bn, hw, cd, m_blocks)
        if w4a16:
            # the 4-bit weights are dequantised in the main loop, off the tensor cores
            ideal_c = ideal_c / w4_efficiency
        terms.append((name, family, flops, bytes_, ideal_c, steps, one, k_loop))
        if name == "experts_up":
            if gated:
                terms.append(("activation", "moe_aux", zero, all_slots * (up_n + inter) * 2.0,
                              zero, zero, one, zero))
            else:
                # vLLM's non-gated squared ReLU (relu2_no_mul, fused_moe/utils.py
                # apply_moe_activation) is no fused kernel but two torch ops over the cache: an
                # in-place relu (reads and writes I per slot), then a square into the next
                # cache (reads and writes I again): twice the traffic of one pass. Its fixed
                # time is counted once: the two launch back to back inside the graph, and
                # moe.csv's few-token Nemotron rows show no second fixed time (pricing two
                # drives the fitted moe_aux t0 to 0; leave-one-shape-out 7.0 / 22.9 % vs
                # 6.6 / 22.4 % with one; one pass of traffic: 7.7 / 22.5 %).
                terms.append(("activation", "moe_aux", zero, all_slots * inter * 2.0 * 4, zero,
                              zero, one, zero))
            if quant:
                terms.append(("quant_mid", "moe_aux", zero, all_slots * inter * (2.0 + ab), zero,
                              zero, one, zero))
    terms.append(("moe_sum", "moe_aux", zero,
                  tokens * top_k * hidden * 2.0 + tokens * hidden * 2.0, zero, zero, one, zero))
    if output_copies:
        # The engine's write-back of the combined output from its workspace into the caller's
        # buffer: one element-wise copy kernel each (reads and writes [tokens, hidden], 16-bit).
        # Per token, not per slot, so it weighs most on top-1 models.
        terms.append(("output_copy", "moe_aux", zero, output_copies * tokens * hidden * 4.0,
                      zero, zero, one * output_copies, zero))
    return terms


def fused_expert_us(loads: np.ndarray, num_tokens, top_k: int, hidden: int, inter: int,
                    hw: HardwareProfile, weight_dtype: str, act_dtype: str,
                    gated: bool = True, w4_efficiency: float = 1.0,
                    num_experts=None, output_copies: int = 0) -> np.ndarray:
    """GPU time of the fused expert pipeline for each row of ``loads`` ``[R, E_local]`` — the
    same kernels :func:`expert_ops` returns, priced at once for every rank."""
    total = 0.0
    for _, family, _, bytes_, ideal_c, steps, kernels, k_loop in fused_terms_steps(
            loads, num_tokens, top_k, hidden, inter, hw, weight_dtype, act_dtype, gated,
            w4_efficiency, num_experts, output_copies):
        fit = hw.kernel(family)
        eff_c = fit.compute_efficiency.value if fit.compute_efficiency is not None else 1.0
        total = total + kernel_time_us(fit.t0_us.value, eff_c, fit.memory_efficiency.value,
                                       ideal_c, bytes_ / hw.hbm_peak_bytes_per_us,
                                       kernels=kernels, steps=steps, k_loop=k_loop,
                                       **fit_terms(fit))
    return np.asarray(total)


#: Bound names by the codes :func:`fused_expert_kernels` returns.
BOUNDS = ("", "compute", "memory", "network", "launch")
BOUND_COMPUTE, BOUND_MEMORY, BOUND_LAUNCH = 1, 2, 4


def fused_expert_kernels(loads: np.ndarray, num_tokens, top_k: int, hidden: int, inter: int,
                         hw: HardwareProfile, weight_dtype: str, act_dtype: str,
                         gated: bool = True, w4_efficiency: float = 1.0,
                         num_experts=None, output_copies: int = 0) -> list[dict]:
    """The kernels :func:`expert_ops` returns (fused strategy) for every row of ``loads``
    ``[R, E_local]`` at once, without building an :class:`OpCost` per row: per kernel a dict of
    OpCost fields, those that differ between rows as arrays ``[R]`` (``time_us``, ``flops``,
    ``bytes``, ``ideal_compute_us``, ``ideal_memory_us``, ``fixed_us``, ``steps``,
    ``kernels``, and ``bound`` as an index into :data:`BOUNDS`; a row whose ``kernels`` is 0
    does not run the kernel, and
    :func:`expert_ops` leaves it out). The numbers are :func:`~.op.roofline`'s, by its formula
    over arrays (:func:`~.op.kernel_time_us`). Used where many MoE layers with different loads
    are priced (``step.build_step`` with routing draws, the sweep's vectorised pricer)."""
    out = []
    for term in fused_terms_steps(loads, num_tokens, top_k, hidden, inter, hw, weight_dtype,
                                  act_dtype, gated, w4_efficiency, num_experts, output_copies):
        name, family, flops, bytes_, ideal_c, steps, kernels, k_loop = term
        kernels = np.asarray(kernels)
        fit = hw.kernel(family)
        eff_c = fit.compute_efficiency.value if fit.compute_efficiency is not None else 1.0
        eff_m = fit.memory_efficiency.value
        terms = fit_terms(fit)
        ideal_m = np.asarray(bytes_ / hw.hbm_peak_bytes_per_us, dtype=np.float64)
        kr = np.broadcast_to(kernels, ideal_m.shape).astype(np.int64)
        fixed = kr * fit.t0_us.value
        time = np.asarray(kernel_time_us(fit.t0_us.value, eff_c, eff_m, ideal_c, ideal_m,
                                         kernels=kr, steps=steps, k_loop=k_loop, **terms),
                          dtype=np.float64)
        # roofline's bound (the K-loop latency is a memory-pipeline stall: memory bound)
        t_c, t_m = np.asarray(ideal_c) / eff_c, ideal_m / eff_m
        t_k = terms["k_latency_us"] * np.minimum(k_loop, terms["k_split_above"]) / 1024.0
        bound = np.where(fixed > time - fixed, BOUND_LAUNCH,
                         np.where(t_c >= np.maximum(t_m, t_k), BOUND_COMPUTE, BOUND_MEMORY))
        out.append({"name": name, "category": "moe", "family": family,
                    "host_floor_us": fit.host_floor_us.value if fit.host_floor_us else 0.0,
                    "time_us": time, "flops": np.asarray(flops, dtype=np.float64),
                    "bytes": np.asarray(bytes_, dtype=np.float64),
                    "ideal_compute_us": np.asarray(ideal_c, dtype=np.float64),
                    "ideal_memory_us": ideal_m, "fixed_us": np.asarray(fixed, dtype=np.float64),
                    "steps": np.broadcast_to(np.asarray(steps, dtype=np.float64), time.shape),
                    "kernels": kr, "bound": bound,
                    "k_loop": np.broadcast_to(np.asarray(k_loop, dtype=np.float64), time.shape)})
    return out


def expert_ops(loads: np.ndarray, num_tokens: int, top_k: int, hidden: int, inter: int,
               hw: HardwareProfile, weight_dtype: str, act_dtype: str, gated: bool = True,
               strategy: str = "fused", w4_efficiency: float = 1.0,
               num_experts=None, output_copies: int = 0) -> list[OpCost]:
    """Expert FFN ops on one rank.

    ``loads``: tokens routed to each expert held by this rank (int array, one per local expert);
    ``num_tokens``: tokens entering the rank's MoE kernel (all of them, including those routed
    elsewhere); ``inter``: this rank's share of the expert intermediate size (after moe_tp).
    """
    loads = np.asarray(loads, dtype=np.int64)
    ab = ELEMENT_BYTES[act_dtype]
    up_n = (2 if gated else 1) * inter
    slots = int(loads.sum())
    active = int(np.count_nonzero(loads))
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

    return [roofline(name, "moe", family, float(fl), float(by), float(ic), hw, kernels=int(kr),
                     steps=float(st), k_loop=float(kl))
            for name, family, fl, by, ic, st, kr, kl in fused_terms_steps(
                loads, num_tokens, top_k, hidden, inter, hw, weight_dtype, act_dtype, gated,
                w4_efficiency, num_experts, output_copies)
            if kr > 0]
