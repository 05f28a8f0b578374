"""Attention on one GPU (this rank's heads): FlashAttention-style prefill and decode, MLA, and
linear (Gated DeltaNet) attention.

Prefill FLOPs count the query-key pairs actually attended: causal, limited to the window for
sliding layers and to the chunk for chunked layers (Llama-4), 2 FLOPs per multiply-add for QK^T
and for PV (FlashAttention-2 paper's FLOP convention). Decode is memory bound: it streams the KV
cache once (FlashAttention-3 decode / FlashDecoding).

Both run FlashAttention-3's tiles (vLLM calls its varlen kernel, which packs the query heads of
one KV head into the tile rows, "PackGQA"): one CTA per (sequence, KV head, query tile, KV
split), one CTA per SM, in whole waves. Prefill tiles take FlashAttention-3's sm90 shapes for
the head dim and KV dtype (:func:`fa3_prefill_tile`: 192 rows at head dim 64, 160-key blocks
for fp8, 64-key blocks for local attention at head dim 256); decode keeps 64 x 128. Each wave pays its CTAs' fixed latency (query tile
load, output and log-sum-exp writes): the family's ``step_us`` per wave, what a batch of many
short sequences costs. A CTA walks its key blocks one after another; the blocks one SM
walks serially (waves x blocks, or its longest causal tile) are priced twice: at the family's
``k_latency_us`` per 1024 K and V values (loads waiting on loads), and at the per-SM tensor and
special-function peaks as a floor under the prefill's ideal compute time (few heads cannot
use the whole GPU). Decode follows FlashAttention-3's split-KV heuristic (few sequences with
long caches are split over more CTAs). Prefill's ideal compute adds the softmax's
exponentials at the special-function peak to the matmuls (``compute.peak_exp_tops``).
Prefill's memory time prices the paged K/V cache bytes at the family's fitted ``kv_read_cost``
reads each (FlashAttention-3 gathers vLLM's 16-token pages without TMA, queries and outputs
move in bulk), which is why one query head per KV head runs so much slower per query than 16.
"""

from __future__ import annotations

import numpy as np

from ..spec.dtypes import ELEMENT_BYTES
from ..spec.hardware import HardwareProfile
from .op import OpCost, roofline


def attended_pairs(q_len: int, prefix: int, window: int = 0, chunk: int = 0) -> float:
    """Query-key pairs of one sequence whose ``q_len`` new tokens follow ``prefix`` cached ones."""
    pos = np.arange(prefix, prefix + q_len, dtype=np.float64)  # 0-based position of each query
    keys = pos + 1.0
    if window:
        keys = np.minimum(keys, float(window))
    if chunk:
        keys = np.minimum(keys, np.mod(pos, chunk) + 1.0)
    return float(keys.sum())


# FlashAttention-3 decode tiles (Shah et al. 2024; hopper/tile_size.h): the query heads sharing
# one KV head are packed into a 64-row tile that walks the keys in 128-key blocks. Prefill tiles
# hold 128 packed query rows by default (kBlockM of the hdim 128-256 bf16 forward kernels;
# :func:`fa3_prefill_tile` gives each head dim's own).
TILE_K, DECODE_TILE_Q, PREFILL_TILE_Q = 128, 64, 128
# FlashAttention-3's split-KV heuristic (hopper/heuristics.h, num_splits_heuristic): no split
# once the tiles fill 80 % of the SMs or a tile walks at most 4 key blocks; otherwise the fewest
# splits (at most 128) whose wave efficiency is within 85 % of the best.
SPLIT_FILL, SPLIT_MIN_BLOCKS, SPLIT_MAX, SPLIT_EFF = 0.8, 4, 128, 0.85


def fa3_splits(tiles, n_blocks, sms: int):
    """KV splits FlashAttention-3 picks for ``tiles`` CTAs of ``n_blocks`` key blocks each on
    ``sms`` SMs (hopper/heuristics.h ``num_splits_heuristic``; the L2 clause for > 50 MB KV
    heads with >= 2 x SMs query tiles never applies to decode). Works on numpy arrays."""
    tiles = np.asarray(tiles, dtype=np.float64)[..., None]
    n_blocks = np.asarray(n_blocks, dtype=np.float64)[..., None]
    s = np.arange(1, SPLIT_MAX + 1, dtype=np.float64)
    allowed = s <= np.minimum(float(sms), n_blocks)
    waves = tiles * s / sms
    eff = np.where(allowed, waves / np.ceil(waves), 0.0)
    best = eff.max(axis=-1, keepdims=True)
    first = np.argmax(allowed & (eff >= SPLIT_EFF * best), axis=-1) + 1.0
    no_split = (tiles[..., 0] >= SPLIT_FILL * sms) | (n_blocks[..., 0] <= SPLIT_MIN_BLOCKS)
    return np.where(no_split, 1.0, first)


def cta_waves(ctas, sms: int):
    """Waves of CTAs: one FlashAttention-3 CTA per SM (its smem pipeline fills the SM)."""
    return np.ceil(np.asarray(ctas, dtype=np.float64) / sms)


def serial_blocks(ctas, mean_blocks, max_blocks, sms: int):
    """Key blocks one SM walks serially: ``ctas`` CTAs of ``mean_blocks`` key blocks on average
    run in whole waves (:func:`cta_waves`), and no SM finishes before its longest CTA. Works on
    numpy arrays."""
    return np.maximum(cta_waves(ctas, sms) * mean_blocks, max_blocks)


def block_compute_us(rows: int, kv_dims: int, hw: HardwareProfile, keys: int = TILE_K) -> float:
    """Ideal time of one (``rows`` x ``keys``) tile block on ONE SM: its QK^T and PV matmuls
    (``kv_dims`` = qk_dim + v_dim) at the per-SM tensor peak plus its exponentials at the
    per-SM special-function peak. A chain of blocks on one SM cannot beat this per block, which
    is what wave quantisation and a long causal tile cost when the heads do not fill the GPU."""
    sms = int(hw.compute.sm_count.value)
    return (2.0 * rows * keys * kv_dims / (hw.peak_flops_per_us("bf16") / sms)
            + float(softmax_us(rows * keys, hw)) * sms)


def decode_key_blocks(keys, window: int = 0):
    """128-key blocks one decode query walks over its ``keys`` cached keys: a sliding window
    that does not start on a block boundary straddles one block more (FlashAttention-3 masks
    inside the first and last blocks). Works on numpy arrays."""
    keys = np.maximum(np.asarray(keys, dtype=np.float64), 1.0)
    if not window:
        return np.ceil(keys / TILE_K)
    first = np.maximum(keys - window, 0.0)  # 0-based index of the first key in the window
    return np.ceil(keys / TILE_K) - np.floor(first / TILE_K)


def _family(hw: HardwareProfile, family: str, kv_dtype: str) -> str:
    """An fp8 KV cache runs FlashAttention-3's fp8 kernels (descaling in the main loop, other
    tiles): their own fitted family where the profile has one."""
    if kv_dtype in ("fp8", "fp8_block") and getattr(hw.kernels, f"{family}_fp8", None):
        return f"{family}_fp8"
    return family


def softmax_us(scores, hw: HardwareProfile):
    """Ideal time of the softmax's exponentials over ``scores`` score elements at the GPU's
    special-function peak (``compute.peak_exp_tops``; 0 where the profile has none). H100: 3.9
    T exp/s against 989 TFLOP/s of matmul (FlashAttention-3 paper, Shah et al. 2024, §3), so a
    64-dim head spends as long in exp as in its two matmuls. Added to the matmul time (no
    overlap credited), it gives the time per FLOP falling with head dim that the reference
    prefill table shows (about 500, 660 and 730 TFLOP/s at head dims 64, 128 and 256 on long
    causal sequences). Works on numpy arrays."""
    peak = hw.compute.peak_exp_tops
    return np.asarray(scores, dtype=np.float64) / (peak.value * 1e6) if peak else 0.0


def _attend(name: str, family: str, pairs: float, heads: int, qk_dim: int, v_dim: int,
            io_bytes: float, hw: HardwareProfile, tiled_flops: float = 0.0,
            k_loop: float = 0.0, waves: int = 0, exp_us: float = 0.0,
            chain_us: float = 0.0, kv_fraction: float = 0.0) -> OpCost:
    """``pairs``: query-key pairs attended (useful work); ``tiled_flops``: the work the kernel's
    tiles actually compute (padding included), which sets the ideal compute time; ``k_loop``:
    K and V values one SM walks serially (:func:`serial_blocks` x 128 x (qk_dim + v_dim));
    ``waves``: CTA waves (:func:`cta_waves`), each a serialised step of the family's
    ``step_us``; ``exp_us``: the tiles' softmax (:func:`softmax_us`), added to the matmuls'
    ideal compute time; ``chain_us``: the blocks one SM walks serially at its own peak
    (:func:`block_compute_us`), a floor under that ideal compute time; ``kv_fraction``: the
    share of ``io_bytes`` that is paged K/V cache (the family's ``kv_read_cost``)."""
    flops = 2.0 * pairs * heads * (qk_dim + v_dim)
    ideal = max(max(flops, tiled_flops) / hw.peak_flops_per_us("bf16") + exp_us, chain_us)
    return roofline(name, "attention", family, flops, io_bytes, ideal, hw, steps=waves,
                    k_loop=k_loop, kv_fraction=kv_fraction)


# FlashAttention-3's forward tiles on sm90 (hopper/tile_size.h, ``tile_size_fwd_sm90``), as vLLM
# calls them: always causal for prefill, local with a window, and "paged KV without TMA"
# (hopper/flash_api.cpp ``get_pagedkv_tma`` wants the page size to be a multiple of kBlockN;
# vLLM's 16-token KV pages never are). (kBlockM query rows, kBlockN keys, IntraWGOverlap).
def fa3_prefill_tile(qk_dim: int, v_dim: int, kv_dtype: str, local: bool) -> tuple[int, int, bool]:
    """FlashAttention-3's prefill tile for these head dims and KV dtype: (query rows, keys,
    whether softmax overlaps the next block's matmuls inside a warpgroup)."""
    if kv_dtype not in ("fp8", "fp8_block"):
        if qk_dim <= 64:
            return (64, 64, False) if v_dim == 512 else \
                (128, 96, False) if v_dim == 256 else (192, 128, True)
        if qk_dim <= 96:
            return 192, 128, True
        if qk_dim <= 128:
            return 128, 128, True
        if qk_dim <= 192:
            return 128, 96, True
        return 128, 64 if local else 80, True
    if qk_dim <= 64:
        return 192, 160, True
    if qk_dim <= 96:
        return 192, 128, True
    if qk_dim <= 128:
        return 128, 160, True
    if qk_dim <= 192:
        return 128, 160, True
    # "PagedKV uses more registers so we disabled IntraWGOverlap" (tile_size.h)
    return 128, 64 if local else 128, False


def _prefill_tiles(q_len: int, prefix: int, group: int, window: int, chunk: int,
                   tile_q: int = PREFILL_TILE_Q, tile_k: int = TILE_K) -> np.ndarray:
    """Key blocks each packed query tile of one (sequence, KV head) walks: tile rows are
    (query, head) pairs, query-major (PackGQA: FlashAttention-3 packs whenever the query is
    varlen and there are more query than KV heads, hopper/heuristics.h ``should_pack_gqa``), a
    tile holds ``tile_q`` rows and visits every ``tile_k``-key block that one of its queries
    attends (causal, window, chunk)."""
    rows = q_len * group
    start_row = np.arange(0, rows, tile_q)
    first_q = prefix + start_row // group  # 0-based positions of the tile's first/last query
    last_q = prefix + (np.minimum(start_row + tile_q, rows) - 1) // group
    lo = np.zeros_like(first_q)
    if window:
        lo = np.maximum(lo, first_q + 1 - window)
    if chunk:
        lo = np.maximum(lo, (first_q // chunk) * chunk)
    return np.ceil((last_q + 1) / tile_k) - np.floor(lo / tile_k)


def prefill(num_seqs: int, q_len: int, prefix: int, heads: int, kv_heads: int, qk_dim: int,
            v_dim: int, hw: HardwareProfile, kv_dtype: str = "bf16", window: int = 0,
            chunk: int = 0) -> OpCost:
    """FlashAttention prefill of ``num_seqs`` equal sequences (``heads`` = this rank's heads)."""
    pairs = num_seqs * attended_pairs(q_len, prefix, window, chunk)
    kv_read = prefix + q_len if not window else min(prefix + q_len, window + q_len)
    kv_bytes = num_seqs * kv_read * kv_heads * (qk_dim + v_dim) * ELEMENT_BYTES[kv_dtype]
    io = num_seqs * q_len * heads * (qk_dim + v_dim) * 2.0 + kv_bytes
    tile_q, tile_k, _ = fa3_prefill_tile(qk_dim, v_dim, kv_dtype, bool(window or chunk))
    blocks = _prefill_tiles(q_len, prefix, max(1, heads // kv_heads), window, chunk,
                            tile_q, tile_k)
    tiles = num_seqs * kv_heads * len(blocks)
    sms = int(hw.compute.sm_count.value)
    tiled = 2.0 * num_seqs * kv_heads * tile_q * blocks.sum() * tile_k * (qk_dim + v_dim)
    # Prefill tiles are not split over the keys: the reference prefill table fits better
    # without FlashAttention-3's split heuristic (11.3 against 11.5 % median APE, 128 x 128 tiles).
    chain = float(serial_blocks(tiles, blocks.mean(), blocks.max(), sms))
    return _attend("attention_prefill", _family(hw, "attention_prefill", kv_dtype), pairs, heads,
                   qk_dim, v_dim, io, hw, float(tiled), chain * tile_k * (qk_dim + v_dim),
                   int(cta_waves(tiles, sms)),
                   float(softmax_us(tiled / (2.0 * (qk_dim + v_dim)), hw)),
                   chain * block_compute_us(tile_q, qk_dim + v_dim, hw, tile_k),
                   kv_fraction=kv_bytes / io)


def decode(num_seqs: int, kv_len: float, heads: int, kv_heads: int, qk_dim: int, v_dim: int,
           hw: HardwareProfile, kv_dtype: str = "bf16", window: int = 0, chunk: int = 0) -> OpCost:
    """One decode step: each sequence's new token attends to ``kv_len`` cached tokens."""
    n_blocks = float(decode_key_blocks(kv_len, window))
    keys = kv_len
    if window:
        keys = min(keys, window)
    if chunk:
        keys = min(keys, chunk / 2.0)  # on average half a chunk is filled
        n_blocks = float(np.ceil(max(keys, 1.0) / TILE_K))
    io = num_seqs * (keys * kv_heads * (qk_dim + v_dim) * ELEMENT_BYTES[kv_dtype]
                     + heads * (qk_dim + v_dim) * 2.0)
    pairs = num_seqs * keys
    # One 64-row tile per (sequence, KV head) holds that head group's queries; it walks the
    # keys in 128-key blocks whatever the group size.
    group_tiles = kv_heads * np.ceil(heads / kv_heads / DECODE_TILE_Q)
    tiled = 2.0 * num_seqs * group_tiles * DECODE_TILE_Q * n_blocks * TILE_K * (qk_dim + v_dim)
    # Few sequences: FlashAttention-3 splits the keys over more CTAs; each walks its share.
    sms = int(hw.compute.sm_count.value)
    splits = fa3_splits(num_seqs * group_tiles, n_blocks, sms)
    per_cta = np.ceil(n_blocks / splits)
    chain = float(serial_blocks(num_seqs * group_tiles * splits, per_cta, per_cta, sms))
    # No softmax or per-SM compute floor here: a decode block's exponentials and matmuls take a
    # tenth of its KV load on the same SM (64 x 128 exp at 3.9 T/s over 132 SMs against 64 KB
    # at 1/132 of HBM) and run under it; the tiles' compute stays only as a per-tile cost.
    return _attend("attention_decode", _family(hw, "attention_decode", kv_dtype), pairs, heads,
                   qk_dim, v_dim, io, hw, float(tiled), chain * TILE_K * (qk_dim + v_dim),
                   int(cta_waves(num_seqs * group_tiles * splits, sms)))


def mla_decode(num_seqs: int, kv_len: float, heads: int, latent_dim: int, rope_dim: int,
               hw: HardwareProfile, kv_dtype: str = "bf16") -> OpCost:
    """MLA decode in the weight-absorbed form (FlashMLA): every head attends over the shared
    latent cache of ``latent_dim + rope_dim`` values per token; values are the latent itself."""
    io = num_seqs * (kv_len * (latent_dim + rope_dim) * ELEMENT_BYTES[kv_dtype]
                     + heads * (latent_dim + rope_dim + latent_dim) * 2.0)
    pairs = num_seqs * kv_len
    # FlashMLA packs the heads of one sequence into full 64-row tiles (no GQA padding): its own
    # kernel family, not the GQA decode kernel's.
    return _attend("mla_decode", "attention_mla_decode", pairs, heads, latent_dim + rope_dim,
                   latent_dim, io, hw)


def linear_attention(num_seqs: int, q_len: int, heads_v: int, key_dim: int, value_dim: int,
                     hw: HardwareProfile) -> OpCost:
    """Gated DeltaNet: a fixed fp32 state ``[heads_v, key_dim, value_dim]`` per sequence is read
    and written once per step; each token costs ~6 state-sized multiply-adds (delta rule update
    and readout, Yang et al. 2024 "Gated Delta Networks")."""
    state = heads_v * key_dim * value_dim * 4.0
    io = num_seqs * (2.0 * state + q_len * heads_v * (2 * key_dim + 2 * value_dim) * 2.0)
    flops = 12.0 * num_seqs * q_len * heads_v * key_dim * value_dim
    family = "attention_prefill" if q_len > 1 else "attention_decode"
    return roofline("linear_attention", "attention", family, flops, io,
                    flops / hw.peak_flops_per_us("bf16"), hw, kernels=2)
