"""Torch reference implementations of a MoE layer's expert path (CPU and GPU).

The expert path starts from the router's output (``topk_ids [T, k]``, ``topk_weights [T, k]``) and
ends with the combined output ``[T, H]``: token sort/alignment, gate-up GEMM, SiLU-and-mul, down
GEMM, top-k weighted sum — the sequence one row of ``moe.csv`` times. Weights as in vLLM:
``w1 [E_local, 2*I, H]`` (gate rows first, then up rows) and ``w2 [E_local, H, I]``.

Expert ids ``>= E_local`` are experts held by other EP ranks: their token slots are skipped and
contribute zero (the ``moe_ep > 1`` emulation of the reference README: all tokens in, local
experts only).

Implementations (``IMPLS``):

* ``torch_loop``: one host sync for the per-expert counts, then ``F.linear`` per non-empty expert.
* ``torch_bmm_padded``: one host sync for the largest expert load C, tokens scattered into
  ``[E_local, C, H]`` (zero padded), two ``torch.bmm``; wastes ``E_local * C - slots`` rows.
* ``torch_grouped_mm``: ``torch._grouped_mm`` on the expert-sorted rows with int32 ``offs``; no host
  sync (CUTLASS fast path on SM90/SM100 bf16; elsewhere torch's per-group fallback, which syncs).
  Needs 16-byte aligned strides: H and I multiples of 8 in bf16 (4 in fp32).

:class:`MoELayer` adds the router (``F.linear`` -> softmax in fp32 -> top-k -> renormalise) in
front; :func:`measure_moe_layer` / :func:`time_moe_layer` time one forward of such a layer of any
shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMPLS = ("torch_loop", "torch_bmm_padded", "torch_grouped_mm")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I] -> [..., I]``: ``silu(gate) * up`` with gate = first half (vLLM convention)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def weighted_sum(slot_out: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """``[T*k, H]`` per-slot expert outputs, ``[T, k]`` weights -> ``[T, H]`` (moe_sum)."""
    t, k = topk_weights.shape
    w = topk_weights.to(slot_out.dtype).unsqueeze(-1)
    return (slot_out.view(t, k, -1) * w).sum(dim=1)


def _counts(key: torch.Tensor, n: int) -> torch.Tensor:
    """Histogram of ``key`` (values in [0, n)) without a host sync (bincount syncs on CUDA)."""
    return torch.zeros(n, dtype=torch.int64, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))


def experts_loop(hidden, topk_ids, topk_weights, w1, w2):
    t, k = topk_ids.shape
    e_local = w1.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = _counts(flat.clamp(max=e_local), e_local + 1)[:e_local].tolist()  # host sync
    n_local = sum(counts)
    order_l = order[:n_local]
    x = hidden.index_select(0, order_l // k)
    y = torch.empty(n_local, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = F.linear(x[start:start + n], w1[e])
            y[start:start + n] = F.linear(silu_and_mul(h), w2[e])
            start += n
    alloc = torch.empty if n_local == t * k else torch.zeros  # remote slots contribute zero
    out = alloc(t * k, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    out.index_copy_(0, order_l, y)
    return weighted_sum(out, topk_weights)


def experts_bmm_padded(hidden, topk_ids, topk_weights, w1, w2):
    t, k = topk_ids.shape
    e_local = w1.shape[0]
    hdim = hidden.shape[1]
    flat = topk_ids.reshape(-1)
    key = flat.clamp(max=e_local)
    order = torch.argsort(key, stable=True)
    counts = _counts(key, e_local + 1)
    host = counts[:e_local].tolist()  # host sync: capacity and local slot count
    cap, n_local = max(host), sum(host)
    out = torch.zeros(t * k, hdim, dtype=hidden.dtype, device=hidden.device)
    if cap == 0:
        return weighted_sum(out, topk_weights)
    order_l = order[:n_local]
    expert = key.index_select(0, order_l)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_local, device=hidden.device) - starts.index_select(0, expert)
    dest = expert * cap + rank
    x_pad = torch.zeros(e_local * cap, hdim, dtype=hidden.dtype, device=hidden.device)
    x_pad.index_copy_(0, dest, hidden.index_select(0, order_l // k))
    h = torch.bmm(x_pad.view(e_local, cap, hdim), w1.transpose(1, 2))
    y = torch.bmm(silu_and_mul(h), w2.transpose(1, 2)).view(e_local * cap, hdim)
    out.index_copy_(0, order_l, y.index_select(0, dest))
    return weighted_sum(out, topk_weights)


def experts_grouped_mm(hidden, topk_ids, topk_weights, w1, w2, *, all_local: bool | None = None):
    """``all_local``: every id is < E_local (``moe_ep == 1``); None = unknown (masks the output)."""
    t, k = topk_ids.shape
    e_local = w1.shape[0]
    flat = topk_ids.reshape(-1)
    key = flat if all_local else flat.clamp(max=e_local)
    order = torch.argsort(key, stable=True)
    offs = torch.cumsum(_counts(key, e_local + 1)[:e_local], 0).to(torch.int32)
    x = hidden.index_select(0, order // k)
    h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(silu_and_mul(h), w2.transpose(1, 2), offs=offs)
    if not all_local:
        # rows past offs[-1] (remote experts) are not written by _grouped_mm: zero them
        y = torch.where((key.index_select(0, order) < e_local).unsqueeze(1), y, 0)
    out = torch.empty_like(y).index_copy_(0, order, y)
    return weighted_sum(out, topk_weights)


def moe_experts(hidden, topk_ids, topk_weights, w1, w2, impl: str = "torch_loop", **kw):
    """Run the expert path ``impl`` (one of ``IMPLS``, or ``triton_fused_moe`` on CUDA)."""
    if impl == "torch_loop":
        return experts_loop(hidden, topk_ids, topk_weights, w1, w2)
    if impl == "torch_bmm_padded":
        return experts_bmm_padded(hidden, topk_ids, topk_weights, w1, w2)
    if impl == "torch_grouped_mm":
        return experts_grouped_mm(hidden, topk_ids, topk_weights, w1, w2, **kw)
    if impl == "triton_fused_moe":
        from .triton_moe import fused_moe  # lazy: needs triton and a GPU (or TRITON_INTERPRET=1)
        return fused_moe(hidden, topk_ids, topk_weights, w1, w2, **kw)
    raise ValueError(f"unknown MoE implementation {impl!r}; known: {IMPLS + ('triton_fused_moe',)}")


def moe_reference(hidden, topk_ids, topk_weights, w1, w2):
    """Slow, obviously-correct per-token version in fp32 (for tests)."""
    e_local = w1.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e >= e_local:
                continue
            h = w1[e].float() @ hidden[t].float()
            y = w2[e].float() @ silu_and_mul(h)
            out[t] += float(topk_weights[t, j]) * y
    return out


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on CUDA; float32 on CPU (bf16 GEMMs are 5-70x slower than fp32 on AVX2 CPUs)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


class MoELayer(torch.nn.Module):
    """Router + top-k + expert path, random weights (std 0.02)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, topk: int,
                 impl: str = "torch_loop", dtype: torch.dtype | None = None,
                 device: str = "cpu", seed: int = 0):
        super().__init__()
        dtype = dtype or default_dtype(device)
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rand(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)

        self.topk, self.impl = topk, impl
        self.gate = rand(num_experts, hidden)
        self.w1 = rand(num_experts, 2 * inter, hidden)
        self.w2 = rand(num_experts, hidden, inter)

    def route(self, x: torch.Tensor):
        logits = F.linear(x, self.gate)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.topk, dim=-1)
        return ids, w / w.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, w = self.route(x)
        kw = {"all_local": True} if self.impl in ("torch_grouped_mm", "triton_fused_moe") else {}
        return moe_experts(x, ids, w, self.w1, self.w2, self.impl, **kw)


@dataclass(frozen=True)
class LayerTiming:
    """One timed :class:`MoELayer` forward: median and samples in µs, and the per-expert token
    counts ``[num_experts]`` its router produced for the timed input (what a cost model needs to
    price the expert path of exactly this call)."""

    median_us: float
    samples_us: tuple[float, ...]
    expert_loads: tuple[int, ...]


@torch.inference_mode()
def measure_moe_layer(num_tokens: int, hidden: int, inter: int, num_experts: int, topk: int,
                      impl: str = "torch_loop", dtype: torch.dtype | None = None,
                      device: str = "cpu", *, seed: int = 0, budget_s: float = 0.2,
                      min_samples: int = 3, max_samples: int = 50, warmup: int | None = None,
                      clock: str = "wall", cpu_flush_bytes: int = 0) -> LayerTiming:
    """Time one forward of a :class:`MoELayer` (router GEMM, softmax, top-k, expert path,
    combine) on ``num_tokens`` random tokens: median of the samples in µs. CPU:
    ``perf_counter_ns``, or the thread's CPU time with ``clock="thread"`` (one torch thread only,
    see ``timing``), caches evicted before each call with ``cpu_flush_bytes`` > 0; CUDA: events,
    256 MB L2 flush before each call."""
    from .timing import make_timer
    layer = MoELayer(hidden, inter, num_experts, topk, impl, dtype, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(num_tokens, hidden, generator=g).to(device=device, dtype=layer.w1.dtype)
    ids, _ = layer.route(x)  # deterministic: the same routing every timed call sees
    loads = torch.bincount(ids.reshape(-1).cpu(), minlength=num_experts).tolist()
    timer = make_timer("cuda" if str(device).startswith("cuda") else "cpu", clock,
                       cpu_flush_bytes)
    extra = {} if warmup is None else {"warmup": warmup}  # None: the timer's own warm-up
    samples = timer.measure(lambda: layer(x), flush=True, budget_s=budget_s,
                            min_samples=min_samples, max_samples=max_samples, **extra)
    return LayerTiming(timer.median(samples), tuple(float(v) for v in samples),
                       tuple(int(v) for v in loads))


def time_moe_layer(num_tokens: int, hidden: int, inter: int, num_experts: int, topk: int,
                   impl: str = "torch_loop", dtype: torch.dtype | None = None,
                   device: str = "cpu", *, seed: int = 0, budget_s: float = 0.2,
                   min_samples: int = 3, max_samples: int = 50, clock: str = "wall") -> float:
    """Median time in µs of one forward of a :class:`MoELayer` (see :func:`measure_moe_layer`)."""
    return measure_moe_layer(num_tokens, hidden, inter, num_experts, topk, impl, dtype, device,
                             seed=seed, budget_s=budget_s, min_samples=min_samples,
                             max_samples=max_samples, clock=clock).median_us
