"""Attention on one GPU (this rank's heads): FlashAttention-style prefill and decode, MLA, and
linear (Gated DeltaNet) attention.

Prefill FLOPs count the query-key pairs actually attended: causal, limited to the window for
sliding layers and to the chunk for chunked layers (Llama-4), 2 FLOPs per multiply-add for QK^T
and for PV (FlashAttention-2 paper's FLOP convention). Decode is memory bound: it streams the KV
cache once (FlashAttention-3 decode / FlashDecoding).
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
# one KV head are packed into a 64-row tile that walks the keys in 128-key blocks.
TILE_K, DECODE_TILE_Q = 128, 64


def _family(hw: HardwareProfile, family: str, kv_dtype: str) -> str:
    """An fp8 KV cache runs FlashAttention-3's fp8 kernels (descaling in the main loop, other
    tiles): their own fitted family where the profile has one."""
    if kv_dtype in ("fp8", "fp8_block") and getattr(hw.kernels, f"{family}_fp8", None):
        return f"{family}_fp8"
    return family


def _attend(name: str, family: str, pairs: float, heads: int, qk_dim: int, v_dim: int,
            io_bytes: float, hw: HardwareProfile, tiled_flops: float = 0.0) -> OpCost:
    """``pairs``: query-key pairs attended (useful work); ``tiled_flops``: the work the kernel's
    tiles actually compute (padding included), which sets the ideal compute time."""
    flops = 2.0 * pairs * heads * (qk_dim + v_dim)
    return roofline(name, "attention", family, flops, io_bytes,
                    max(flops, tiled_flops) / hw.peak_flops_per_us("bf16"), hw)


def prefill(num_seqs: int, q_len: int, prefix: int, heads: int, kv_heads: int, qk_dim: int,
            v_dim: int, hw: HardwareProfile, kv_dtype: str = "bf16", window: int = 0,
            chunk: int = 0) -> OpCost:
    """FlashAttention prefill of ``num_seqs`` equal sequences (``heads`` = this rank's heads)."""
    pairs = num_seqs * attended_pairs(q_len, prefix, window, chunk)
    kv_read = prefix + q_len if not window else min(prefix + q_len, window + q_len)
    io = num_seqs * (q_len * heads * (qk_dim + v_dim) * 2.0
                     + kv_read * kv_heads * (qk_dim + v_dim) * ELEMENT_BYTES[kv_dtype])
    return _attend("attention_prefill", _family(hw, "attention_prefill", kv_dtype), pairs, heads,
                   qk_dim, v_dim, io, hw)


def decode(num_seqs: int, kv_len: float, heads: int, kv_heads: int, qk_dim: int, v_dim: int,
           hw: HardwareProfile, kv_dtype: str = "bf16", window: int = 0, chunk: int = 0) -> OpCost:
    """One decode step: each sequence's new token attends to ``kv_len`` cached tokens."""
    keys = kv_len
    if window:
        keys = min(keys, window)
    if chunk:
        keys = min(keys, chunk / 2.0)  # on average half a chunk is filled
    io = num_seqs * (keys * kv_heads * (qk_dim + v_dim) * ELEMENT_BYTES[kv_dtype]
                     + heads * (qk_dim + v_dim) * 2.0)
    pairs = num_seqs * keys
    # One 64-row tile per (sequence, KV head) holds that head group's queries; it walks the
    # keys in 128-key blocks whatever the group size.
    group_tiles = kv_heads * np.ceil(heads / kv_heads / DECODE_TILE_Q)
    tiled = 2.0 * num_seqs * group_tiles * DECODE_TILE_Q * np.ceil(max(keys, 1.0) / TILE_K) * \
        TILE_K * (qk_dim + v_dim)
    return _attend("attention_decode", _family(hw, "attention_decode", kv_dtype), pairs, heads,
                   qk_dim, v_dim, io, hw, float(tiled))


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
