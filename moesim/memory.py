"""Memory per GPU: weights (by dtype and sharding), KV cache, activations, runtime reserve.

Sharding follows vLLM / SGLang: attention, dense MLP, shared experts, embedding and LM head are
split over ``tp`` (each attention-DP group holds a full copy); routed experts over ``ep * moe_tp``
(plus EPLB's redundant slots); layers over ``pp``. Embeddings, LM head, router and norms stay in
bf16 in every quantised checkpoint we know of (DeepSeek-V3 fp8, gpt-oss mxfp4, Qwen3 FP8 all list
them in ``modules_to_not_convert`` or keep them unquantised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES
from .spec.scenario import Scenario


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU (the most loaded one)."""

    weights: float
    kv_cache: float
    activations: float
    reserved: float
    capacity: float
    kv_bytes_per_seq: float
    max_batch_size: int

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.reserved

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "kv_cache": self.kv_cache,
                "activations": self.activations, "reserved": self.reserved, "total": self.total,
                "capacity": self.capacity}


def weight_bytes_per_gpu(sc: Scenario) -> float:
    m, d = sc.model, sc.deployment
    layers_share = 1.0 / d.pp
    wb = WEIGHT_BYTES[d.weight_dtype]
    bf16 = 2.0
    total = m.embedding_params * bf16 / d.tp
    total += m.hidden_size * (2 * m.num_layers + 1) * bf16 * layers_share
    per_layer = 0.0
    for att, mlp in zip(m.layer_attention, m.layer_mlp):
        per_layer += m.attention_params(att) * wb / d.tp
        if mlp == "dense":
            per_layer += m.mlp_params(m.dense_intermediate_size) * wb / d.tp
        else:
            per_layer += m.shared_expert_params() * wb / d.tp + m.router_params() * bf16
    total += per_layer * layers_share
    if m.moe is not None:
        slots = (m.moe.num_experts + sc.routing.redundant_experts) / d.ep
        total += (m.num_moe_layers * layers_share * slots * m.expert_params()
                  * WEIGHT_BYTES[d.experts_dtype] / d.moe_tp)
    return total


def kv_bytes_per_token_layer(sc: Scenario, kind: str) -> float:
    """KV-cache bytes one token adds to one layer on one GPU (0 for linear attention)."""
    m, d = sc.model, sc.deployment
    kvb = ELEMENT_BYTES[d.kv_cache_dtype]
    if kind == "linear":
        return 0.0
    if m.mla is not None:
        # The latent cache is shared by all heads, so every TP rank holds all of it.
        return (m.mla.kv_lora_rank + m.mla.qk_rope_head_dim) * kvb
    kv_heads = max(1, m.num_kv_heads // d.tp)  # replicated when tp > kv heads
    return 2 * kv_heads * m.head_dim * kvb


def kv_bytes_per_seq(sc: Scenario, seq_len: int) -> float:
    """KV cache (and recurrent state) of one sequence of ``seq_len`` tokens on one GPU.

    Sliding-window and chunked layers keep only the window / chunk (vLLM's hybrid allocator);
    linear-attention layers keep a fixed fp32 state.
    """
    m, d = sc.model, sc.deployment
    total = 0.0
    for att in m.layer_attention:
        if att == "linear":
            la = m.linear_attention
            assert la is not None
            heads = max(1, la.num_value_heads // d.tp)
            total += heads * la.key_head_dim * la.value_head_dim * 4.0
            continue
        tokens = seq_len
        if att == "sliding":
            tokens = min(seq_len, m.sliding_window)
        elif att == "chunked":
            tokens = min(seq_len, m.attention_chunk_size)
        total += tokens * kv_bytes_per_token_layer(sc, att)
    return total / d.pp


def activation_bytes(sc: Scenario) -> float:
    """Peak activation memory of the largest step (a full prefill chunk) on one GPU.

    Estimate: the residual stream, the attention block's Q/K/V/O and the widest MLP
    intermediate are live at once, in the activation dtype; MoE layers hold the ``T*k``
    permuted copies and their gate/up output (vLLM's fused-MoE workspaces ``[T, k, 2I]``)."""
    m, d = sc.model, sc.deployment
    t = min(sc.max_num_batched_tokens, sc.workload.batch_size * sc.workload.input_len)
    h = m.hidden_size
    attn = (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim / d.tp + h
    widest = 0.0
    if m.dense_intermediate_size:
        widest = 3 * m.dense_intermediate_size / d.tp
    if m.moe is not None:
        widest = max(widest, m.moe.top_k * (h + 3 * m.moe.expert_intermediate_size / d.moe_tp))
    per_token = (2 * h + attn + widest) * 2.0
    logits = sc.workload.batch_size * m.vocab_size * 4.0 / d.tp
    return t * per_token + logits


def memory_per_gpu(sc: Scenario) -> MemoryBreakdown:
    wl, d = sc.workload, sc.deployment
    cap = sc.hardware.memory.hbm_capacity_bytes.value
    weights = weight_bytes_per_gpu(sc)
    per_seq = kv_bytes_per_seq(sc, wl.input_len + wl.output_len)
    seqs_per_gpu = math.ceil(wl.batch_size / d.attention_dp)
    kv = seqs_per_gpu * per_seq
    act = activation_bytes(sc)
    # The engine leaves (1 - gpu_memory_utilization) of HBM unused, and the CUDA context and
    # library workspaces live inside the part it uses.
    reserved = (1.0 - sc.gpu_memory_utilization) * cap + \
        sc.hardware.overheads.runtime_reserved_bytes.value
    free = cap - weights - act - reserved
    max_batch = max(0, int(free // per_seq)) * d.attention_dp if per_seq > 0 else 0
    return MemoryBreakdown(weights, kv, act, reserved, cap, per_seq, max_batch)
