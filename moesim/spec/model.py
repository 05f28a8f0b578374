"""``ModelSpec``: the architecture facts the cost model needs, and nothing it does not.

Built from a preset, any Hugging Face ``config.json`` (see :mod:`moesim.spec.hf_import`) or an
inline object. Parameter counts are derived here so that every consumer (memory, cost model,
``moesim models``) counts the same way.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

AttentionKind = Literal["full", "sliding", "chunked", "linear"]
MlpKind = Literal["dense", "moe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MlaSpec(_Strict):
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi, GLM-5): compressed KV cache.

    Per token the cache holds ``kv_lora_rank + qk_rope_head_dim`` values for all heads together.
    """

    q_lora_rank: Optional[int] = Field(None, ge=1, description="0/None = no query compression")
    kv_lora_rank: int = Field(..., ge=1)
    qk_nope_head_dim: int = Field(..., ge=1)
    qk_rope_head_dim: int = Field(..., ge=0)
    v_head_dim: int = Field(..., ge=1)
    # DeepSeek Sparse Attention "lightning indexer" (DeepSeek-V3.2, GLM-5): extra per-layer
    # weights wq_b [q_lora_rank -> n*d], wk [hidden -> d], a LayerNorm(d) and weights_proj
    # [hidden -> n] (transformers ``DeepseekV32Indexer``). 0 = no indexer.
    index_n_heads: int = Field(0, ge=0, description="DSA indexer heads (0 = no indexer)")
    index_head_dim: int = Field(0, ge=0, description="DSA indexer head dim (0 = no indexer)")
    index_topk: int = Field(0, ge=0, description="DSA: keys each query attends to (0 = dense)")


class LinearAttentionSpec(_Strict):
    """Linear attention with a fixed-size recurrent state.

    ``gated_deltanet``: Qwen3.5 / Qwen3-Next (q/k/v/z + b/a projections, short conv).
    ``lightning``: MiniMax-Text-01 lightning attention (qkv + output gate, no conv, no b/a;
    transformers ``MiniMaxLightningAttention``); key and value heads are the attention heads.
    """

    variant: Literal["gated_deltanet", "lightning"] = "gated_deltanet"
    num_key_heads: int = Field(..., ge=1)
    num_value_heads: int = Field(..., ge=1)
    key_head_dim: int = Field(..., ge=1)
    value_head_dim: int = Field(..., ge=1)
    conv_kernel_dim: int = Field(4, ge=1)


class MoeSpec(_Strict):
    num_experts: int = Field(..., ge=1, description="routed experts per MoE layer")
    top_k: int = Field(..., ge=1, description="routed experts per token")
    expert_intermediate_size: int = Field(..., ge=1)
    num_shared_experts: int = Field(0, ge=0)
    shared_expert_intermediate_size: int = Field(0, ge=0, description="per shared expert")
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    num_expert_groups: int = Field(1, ge=1, description="DeepSeek grouped top-k (n_group)")

    @model_validator(mode="after")
    def _check(self) -> "MoeSpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_shared_experts and not self.shared_expert_intermediate_size:
            raise ValueError("num_shared_experts > 0 needs shared_expert_intermediate_size")
        return self


class ModelSpec(_Strict):
    """A decoder-only transformer, dense or MoE. Sizes are element counts; no units."""

    name: str
    hf_id: Optional[str] = None
    family: str = "custom"
    hidden_size: int = Field(..., ge=1)
    vocab_size: int = Field(..., ge=1)
    num_layers: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)
    num_kv_heads: int = Field(..., ge=1)
    head_dim: int = Field(..., ge=1)
    mla: Optional[MlaSpec] = None
    linear_attention: Optional[LinearAttentionSpec] = None
    attention_output_gate: bool = Field(False, description="Qwen3.5 gated attention output")
    sliding_window: int = Field(0, ge=0, description="tokens; used by 'sliding' layers")
    attention_chunk_size: int = Field(0, ge=0, description="tokens; used by 'chunked' layers")
    layer_attention: list[AttentionKind] = Field(
        ..., description="per decoder layer: full / sliding / chunked / linear")
    layer_mlp: list[MlpKind] = Field(..., description="per decoder layer: dense / moe")
    dense_intermediate_size: int = Field(0, ge=0, description="FFN size of dense layers")
    moe: Optional[MoeSpec] = None
    gated_mlp: bool = Field(True, description="SwiGLU-style (3 matrices) vs 2-matrix MLP")
    tie_word_embeddings: bool = False
    checkpoint_dtype: str = Field("bf16", description="weight dtype of the published checkpoint")
    checkpoint_expert_dtype: Optional[str] = Field(
        None, description="expert weight dtype if it differs (gpt-oss: mxfp4)")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        n = self.num_layers
        if len(self.layer_attention) != n:
            raise ValueError(f"layer_attention has {len(self.layer_attention)} entries, "
                             f"num_layers is {n}")
        if len(self.layer_mlp) != n:
            raise ValueError(f"layer_mlp has {len(self.layer_mlp)} entries, num_layers is {n}")
        if "moe" in self.layer_mlp and self.moe is None:
            raise ValueError("layer_mlp has 'moe' layers but no 'moe' block is given")
        if "dense" in self.layer_mlp and not self.dense_intermediate_size:
            raise ValueError("layer_mlp has 'dense' layers but dense_intermediate_size is 0")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_kv_heads={self.num_kv_heads}")
        if "sliding" in self.layer_attention and not self.sliding_window:
            raise ValueError("'sliding' layers need sliding_window > 0")
        if "chunked" in self.layer_attention and not self.attention_chunk_size:
            raise ValueError("'chunked' layers need attention_chunk_size > 0")
        if "linear" in self.layer_attention and self.linear_attention is None:
            raise ValueError("'linear' layers need a linear_attention block")
        return self

    # ---- parameter counts (elements) -------------------------------------------------------
    def attention_params(self, kind: AttentionKind) -> int:
        """Weights of one attention block (projections only; norms counted separately)."""
        h = self.hidden_size
        if kind == "linear":
            la = self.linear_attention
            assert la is not None
            qk = la.num_key_heads * la.key_head_dim
            v = la.num_value_heads * la.value_head_dim
            if la.variant == "lightning":
                # qkv_proj, output_gate and out_proj (MiniMaxLightningAttention).
                return h * (2 * qk + 2 * v) + v * h
            # q, k, v, z (output gate) and b/a (per-value-head gates) projections, the
            # depthwise conv over q,k,v, and the output projection (Gated DeltaNet, Qwen3-Next).
            return (h * (2 * qk + 2 * v) + h * 2 * la.num_value_heads
                    + la.conv_kernel_dim * (2 * qk + v) + v * h)
        if self.mla is not None:
            m = self.mla
            nh = self.num_attention_heads
            qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = (h * m.q_lora_rank + m.q_lora_rank * nh * qk_head) if m.q_lora_rank \
                else h * nh * qk_head
            kv_down = h * (m.kv_lora_rank + m.qk_rope_head_dim)
            kv_up = m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim)
            o = nh * m.v_head_dim * h
            indexer = 0
            if m.index_n_heads and m.index_head_dim:
                n, d = m.index_n_heads, m.index_head_dim
                indexer = (m.q_lora_rank or h) * n * d + h * d + 2 * d + h * n
            return q + kv_down + kv_up + o + indexer
        q = h * self.num_attention_heads * self.head_dim
        if self.attention_output_gate:
            q *= 2
        kv = 2 * h * self.num_kv_heads * self.head_dim
        o = self.num_attention_heads * self.head_dim * h
        return q + kv + o

    def mlp_params(self, intermediate: int) -> int:
        mats = 3 if self.gated_mlp else 2
        return mats * self.hidden_size * intermediate

    def expert_params(self) -> int:
        """Weights of one routed expert."""
        assert self.moe is not None
        return self.mlp_params(self.moe.expert_intermediate_size)

    def shared_expert_params(self) -> int:
        assert self.moe is not None
        return self.moe.num_shared_experts * self.mlp_params(self.moe.shared_expert_intermediate_size)

    def router_params(self) -> int:
        assert self.moe is not None
        return self.hidden_size * self.moe.num_experts

    @cached_property
    def num_moe_layers(self) -> int:
        return sum(1 for k in self.layer_mlp if k == "moe")

    @cached_property
    def embedding_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return emb if self.tie_word_embeddings else 2 * emb

    @cached_property
    def non_expert_params(self) -> int:
        """Everything except routed experts: embeddings, attention, dense MLPs, shared experts,
        routers and norms (two RMSNorm vectors per layer plus the final norm)."""
        total = self.embedding_params + self.hidden_size * (2 * self.num_layers + 1)
        for att, mlp in zip(self.layer_attention, self.layer_mlp):
            total += self.attention_params(att)
            if mlp == "dense":
                total += self.mlp_params(self.dense_intermediate_size)
            else:
                total += self.shared_expert_params() + self.router_params()
        return total

    @cached_property
    def routed_expert_params(self) -> int:
        if self.moe is None:
            return 0
        return self.num_moe_layers * self.moe.num_experts * self.expert_params()

    @cached_property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params

    @cached_property
    def active_params(self) -> int:
        """Parameters touched by one token: all non-expert weights plus top_k routed experts per
        MoE layer (the convention of the published "active" figures, embeddings included)."""
        if self.moe is None:
            return self.total_params
        return self.non_expert_params + self.num_moe_layers * self.moe.top_k * self.expert_params()

    @cached_property
    def active_params_excl_input_embedding(self) -> int:
        """``active_params`` without the input embedding table: a token reads one row of it, not
        the table, while the LM head is a full GEMM. This is OpenAI's convention for gpt-oss
        (model card: 5.13B active for gpt-oss-120b = experts + attention + router + unembedding).
        With tied embeddings the table is the LM head, so nothing is taken off."""
        if self.tie_word_embeddings:
            return self.active_params
        return self.active_params - self.vocab_size * self.hidden_size
