"""Synthetic routing for the MoE microbenchmarks (numpy only, no torch).

Implements the two ``distribution`` labels of the reference ``moe.csv`` exactly as
``../shared/reference/README.md`` ("What moe.csv measures, exactly") defines them:

* ``balanced``: every expert receives ``num_tokens * topk / num_experts`` token slots, rounded up or
  down (the remainder is spread over the EP groups, group 0 first).
* ``power_law_A``: one bounded-Pareto draw per expert,
  ``x = ((xmax^(1-A) - xmin^(1-A)) u + xmin^(1-A))^(1/(1-A))``, u ~ U[0,1), with xmin = 1,
  xmax = 0.8 * num_tokens when ``num_tokens * topk > num_experts``, else xmin = 0.01, xmax = 2;
  the draws are scaled to sum to ``num_tokens * topk``, rounded (the rounding residual is added to
  the largest / taken from the smallest non-empty experts, one slot each, so the total is exact),
  capped at ``num_tokens`` per expert with the overflow moved one slot at a time to the
  least-loaded expert; with ``moe_ep > 1`` the EP group (``num_experts / moe_ep`` consecutive
  experts) with the highest total is swapped into group 0, the group that is measured.

Tokens are then assigned so that every token has ``topk`` distinct experts and the per-expert counts
match exactly: the expert ids, each repeated ``count`` times in descending-count order, are laid out
column by column into a ``[topk, num_tokens]`` grid; since no count exceeds ``num_tokens``, no
expert appears twice in a token's column.
"""
from __future__ import annotations

import re

import numpy as np

_POWER_LAW = re.compile(r"^power_law_(\d+(?:\.\d+)?)$")


def parse_distribution(distribution: str) -> tuple[str, float | None]:
    """``"balanced"`` -> ("balanced", None); ``"power_law_1.2"`` -> ("power_law", 1.2)."""
    if distribution == "balanced":
        return "balanced", None
    m = _POWER_LAW.match(distribution)
    if m:
        alpha = float(m.group(1))
        if alpha <= 0 or alpha == 1.0:
            raise ValueError(f"power-law exponent must be > 0 and != 1, got {alpha}")
        return "power_law", alpha
    raise ValueError(f"unknown distribution {distribution!r} (balanced, power_law_<A>)")


def bounded_pareto(n: int, alpha: float, xmin: float, xmax: float, rng: np.random.Generator):
    u = rng.random(n)
    a = 1.0 - alpha
    return ((xmax ** a - xmin ** a) * u + xmin ** a) ** (1.0 / a)


def _balanced_expert(slot: np.ndarray, num_experts: int, moe_ep: int) -> np.ndarray:
    """Slot j -> expert: j mod E, transposed on the (ep x E/ep) grid so consecutive slots visit
    different EP groups (a bijection of [0, E), so ``topk <= E`` consecutive slots are distinct)."""
    j = slot % num_experts
    per_group = num_experts // moe_ep
    return (j % moe_ep) * per_group + j // moe_ep


def expert_counts(num_tokens: int, num_experts: int, topk: int, distribution: str, *,
                  moe_ep: int = 1, rng: np.random.Generator | None = None) -> np.ndarray:
    """Token slots per (global) expert; with ``moe_ep > 1`` group 0 is the busiest EP group."""
    _check(num_tokens, num_experts, topk, moe_ep)
    kind, alpha = parse_distribution(distribution)
    total = num_tokens * topk
    if kind == "balanced":
        experts = _balanced_expert(np.arange(total), num_experts, moe_ep)
        return np.bincount(experts, minlength=num_experts).astype(np.int64)

    rng = rng if rng is not None else np.random.default_rng(0)
    if total > num_experts:
        xmin, xmax = 1.0, 0.8 * num_tokens
    else:
        xmin, xmax = 0.01, 2.0
    x = bounded_pareto(num_experts, alpha, xmin, xmax, rng)
    counts = np.round(x / x.sum() * total).astype(np.int64)
    delta = int(total - counts.sum())
    if delta > 0:  # add to the largest experts first
        order = np.argsort(-counts, kind="stable")
        i = 0
        while delta > 0:
            e = order[i % num_experts]
            if counts[e] < num_tokens:
                counts[e] += 1
                delta -= 1
            i += 1
    elif delta < 0:  # take from the smallest non-empty experts first
        order = np.argsort(counts, kind="stable")
        i = 0
        while delta < 0:
            e = order[i % num_experts]
            if counts[e] > 0:
                counts[e] -= 1
                delta += 1
            i += 1
    # cap at num_tokens per expert; overflow goes to the least-loaded experts
    overflow = int(np.clip(counts - num_tokens, 0, None).sum())
    counts = np.minimum(counts, num_tokens)
    while overflow > 0:
        e = int(np.argmin(counts))
        counts[e] += 1
        overflow -= 1
    assert counts.sum() == total and counts.max() <= num_tokens
    if moe_ep > 1:
        groups = counts.reshape(moe_ep, num_experts // moe_ep)
        busiest = int(np.argmax(groups.sum(axis=1)))
        if busiest != 0:
            groups[[0, busiest]] = groups[[busiest, 0]]
        counts = groups.reshape(-1)
    return counts


def assign_tokens(counts: np.ndarray, num_tokens: int, topk: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """``[num_tokens, topk]`` int64 expert ids: distinct per token, per-expert counts = ``counts``.
    Token rows are shuffled when ``rng`` is given."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != num_tokens * topk or counts.max(initial=0) > num_tokens or counts.min() < 0:
        raise ValueError("counts must be >= 0, <= num_tokens each and sum to num_tokens * topk")
    order = np.argsort(-counts, kind="stable")
    seq = np.repeat(order, counts[order])
    ids = seq.reshape(topk, num_tokens).T.copy()
    if rng is not None:
        ids = ids[rng.permutation(num_tokens)]
    return ids


def make_routing(num_tokens: int, num_experts: int, topk: int, distribution: str, *,
                 moe_ep: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topk_ids ``[T, k]`` int64, topk_weights ``[T, k]`` float32 summing to 1 per token,
    per-expert counts ``[E]``). ``balanced`` ids follow the slot pattern directly (token t gets
    the experts of slots t*k .. t*k+k-1); ``power_law_*`` ids come from :func:`assign_tokens`."""
    rng = np.random.default_rng(seed)
    kind, _ = parse_distribution(distribution)
    if kind == "balanced":
        _check(num_tokens, num_experts, topk, moe_ep)
        ids = _balanced_expert(np.arange(num_tokens * topk), num_experts, moe_ep)
        ids = ids.reshape(num_tokens, topk).astype(np.int64)
        counts = np.bincount(ids.reshape(-1), minlength=num_experts).astype(np.int64)
    else:
        counts = expert_counts(num_tokens, num_experts, topk, distribution, moe_ep=moe_ep, rng=rng)
        ids = assign_tokens(counts, num_tokens, topk, rng)
    logits = rng.standard_normal((num_tokens, topk))
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    return ids, w, counts


def _check(num_tokens: int, num_experts: int, topk: int, moe_ep: int) -> None:
    if num_tokens < 1 or num_experts < 1 or not 1 <= topk <= num_experts:
        raise ValueError(f"need num_tokens >= 1 and 1 <= topk <= num_experts, got "
                         f"T={num_tokens}, E={num_experts}, k={topk}")
    if moe_ep < 1 or num_experts % moe_ep:
        raise ValueError(f"moe_ep={moe_ep} must divide num_experts={num_experts}")
