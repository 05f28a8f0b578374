"""The closed-form driver: TTFT, TPOT, throughput and memory of one scenario.

Model of a closed loop with ``batch_size`` requests in flight (the measured benchmarks' setup).
Prompts are prefilled in chunks of ``max_num_batched_tokens`` tokens per attention-DP group.

- TTFT (steady state): requests of one prefill chunk finish together, so in a running closed loop
  their replacements arrive together too: a request waits on average half a decode step, then
  its group's prefill chunk (or, for a prompt longer than a chunk, its chain of chunks) runs.
  ``ttft_ms_first_wave`` is the other extreme, all ``batch_size`` prompts arriving at once (the
  start of a benchmark): the mean over requests of the end of the chunk holding their last token.
- TPOT: one decode step at the mean context length ``input_len + output_len / 2``.
- Throughput: a full cycle (all prefills, then ``output_len - 1`` decode steps) for
  ``batch_size`` requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .memory import MemoryBreakdown, memory_per_gpu
from .routing import sample_loads
from .spec.scenario import Scenario
from .step import Batch, Step, build_step


Chunk = tuple[Batch, int]  # a prefill step and how many requests finish with it


def prefill_plan(sc: Scenario) -> list[tuple[list[Chunk], int]]:
    """The prefill steps of one attention-DP group, in order, as (chunk sequence, repeats).

    Short prompts are packed whole into chunks of ``max_num_batched_tokens``; a prompt longer
    than that is split into consecutive chunks of one request each (chunked prefill)."""
    wl, d = sc.workload, sc.deployment
    seqs = math.ceil(wl.batch_size / d.attention_dp)
    isl, budget = wl.input_len, sc.max_num_batched_tokens
    if isl <= budget:
        per_chunk = min(seqs, budget // isl)
        full, rest = divmod(seqs, per_chunk)
        plan = [([(Batch("prefill", per_chunk, isl, 0.0), per_chunk)], full)]
        if rest:
            plan.append(([(Batch("prefill", rest, isl, 0.0), rest)], 1))
        return plan
    n_full, last = divmod(isl, budget)
    chunks = [(Batch("prefill", 1, budget, float(j * budget)), 0) for j in range(n_full)]
    if last:
        chunks.append((Batch("prefill", 1, last, float(n_full * budget)), 0))
    chunks[-1] = (chunks[-1][0], 1)
    return [(chunks, seqs)]


@dataclass(frozen=True)
class Prediction:
    scenario: Scenario
    ttft_ms: float
    ttft_ms_first_wave: float
    tpot_ms: float
    throughput_output_tok_per_s: float
    memory: MemoryBreakdown
    prefill_step: Step
    decode_step: Step
    prefill_total_ms: float
    samples: int
    ttft_ms_p50: float
    ttft_ms_p95: float
    tpot_ms_p50: float
    tpot_ms_p95: float
    warnings: list[str] = field(default_factory=list)

    @property
    def throughput_output_tok_per_s_per_gpu(self) -> float:
        return self.throughput_output_tok_per_s / self.scenario.num_gpus


def _steps(sc: Scenario):
    """The prefill steps of one attention-DP group in order, as (batch, requests finishing)."""
    for chunks, repeat in prefill_plan(sc):
        for _ in range(repeat):
            yield from chunks


def predict(sc: Scenario) -> Prediction:
    """Predict one scenario. Deterministic: routing draws use ``routing.seed``.

    With stochastic routing every step of the timeline gets ``routing.samples`` independent
    draws (one timeline per draw, drawn step by step so memory stays one step's worth); TTFT and
    TPOT are averaged over the draws and their p50 / p95 reported."""
    rs, m, wl = sc.routing, sc.model, sc.workload
    stochastic = m.moe is not None and rs.distribution != "balanced"
    n = rs.samples if stochastic else 1
    rng = np.random.default_rng(rs.seed) if stochastic else None
    memo: dict[Batch, Step] = {}  # balanced routing: identical chunks cost the same

    def priced(batch: Batch) -> list[Step]:
        if rng is None:
            if batch not in memo:
                memo[batch] = build_step(sc, batch)
            return [memo[batch]]
        assert m.moe is not None
        loads = sample_loads(rs, batch.tokens * sc.deployment.attention_dp, m.moe.num_experts,
                             m.moe.top_k, m.num_moe_layers, rng, num_samples=n)
        return [build_step(sc, batch, loads[i]) for i in range(n)]

    clock_us = np.zeros(n)
    ttft_sum_us = np.zeros(n)
    group_us: Optional[np.ndarray] = None  # prefill of the first group of requests to finish
    finished = 0
    biggest: Optional[Step] = None
    for batch, done in _steps(sc):
        steps = priced(batch)
        clock_us += [st.time_us for st in steps]
        ttft_sum_us += done * clock_us
        finished += done
        if done and group_us is None:
            group_us = clock_us.copy()
        if biggest is None or batch.tokens > biggest.batch.tokens:
            biggest = steps[0]
    assert biggest is not None and finished > 0
    seqs = math.ceil(wl.batch_size / sc.deployment.attention_dp)
    dsteps = priced(Batch("decode", seqs, 1, wl.input_len + wl.output_len / 2.0))
    assert group_us is not None
    tpots = np.array([st.time_us for st in dsteps]) / 1e3
    ttfts = group_us / 1e3 + 0.5 * tpots
    first_wave = float((ttft_sum_us / finished / 1e3).mean())
    prefill_ms = float(clock_us.mean() / 1e3)
    ttft, tpot = float(ttfts.mean()), float(tpots.mean())
    cycle_ms = prefill_ms + (wl.output_len - 1) * tpot
    throughput = wl.batch_size * wl.output_len / (cycle_ms / 1e3)
    mem = memory_per_gpu(sc)
    return Prediction(
        scenario=sc, ttft_ms=ttft, ttft_ms_first_wave=first_wave, tpot_ms=tpot,
        throughput_output_tok_per_s=throughput,
        memory=mem, prefill_step=biggest, decode_step=dsteps[0], prefill_total_ms=prefill_ms,
        samples=n, ttft_ms_p50=float(np.percentile(ttfts, 50)),
        ttft_ms_p95=float(np.percentile(ttfts, 95)), tpot_ms_p50=float(np.percentile(tpots, 50)),
        tpot_ms_p95=float(np.percentile(tpots, 95)), warnings=_warnings(sc, mem))


def _warnings(sc: Scenario, mem: MemoryBreakdown) -> list[str]:
    out = []
    d = sc.deployment
    if not mem.fits:
        over = (mem.total - mem.capacity) / 1e9
        out.append(f"does not fit: needs {mem.total / 1e9:.1f} GB per GPU, {over:.1f} GB more "
                   f"than the {mem.capacity / 1e9:.1f} GB of {sc.hardware.id}; largest batch "
                   f"that fits: {mem.max_batch_size}")
    if d.tp > sc.gpus_per_node:
        out.append(f"tp={d.tp} spans nodes ({sc.gpus_per_node} GPUs per node): every layer's "
                   "all-reduce crosses the scale-out network")
    seqs = math.ceil(sc.workload.batch_size / d.attention_dp)
    if sc.cuda_graphs and seqs > sc.framework.cuda_graph_max_batch.value:
        out.append(f"decode batch {seqs} exceeds {sc.framework.id}'s CUDA-graph capture limit "
                   f"({int(sc.framework.cuda_graph_max_batch.value)}): decode runs eagerly")
    return out
