"""Build a :class:`ModelSpec` from a Hugging Face ``config.json``.

Each supported ``model_type`` maps to one small reader that follows the semantics of the matching
transformers config class (``MixtralConfig``, ``Qwen3MoeConfig``, ``DeepseekV3Config``,
``Llama4TextConfig``, ``GptOssConfig``, ``Qwen3NextConfig``, ``GlmMoeDsaConfig``, ...), or of the
model's own remote code where transformers has none (MiniMax-M2, Kimi-K2).

Rules:

* Architecture sizes (hidden size, layer / head / expert counts, intermediate sizes) are required;
  a missing one is an :class:`InputError` naming the key. Only switches whose default every
  implementation agrees on (``num_key_value_heads`` = heads, ``head_dim`` = hidden / heads,
  ``moe_layer_freq`` = 1, ``decoder_sparse_step`` = 1, ``tie_word_embeddings`` = false,
  ``hidden_act`` = silu) fall back to that default.
* A value the spec cannot represent (unknown ``model_type``, activation, layer type, scoring
  function or quantization method) is an :class:`InputError` that lists what is supported.
* Multimodal wrappers (Llama-4, Kimi-K2.5, Qwen3.5) are read through ``text_config``; the vision
  tower is not modelled (it is outside the decoder the cost model simulates), so parameter counts
  are the language model's.
* Not counted (all below 0.1 % of any reference model): biases (gpt-oss, Qwen2 qkv), attention
  sinks, q/k norms, MLA's latent norms, Qwen's shared-expert gate. Multi-token-prediction layers
  (DeepSeek ``num_nextn_predict_layers``, Qwen3.5 ``mtp_num_hidden_layers``, MiniMax
  ``num_mtp_modules``) are not decoder layers and are left out, as in DeepSeek's 671B figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from pydantic import ValidationError

from ..errors import InputError, from_pydantic
from .dtypes import canonical
from .model import LinearAttentionSpec, MlaSpec, ModelSpec, MoeSpec

__all__ = ["model_from_hf_config", "supported_model_types"]

# Activations of a gated (SwiGLU/GeGLU-style, three-matrix) MLP; every supported family's MLP is
# gated whatever the activation, and the activation itself only changes elementwise cost.
_GATED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")

# HF ``layer_types`` entries -> ModelSpec attention kinds. DSA ("deepseek_sparse_attention", GLM-5
# under transformers 5) is dense attention over a top-k key selection: 'full' plus the indexer.
_LAYER_TYPES = {
    "full_attention": "full",
    "attention": "full",
    "deepseek_sparse_attention": "full",
    "sliding_attention": "sliding",
    "chunked_attention": "chunked",
    "linear_attention": "linear",
}


@dataclass(frozen=True)
class _Cfg:
    """One config dict (the text config of a wrapper, or the whole config) with error paths."""

    d: Mapping[str, Any]
    top: Mapping[str, Any]  # outermost config: wrapper-level keys (dtype, tying, quantization)
    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def has(self, name: str) -> bool:
        return self.d.get(name) is not None

    def get(self, name: str, default: Any = None) -> Any:
        value = self.d.get(name)
        return default if value is None else value

    def outer(self, name: str, default: Any = None) -> Any:
        """A key a text config may leave to its wrapper (``torch_dtype``, tying, quantization)."""
        for src in (self.d, self.top):
            if src.get(name) is not None:
                return src[name]
        return default

    def req_int(self, name: str, minimum: int = 1) -> int:
        if not self.has(name):
            raise InputError(self.key(name), "required key is missing",
                             "add it from the model's config.json")
        return self._int(name, self.d[name], minimum)

    def int_or(self, name: str, default: int, minimum: int = 0) -> int:
        return self._int(name, self.d[name], minimum) if self.has(name) else default

    def _int(self, name: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(self.key(name), f"must be an integer; got {value!r}")
        if value < minimum:
            raise InputError(self.key(name), f"must be >= {minimum}; got {value}")
        return value

    def int_list(self, name: str, length: Optional[int] = None) -> list[int]:
        value = self.get(name, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                             for v in value):
            raise InputError(self.key(name), f"must be a list of integers; got {value!r}")
        if length is not None and len(value) != length:
            raise InputError(self.key(name), f"has {len(value)} entries, expected {length} "
                             "(one per decoder layer)")
        return value


# ---- entry point ---------------------------------------------------------------------------

def model_from_hf_config(config: Mapping[str, Any], *, name: str, hf_id: Optional[str] = None,
                         field: str = "model") -> ModelSpec:
    """Translate an HF ``config.json`` (already parsed) into a validated :class:`ModelSpec`.

    ``field`` prefixes every error path (``model.text_config.hidden_size``)."""
    if not isinstance(config, Mapping):
        raise InputError(field, "a Hugging Face config must be a JSON object")
    cfg = _unwrap(config, field)
    model_type = _model_type(cfg, config, field)
    reader = _FAMILIES[model_type]
    _check_activation(cfg)
    dense_dtype, expert_dtype = _checkpoint_dtypes(cfg)
    try:
        spec: dict[str, Any] = _common(cfg)
        spec.update(reader(cfg))
        spec.update(name=name, hf_id=hf_id, family=_family(model_type),
                    checkpoint_dtype=dense_dtype, checkpoint_expert_dtype=expert_dtype)
        return ModelSpec(**spec)
    except ValidationError as exc:  # a value the config passes on that the spec rejects
        raise from_pydantic(exc, prefix=field) from None


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def _unwrap(config: Mapping[str, Any], field: str) -> _Cfg:
    """Multimodal wrappers (``Llama4Config``, ``KimiK25Config``, ``Qwen3_5MoeConfig``) keep the
    decoder under ``text_config``."""
    text = config.get("text_config")
    if text is None:
        return _Cfg(config, config, field)
    if not isinstance(text, Mapping):
        raise InputError(f"{field}.text_config", "must be an object")
    return _Cfg(text, config, f"{field}.text_config")


def _model_type(cfg: _Cfg, config: Mapping[str, Any], field: str) -> str:
    supported = f"supported: {', '.join(supported_model_types())}"
    # The text config's own type names the decoder; a wrapper without one falls back to its type.
    for src, path in ((cfg.d, cfg.key("model_type")), (config, f"{field}.model_type")):
        mt = src.get("model_type")
        if mt is None:
            continue
        if mt not in _FAMILIES:
            raise InputError(path, f"unsupported model_type {mt!r}", supported)
        return mt
    raise InputError(f"{field}.model_type", "required key is missing", supported)


def _family(model_type: str) -> str:
    mt = model_type.removesuffix("_text")
    return {"kimi_k25": "kimi_k2", "minimax_text_01": "minimax"}.get(mt, mt)


def _check_activation(cfg: _Cfg) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in _GATED_ACTIVATIONS:
        raise InputError(cfg.key("hidden_act"), f"unsupported activation {act!r}",
                         f"supported (gated MLP): {', '.join(_GATED_ACTIVATIONS)}")


def _common(cfg: _Cfg) -> dict[str, Any]:
    hidden = cfg.req_int("hidden_size")
    heads = cfg.req_int("num_attention_heads")
    if not cfg.has("head_dim") and hidden % heads:
        raise InputError(cfg.key("head_dim"), "required key is missing (hidden_size is not a "
                         "multiple of num_attention_heads)", "add head_dim")
    tie = cfg.outer("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise InputError(cfg.key("tie_word_embeddings"), f"must be true or false; got {tie!r}")
    return dict(
        hidden_size=hidden,
        vocab_size=cfg.req_int("vocab_size"),
        num_layers=cfg.req_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_kv_heads=cfg.int_or("num_key_value_heads", heads, minimum=1),
        head_dim=cfg.int_or("head_dim", hidden // heads, minimum=1),
        tie_word_embeddings=tie,
    )


# ---- per-layer structure --------------------------------------------------------------------

def _layer_types(cfg: _Cfg, n: int) -> Optional[list[str]]:
    """``layer_types`` (transformers >= 4.54 convention), or None when the config has none."""
    if not cfg.has("layer_types"):
        return None
    raw = cfg.d["layer_types"]
    if not isinstance(raw, list) or len(raw) != n:
        raise InputError(cfg.key("layer_types"), f"must list one type per layer ({n})")
    kinds = []
    for i, t in enumerate(raw):
        if t not in _LAYER_TYPES:
            raise InputError(cfg.key(f"layer_types[{i}]"), f"unsupported layer type {t!r}",
                             f"supported: {', '.join(_LAYER_TYPES)}")
        kinds.append(_LAYER_TYPES[t])
    return kinds


def _qwen_window_attention(cfg: _Cfg, n: int) -> list[str]:
    """Qwen2/Qwen3 (dense and MoE): with ``use_sliding_window`` the layers from
    ``max_window_layers`` on use the window (transformers ``Qwen2Config.layer_types``)."""
    kinds = _layer_types(cfg, n)
    if kinds is not None:
        return kinds
    if cfg.get("use_sliding_window", False) and cfg.has("sliding_window"):
        first = cfg.int_or("max_window_layers", n)
        return ["sliding" if i >= first else "full" for i in range(n)]
    return ["full"] * n


def _mistral_attention(cfg: _Cfg, n: int) -> list[str]:
    """Mistral / Mixtral: a non-null ``sliding_window`` applies to every layer."""
    kinds = _layer_types(cfg, n)
    if kinds is not None:
        return kinds
    return ["sliding" if cfg.has("sliding_window") else "full"] * n


def _window(cfg: _Cfg, kinds: list[str]) -> dict[str, Any]:
    if "sliding" not in kinds:
        return {}
    return {"sliding_window": cfg.req_int("sliding_window")}


def _dense_size(cfg: _Cfg, mlp: list[str], key: str = "intermediate_size") -> dict[str, Any]:
    return {"dense_intermediate_size": cfg.req_int(key)} if "dense" in mlp else {}


def _scoring(cfg: _Cfg, default: str) -> str:
    s = cfg.get("scoring_func", default)
    if s not in ("softmax", "sigmoid"):
        raise InputError(cfg.key("scoring_func"), f"unsupported router scoring {s!r}",
                         "supported: softmax, sigmoid")
    return s


def _moe(cfg: _Cfg, *, experts: str, top_k: str, size: str, shared: int = 0,
         shared_size: int = 0, scoring: str = "softmax", groups: int = 1) -> MoeSpec:
    try:
        return MoeSpec(num_experts=cfg.req_int(experts), top_k=cfg.req_int(top_k),
                       expert_intermediate_size=cfg.req_int(size), num_shared_experts=shared,
                       shared_expert_intermediate_size=shared_size if shared else 0,
                       scoring=scoring, num_expert_groups=groups)
    except ValidationError as exc:
        raise from_pydantic(exc, prefix=cfg.prefix) from None


# ---- families -------------------------------------------------------------------------------

def _dense(cfg: _Cfg) -> dict[str, Any]:
    """LlamaConfig / Qwen2Config / Qwen3Config / MistralConfig: every layer a dense MLP."""
    n = cfg.req_int("num_hidden_layers")
    if cfg.get("model_type") == "llama":
        att = _layer_types(cfg, n) or ["full"] * n
    elif cfg.get("model_type") == "mistral":
        att = _mistral_attention(cfg, n)
    else:
        att = _qwen_window_attention(cfg, n)
    mlp = ["dense"] * n
    return dict(layer_attention=att, layer_mlp=mlp, **_window(cfg, att), **_dense_size(cfg, mlp))


def _mixtral(cfg: _Cfg) -> dict[str, Any]:
    """MixtralConfig: every layer MoE, ``intermediate_size`` is the expert size."""
    n = cfg.req_int("num_hidden_layers")
    att = _mistral_attention(cfg, n)
    moe = _moe(cfg, experts="num_local_experts", top_k="num_experts_per_tok",
               size="intermediate_size")
    return dict(layer_attention=att, layer_mlp=["moe"] * n, moe=moe, **_window(cfg, att))


def _olmoe(cfg: _Cfg) -> dict[str, Any]:
    """OlmoeConfig: every layer MoE, ``intermediate_size`` is the expert size."""
    n = cfg.req_int("num_hidden_layers")
    att = _layer_types(cfg, n) or ["full"] * n
    moe = _moe(cfg, experts="num_experts", top_k="num_experts_per_tok", size="intermediate_size")
    return dict(layer_attention=att, layer_mlp=["moe"] * n, moe=moe, **_window(cfg, att))


def _qwen_mlp_kinds(cfg: _Cfg, n: int) -> list[str]:
    """Qwen2MoeDecoderLayer: MoE iff the layer is not in ``mlp_only_layers``, ``num_experts`` > 0
    and ``(layer + 1) % decoder_sparse_step == 0``."""
    dense_only = set(cfg.int_list("mlp_only_layers"))
    step = cfg.int_or("decoder_sparse_step", 1, minimum=1)
    experts = cfg.int_or("num_experts", 0)
    return ["moe" if experts > 0 and i not in dense_only and (i + 1) % step == 0 else "dense"
            for i in range(n)]


def _qwen_shared(cfg: _Cfg) -> dict[str, int]:
    """Qwen2-MoE / Qwen3-Next / Qwen3.5: one gated shared expert of
    ``shared_expert_intermediate_size`` (absent or 0 in Qwen3-MoE: no shared expert)."""
    size = cfg.int_or("shared_expert_intermediate_size", 0)
    return {"shared": 1 if size else 0, "shared_size": size}


def _qwen_moe(cfg: _Cfg) -> dict[str, Any]:
    """Qwen2MoeConfig / Qwen3MoeConfig."""
    n = cfg.req_int("num_hidden_layers")
    att = _qwen_window_attention(cfg, n)
    mlp = _qwen_mlp_kinds(cfg, n)
    out = dict(layer_attention=att, layer_mlp=mlp, **_window(cfg, att), **_dense_size(cfg, mlp))
    if "moe" in mlp:
        out["moe"] = _moe(cfg, experts="num_experts", top_k="num_experts_per_tok",
                          size="moe_intermediate_size", **_qwen_shared(cfg))
    return out


def _qwen_next(cfg: _Cfg) -> dict[str, Any]:
    """Qwen3NextConfig / Qwen3_5MoeTextConfig: Gated DeltaNet layers with a full-attention layer
    every ``full_attention_interval`` (default 4) unless ``layer_types`` says otherwise; the
    full-attention layers gate their output (``attn_output_gate``, always on in Qwen3-Next)."""
    n = cfg.req_int("num_hidden_layers")
    att = _layer_types(cfg, n)
    if att is None:
        every = cfg.int_or("full_attention_interval", 4, minimum=1)
        att = ["full" if (i + 1) % every == 0 else "linear" for i in range(n)]
    mlp = _qwen_mlp_kinds(cfg, n)
    out: dict[str, Any] = dict(layer_attention=att, layer_mlp=mlp,
                               attention_output_gate=bool(cfg.get("attn_output_gate", True)),
                               **_window(cfg, att), **_dense_size(cfg, mlp))
    if "linear" in att:
        out["linear_attention"] = LinearAttentionSpec(
            num_key_heads=cfg.req_int("linear_num_key_heads"),
            num_value_heads=cfg.req_int("linear_num_value_heads"),
            key_head_dim=cfg.req_int("linear_key_head_dim"),
            value_head_dim=cfg.req_int("linear_value_head_dim"),
            conv_kernel_dim=cfg.int_or("linear_conv_kernel_dim", 4, minimum=1))
    if "moe" in mlp:
        out["moe"] = _moe(cfg, experts="num_experts", top_k="num_experts_per_tok",
                          size="moe_intermediate_size", **_qwen_shared(cfg))
    return out


def _deepseek_mlp_kinds(cfg: _Cfg, n: int) -> list[str]:
    """DeepseekV2/V3 decoder layer: MoE iff ``n_routed_experts`` is set, ``layer >=
    first_k_dense_replace`` and ``layer % moe_layer_freq == 0``; transformers 5 may spell it out
    as ``mlp_layer_types`` ("dense" / "sparse")."""
    if cfg.has("mlp_layer_types"):
        raw = cfg.d["mlp_layer_types"]
        if not isinstance(raw, list) or len(raw) != n or not set(raw) <= {"dense", "sparse"}:
            raise InputError(cfg.key("mlp_layer_types"),
                             f"must list 'dense' or 'sparse' for each of the {n} layers")
        return ["moe" if t == "sparse" else "dense" for t in raw]
    if not cfg.has("n_routed_experts"):
        return ["dense"] * n
    # Required: its default differs between DeepSeek's remote code (0) and transformers (3).
    first = cfg.req_int("first_k_dense_replace", minimum=0)
    freq = cfg.int_or("moe_layer_freq", 1, minimum=1)
    return ["moe" if i >= first and i % freq == 0 else "dense" for i in range(n)]


def _dsa_indexer(cfg: _Cfg) -> dict[str, int]:
    """DeepSeek Sparse Attention indexer (DeepSeek-V3.2, GLM-5), on every layer. GLM-5 can share
    one layer's top-k with the next (``indexer_types`` "shared", or ``index_topk_freq`` > 1),
    which leaves those layers without indexer weights; the spec has no per-layer indexer flag."""
    if not (cfg.has("index_n_heads") and cfg.has("index_head_dim")):
        return {}
    types = cfg.get("indexer_types") or []
    if any(t != "full" for t in types) or cfg.int_or("index_topk_freq", 1) > 1 \
            or cfg.has("index_topk_pattern"):
        raise InputError(cfg.key("indexer_types"), "layers sharing another layer's DSA indexer "
                         "are not supported", "every layer must run its own indexer")
    return dict(index_n_heads=cfg.req_int("index_n_heads"),
                index_head_dim=cfg.req_int("index_head_dim"),
                index_topk=cfg.int_or("index_topk", 0))


def _deepseek(cfg: _Cfg) -> dict[str, Any]:
    """DeepseekV2/V3 (and V3.2), Kimi-K2 (DeepseekV3 architecture) and GLM-5 (``GlmMoeDsaConfig``,
    MLA plus a DSA indexer). ``head_dim`` is set to the q/k head dim ``qk_nope + qk_rope`` (GLM-5's
    config ``head_dim`` is the rope slice only); KV heads equal query heads after decompression."""
    n = cfg.req_int("num_hidden_layers")
    q_lora = cfg.get("q_lora_rank") or None  # V2-Lite: null = no query compression
    mla = MlaSpec(q_lora_rank=q_lora and cfg.req_int("q_lora_rank"),
                  kv_lora_rank=cfg.req_int("kv_lora_rank"),
                  qk_nope_head_dim=cfg.req_int("qk_nope_head_dim"),
                  qk_rope_head_dim=cfg.req_int("qk_rope_head_dim", minimum=0),
                  v_head_dim=cfg.req_int("v_head_dim"), **_dsa_indexer(cfg))
    mlp = _deepseek_mlp_kinds(cfg, n)
    heads = cfg.req_int("num_attention_heads")
    out: dict[str, Any] = dict(
        mla=mla, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, num_kv_heads=heads,
        layer_attention=_layer_types(cfg, n) or ["full"] * n, layer_mlp=mlp,
        **_dense_size(cfg, mlp))
    if "moe" in mlp:
        # V2's remote code scores with softmax; V3, Kimi-K2 and GLM-5 with sigmoid (noaux_tc).
        default = "softmax" if cfg.get("model_type") == "deepseek_v2" else "sigmoid"
        # Required: transformers defaults it to 2 (V2) or 1 (V3), the remote code to None.
        shared = cfg.req_int("n_shared_experts", minimum=0)
        out["moe"] = _moe(cfg, experts="n_routed_experts", top_k="num_experts_per_tok",
                          size="moe_intermediate_size", shared=shared,
                          shared_size=cfg.req_int("moe_intermediate_size"),
                          scoring=_scoring(cfg, default),
                          groups=cfg.int_or("n_group", 1, minimum=1))
    return out


def _gpt_oss(cfg: _Cfg) -> dict[str, Any]:
    """GptOssConfig: sliding (``sliding_window``) and full layers per ``layer_types`` (default:
    alternating, sliding first); every layer MoE with ``intermediate_size`` experts."""
    n = cfg.req_int("num_hidden_layers")
    att = _layer_types(cfg, n) or ["sliding" if i % 2 == 0 else "full" for i in range(n)]
    top_k = "num_experts_per_tok" if cfg.has("num_experts_per_tok") else "experts_per_token"
    moe = _moe(cfg, experts="num_local_experts", top_k=top_k, size="intermediate_size")
    return dict(layer_attention=att, layer_mlp=["moe"] * n, moe=moe, **_window(cfg, att))


def _llama4(cfg: _Cfg) -> dict[str, Any]:
    """Llama4TextConfig. MoE layers: ``moe_layers``, else every ``interleave_moe_layer_step``-th
    layer counting from ``step - 1``; dense layers use ``intermediate_size_mlp``. Each MoE layer
    has one shared expert of ``intermediate_size``. Attention: ``no_rope_layers[i] == 1`` means the
    layer uses RoPE and chunked attention; the NoPE layers (every ``no_rope_layer_interval``-th,
    default 4, i.e. layers 3, 7, ...) attend globally. No ``attention_chunk_size``: all full.
    The router applies a sigmoid to the top-k logits (``Llama4Router``), hence 'sigmoid'."""
    n = cfg.req_int("num_hidden_layers")
    if cfg.has("moe_layers"):
        moe_at = set(cfg.int_list("moe_layers"))
    else:
        step = cfg.int_or("interleave_moe_layer_step", 1, minimum=1)
        moe_at = set(range(step - 1, n, step))
    mlp = ["moe" if i in moe_at else "dense" for i in range(n)]
    att = _layer_types(cfg, n)
    if att is None:
        if cfg.get("no_rope_layers"):
            rope = cfg.int_list("no_rope_layers", length=n)
        else:
            every = cfg.int_or("no_rope_layer_interval", 4, minimum=1)
            rope = [int((i + 1) % every != 0) for i in range(n)]
        att = ["chunked" if r else "full" for r in rope]
    chunk = cfg.int_or("attention_chunk_size", 0)
    if not chunk:
        att = ["full" if k == "chunked" else k for k in att]
    out: dict[str, Any] = dict(layer_attention=att, layer_mlp=mlp, attention_chunk_size=chunk,
                               **_window(cfg, att),
                               **_dense_size(cfg, mlp, "intermediate_size_mlp"))
    if "moe" in mlp:
        out["moe"] = _moe(cfg, experts="num_local_experts", top_k="num_experts_per_tok",
                          size="intermediate_size", shared=1,
                          shared_size=cfg.req_int("intermediate_size"), scoring="sigmoid")
    return out


def _minimax_attention(cfg: _Cfg, n: int, default: Callable[[int], str]) -> list[str]:
    """``layer_types`` (transformers ``MiniMaxConfig``) or the remote code's ``attn_type_list``
    (1 = softmax attention, 0 = lightning linear attention)."""
    kinds = _layer_types(cfg, n)
    if kinds is not None:
        return kinds
    if cfg.has("attn_type_list"):
        flags = cfg.int_list("attn_type_list", length=n)
        return ["full" if f else "linear" for f in flags]
    return [default(i) for i in range(n)]


def _minimax(cfg: _Cfg) -> dict[str, Any]:
    """MiniMax-M2 (``minimax_m2``, all softmax attention) and MiniMax-Text-01 (``minimax``:
    lightning linear attention with softmax layers interleaved). Experts are
    ``intermediate_size``; ``shared_intermediate_size`` > 0 adds one shared MLP of that size."""
    n = cfg.req_int("num_hidden_layers")
    if cfg.get("model_type") == "minimax_m2":
        att = _minimax_attention(cfg, n, lambda i: "full")
    else:  # MiniMaxConfig default: even layers full, odd layers linear
        att = _minimax_attention(cfg, n, lambda i: "full" if (i + 1) % 2 else "linear")
    out: dict[str, Any] = dict(layer_attention=att, layer_mlp=["moe"] * n, **_window(cfg, att))
    if "linear" in att:
        heads = cfg.req_int("num_attention_heads")
        hidden = cfg.req_int("hidden_size")
        hd = cfg.int_or("head_dim", hidden // heads, minimum=1)
        # Lightning attention has no short convolution: a 1-tap kernel keeps no conv state.
        out["linear_attention"] = LinearAttentionSpec(
            variant="lightning", num_key_heads=heads, num_value_heads=heads, key_head_dim=hd,
            value_head_dim=hd, conv_kernel_dim=1)
    shared_size = cfg.int_or("shared_intermediate_size", 0)
    out["moe"] = _moe(cfg, experts="num_local_experts", top_k="num_experts_per_tok",
                      size="intermediate_size", shared=1 if shared_size else 0,
                      shared_size=shared_size, scoring=_scoring(cfg, "softmax"))
    return out


_FAMILIES: dict[str, Callable[[_Cfg], dict[str, Any]]] = {
    "llama": _dense, "mistral": _dense, "qwen2": _dense, "qwen3": _dense,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe,
    "qwen3_next": _qwen_next, "qwen3_5_moe": _qwen_next, "qwen3_5_moe_text": _qwen_next,
    "deepseek_v2": _deepseek, "deepseek_v3": _deepseek, "deepseek_v32": _deepseek,
    "kimi_k2": _deepseek, "kimi_k25": _deepseek, "glm_moe_dsa": _deepseek,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4, "llama4_text": _llama4,
    "minimax_m2": _minimax, "minimax": _minimax, "minimax_text_01": _minimax,
}


# ---- checkpoint dtypes ----------------------------------------------------------------------

_QUANT_METHODS = ("fp8", "fbgemm_fp8", "mxfp4", "compressed-tensors", "modelopt", "gptq", "awq")


def _checkpoint_dtypes(cfg: _Cfg) -> tuple[str, Optional[str]]:
    """(dtype of non-expert weights, dtype of routed experts or None if the same).

    The unquantized dtype is ``torch_dtype`` / ``dtype`` (bf16 when absent: every supported family
    publishes bf16 weights). ``quantization_config`` then applies to every linear layer, or to the
    routed experts only when its exclusion list names the attention modules (gpt-oss mxfp4,
    Kimi-K2.5 int4). Embeddings and the LM head stay unquantized in all these schemes; the spec
    labels them with the non-expert dtype regardless."""
    base = _dtype(cfg)
    q = cfg.outer("quantization_config")
    if not q:
        return base, None
    path = f"{cfg.prefix}.quantization_config"
    if not isinstance(q, Mapping):
        raise InputError(path, "must be an object")
    method = q.get("quant_method")
    if method == "fp8":
        # DeepSeek-V3 style: one scale per 128x128 block (``weight_block_size``).
        quant = "fp8_block" if q.get("weight_block_size") else "fp8"
        excluded = q.get("modules_to_not_convert") or []
    elif method == "fbgemm_fp8":
        quant, excluded = "fp8", q.get("modules_to_not_convert") or []
    elif method == "mxfp4":
        quant, excluded = "mxfp4", q.get("modules_to_not_convert") or []
    elif method == "compressed-tensors":
        quant, excluded = _compressed_tensors_dtype(q, path), q.get("ignore") or []
    elif method == "modelopt":
        quant, excluded = _modelopt_dtype(q, path), q.get("exclude_modules") or []
    elif method in ("gptq", "awq"):
        bits = q.get("bits")
        if bits not in (4, 8):
            raise InputError(f"{path}.bits", f"unsupported {method} bit width {bits!r}",
                             "supported: 4, 8")
        quant, excluded = ("int4" if bits == 4 else "int8"), q.get("modules_to_not_convert") or []
    else:
        raise InputError(f"{path}.quant_method", f"unsupported quantization {method!r}",
                         f"supported: {', '.join(_QUANT_METHODS)}")
    if _excludes_attention(excluded):
        return base, quant
    return quant, None


def _dtype(cfg: _Cfg) -> str:
    raw = cfg.outer("torch_dtype") or cfg.outer("dtype") or "bfloat16"
    try:
        return canonical(str(raw))
    except ValueError as exc:
        raise InputError(cfg.key("torch_dtype"), str(exc)) from None


# An attention module name (``self_attn``, ``attn``, ``attention``) but not a norm named after it
# (Qwen3-FP8 excludes ``post_attention_layernorm``, which says nothing about the projections).
_ATTENTION_MODULE = re.compile(r"self_attn|(?<![a-z_])(attn|attention)(?![a-z_])")


def _excludes_attention(patterns: Any) -> bool:
    """True when the quantizer's exclusion list keeps the attention projections unquantized."""
    return isinstance(patterns, list) and any(
        isinstance(p, str) and _ATTENTION_MODULE.search(p) for p in patterns)


def _compressed_tensors_dtype(q: Mapping[str, Any], path: str) -> str:
    """llm-compressor ``config_groups``: weights {type: int|float, num_bits, group_size}. Kimi-K2.5:
    int 4-bit, group 32, on the routed experts."""
    groups = q.get("config_groups") or {}
    found = set()
    for gname, group in groups.items():
        w = (group or {}).get("weights") or {}
        kind, bits, gsize = w.get("type"), w.get("num_bits"), w.get("group_size")
        strategy = w.get("strategy")
        if kind == "int" and bits in (4, 8):
            found.add("int4" if bits == 4 else "int8")
        elif kind == "float" and bits == 8:
            found.add("fp8_block" if strategy == "block" else "fp8")
        elif kind == "float" and bits == 4:
            found.add("nvfp4" if gsize == 16 else "mxfp4")
        else:
            raise InputError(f"{path}.config_groups.{gname}.weights",
                             f"unsupported weight format type={kind!r} num_bits={bits!r}",
                             "supported: int4, int8, float8, float4")
    if len(found) != 1:
        raise InputError(f"{path}.config_groups", "needs exactly one weight format"
                         + (f"; got {', '.join(sorted(found))}" if found else ""),
                         "the spec holds one dtype for experts and one for the rest")
    return found.pop()


def _modelopt_dtype(q: Mapping[str, Any], path: str) -> str:
    """NVIDIA ModelOpt (``hf_quant_config.json`` / ``quant_method: modelopt``)."""
    algo = str(q.get("quant_algo", "")).upper()
    table = {"FP8": "fp8", "NVFP4": "nvfp4", "W4A16_AWQ": "int4", "INT4_AWQ": "int4",
             "INT8_SQ": "int8", "W8A8_SQ_PER_CHANNEL": "int8"}
    if algo not in table:
        raise InputError(f"{path}.quant_algo", f"unsupported ModelOpt algorithm {algo!r}",
                         f"supported: {', '.join(table)}")
    return table[algo]
