"""The ops of one forward step on one GPU, from the scenario, the tokens in the batch and the
routing sample.

A step is described for the slowest GPU: attention work is the same on every rank of a TP group
(the batch is split evenly over attention-DP groups); MoE layers wait for the rank whose experts
received the most work, which is where routing imbalance enters. Identical layers are reported
once with a ``count``; MoE layers whose routing draws differ are averaged into one entry per layer
kind so that ``count * total_us`` is still their exact sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

import numpy as np

from .costs import attention, comm, deepep, moe
from .costs.elementwise import memory_op
from .costs.gemm import gemm, linear
from .costs.op import OpCost
from .spec.dtypes import ELEMENT_BYTES
from .spec.scenario import Scenario

Phase = Literal["prefill", "decode"]


def _with(op: OpCost, **changes: Any) -> OpCost:
    """``dataclasses.replace(op, **changes)`` without re-running ``OpCost.__init__`` (which has
    nothing to check): a step builds hundreds of ops, and replace is most of their cost."""
    if not hasattr(op, "__dict__"):  # a slotted OpCost: the dataclass way
        return replace(op, **changes)
    new = object.__new__(type(op))
    d = new.__dict__
    d.update(op.__dict__)
    d.update(changes)
    return new


@dataclass(frozen=True)
class Batch:
    """Work of one step on one attention-DP group: ``num_seqs`` sequences, each adding
    ``new_tokens`` tokens after ``context`` tokens already in its KV cache.

    A decode batch may carry a ``prefill`` chunk in the same forward pass (vLLM / SGLang chunked
    prefill, TensorRT-LLM in-flight batching): the linear layers and experts then see the tokens
    of both, the attention kernels run once per part. ``new_tokens > 1`` on a decode batch is a
    speculative verification step (each sequence's drafted tokens checked in one pass)."""

    phase: Phase
    num_seqs: int
    new_tokens: int
    context: float
    prefill: Optional["Batch"] = None

    @property
    def tokens(self) -> int:
        """Tokens through the linear layers: this batch's and its prefill chunk's."""
        own = self.num_seqs * self.new_tokens
        return own + self.prefill.tokens if self.prefill is not None else own

    @property
    def sequences(self) -> int:
        """Sequences whose last position reaches the LM head in this step."""
        return self.num_seqs + (self.prefill.num_seqs if self.prefill is not None else 0)


@dataclass(frozen=True)
class MoeLayerStats:
    """What the routing did to one kind of MoE layer in this step (averages over its layers)."""

    tokens_per_expert_mean: float
    tokens_per_expert_max: float
    rank_load_max_over_mean: float
    distinct_experts: float
    dropped_fraction: float = 0.0
    rerouted_fraction: float = 0.0
    rank_tokens_max_over_mean: float = 1.0
    rank_tokens_max_over_mean_before_eplb: Optional[float] = None  # contiguous placement


@dataclass(frozen=True)
class Step:
    phase: Phase
    batch: Batch
    ops: list[OpCost]
    moe_stats: dict[str, MoeLayerStats] = field(default_factory=dict)

    @property
    def time_us(self) -> float:
        return float(sum(o.count * o.total_us for o in self.ops))

    def by_layer_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.ops:
            out[o.layer_kind] = out.get(o.layer_kind, 0.0) + o.count * o.total_us
        return out


# ---------------------------------------------------------------------------------------------
def _attention_ops(sc: Scenario, b: Batch, kind: str) -> list[OpCost]:
    """Projections over every token of the step, then the attention kernels of each part (a
    decode batch and the prefill chunk riding along with it)."""
    m, d, hw = sc.model, sc.deployment, sc.hardware
    tp, T, H = d.tp, b.tokens, m.hidden_size
    wd, ad = d.weight_dtype, d.activation_dtype
    parts = [b] if b.prefill is None else [b, b.prefill]
    ops: list[OpCost] = []
    if kind == "linear":
        la = m.linear_attention
        assert la is not None
        qk, v = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
        ops.extend(linear("linear_attn_in_proj", T, (2 * qk + 2 * v + 2 * la.num_value_heads) // tp,
                        H, hw, wd, ad))
        ops.extend(attention.linear_attention(p.num_seqs, p.new_tokens,
                                              max(1, la.num_value_heads // tp), la.key_head_dim,
                                              la.value_head_dim, hw) for p in parts)
        ops.extend(linear("linear_attn_out_proj", T, H, v // tp, hw, wd, ad))
        return ops
    heads = m.num_attention_heads // tp
    if m.mla is not None:
        a = m.mla
        qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            ops.extend(linear("q_a_proj", T, a.q_lora_rank, H, hw, wd, ad))
            ops.extend(linear("q_b_proj", T, heads * qk_head, a.q_lora_rank, hw, wd, ad))
        else:
            ops.extend(linear("q_proj", T, heads * qk_head, H, hw, wd, ad))
        ops.extend(linear("kv_a_proj", T, a.kv_lora_rank + a.qk_rope_head_dim, H, hw, wd, ad))
        for p in parts:
            ops.extend(_mla_kernels(sc, p, heads))
        ops.extend(linear("o_proj", T, H, heads * a.v_head_dim, hw, wd, ad))
    else:
        kv_heads = max(1, m.num_kv_heads // tp)
        hd = m.head_dim
        q_width = heads * hd * (2 if m.attention_output_gate else 1)
        ops.extend(linear("qkv_proj", T, q_width + 2 * kv_heads * hd, H, hw, wd, ad))
        window = m.sliding_window if kind == "sliding" else 0
        chunk = m.attention_chunk_size if kind == "chunked" else 0
        for p in parts:
            if p.phase == "prefill":
                ops.append(attention.prefill(p.num_seqs, p.new_tokens, int(p.context), heads,
                                             kv_heads, hd, hd, hw, d.kv_cache_dtype, window,
                                             chunk))
            else:
                # Verification of drafted tokens packs each sequence's queries into the rows
                # of one tile, as extra heads of its group: the KV is read once (FlashInfer /
                # FA3 with q_len > 1).
                ops.append(attention.decode(p.num_seqs, p.context + p.new_tokens,
                                            heads * p.new_tokens, kv_heads, hd, hd, hw,
                                            d.kv_cache_dtype, window, chunk))
        ops.extend(linear("o_proj", T, H, heads * hd, hw, wd, ad))
    return ops


def _mla_kernels(sc: Scenario, p: Batch, heads: int) -> list[OpCost]:
    """MLA attention of one part of a step, between the shared projections."""
    m, d, hw = sc.model, sc.deployment, sc.hardware
    a = m.mla
    assert a is not None
    wd, ad, kvd = d.weight_dtype, d.activation_dtype, d.kv_cache_dtype
    qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
    if p.phase == "prefill":
        # Prefill expands the latent cache into per-head K and V (vLLM's MLA "MHA mode").
        kv_tokens = int(p.num_seqs * (p.context + p.new_tokens))
        return [*linear("kv_b_proj", kv_tokens, heads * (a.qk_nope_head_dim + a.v_head_dim),
                        a.kv_lora_rank, hw, wd, ad),
                attention.prefill(p.num_seqs, p.new_tokens, int(p.context), heads, heads,
                                  qk_head, a.v_head_dim, hw, kvd)]
    # Decode absorbs W_UK into the query and W_UV into the output (FlashMLA form); drafted
    # tokens to verify ride as extra query heads over the same latent cache.
    t = p.num_seqs * p.new_tokens
    return [gemm("q_absorb", t, heads * a.kv_lora_rank, a.qk_nope_head_dim, hw, wd, ad),
            attention.mla_decode(p.num_seqs, p.context + p.new_tokens, heads * p.new_tokens,
                                 a.kv_lora_rank, a.qk_rope_head_dim, hw, kvd),
            gemm("v_absorb", t, heads * a.v_head_dim, a.kv_lora_rank, hw, wd, ad)]


def _norm_ops(sc: Scenario, b: Batch) -> OpCost:
    # Two RMSNorms with fused residual add and the rotary embedding: each reads and writes the
    # hidden state (vLLM fused_add_rms_norm, rotary_embedding kernels).
    return memory_op("norms_rope", 3 * 2 * b.tokens * sc.model.hidden_size * 2.0, sc.hardware,
                     kernels=3)


def _tp_all_reduce(sc: Scenario, b: Batch, name: str) -> Optional[OpCost]:
    if sc.deployment.tp == 1:
        return None
    return comm.all_reduce(name, b.tokens * sc.model.hidden_size * 2.0, sc.deployment.tp,
                           sc.hardware, sc.gpus_per_node,
                           custom=bool(sc.framework.custom_all_reduce.value))


def _dense_mlp_ops(sc: Scenario, b: Batch, inter: int, prefix: str = "mlp") -> list[OpCost]:
    m, d, hw = sc.model, sc.deployment, sc.hardware
    inter_r = inter // d.tp
    up = (2 if m.gated_mlp else 1) * inter_r
    return [*linear(f"{prefix}_up", b.tokens, up, m.hidden_size, hw, d.weight_dtype,
                    d.activation_dtype),
            memory_op(f"{prefix}_act", b.tokens * (up + inter_r) * 2.0, hw),
            *linear(f"{prefix}_down", b.tokens, m.hidden_size, inter_r, hw, d.weight_dtype,
                    d.activation_dtype)]


def deepep_backend(sc: Scenario, b: "Batch") -> Optional[str]:
    """The DeepEP backend (costs/deepep.py) that moves batch ``b``'s dispatch / combine, or None
    for the NCCL all-to-all (``deployment.ep_comm_backend``). ``deepep`` / ``deepep_v2`` pick
    the low-latency (generation) kernels for decode-only steps and the normal (context) ones for
    steps carrying prefill tokens, as SGLang's ``--deepep-mode auto`` does."""
    d = sc.deployment
    mode = d.ep_comm_backend
    if mode == "nccl":
        return None
    from .errors import InputError

    if d.ep > sc.gpus_per_node:
        raise InputError("deployment.ep_comm_backend", f"{mode} over ep={d.ep} spans nodes "
                         f"({sc.gpus_per_node} GPUs per node); only intra-node DeepEP is "
                         "modelled", "use ep_comm_backend nccl or ep <= GPUs per node")
    decode_only = b.phase == "decode" and b.prefill is None
    if mode in ("deepep_ht", "deepep_ll"):
        return mode[len("deepep_"):]
    if mode == "deepep_v2":
        return "v2_generation" if decode_only else "v2_context"
    return "ll" if decode_only else "ht"


def received_tokens(rank_loads: np.ndarray, num_tokens: int) -> np.ndarray:
    """Distinct tokens each rank receives, from its experts' token-slots ``[..., ep, slots]``: a token
    with several experts on one rank arrives once. Expected value when each expert's tokens are
    an independent draw of ``n_e`` of the ``num_tokens``: ``T * (1 - prod_e (1 - n_e / T))``."""
    t = np.asarray(num_tokens, dtype=np.float64)
    if t.ndim == 0:
        if num_tokens <= 0:
            return np.zeros(rank_loads.shape[:-1])
        frac = np.clip(rank_loads / num_tokens, 0.0, 1.0)
        return num_tokens * (1.0 - np.prod(1.0 - frac, axis=-1))
    # token counts per row (``num_tokens`` broadcasts against ``rank_loads[..., 0]``)
    frac = np.clip(rank_loads / np.maximum(t, 1.0)[..., None], 0.0, 1.0)
    return np.where(t > 0, t * (1.0 - np.prod(1.0 - frac, axis=-1)), 0.0)


@dataclass(frozen=True)
class _MoeLayer:
    ops: list[OpCost]
    rank_us: np.ndarray  # expert time per EP rank
    dropped: float  # shares of the token-slots
    rerouted: float
    rank_tokens_ratio: float  # max / mean token-slots per rank, after placement
    rank_tokens_ratio_contiguous: Optional[float]  # the same without EPLB (eplb only)


def _placed(loads: np.ndarray, ep: int, rs: Any) -> np.ndarray:
    """Per-slot loads ``[L, ep, slots]`` of per-expert loads ``[L, E]`` under ``rs``'s
    placement (EPLB plans each row on its own loads)."""
    from .routing import rank_expert_loads

    if rs.placement == "eplb":
        return np.stack([rank_expert_loads(row, ep, rs) for row in loads])
    return rank_expert_loads(loads, ep, rs)


def _max_over_mean(x: np.ndarray) -> float:
    m = float(np.mean(x))
    return float(np.max(x)) / m if m > 0 else 1.0


def _max_over_mean_rows(x: np.ndarray) -> np.ndarray:
    """:func:`_max_over_mean` of each row of ``x`` ``[R, n]``."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    m = x.mean(axis=1)
    return np.where(m > 0, x.max(axis=1) / np.where(m > 0, m, 1.0), 1.0)


def moe_layer_ops(sc: Scenario, b: Batch, loads: np.ndarray) -> _MoeLayer:
    """Ops of one MoE layer for global per-expert ``loads`` ``[E]`` (see :func:`moe_layers`)."""
    return moe_layers(sc, b, np.asarray(loads)[None, :])[0]


#: OpCost fields that differ between MoE layers with different loads (the rest are the op's).
_VARYING = ("time_us", "launch_us", "fixed_us", "flops", "bytes", "ideal_compute_us",
            "ideal_memory_us", "bound", "kernels", "steps", "k_loop", "host_floor_us")


class _Column:
    """One op of every MoE layer priced together: the layers' OpCosts are ``template`` with the
    fields in ``varying`` (arrays over the layers) replaced; ``varying`` None: one op shared by
    every layer (the router, the shared experts, the all-reduce). ``present``: the layers that
    run the op (None: all)."""

    __slots__ = ("template", "varying", "present")

    def __init__(self, template: OpCost, varying: Optional[dict[str, np.ndarray]] = None,
                 present: Optional[np.ndarray] = None):
        self.template, self.varying, self.present = template, varying, present

    @staticmethod
    def stack(ops: list[OpCost]) -> "_Column":
        """The column of one op given per layer."""
        return _Column(ops[0], {f: np.array([getattr(o, f) for o in ops]) for f in _VARYING})

    def runs(self, layer: int) -> bool:
        return self.present is None or bool(self.present[layer])

    def op(self, layer: int) -> OpCost:
        """The op of one layer (one that runs it)."""
        if self.varying is None:
            return self.template
        return _with(self.template, **{f: v[layer].item() for f, v in self.varying.items()})

    def average(self, idx: list[int], kind: str) -> OpCost:
        """:func:`_average_layers` of this op over the layers ``idx`` (in layer order): the
        sums of its times, FLOPs and bytes over the layers running it over the count of all,
        the bound that accounts for most of the time, the other fields of the first layer's."""
        n = len(idx)
        if self.varying is None:
            o = self.template
            return _with(o, time_us=sum([o.time_us] * n) / n,
                           launch_us=sum([o.launch_us] * n) / n,
                           fixed_us=sum([o.fixed_us] * n) / n, flops=sum([o.flops] * n) / n,
                           bytes=sum([o.bytes] * n) / n, count=n, layer_kind=kind)
        v = self.varying
        if self.present is not None:
            idx = [i for i in idx if self.present[i]]
        times = v["time_us"][idx].tolist()
        bounds: dict[str, float] = {}
        for bd, t in zip(v["bound"][idx].tolist(), times):
            bounds[bd] = bounds.get(bd, 0.0) + t
        return _with(self.op(idx[0]), time_us=sum(times) / n,
                       launch_us=sum(v["launch_us"][idx].tolist()) / n,
                       fixed_us=sum(v["fixed_us"][idx].tolist()) / n,
                       flops=sum(v["flops"][idx].tolist()) / n,
                       bytes=sum(v["bytes"][idx].tolist()) / n,
                       bound=max(bounds, key=bounds.get), count=n, layer_kind=kind)


def _kind_ops(columns: list[_Column], idx: list[int], kind: str) -> list[OpCost]:
    """The MoE ops of the layers ``idx`` of one kind (rows of the priced loads, in layer order):
    with the same loads everywhere the layer's ops, else :func:`_average_layers` of them (by op,
    in the order the layers first run them; ``count * time`` is still their sum)."""
    n = len(idx)
    if all(i == idx[0] for i in idx):
        return [_with(c.op(idx[0]), count=n, layer_kind=kind) for c in columns if c.runs(idx[0])]
    order = [j for j, c in enumerate(columns) if c.runs(idx[0])]
    if len(order) < len(columns):  # some op is not run by the first layer
        seen = set(order)
        for i in idx[1:]:
            for j, c in enumerate(columns):
                if j not in seen and c.runs(i):
                    seen.add(j)
                    order.append(j)
    return [columns[j].average(idx, kind) for j in order]


@dataclass(frozen=True)
class _MoePriced:
    """MoE layers with loads ``[L, E]`` priced at once: their ops as columns (op order) and per
    layer the expert time of each EP rank, what the capacity cap did and the rank balance."""

    columns: list[_Column]
    rank_us: np.ndarray  # [L, ep]
    dropped: np.ndarray  # [L] shares of the token-slots
    rerouted: np.ndarray
    ratio: np.ndarray  # [L] max / mean token-slots per rank, after placement
    before: Optional[np.ndarray]  # [L] the same without EPLB (eplb only)

    def layer(self, l: int) -> _MoeLayer:
        return _MoeLayer([c.op(l) for c in self.columns if c.runs(l)], self.rank_us[l],
                         float(self.dropped[l]), float(self.rerouted[l]), float(self.ratio[l]),
                         None if self.before is None else float(self.before[l]))


def moe_layers(sc: Scenario, b: Batch, loads: np.ndarray) -> list[_MoeLayer]:
    """Ops of MoE layers, their per-rank expert times, what the capacity cap did and the rank
    balance, for global per-expert ``loads`` ``[L, E]`` (one row per layer); see
    :func:`_moe_priced`."""
    priced = _moe_priced(sc, b, loads)
    return [priced.layer(l) for l in range(len(priced.rank_us))]


def _moe_priced(sc: Scenario, b: Batch, loads: np.ndarray) -> _MoePriced:
    """MoE layers for global per-expert ``loads`` ``[L, E]`` (one row per layer), priced at once.

    ``loads`` are the token-slots routed to each expert by all tokens that meet in a layer:
    with attention_dp == 1 every rank holds the whole batch (TP-style MoE) and the tokens are
    those of the batch; with attention_dp > 1 the groups' tokens are dispatched to the experts.
    A capacity factor caps each expert first (``routing.apply_capacity``); ``second_pass`` runs
    the overflow as further rounds of the expert kernels. Every rank of every layer is priced
    at once (fused kernels over arrays); a layer's expert ops are those of its slowest rank,
    which is what the layer waits for, priced for all layers at once as well
    (``moe.fused_expert_kernels``; the grouped and naive strategies per layer).
    """
    from .routing import apply_capacity  # a peer layer, imported on use

    m, d, hw, rs = sc.model, sc.deployment, sc.hardware, sc.routing
    mo = m.moe
    assert mo is not None
    H = m.hidden_size
    dp = d.attention_dp
    t_group = b.tokens  # tokens in this attention-DP group
    t_global = t_group * dp
    inter_r = mo.expert_intermediate_size // d.moe_tp
    w4 = sc.framework.w4a16_moe_efficiency.value
    # the expert GEMMs' grid over all EP ranks' experts (costs.moe._skipped_block_waves), where
    # the engine's kernel has one (None: the local experts only)
    spans = bool(sc.framework.moe_grid_spans_all_experts.value) and d.ep > 1
    copies = int(sc.framework.moe_output_copies.value)
    loads = np.asarray(loads, dtype=np.int64)
    L = loads.shape[0]

    def placed(x: np.ndarray) -> np.ndarray:  # [L, E] -> [L, ep, slots]
        return _placed(x, d.ep, rs)

    capped = apply_capacity(loads, t_global, mo.top_k, rs.capacity_factor, rs.overflow)
    rounds = np.asarray(capped.rounds).reshape(L, -1, loads.shape[1])  # [L, passes, E]
    passes: list[tuple[int, np.ndarray, np.ndarray]] = []
    for p in range(rounds.shape[1]):
        if p and not rounds[:, p].any():
            continue
        per_rank = placed(rounds[:, p])  # [L, ep, slots]
        if dp == 1:
            tokens_in = np.full(per_rank.shape[:2], float(t_global))
        else:
            tokens_in = np.maximum(np.ceil(received_tokens(per_rank, t_global)), 1)
        passes.append((p, per_rank, tokens_in))
    rank_us = np.zeros((L, d.ep))
    for p, per_rank, tokens_in in passes:
        if d.strategy == "fused":
            rank_us += moe.fused_expert_us(per_rank, tokens_in, mo.top_k, H, inter_r, hw,
                                           d.experts_dtype, d.activation_dtype, m.gated_mlp,
                                           w4, per_rank.shape[-1] * d.ep if spans else None,
                                           copies)
        else:
            rank_us += [[sum(o.total_us for o in moe.expert_ops(
                per_rank[l, r], int(tokens_in[l, r]), mo.top_k, H, inter_r, hw, d.experts_dtype,
                d.activation_dtype, m.gated_mlp, d.strategy, w4)) for r in range(d.ep)]
                for l in range(L)]
    slowest = np.argmax(rank_us, axis=1)
    layer = np.arange(L)
    # Dispatch/combine: each token travels once to every rank holding one of its experts
    # (DeepEP de-duplicates per rank); the all-to-all waits for the rank receiving the most.
    processed = np.asarray(capped.processed).reshape(L, -1)
    # With one pass the processed loads are that pass's: reuse its placement.
    per_rank_all = passes[0][1] if len(passes) == 1 else placed(processed)
    a2a_tokens = received_tokens(per_rank_all, t_global).max(axis=1)

    def per_layer(make: Any, values: np.ndarray) -> _Column:
        """A column of scalar ops, one per distinct value (layers alike share it)."""
        memo: dict[float, OpCost] = {}
        ops = []
        for x in values.tolist():
            o = memo.get(x)
            if o is None:
                o = memo[x] = make(x)
            ops.append(o)
        return _Column.stack(ops)

    columns = [_Column(o) for o in moe.router(t_group, H, mo.num_experts, mo.top_k, hw,
                                                 mo.scoring, d.activation_dtype)]
    a2a_backend = deepep_backend(sc, b) if dp > 1 else None
    if a2a_backend is not None:
        # DeepEP (costs/deepep.py): the copies the busiest rank receives from the other ranks,
        # per (token, rank) for the normal kernels, per (token, expert) for the low-latency ones.
        a2a_copies = (per_rank_all.sum(axis=-1).max(axis=1)
                      if a2a_backend in deepep.PER_EXPERT_BACKENDS else a2a_tokens) \
            * (d.ep - 1) / d.ep
    if a2a_backend is not None:
        columns.append(per_layer(lambda c: deepep.deepep_op(
            "dispatch", a2a_backend, c, H, hw), a2a_copies))
    elif dp > 1:
        columns.append(per_layer(lambda a: comm.all_to_all(
            "dispatch", a * H * ELEMENT_BYTES[d.activation_dtype], d.ep, hw, sc.gpus_per_node),
            a2a_tokens))
    for p, per_rank, tokens_in in passes:
        suffix = f"_pass{p + 1}" if p else ""
        if d.strategy == "fused":
            for k in moe.fused_expert_kernels(per_rank[layer, slowest],
                                              tokens_in[layer, slowest], mo.top_k, H, inter_r,
                                              hw, d.experts_dtype, d.activation_dtype,
                                              m.gated_mlp, w4,
                                              per_rank.shape[-1] * d.ep if spans else None,
                                              copies):
                template = OpCost(k["name"] + suffix, "moe", 0.0, 0.0, 0.0, "memory",
                                  family=k["family"], host_floor_us=k["host_floor_us"])
                zero = np.zeros(L)
                runs = k["kernels"] > 0
                columns.append(_Column(template, {
                    "time_us": k["time_us"], "launch_us": zero, "fixed_us": k["fixed_us"],
                    "flops": k["flops"], "bytes": k["bytes"],
                    "ideal_compute_us": k["ideal_compute_us"],
                    "ideal_memory_us": k["ideal_memory_us"],
                    "bound": np.array(moe.BOUNDS)[k["bound"]],
                    "kernels": k["kernels"], "steps": k["steps"], "k_loop": k["k_loop"],
                    "host_floor_us": np.full(L, k["host_floor_us"])},
                    None if runs.all() else runs))
        else:
            lists = [moe.expert_ops(per_rank[l, slowest[l]], int(tokens_in[l, slowest[l]]),
                                    mo.top_k, H, inter_r, hw, d.experts_dtype,
                                    d.activation_dtype, m.gated_mlp, d.strategy, w4)
                     for l in range(L)]
            for j in range(len(lists[0])):
                col = _Column.stack([ops[j] for ops in lists])
                if p:
                    col.template = replace(col.template, name=col.template.name + suffix)
                columns.append(col)
    if mo.num_shared_experts:
        columns += [_Column(o) for o in _dense_mlp_ops(
            sc, b, mo.num_shared_experts * mo.shared_expert_intermediate_size, "shared_expert")]
    if a2a_backend is not None:
        columns.append(per_layer(lambda c: deepep.deepep_op(
            "combine", a2a_backend, c, H, hw), a2a_copies))
    elif dp > 1:
        columns.append(per_layer(lambda a: comm.all_to_all(
            "combine", a * H * 2.0, d.ep, hw, sc.gpus_per_node), a2a_tokens))
    else:
        all_reduce = _tp_all_reduce(sc, b, "moe_all_reduce")
        if all_reduce is not None:
            columns.append(_Column(all_reduce))
    slots = max(1, t_global * mo.top_k)
    dropped = np.asarray(capped.dropped, dtype=float).reshape(L) / slots
    rerouted = np.asarray(capped.rerouted, dtype=float).reshape(L) / slots
    ratio = _max_over_mean_rows(per_rank_all.sum(axis=2))
    before = None
    if rs.placement == "eplb" and mo.num_experts % d.ep == 0:
        before = _max_over_mean_rows(processed.reshape(L, d.ep, -1).sum(axis=2))
    return _MoePriced(columns, rank_us, dropped, rerouted, ratio, before)


def _head_ops(sc: Scenario, b: Batch) -> list[OpCost]:
    """Embedding lookup, final norm, LM head on the last token of each sequence, sampling."""
    m, d, hw = sc.model, sc.deployment, sc.hardware
    T, H, V = b.tokens, m.hidden_size, m.vocab_size
    # Speculative verification samples every position of a sequence's drafted tokens.
    n = b.sequences + b.num_seqs * (b.new_tokens - 1) * (b.phase == "decode")
    ops = [memory_op("embedding", T * H * 2.0 * 2, hw),
           memory_op("final_norm", n * H * 2.0 * 2, hw),
           gemm("lm_head", n, V // d.tp, H, hw, "bf16", "bf16", "fp32")]
    if d.tp > 1:
        ops.append(comm.all_to_all("logits_gather", n * V * 4.0, d.tp, hw, sc.gpus_per_node))
    ops.append(memory_op("sampling", n * V * 4.0 * 3, hw, kernels=4))
    return ops


def _layer_kind(att: str, mlp: str) -> str:
    return f"{att}_attention+{mlp}"


def build_step(sc: Scenario, b: Batch, moe_loads: Optional[np.ndarray] = None,
               host_overlap: bool = True) -> Step:
    """Ops of one step. ``moe_loads``: ``[num_moe_layers, num_experts]`` routed token-slots per
    expert for all tokens meeting in each MoE layer (``None``: balanced routing).
    ``host_overlap=False`` leaves each eager op's launch stall as if it ran alone (the DES
    applies ``overlap_host`` to the step it assembles)."""
    m, d, hw = sc.model, sc.deployment, sc.hardware
    counts: dict[tuple[str, str], int] = {}
    for att, mlp in zip(m.layer_attention, m.layer_mlp):
        counts[(att, mlp)] = counts.get((att, mlp), 0) + 1

    moe_per_kind: dict[str, list[OpCost]] = {}
    stats: dict[str, MoeLayerStats] = {}
    if m.moe is not None:
        from .routing import balanced_loads

        t_global = b.tokens * d.attention_dp
        if moe_loads is None:
            moe_loads = np.broadcast_to(balanced_loads(t_global, m.moe.num_experts, m.moe.top_k),
                                        (m.num_moe_layers, m.moe.num_experts))
        rows = np.asarray(moe_loads)
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        inverse = np.ravel(inverse)
        priced = _moe_priced(sc, b, uniq)
        idx_of: dict[str, list[int]] = {}  # each kind's layers, as rows of uniq
        moe_idx = 0
        for att, mlp in zip(m.layer_attention, m.layer_mlp):
            if mlp != "moe":
                continue
            idx_of.setdefault(_layer_kind(att, mlp), []).append(int(inverse[moe_idx]))
            moe_idx += 1
        for kind, idx in idx_of.items():
            moe_per_kind[kind] = _kind_ops(priced.columns, idx, kind)
        max_tok = rows.max(axis=1)
        distinct = np.count_nonzero(rows, axis=1)
        mean_tok = t_global * m.moe.top_k / m.moe.num_experts
        mom = _max_over_mean_rows(priced.rank_us)
        stats["moe"] = MoeLayerStats(
            float(mean_tok), float(np.mean(max_tok)), float(np.mean(mom[inverse])),
            float(np.mean(distinct)), float(np.mean(priced.dropped[inverse])),
            float(np.mean(priced.rerouted[inverse])), float(np.mean(priced.ratio[inverse])),
            None if priced.before is None else float(np.mean(priced.before[inverse])))

    ops: list[OpCost] = []
    for (att, mlp), n in counts.items():
        kind = _layer_kind(att, mlp)
        layer = _attention_ops(sc, b, att) + [_norm_ops(sc, b)]
        ar = _tp_all_reduce(sc, b, "attn_all_reduce")
        if ar is not None:
            layer.append(ar)
        if mlp == "dense":
            layer += _dense_mlp_ops(sc, b, m.dense_intermediate_size)
            ar = _tp_all_reduce(sc, b, "mlp_all_reduce")
            if ar is not None:
                layer.append(ar)
            ops += [_with(o, count=n, layer_kind=kind) for o in layer]
        else:
            ops += [_with(o, count=n, layer_kind=kind) for o in layer]
            ops += moe_per_kind[kind]
    ops += [_with(o, count=1, layer_kind="head") for o in _head_ops(sc, b)]
    if d.pp > 1:
        send = comm.all_to_all("pp_send", b.tokens * m.hidden_size * 2.0 * 2, 2, hw,
                               sc.gpus_per_node)
        ops.append(_with(send, count=d.pp - 1, layer_kind="pipeline"))
    ops = [with_launch(sc, b, o) for o in ops]
    if host_overlap:
        ops = overlap_host(ops)
    step_us = sc.framework.step_overhead_us.value
    if step_us:
        ops.append(OpCost("engine_step", "overhead", step_us, 0.0, 0.0, "launch", 0,
                          layer_kind="engine"))
    return Step(b.phase, b, ops, stats)


def overlap_host(ops: list[OpCost]) -> list[OpCost]:
    """The step's eager launch stalls, with the host running ahead of the GPU.

    ``with_launch`` prices each eager op alone: the GPU idles ``launch_us`` while the host
    dispatches a kernel (``host_us``) longer than it runs. In a forward pass nothing waits for
    the host between kernels (no synchronisation), so the host queues the next kernels while a
    long one runs (an expert GEMM, an attention kernel) and the step lasts
    ``max(GPU time, host time)``: the stalls add up to ``max(0, H - G)`` over the step
    (H: host dispatch time of the eager ops, G: GPU time of all ops). Each stall is scaled by
    the same factor; in a host-bound step (H > G) the stalled ops are launch-bound, otherwise
    they keep the bound of their GPU time (``with_launch``)."""
    stall = host = gpu = 0.0
    for o in ops:
        if o.host_us > 0.0:
            stall += o.count * o.launch_us
            host += o.count * o.host_us
            gpu += o.count * o.time_us
        else:
            gpu += o.count * (o.time_us + o.launch_us)
    if stall <= 0.0:
        return ops
    f = stall_scale(stall, host, gpu)
    return [_with(o, launch_us=o.launch_us * f, bound="launch" if f > 0.0 else o.bound)
            if o.host_us > 0.0 and o.launch_us > 0.0 else o for o in ops]


def stall_scale(stall_us: float, host_us: float, gpu_us: float) -> float:
    """The factor on a step's eager launch stalls (sum ``stall_us`` > 0) when the host runs
    ahead: the step lasts ``max(gpu_us, host_us)``, so the stalls shrink to
    ``max(0, host_us - gpu_us)`` (``gpu_us``: the step's GPU time without them)."""
    return max(0.0, host_us - gpu_us) / stall_us


def _average_layers(layers: list[list[OpCost]], kind: str) -> list[OpCost]:
    """Merge the op lists of several MoE layers (different loads, possibly different numbers of
    overflow passes) into one list, by op name, whose ``count * time`` sums equal the layers'
    total; an op a layer lacks counts as zero time for that layer.

    The definition of the per-kind entries: :func:`build_step` computes them from the layers'
    op columns without building a list per layer (:func:`_kind_ops`, ``_Column.average``);
    ``tests/test_sweep.py`` holds the two equal."""
    n = len(layers)
    if all(l is layers[0] for l in layers):
        return [_with(o, count=n, layer_kind=kind) for o in layers[0]]
    by_name: dict[str, list[OpCost]] = {}
    for layer in layers:
        for o in layer:
            by_name.setdefault(o.name, []).append(o)
    out = []
    for items in by_name.values():
        bounds: dict[str, float] = {}
        for o in items:
            bounds[o.bound] = bounds.get(o.bound, 0.0) + o.time_us
        out.append(replace(items[0], time_us=sum(o.time_us for o in items) / n,
                           launch_us=sum(o.launch_us for o in items) / n,
                           fixed_us=sum(o.fixed_us for o in items) / n,
                           flops=sum(o.flops for o in items) / n,
                           bytes=sum(o.bytes for o in items) / n,
                           bound=max(bounds, key=bounds.get), count=n, layer_kind=kind))
    return out


def graphs_cover(sc: Scenario, b: Batch, op: OpCost) -> bool:
    """Whether ``op`` replays from a CUDA graph in this step.

    Engines capture graphs per token count up to ``cuda_graph_max_batch``: a decode-only step
    replays whole; with ``piecewise_cuda_graphs`` (vLLM V1's FULL_AND_PIECEWISE) any other step
    replays everything but its attention kernels, which run eagerly between graph pieces."""
    fw = sc.framework
    if not sc.cuda_graphs or b.tokens > fw.cuda_graph_max_batch.value:
        return False
    if b.phase == "decode" and b.prefill is None:
        return True
    return bool(fw.piecewise_cuda_graphs.value) and not op.family.startswith("attention")


def with_launch(sc: Scenario, b: Batch, op: OpCost) -> OpCost:
    """Add launch cost: inside a CUDA graph each kernel costs ``graph_kernel_us``; eager, the
    op records its host dispatch time (``host_us``) and, as ``launch_us``, how long the GPU
    would idle if the host dispatched it with nothing queued (``overlap_host`` then prices
    the step's stalls as a whole)."""
    if op.kernels == 0:
        return op
    ov = sc.hardware.overheads
    graph_fixed = op.kernels * ov.graph_kernel_us.value
    covered = graphs_cover(sc, b, op)
    if op.fixed_us > graph_fixed:
        # The per-kernel fixed time fitted from eager kernel tables (t0) is mostly the host
        # dispatching the call; on the GPU a kernel's fixed cost is the gap a graph replay
        # shows. Inside a graph that is all; eager, the host's dispatch overlaps the GPU's
        # previous work and stalls the GPU only where it takes longer than the kernel runs.
        t = op.time_us - op.fixed_us + graph_fixed
        host = 0.0 if covered else max(op.kernels * ov.kernel_launch_host_us.value, op.fixed_us)
        launch = max(0.0, host - t)
        bound = op.bound
        if bound == "launch" and t > 2 * graph_fixed:
            bound = "compute" if op.ideal_compute_us >= op.ideal_memory_us else "memory"
        # eager: the bound stays that of the GPU time; overlap_host decides whether the
        # host's dispatch (``host_us``) shows
        return _with(op, time_us=t, fixed_us=graph_fixed, launch_us=launch, bound=bound,
                     host_us=host)
    if not covered:
        # The host floors fitted from kernel tables (``op.host_floor_us``) belong to the
        # benchmark harness's Python call path (DeepGEMM's JIT dispatch: 85-100 us even for
        # tiny GEMMs); inside an engine's forward pass a kernel costs the host one launch.
        host = op.kernels * ov.kernel_launch_host_us.value
        return _with(op, launch_us=max(0.0, host - op.time_us), host_us=host)
    launch = graph_fixed - op.fixed_us
    return _with(op, launch_us=launch, bound="launch" if launch > op.time_us else op.bound)
