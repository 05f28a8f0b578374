"""The closed-form driver: TTFT, TPOT, throughput and memory of one scenario.

Model of a closed loop with ``batch_size`` requests in flight (the measured benchmarks' setup),
in its steady state, per attention-DP group, counted in engine iterations:

- A request lives ``c`` prefill iterations (its prompt in chunks of the token budget left by the
  running decodes) and ``(output_len - 1) / g`` decode iterations (``g`` tokens per step:
  1, or the expected accepted tokens with speculative decoding). By Little's law
  ``r = seqs / (c + (output_len - 1) / g)`` new prompts enter per iteration.
- With ``r * c <= 1`` a share ``r * c`` of the iterations carries one chunk of a prompt next to
  the running decodes (mixed batching) or runs it in a step of its own before them (engines
  without mixed batching); the rest are decode-only. With ``r * c > 1`` every iteration carries
  prefill: ``r`` prompts' worth when they fit in the token budget, else the engine is
  prefill-limited and the closed loop's surplus requests queue.
- TPOT: the mean time of the iterations a decoding request sees, over ``g``.
- TTFT: the framework's ``request_overhead_us``, one iteration when the engine schedules ahead
  (``overlap_scheduler``; a closed loop's request arrives at an iteration boundary, as another
  finishes), any queueing, then the iterations carrying its own chunks.
- Throughput: ``r`` requests of ``output_len`` tokens per mean iteration, times the groups.

``ttft_ms_first_wave`` is the other extreme, the start of a benchmark: all ``batch_size``
prompts arrive at once and are prefilled in budget-sized chunks before decoding starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

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
    mixed_step: Optional[Step] = None  # a decode iteration carrying a prefill chunk
    mixed_fraction: float = 0.0  # share of the decode iterations that carry prefill
    queued_requests: float = 0.0  # closed-loop requests waiting for prefill (prefill-limited)
    warnings: list[str] = field(default_factory=list)

    @property
    def throughput_output_tok_per_s_per_gpu(self) -> float:
        return self.throughput_output_tok_per_s / self.scenario.num_gpus


@dataclass(frozen=True)
class SteadyState:
    """The closed loop's steady state on one attention-DP group (see the module docstring).

    ``mixes``: the prefill an iteration may carry, each with the share of decode iterations that
    carry it; ``ttft_mixes``: the ones a request's own prompt rides in, in order."""

    decode: Batch
    mixes: list[tuple[Batch, float]]
    ttft_mixes: list[Batch]
    prompts_per_iteration: float
    queue_iterations: float
    queued_requests: float


def steady_state(sc: Scenario) -> SteadyState:
    """Iteration mix of the closed loop; pure arithmetic on the workload and the token budget."""
    wl, d = sc.workload, sc.deployment
    seqs = math.ceil(wl.batch_size / d.attention_dp)
    isl, osl, budget = wl.input_len, wl.output_len, sc.max_num_batched_tokens
    spec = wl.speculative
    q = spec.num_draft_tokens + 1 if spec else 1
    g = spec.tokens_per_step if spec else 1.0
    decode_iters = max(osl - 1, 0) / g
    ctx = isl + osl / 2.0
    mixed = bool(sc.framework.mixed_batching.value)
    room = max(1, budget - seqs * q) if mixed else budget  # decodes take their share first
    c = math.ceil(isl / room)
    chunk = min(isl, room)
    chunks = [Batch("prefill", 1, min(chunk, isl - j * chunk), float(j * chunk))
              for j in range(c)]
    r = seqs / (c + decode_iters)
    queued = 0.0
    queue_iters = 0.0
    if c > 1 or r <= 1.0:
        # One prompt's chunk at a time (vLLM: max_num_partial_prefills = 1).
        share = min(1.0, r * c)
        mixes = [(ch, share / c) for ch in chunks]
        ttft = list(chunks)
        r_eff = min(r, 1.0 / c)
    else:
        fit = max(1, room // isl)  # whole prompts per iteration
        r_eff = min(r, float(fit))
        lo = max(1, math.floor(r_eff))
        hi = min(fit, math.ceil(r_eff))
        w_hi = r_eff - lo if hi > lo else 0.0
        mixes = [(Batch("prefill", lo, isl, 0.0), 1.0 - w_hi)]
        if w_hi:
            mixes.append((Batch("prefill", hi, isl, 0.0), w_hi))
        ttft = [mixes[-1][0] if w_hi >= 0.5 else mixes[0][0]]
    if r_eff < r:
        # Prefill-limited: prompts enter at r_eff per iteration; by Little's law the rest of the
        # closed loop's requests wait in the queue.
        running = r_eff * (c + decode_iters)
        queued = seqs - running
        queue_iters = queued / r_eff
        seqs_dec = max(1, round(running * decode_iters / (c + decode_iters)))
    else:
        seqs_dec = seqs
    return SteadyState(Batch("decode", seqs_dec, q, ctx), mixes, ttft, r_eff, queue_iters,
                       queued)


def _steps(sc: Scenario):
    """The prefill steps of one attention-DP group in order, as (batch, requests finishing)."""
    for chunks, repeat in prefill_plan(sc):
        for _ in range(repeat):
            yield from chunks


def predict(sc: Scenario) -> Prediction:
    """Predict one scenario. Deterministic: routing draws use ``routing.seed``.

    With stochastic routing every distinct step gets ``routing.samples`` independent draws (one
    timeline per draw); TTFT and TPOT are averaged over the draws and their p50 / p95
    reported."""
    rs, m, wl, fw = sc.routing, sc.model, sc.workload, sc.framework
    stochastic = m.moe is not None and rs.distribution != "balanced"
    n = rs.samples if stochastic else 1
    rng = np.random.default_rng(rs.seed) if stochastic else None
    # Identical steps cost the same: each distinct batch is priced once (with stochastic
    # routing: once per draw, the draws shared by its repeats; the mean is unchanged).
    memo: dict[Batch, list[Step]] = {}

    def priced(batch: Batch) -> list[Step]:
        if batch not in memo:
            if rng is None:
                memo[batch] = [build_step(sc, batch)]
            else:
                assert m.moe is not None
                loads = sample_loads(rs, batch.tokens * sc.deployment.attention_dp,
                                     m.moe.num_experts, m.moe.top_k, m.num_moe_layers, rng,
                                     num_samples=n)
                memo[batch] = [build_step(sc, batch, loads[i]) for i in range(n)]
        return memo[batch]

    def times(batch: Batch) -> np.ndarray:
        return np.array([st.time_us for st in priced(batch)])

    # Start of a benchmark: every prompt at once, prefilled chunk by chunk.
    clock_us = np.zeros(n)
    ttft_sum_us = np.zeros(n)
    finished = 0
    biggest: Optional[Step] = None
    for batch, done in _steps(sc):
        steps = priced(batch)
        clock_us += [st.time_us for st in steps]
        ttft_sum_us += done * clock_us
        finished += done
        if biggest is None or batch.tokens > biggest.batch.tokens:
            biggest = steps[0]
    assert biggest is not None and finished > 0

    ss = steady_state(sc)
    dsteps = priced(ss.decode)
    spec = wl.speculative
    draft = draft_us(sc, priced(replace(ss.decode, new_tokens=1))[0]) if spec else 0.0
    served = serving_times(sc, ss, times, draft)
    first_wave_ms = (ttft_sum_us / finished + fw.request_overhead_us.value) / 1e3
    prefill_ms = clock_us / 1e3
    ttfts, tpots = benchmark_means(sc, served, first_wave_ms, prefill_ms)
    first_wave = float(first_wave_ms.mean())
    prefill_ms = float(prefill_ms.mean())
    ttft, tpot = float(ttfts.mean()), float(tpots.mean())
    mem = memory_per_gpu(sc)
    mixed = bool(fw.mixed_batching.value)
    mixed_step = priced(replace(ss.decode, prefill=ss.mixes[0][0]))[0] if mixed else None
    return Prediction(
        scenario=sc, ttft_ms=ttft, ttft_ms_first_wave=first_wave, tpot_ms=tpot,
        throughput_output_tok_per_s=served.throughput_output_tok_per_s,
        memory=mem, prefill_step=biggest, decode_step=dsteps[0], prefill_total_ms=prefill_ms,
        samples=n, ttft_ms_p50=float(np.percentile(ttfts, 50)),
        ttft_ms_p95=float(np.percentile(ttfts, 95)), tpot_ms_p50=float(np.percentile(tpots, 50)),
        tpot_ms_p95=float(np.percentile(tpots, 95)), mixed_step=mixed_step,
        mixed_fraction=served.mixed_fraction, queued_requests=ss.queued_requests * sc.deployment.attention_dp,
        warnings=_warnings(sc, mem, ss))


@dataclass(frozen=True)
class ServingTimes:
    """What a closed loop's steady state gives, one entry per routing draw."""

    ttft_ms: np.ndarray
    tpot_ms: np.ndarray
    throughput_output_tok_per_s: float  # of the mean over draws
    mixed_fraction: float


def serving_times(sc: Scenario, ss: SteadyState, time_of: Callable[[Batch], np.ndarray],
                  draft: float = 0.0) -> ServingTimes:
    """TTFT, TPOT and throughput from the iteration mix ``ss`` and a step pricer ``time_of``
    (one step time in us per routing draw), as the module docstring derives them. Every driver
    that prices steps its own way (``predict``, the sweep's fast path) combines them here.
    ``draft``: GPU time to draft one decode iteration's tokens (:func:`draft_us`)."""
    wl, fw, d = sc.workload, sc.framework, ss.decode
    t_dec = time_of(d) + draft
    mixed = bool(fw.mixed_batching.value)
    carried: dict[Batch, tuple[np.ndarray, np.ndarray]] = {}  # ttft_mixes repeat mixes

    def carrying(p: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(time of the iteration carrying ``p`` as the decodes see it, as ``p``'s request
        sees it)"""
        c = carried.get(p)
        if c is None:
            if mixed:
                # Batch(...) is replace(d, prefill=p) without its generic field walk (the
                # sweep calls this for every point)
                t = time_of(Batch(d.phase, d.num_seqs, d.new_tokens, d.context, p)) + draft
                c = (t, t)
            else:
                alone = time_of(p)
                c = (t_dec + alone, alone)
            carried[p] = c
        return c

    share = sum(w for _, w in ss.mixes)
    mean_us = (1.0 - share) * t_dec
    for p, w in ss.mixes:
        mean_us = mean_us + w * carrying(p)[0]
    own_us = sum(carrying(p)[1] for p in ss.ttft_mixes)
    g = wl.speculative.tokens_per_step if wl.speculative else 1.0
    # In a closed loop a request arrives as another finishes, at an iteration boundary: it waits
    # one iteration only if the engine has already scheduled the next one (overlap scheduler),
    # plus the queue of a prefill-limited loop.
    wait_us = (fw.overlap_scheduler.value + ss.queue_iterations) * mean_us
    ttfts = (fw.request_overhead_us.value + wait_us + own_us) / 1e3
    throughput = (sc.deployment.attention_dp * ss.prompts_per_iteration * wl.output_len
                  / (_mean(mean_us) / 1e6))
    return ServingTimes(ttfts, mean_us / g / 1e3, throughput, float(share))


def serving_times_rows(t_dec_us: np.ndarray, carry_us: np.ndarray, carry_w: np.ndarray,
                       own_us: np.ndarray, share: np.ndarray, wait_iterations: np.ndarray,
                       tokens_per_s_num: np.ndarray, tokens_per_step: float,
                       request_overhead_us: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`serving_times` of many points at once, one row per point (the sweep's fast path
    for drawn routing: the same arithmetic, in the same order, on ``[points, draws]`` arrays
    instead of one ``[draws]`` array per point, so every number comes out bit for bit the same;
    ``tests/test_sweep.py`` holds the two to each other).

    ``t_dec_us [P, S]``: the decode iteration (draft included); ``carry_us [P, M, S]`` and
    ``carry_w [P, M]``: each mix's iteration as the decodes see it and its share (padded with
    zero shares and zero times: adding ``0 * 0`` leaves a sum unchanged); ``own_us [P, C, S]``:
    the iterations a request's own prompt rides in, as the request sees them (padded with zero
    times); ``share``: the mixes' shares summed
    (``serving_times``'s ``share``); ``wait_iterations``: overlap scheduler + queue
    iterations; ``tokens_per_s_num``: ``attention_dp * prompts_per_iteration * output_len``.
    Returns (TTFT ms ``[P, S]``, TPOT ms ``[P, S]``, throughput ``[P]``)."""
    mean_us = (1.0 - share)[:, None] * t_dec_us
    for j in range(carry_w.shape[1]):
        mean_us = mean_us + carry_w[:, j:j + 1] * carry_us[:, j]
    own = own_us[:, 0]  # serving_times's sum() starts at 0: 0 + x is x
    for j in range(1, own_us.shape[1]):
        own = own + own_us[:, j]
    wait_us = wait_iterations[:, None] * mean_us
    ttfts = (request_overhead_us + wait_us + own) / 1e3
    # _mean per row: np.add.reduce along contiguous rows sums as it does one row alone
    throughput = tokens_per_s_num / (np.add.reduce(mean_us, axis=1) / mean_us.shape[1] / 1e6)
    return ttfts, mean_us / tokens_per_step / 1e3, throughput


def _mean(x) -> float:
    """``float(np.mean(x))`` of a float or a float64 array (the same sum over the same count,
    without np.mean's dispatch, a third of serving_times' time)."""
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        return float(x)
    return float(np.add.reduce(x)) / x.size


def benchmark_means(sc: Scenario, served: ServingTimes, first_wave_ttft_ms: np.ndarray,
                    first_wave_prefill_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and TPOT (ms, per draw) as a benchmark of ``workload.num_requests`` requests reports
    them: the first ``batch_size`` arrive at once (first-wave TTFT; while the later prompts of
    that wave are prefilled, the earlier ones' decodes wait, on average half of the wave's
    prefill spread over their ``output_len - 1`` tokens), the rest find the steady state.
    Without ``num_requests``: the steady state."""
    wl = sc.workload
    if wl.num_requests is None:
        return served.ttft_ms, served.tpot_ms
    first = wl.batch_size / wl.num_requests
    ttft = first * first_wave_ttft_ms + (1.0 - first) * served.ttft_ms
    stall_ms = 0.5 * first_wave_prefill_ms / max(wl.output_len - 1, 1)
    tpot = served.tpot_ms + first * stall_ms
    return ttft, tpot


def benchmark_means_rows(ttft_ms: np.ndarray, tpot_ms: np.ndarray,
                         first_wave_ttft_ms: np.ndarray, first_wave_prefill_ms: np.ndarray,
                         first: np.ndarray, output_len: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`benchmark_means` of many points, one row per point (``[P, S]`` arrays; the same
    arithmetic in the same order). ``first``: ``batch_size / num_requests``, NaN where a
    point has no ``num_requests`` (its steady state is reported)."""
    has = ~np.isnan(first)
    f = np.where(has, first, 0.0)[:, None]
    ttft = f * first_wave_ttft_ms + (1.0 - f) * ttft_ms
    stall_ms = 0.5 * first_wave_prefill_ms / np.maximum(output_len - 1, 1)[:, None]
    tpot = tpot_ms + f * stall_ms
    return np.where(has[:, None], ttft, ttft_ms), np.where(has[:, None], tpot, tpot_ms)


def draft_us(sc: Scenario, decode: Step) -> float:
    """GPU time to draft a decode iteration's tokens, from a one-token decode step of the target:
    for ``mtp`` one decoder layer of the target plus the LM head per drafted token (DeepSeek-V3's
    MTP module, EAGLE heads); ``ngram`` drafts on the host."""
    spec = sc.workload.speculative
    if spec is None or spec.method == "ngram":
        return 0.0
    kinds = decode.by_layer_kind()
    head = kinds.pop("head", 0.0)
    kinds.pop("engine", None)
    kinds.pop("pipeline", None)
    layer = sum(kinds.values()) / sc.model.num_layers
    return spec.num_draft_tokens * (layer + head)


def _warnings(sc: Scenario, mem: MemoryBreakdown, ss: SteadyState) -> list[str]:
    out = []
    if ss.queued_requests > 0:
        out.append(f"prefill-limited: the engine admits {ss.prompts_per_iteration:.2f} prompts "
                   f"per step, fewer than finish; about "
                   f"{ss.queued_requests * sc.deployment.attention_dp:.0f} of the "
                   f"{sc.workload.batch_size} requests wait in the queue (counted in TTFT)")
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
