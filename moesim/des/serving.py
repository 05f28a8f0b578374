"""Serving-level discrete-event simulation: requests arrive, a continuous-batching scheduler
forms steps over a paged KV cache, and every step is priced by the step model.

Processes (simpy): the arrival process (Poisson or trace; a closed loop needs none: a finishing
request issues its client's next one) and the engine loop, which repeatedly schedules one step,
prices it, advances the clock by its duration and applies its effects.

Scheduler (``prefill_first``: separate prefill and decode steps, as SGLang's default scheduler
and vLLM's V0 scheduler without chunked prefill run them, and as the closed form assumes): a step
is a prefill step whenever a prompt can make progress — partially prefilled requests first, then
waiting requests in arrival order while ``max_num_seqs`` and the token budget
(``max_num_batched_tokens`` per attention-DP group) allow, a prompt longer than the remaining
budget being cut into chunks (chunked prefill) — otherwise a decode step of every running
request. Mixed steps (decode tokens and a prefill chunk together, vLLM V1) are not modelled. The KV cache holds ``num_gpu_blocks`` blocks of
``block_size`` tokens per attention-DP group; a request gets blocks as its tokens enter the cache;
when a decode step finds no free block the most recently admitted running request is preempted
(its blocks freed, and later recomputed: it is prefilled again over its prompt and the tokens it
had generated).

Pricing: a step of ``n`` sequences adding ``t`` tokens after a mean context ``c`` is priced as
one attention-DP group's :class:`~moesim.step.Batch` (``ceil(n / dp)`` sequences of
``t / n`` tokens; every group gets the same share, as in the closed form) through
:mod:`moesim.des.step_sim` — the closed form over the same op costs when nothing overlaps, the
simpy step simulation when something does. Costs are cached per ``(phase, sequences, tokens per
sequence)`` at context lengths on a grid of ``context_bucket`` tokens and interpolated linearly
between grid points (``context_bucket = 1``: exact). With a stochastic routing distribution every
step gets a fresh routing draw and its MoE layers are priced for it (exact but slow: ~5 ms of
wall time per step for Mixtral); ``routing_pool = N`` instead prices N draws per step shape once
and picks one at random per step.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import simpy

from ..errors import InputError
from ..memory import activation_bytes, kv_bytes_per_seq, weight_bytes_per_gpu
from ..routing import sample_loads
from ..spec.scenario import Scenario
from ..step import Batch
from ..spec.simulation import LengthSpec, SimulationSpec, parse_simulation
from .step_sim import (PlanBuilder, StepCost, TraceEvent, closed_form, simulate_step,
                       split_batch)

DEFAULT_REQUESTS = 200


# ---------------------------------------------------------------------------------------------
# inputs: arrivals and lengths
# ---------------------------------------------------------------------------------------------

_TIME_KEYS = ("arrival_s", "arrival_time", "timestamp", "time")
_IN_KEYS = ("input_len", "input_tokens", "prompt_len", "prompt_tokens")
_OUT_KEYS = ("output_len", "output_tokens", "completion_len", "completion_tokens")


def _pick(row: dict, keys: tuple[str, ...], what: str, where: str) -> Any:
    for k in keys:
        if k in row and row[k] not in (None, ""):
            return row[k]
    raise InputError("simulation.arrival.trace_file", f"{where} has no {what} column",
                     f"name it one of {', '.join(keys)}")


def _number(v: Any, what: str, where: str, integer: bool) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise InputError("simulation.arrival.trace_file", f"{where}: {what} is not a number: "
                         f"{v!r}") from None
    if not math.isfinite(x):
        raise InputError("simulation.arrival.trace_file", f"{where}: {what} is not finite")
    if integer and x != int(x):
        raise InputError("simulation.arrival.trace_file", f"{where}: {what} must be a whole "
                         f"number of tokens; got {v!r}")
    return x


def _read_text(p: Path, field_: str, fix: str) -> str:
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise InputError(field_, f"cannot read {p}: {reason}", fix) from None


def read_arrival_trace(path: Union[str, Path]) -> np.ndarray:
    """``[rows, 3]`` float (arrival seconds, input tokens, output tokens), sorted by arrival, from
    a CSV with a header, a JSON list of objects or JSON lines."""
    field_ = "simulation.arrival.trace_file"
    p = Path(path)
    text = _read_text(p, field_, "give a CSV / JSON / JSON-lines arrival trace")
    stripped = text.lstrip()
    rows: list[dict]
    try:
        if p.suffix == ".json" or stripped.startswith("["):
            data = json.loads(text)
            rows = data if isinstance(data, list) else data.get("requests", None)
            if not isinstance(rows, list):
                raise ValueError("expected a list of requests")
        elif p.suffix in (".jsonl", ".ndjson") or stripped.startswith("{"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            rows = [{(k or "").strip(): v for k, v in r.items()} for r in rows]
    except (ValueError, AttributeError) as exc:
        raise InputError(field_, f"{p} is not a valid arrival trace: {str(exc).splitlines()[0]}",
                         "use CSV with a header, a JSON list or JSON lines") from None
    if not rows:
        raise InputError(field_, f"{p} holds no requests", "add at least one row")
    out = np.empty((len(rows), 3))
    for i, row in enumerate(rows):
        where = f"{p.name} row {i + 1}"
        if not isinstance(row, dict):
            raise InputError(field_, f"{where} is not an object")
        t = _number(_pick(row, _TIME_KEYS, "arrival time", where), "arrival time", where, False)
        n_in = _number(_pick(row, _IN_KEYS, "input length", where), "input length", where, True)
        n_out = _number(_pick(row, _OUT_KEYS, "output length", where), "output length", where,
                        True)
        if t < 0:
            raise InputError(field_, f"{where} has a negative arrival time {t:g}",
                             "arrival times are seconds >= 0")
        for what, v in (("input length", n_in), ("output length", n_out)):
            if v < 1:
                raise InputError(field_, f"{where} has {'a negative' if v < 0 else 'a zero'} "
                                 f"{what} {int(v)}", "lengths must be >= 1 token")
        out[i] = (t, n_in, n_out)
    return out[np.argsort(out[:, 0], kind="stable")]


def _length_file(path: str, column: str, field_: str) -> np.ndarray:
    p = Path(path)
    text = _read_text(p, field_, "give a file with one length per line")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and not _is_number(lines[0].split(",")[0]):
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        header = [h.strip() for h in (rows[0].keys() if rows else [])]
        col = column if column in header else (header[0] if header else None)
        values = [r.get(col) if col in r else list(r.values())[0] for r in rows]
    else:
        values = [ln.split(",")[0] for ln in lines]
    if not values:
        raise InputError(field_, f"{p} holds no lengths", "add one length per line")
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(field_, f"{p.name} line {i + 1}: not a number: {v!r}") from None
        if not x >= 1:
            raise InputError(field_, f"{p.name} line {i + 1} has a "
                             f"{'negative' if x < 0 else 'zero'} length {v!s}",
                             "lengths must be >= 1 token")
        out.append(int(round(x)))
    return np.asarray(out, dtype=np.int64)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def draw_lengths(spec: LengthSpec, n: int, rng: np.random.Generator, field_: str) -> np.ndarray:
    d = spec.distribution
    if d == "fixed":
        x = np.full(n, spec.value, dtype=np.int64)
    elif d == "uniform":
        x = rng.integers(spec.low, spec.high + 1, size=n)
    elif d == "lognormal":
        sigma = float(spec.sigma)
        mu = math.log(spec.mean) - sigma * sigma / 2.0
        x = np.rint(rng.lognormal(mu, sigma, size=n)).astype(np.int64)
    else:
        pool = _length_file(spec.file, field_.split(".")[-1], field_)
        x = pool[rng.integers(0, len(pool), size=n)]
    hi = spec.max if spec.max is not None else np.iinfo(np.int64).max
    return np.clip(x, spec.min, hi).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestRecord:
    id: int
    arrival_ms: float
    first_token_ms: float
    finish_ms: float
    input_len: int
    output_len: int
    preemptions: int
    queue_ms: float

    @property
    def ttft_ms(self) -> float:
        return self.first_token_ms - self.arrival_ms

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first (NaN for one-token outputs)."""
        if self.output_len <= 1:
            return float("nan")
        return (self.finish_ms - self.first_token_ms) / (self.output_len - 1)

    @property
    def e2e_ms(self) -> float:
        return self.finish_ms - self.arrival_ms


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {f"{prefix}_mean": float("nan"), f"{prefix}_p50": float("nan"),
                f"{prefix}_p90": float("nan"), f"{prefix}_p99": float("nan")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_p50": float(p50),
            f"{prefix}_p90": float(p90), f"{prefix}_p99": float(p99)}


@dataclass
class SimResult:
    """Outcome of one serving simulation. ``metrics`` holds the flat headline figures (the
    ``--json`` keys), ``detail`` everything else; ``requests`` the measured requests."""

    scenario: str
    sim: SimulationSpec
    seed: int
    requests: list[RequestRecord]
    metrics: dict[str, Any]
    detail: dict[str, Any]
    timeline: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    wall_s: float = 0.0

    def __getattr__(self, name: str) -> Any:
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        out = {"scenario": self.scenario, "seed": self.seed}
        out.update(self.metrics)
        out["detail"] = copy.deepcopy(self.detail)
        out["wall_s"] = self.wall_s
        return out


# ---------------------------------------------------------------------------------------------
# the KV cache size
# ---------------------------------------------------------------------------------------------

def kv_blocks(sc: Scenario, sim: SimulationSpec) -> tuple[int, float]:
    """(KV blocks per attention-DP group, bytes one block takes on one GPU). Free memory follows
    :mod:`moesim.memory`: HBM minus weights, peak activations and the runtime reserve."""
    bs = sim.block_size
    block_bytes = kv_bytes_per_seq(sc, bs) - kv_bytes_per_seq(sc, 0)
    if sim.num_gpu_blocks is not None:
        return sim.num_gpu_blocks, block_bytes
    cap = sc.hardware.memory.hbm_capacity_bytes.value
    reserved = (1.0 - sc.gpu_memory_utilization) * cap + \
        sc.hardware.overheads.runtime_reserved_bytes.value
    free = cap - weight_bytes_per_gpu(sc) - activation_bytes(sc) - reserved
    free -= sim.max_num_seqs / sc.deployment.attention_dp * kv_bytes_per_seq(sc, 0)  # states
    if block_bytes <= 0:  # no attention KV at all (pure linear attention): never the limit
        return 1 << 40, block_bytes
    blocks = int(free // block_bytes)
    if blocks < 1:
        raise InputError("simulation.num_gpu_blocks",
                         f"no HBM left for the KV cache ({free / 1e9:.1f} GB free per GPU "
                         "after weights, activations and reserve)",
                         "use more GPUs, a smaller dtype, or set num_gpu_blocks")
    return blocks, block_bytes


# ---------------------------------------------------------------------------------------------
# step pricing
# ---------------------------------------------------------------------------------------------

class StepPricer:
    """Prices steps through :mod:`moesim.des.step_sim` and keeps the per-rank totals.

    Deterministic routing (balanced), or stochastic routing with a ``routing_pool``: the cost of
    each ``(phase, sequences per group, tokens per sequence, context grid point, draw)`` is
    computed once and reused; the per-rank totals are the cached costs times how often (and
    with what interpolation weight) each was used. Stochastic routing without a pool: every
    step draws fresh loads and is evaluated on its own."""

    def __init__(self, sc: Scenario, sim: SimulationSpec, rng: np.random.Generator) -> None:
        self.sc = sc
        self.sim = sim
        self.ov = sim.overlap
        self.builder = PlanBuilder(sc)
        self.dp = sc.deployment.attention_dp
        self.bucket = sim.context_bucket
        self.rng = rng
        moe = sc.model.moe
        self.stochastic = moe is not None and sc.routing.distribution != "balanced"
        self.fresh = self.stochastic and sim.routing_pool is None
        self.pool = sim.routing_pool if (self.stochastic and not self.fresh) else 1
        self._cache: dict[tuple, StepCost] = {}
        self._draws: dict[tuple, np.ndarray] = {}
        self.usage: dict[tuple, float] = {}
        n = self.builder.topo.n_ranks
        self.acc = StepCost(0.0, np.zeros(n), np.zeros(n), np.zeros(n))
        self._last: tuple = ()

    # routing draws --------------------------------------------------------------------------
    def _draw(self, tokens_per_group: int) -> np.ndarray:
        m = self.sc.model
        return sample_loads(self.sc.routing, tokens_per_group * self.dp, m.moe.num_experts,
                            m.moe.top_k, m.num_moe_layers, self.rng)

    def _pooled(self, parts: list[Batch], j: int) -> list[Optional[np.ndarray]]:
        if not self.stochastic:
            return [None] * len(parts)
        out = []
        for i, p in enumerate(parts):
            key = (p.phase, p.num_seqs, p.new_tokens, i, j)
            if key not in self._draws:
                self._draws[key] = self._draw(p.tokens)
            out.append(self._draws[key])
        return out

    def _shape(self, n: int, tokens: int) -> tuple[int, int]:
        """(sequences, tokens per sequence) of the busiest attention-DP group: the sequences
        are spread over the groups, each keeping its own tokens."""
        return -(-n // self.dp), max(1, int(round(tokens / n)))

    def _parts(self, phase: str, ng: int, new: int, ctx: float) -> list[Batch]:
        b = Batch(phase, ng, new, float(ctx))
        return split_batch(b) if self.ov.two_batch else [b]

    def _evaluate(self, parts: list[Batch], loads: list, record=None) -> StepCost:
        plans = [self.builder.plan(p, l) for p, l in zip(parts, loads)]
        if self.ov.any or record is not None:
            return simulate_step(plans, self.ov, record)
        return closed_form(plans[0])

    def _cached(self, key: tuple) -> StepCost:
        c = self._cache.get(key)
        if c is None:
            phase, ng, new, edge, j = key
            parts = self._parts(phase, ng, new, edge)
            c = self._evaluate(parts, self._pooled(parts, j))
            self._cache[key] = c
        return c

    def _grid(self, ctx: float) -> tuple[float, float]:
        B = self.bucket
        lo = math.floor(ctx / B) * B
        return lo, (ctx - lo) / B

    # the one call per step --------------------------------------------------------------------
    def price(self, phase: str, n: int, tokens: int, ctx: float,
              record: Optional[list[TraceEvent]] = None) -> float:
        """Duration in µs of a step of ``n`` sequences adding ``tokens`` tokens after a mean
        context of ``ctx`` tokens (whole batch over all attention-DP groups); ``record``
        receives the step's op-level timeline (simpy, at the exact context)."""
        ng, new = self._shape(n, tokens)
        lo, w = self._grid(ctx)
        if self.fresh:
            parts = self._parts(phase, ng, new, lo)
            loads = [self._draw(p.tokens) for p in parts]
            c = self._evaluate(parts, loads)
            if w > 1e-12:
                c = _lerp(c, self._evaluate(self._parts(phase, ng, new, lo + self.bucket),
                                            loads), w)
            a = self.acc
            a.time_us += c.time_us
            a.compute_us += c.compute_us
            a.comm_us += c.comm_us
            a.wait_us += c.wait_us
            a.dropped_slots += c.dropped_slots
            a.rerouted_slots += c.rerouted_slots
            a.routed_slots += c.routed_slots
            self._last = (c,)
            if record is not None:
                self._evaluate(self._parts(phase, ng, new, ctx), loads, record)
            return c.time_us
        j = int(self.rng.integers(self.pool)) if self.pool > 1 else 0
        k_lo = (phase, ng, new, lo, j)
        c_lo = self._cached(k_lo)
        u = self.usage
        if w > 1e-12:
            k_hi = (phase, ng, new, lo + self.bucket, j)
            c_hi = self._cached(k_hi)
            u[k_lo] = u.get(k_lo, 0.0) + (1.0 - w)
            u[k_hi] = u.get(k_hi, 0.0) + w
            t = (1.0 - w) * c_lo.time_us + w * c_hi.time_us
            self._last = (c_lo, c_hi, w)
        else:
            u[k_lo] = u.get(k_lo, 0.0) + 1.0
            t = c_lo.time_us
            self._last = (c_lo,)
        if record is not None:
            parts = self._parts(phase, ng, new, ctx)
            self._evaluate(parts, self._pooled(parts, j), record)
        return t

    def last_cost(self) -> StepCost:
        """Per-rank cost of the step last priced."""
        if len(self._last) == 3:
            return _lerp(*self._last)
        return self._last[0]

    def totals(self) -> tuple[StepCost, int, int, int]:
        """(summed StepCost over all steps, dropped, rerouted, routed token-slots)."""
        a = self.acc
        tot = StepCost(a.time_us, a.compute_us.copy(), a.comm_us.copy(), a.wait_us.copy(),
                       a.dropped_slots, a.rerouted_slots, a.routed_slots)
        for key, wgt in self.usage.items():
            c = self._cache[key]
            tot.time_us += wgt * c.time_us
            tot.compute_us += wgt * c.compute_us
            tot.comm_us += wgt * c.comm_us
            tot.wait_us += wgt * c.wait_us
            tot.dropped_slots += wgt * c.dropped_slots
            tot.rerouted_slots += wgt * c.rerouted_slots
            tot.routed_slots += wgt * c.routed_slots
        return (tot, int(round(tot.dropped_slots)), int(round(tot.rerouted_slots)),
                int(round(tot.routed_slots)))


def _lerp(a: StepCost, b: StepCost, w: float) -> StepCost:
    return StepCost((1 - w) * a.time_us + w * b.time_us,
                    (1 - w) * a.compute_us + w * b.compute_us,
                    (1 - w) * a.comm_us + w * b.comm_us, (1 - w) * a.wait_us + w * b.wait_us,
                    a.dropped_slots, a.rerouted_slots, a.routed_slots)


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------

class _Req:
    __slots__ = ("id", "arrival", "prompt", "out", "target", "computed", "generated", "blocks",
                 "first_token", "finish", "preempt", "queue_us", "queued_at", "first_sched")

    def __init__(self, rid: int, arrival: float, prompt: int, out: int) -> None:
        self.id = rid
        self.arrival = arrival
        self.prompt = prompt
        self.out = out
        self.target = prompt       # tokens to have in the cache before decoding (re)starts
        self.computed = 0          # tokens whose KV is in the cache
        self.generated = 0         # output tokens produced
        self.blocks = 0
        self.first_token = -1.0
        self.finish = -1.0
        self.preempt = 0
        self.queue_us = 0.0
        self.queued_at = arrival
        self.first_sched = -1.0


class Engine:
    def __init__(self, sc: Scenario, sim: SimulationSpec, seed: int, n_requests: int,
                 trace_events: Optional[list] = None) -> None:
        self.sc = sc
        self.sim = sim
        ss = np.random.SeedSequence(seed)
        r_arr, r_len, r_route = (np.random.default_rng(s) for s in ss.spawn(3))
        self.env = simpy.Environment()
        self.pricer = StepPricer(sc, sim, r_route)
        self.bs = sim.block_size
        # the step budget holds per attention-DP group (each group prefills its own chunk)
        self.max_tokens = (sim.max_num_batched_tokens or sc.max_num_batched_tokens) * \
            sc.deployment.attention_dp
        self.max_seqs = sim.max_num_seqs
        blocks_per_group, self.block_bytes = kv_blocks(sc, sim)
        self.blocks_per_group = blocks_per_group
        self.total_blocks = blocks_per_group * sc.deployment.attention_dp
        self.free = self.total_blocks
        self.waiting: deque[_Req] = deque()
        self.prefilling: list[_Req] = []
        self.decoding: list[_Req] = []
        self.done: list[_Req] = []
        self.rejected = 0
        self.n_requests = n_requests
        self.issued = 0
        self.wake: Optional[simpy.Event] = None
        self.trace = trace_events
        self.trace_steps = sim.trace_steps
        # arrivals and lengths
        arr = sim.arrival
        wl = sc.workload
        if arr.process == "trace":
            rows = read_arrival_trace(arr.trace_file)[:n_requests]
            self.n_requests = len(rows)
            self.arrivals = rows[:, 0] * 1e6
            self.in_lens = rows[:, 1].astype(np.int64)
            self.out_lens = rows[:, 2].astype(np.int64)
        else:
            in_spec = sim.input_len or LengthSpec(value=wl.input_len)
            out_spec = sim.output_len or LengthSpec(value=wl.output_len)
            self.in_lens = draw_lengths(in_spec, n_requests, r_len, "simulation.input_len")
            self.out_lens = draw_lengths(out_spec, n_requests, r_len, "simulation.output_len")
            if arr.process == "poisson":
                gaps = r_arr.exponential(1e6 / arr.rate, size=n_requests)
                self.arrivals = np.cumsum(gaps) - gaps[0]
            else:
                self.arrivals = None
        self.concurrency = (arr.concurrency or wl.batch_size) if arr.process == "closed_loop" \
            else None
        if not sim.chunked_prefill:
            # a prompt (after a preemption: prompt + generated tokens) must fit one step
            longest = int((self.in_lens + self.out_lens).max()) - 1
            if longest > self.max_tokens:
                raise InputError("simulation.chunked_prefill",
                                 f"a request of {longest} tokens does not fit one prefill step "
                                 f"of {self.max_tokens} tokens (max_num_batched_tokens x "
                                 "attention_dp)",
                                 "turn chunked_prefill on or raise max_num_batched_tokens")
        # accounting
        self.last_t = 0.0
        self.n_sys = 0
        self.area_sys = 0.0
        self.area_wait = 0.0
        self.area_kv = 0.0
        self.area_run = 0.0
        self.max_wait = 0
        self.max_kv = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.step_tokens = {"prefill": 0, "decode": 0}
        self.preemptions = 0
        self.series_t: list[float] = []
        self.series_wait: list[int] = []
        self.series_run: list[int] = []
        self.series_kv: list[int] = []
        self.step_index = 0

    # -- bookkeeping ----------------------------------------------------------------------------
    def _tick(self) -> None:
        now = self.env.now
        dt = now - self.last_t
        if dt > 0:
            self.area_sys += self.n_sys * dt
            self.area_wait += len(self.waiting) * dt
            self.area_kv += (self.total_blocks - self.free) * dt
            self.area_run += (len(self.prefilling) + len(self.decoding)) * dt
            self.last_t = now

    def _new_request(self) -> None:
        i = self.issued
        if i >= self.n_requests:
            return
        self.issued += 1
        prompt, out = int(self.in_lens[i]), int(self.out_lens[i])
        r = _Req(i, self.env.now, prompt, out)
        if -(-(prompt + out - 1) // self.bs) > self.total_blocks:
            self.rejected += 1  # can never fit the KV cache: the engine refuses it
            if self.concurrency is not None and self.issued < self.n_requests:
                self._new_request()
            return
        self._tick()
        self.n_sys += 1
        self.waiting.append(r)
        if len(self.waiting) > self.max_wait:
            self.max_wait = len(self.waiting)
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def _arrivals(self):
        env = self.env
        for t in self.arrivals:
            if t > env.now:
                yield env.timeout(t - env.now)
            self._new_request()

    # -- scheduling -------------------------------------------------------------------------------
    def _admit_prefill(self) -> list[tuple[_Req, int]]:
        bs = self.bs
        budget = self.max_tokens
        items: list[tuple[_Req, int]] = []
        for r in self.prefilling:
            if budget <= 0:
                break
            chunk = min(r.target - r.computed, budget)
            need = -(-(r.computed + chunk) // bs) - r.blocks
            if need > self.free:
                continue
            self.free -= need
            r.blocks += need
            items.append((r, chunk))
            budget -= chunk
        now = self.env.now
        while self.waiting and budget > 0 and \
                len(self.prefilling) + len(self.decoding) < self.max_seqs:
            r = self.waiting[0]
            remaining = r.target
            if remaining > budget and not self.sim.chunked_prefill:
                break
            chunk = min(remaining, budget)
            need = -(-chunk // bs)
            if need > self.free:
                break
            self.waiting.popleft()
            r.queue_us += now - r.queued_at
            if r.first_sched < 0:
                r.first_sched = now
            self.free -= need
            r.blocks = need
            self.prefilling.append(r)
            items.append((r, chunk))
            budget -= chunk
        return items

    def _preempt(self, victim: _Req) -> None:
        self._tick()
        self.free += victim.blocks
        victim.blocks = 0
        victim.computed = 0
        victim.target = victim.prompt + victim.generated
        victim.queued_at = self.env.now
        victim.preempt += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        if len(self.waiting) > self.max_wait:
            self.max_wait = len(self.waiting)

    def _prepare_decode(self) -> float:
        """Give every decoding request a slot for its next token (preempting from the back when
        blocks run out); returns the mean context."""
        bs = self.bs
        dec = self.decoding
        need = 0
        for r in dec:
            if r.computed >= r.blocks * bs:
                need += 1
        while need > self.free and dec:
            v = dec.pop()
            if v.computed >= v.blocks * bs:
                need -= 1
            self._preempt(v)
        total = 0
        for r in dec:
            c = r.computed
            total += c
            if c >= r.blocks * bs:
                r.blocks += 1
        self.free -= need
        return total / len(dec) if dec else 0.0

    def _finish(self, r: _Req) -> None:
        r.finish = self.env.now
        self.free += r.blocks
        r.blocks = 0
        self.n_sys -= 1
        self.done.append(r)
        if self.concurrency is not None and self.issued < self.n_requests:
            self._new_request()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self):
        env = self.env
        pricer = self.pricer
        while True:
            self._tick()
            if not self.waiting and not self.prefilling and not self.decoding:
                self.series_t.append(env.now)
                self.series_wait.append(0)
                self.series_run.append(0)
                self.series_kv.append(self.total_blocks - self.free)
                if self.issued >= self.n_requests:
                    return
                self.wake = env.event()
                yield self.wake
                self.wake = None
                continue
            items = self._admit_prefill()
            if not items and not self.decoding:
                if self.prefilling:  # partial prefills hold the blocks: free the newest
                    v = self.prefilling.pop()
                    self._preempt(v)
                    continue
                raise RuntimeError("scheduler stalled")  # pragma: no cover
            record = [] if self.trace is not None and self.step_index < self.trace_steps \
                else None
            start = env.now
            if items:
                phase = "prefill"
                n = len(items)
                tokens = sum(c for _, c in items)
                ctx = sum(r.computed for r, _ in items) / n
            else:
                phase = "decode"
                ctx = self._prepare_decode()
                n = len(self.decoding)
                tokens = n
                if n == 0:
                    continue
            dur = pricer.price(phase, n, tokens, ctx, record)
            used = self.total_blocks - self.free
            if used > self.max_kv:
                self.max_kv = used
            self.series_t.append(start)
            self.series_wait.append(len(self.waiting))
            self.series_run.append(len(self.prefilling) + len(self.decoding))
            self.series_kv.append(used)
            yield env.timeout(dur)
            self._tick()
            self.steps[phase] += 1
            self.step_tokens[phase] += tokens
            if self.trace is not None:
                self._trace_step(phase, n, tokens, ctx, start, dur, record)
            self.step_index += 1
            if phase == "prefill":
                for r, chunk in items:
                    r.computed += chunk
                    if r.computed >= r.target:
                        self.prefilling.remove(r)
                        r.generated += 1
                        if r.first_token < 0:
                            r.first_token = env.now
                        if r.generated >= r.out:
                            self._finish(r)
                        else:
                            self.decoding.append(r)
            else:
                keep = []
                for r in self.decoding:
                    r.computed += 1
                    r.generated += 1
                    if r.generated >= r.out:
                        self._finish(r)
                    else:
                        keep.append(r)
                self.decoding = keep

    def _trace_step(self, phase, n, tokens, ctx, start, dur, record) -> None:
        ev = self.trace
        name = f"{phase} {n} seq" + (f" / {tokens} tok" if phase == "prefill" else "")
        ev.append(TraceEvent(-1, "steps", name, start, dur,
                             {"step": self.step_index, "sequences": n, "tokens": tokens,
                              "mean_context": round(ctx, 1)}))
        if record is not None:
            sim_end = max((e.start_us + e.dur_us for e in record), default=0.0)
            scale = dur / sim_end if sim_end > 0 else 1.0
            for e in record:
                ev.append(TraceEvent(e.rank, e.stream, e.name, start + e.start_us * scale,
                                     e.dur_us * scale, e.args))
        else:
            c = self.pricer.last_cost()
            for r in range(self.pricer.builder.topo.n_ranks):
                args = {"step": self.step_index, "compute_us": round(float(c.compute_us[r]), 1),
                        "comm_us": round(float(c.comm_us[r]), 1),
                        "wait_us": round(float(c.wait_us[r]), 1)}
                ev.append(TraceEvent(r, "compute", name, start, dur, args))

    def start(self) -> None:
        if self.concurrency is not None:
            for _ in range(min(self.concurrency, self.n_requests)):
                self._new_request()
        else:
            self.env.process(self._arrivals())
        self.env.process(self.run())


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def _tw_summary(t: np.ndarray, v: np.ndarray, t_end: float) -> dict[str, float]:
    """Time-weighted mean / max and a few percentiles of a step-wise series (value v[i] holds
    from t[i] to t[i+1])."""
    if t.size == 0:
        return {"mean": 0.0, "max": 0.0, "p50": 0.0, "p90": 0.0}
    dt = np.diff(np.append(t, max(t_end, t[-1])))
    total = dt.sum()
    if total <= 0:
        return {"mean": float(v.mean()), "max": float(v.max()), "p50": float(np.median(v)),
                "p90": float(np.percentile(v, 90))}
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(dt[order]) / total
    pct = lambda q: float(v[order][min(np.searchsorted(cum, q), v.size - 1)])  # noqa: E731
    return {"mean": float((v * dt).sum() / total), "max": float(v.max()), "p50": pct(0.5),
            "p90": pct(0.9)}


def _downsample(t: np.ndarray, cols: dict[str, np.ndarray], points: int = 100) -> dict:
    if t.size <= points:
        idx = np.arange(t.size)
    else:
        idx = np.unique(np.linspace(0, t.size - 1, points).round().astype(int))
    out = {"t_ms": [round(float(x) / 1e3, 3) for x in t[idx]]}
    for k, v in cols.items():
        out[k] = [float(x) for x in v[idx]]
    return out


def simulate(sc: Scenario, requests: Optional[int] = None, seed: Optional[int] = None,
             trace_path: Optional[Union[str, Path]] = None,
             sim: Union[SimulationSpec, dict, None] = None) -> SimResult:
    """Simulate serving ``sc``: ``requests`` requests (default: the simulation spec's
    ``num_requests``, else the workload's, else 200, or every row of an arrival trace), ``seed``
    (default: the
    spec's, else ``routing.seed``); ``sim``: a :class:`SimulationSpec` (or its dict), default the
    scenario's ``simulation`` block when it has one. ``trace_path``: write a Chrome trace-event
    JSON of the run (opens in Perfetto)."""
    wall0 = time.perf_counter()
    if sim is None:
        sim = getattr(sc.source, "simulation", None)
    spec = parse_simulation(sim)
    if requests is not None and (isinstance(requests, bool) or int(requests) < 1):
        raise InputError("requests", f"must be >= 1; got {requests!r}")
    if seed is not None and (isinstance(seed, bool) or int(seed) < 0):
        raise InputError("seed", f"must be >= 0; got {seed!r}")
    n_req = requests or spec.num_requests or sc.workload.num_requests
    if n_req is None:
        n_req = 1 << 62 if spec.arrival.process == "trace" else DEFAULT_REQUESTS
    seed_ = seed if seed is not None else spec.seed if spec.seed is not None else sc.routing.seed
    trace_events: Optional[list] = [] if trace_path is not None else None
    eng = Engine(sc, spec, int(seed_), int(n_req), trace_events)
    if spec.warmup_requests >= eng.n_requests:
        raise InputError("simulation.warmup_requests",
                         f"{spec.warmup_requests} warm-up requests leave none of the "
                         f"{eng.n_requests} to measure", "lower it or simulate more requests")
    eng.start()
    eng.env.run()
    t_end = eng.env.now
    eng._tick()
    result = _summarise(sc, spec, eng, int(seed_), t_end)
    if trace_path is not None:
        from .trace import write_chrome_trace

        write_chrome_trace(trace_path, trace_events, eng, result)
    result.wall_s = time.perf_counter() - wall0
    result.detail["wall_s"] = result.wall_s
    return result


def _summarise(sc: Scenario, spec: SimulationSpec, eng: Engine, seed: int,
               t_end: float) -> SimResult:
    done = sorted(eng.done, key=lambda r: r.id)
    recs = [RequestRecord(r.id, r.arrival / 1e3, r.first_token / 1e3, r.finish / 1e3, r.prompt,
                          r.out, r.preempt, r.queue_us / 1e3) for r in done]
    measured = [x for x in recs if x.id >= spec.warmup_requests]
    ttft = np.array([x.ttft_ms for x in measured])
    tpot = np.array([x.tpot_ms for x in measured])
    e2e = np.array([x.e2e_ms for x in measured])
    metrics: dict[str, Any] = {}
    metrics.update(_stats("ttft_ms", ttft))
    metrics.update(_stats("tpot_ms", tpot))
    metrics.update(_stats("e2e_ms", e2e))
    if measured:
        t0 = min(x.arrival_ms for x in measured)
        t1 = max(x.finish_ms for x in measured)
        span_s = max(t1 - t0, 1e-9) / 1e3
        out_tok = sum(x.output_len for x in measured)
        metrics["throughput_output_tok_per_s"] = float(out_tok / span_s)
        metrics["throughput_requests_per_s"] = float(len(measured) / span_s)
        metrics["throughput_total_tok_per_s"] = \
            float(sum(x.output_len + x.input_len for x in measured) / span_s)
    else:
        metrics["throughput_output_tok_per_s"] = 0.0
        metrics["throughput_requests_per_s"] = 0.0
        metrics["throughput_total_tok_per_s"] = 0.0
    metrics["requests_completed"] = len(recs)

    tot, dropped, rerouted, routed = eng.pricer.totals()
    topo = eng.pricer.builder.topo
    span = max(t_end, 1e-9)
    t = np.asarray(eng.series_t)
    wait_s = np.asarray(eng.series_wait, dtype=float)
    run_s = np.asarray(eng.series_run, dtype=float)
    kv_s = np.asarray(eng.series_kv, dtype=float) / max(eng.total_blocks, 1)
    queue_us_total = sum(r.queue_us for r in done)
    sojourn_us_total = sum(r.finish - r.arrival for r in done)
    n_done = len(done)
    detail: dict[str, Any] = {
        "makespan_ms": t_end / 1e3,
        "requests_issued": eng.issued,
        "requests_rejected": eng.rejected,
        "requests_measured": len(measured),
        "steps": dict(eng.steps),
        "mean_decode_batch": eng.step_tokens["decode"] / max(eng.steps["decode"], 1),
        "mean_prefill_tokens": eng.step_tokens["prefill"] / max(eng.steps["prefill"], 1),
        "preemptions": eng.preemptions,
        "gpu": {
            "ranks": [topo.label(r) for r in range(topo.n_ranks)],
            "busy_fraction": [float(x) for x in (tot.compute_us / span)],
            "busy_fraction_mean": float(tot.compute_us.mean() / span),
            "comm_fraction": [float(x) for x in (tot.comm_us / span)],
            "waiting_ms": [float(x) / 1e3 for x in tot.wait_us],
            "waiting_fraction": [float(x) for x in (tot.wait_us / span)],
            "step_time_total_ms": tot.time_us / 1e3,
        },
        "queue": {
            "waiting": {**_tw_summary(t, wait_s, t_end), "mean": eng.area_wait / span,
                        "max": eng.max_wait},
            "running": {**_tw_summary(t, run_s, t_end), "mean": eng.area_run / span},
            "in_system_mean": eng.area_sys / span,
            "arrival_rate_per_s": n_done / (span / 1e6) if span else 0.0,
            "mean_queue_ms": queue_us_total / max(n_done, 1) / 1e3,
            "mean_sojourn_ms": sojourn_us_total / max(n_done, 1) / 1e3,
        },
        "kv_cache": {
            "blocks": eng.total_blocks,
            "blocks_per_dp_group": eng.blocks_per_group,
            "block_size": eng.bs,
            "block_bytes_per_gpu": eng.block_bytes,
            "usage": {**_tw_summary(t, kv_s, t_end),
                      "mean": eng.area_kv / span / max(eng.total_blocks, 1)},
            "max_usage": eng.max_kv / max(eng.total_blocks, 1),
        },
        "routing": {
            "distribution": sc.routing.distribution,
            "fresh_draw_per_step": eng.pricer.fresh,
            "routing_pool": eng.pricer.pool if eng.pricer.stochastic and not eng.pricer.fresh
            else None,
            "capacity_factor": sc.routing.capacity_factor,
            "overflow": sc.routing.overflow,
            "routed_token_slots": routed,
            "dropped_token_slots": dropped,
            "rerouted_token_slots": rerouted,
            "dropped_fraction": dropped / routed if routed else 0.0,
            "rerouted_fraction": rerouted / routed if routed else 0.0,
        },
        "timeline": _downsample(t, {"waiting": wait_s, "running": run_s, "kv_usage": kv_s}),
        "settings": {
            "arrival": spec.arrival.process,
            "concurrency": eng.concurrency,
            "rate_per_s": spec.arrival.rate,
            "max_num_seqs": eng.max_seqs,
            "max_num_batched_tokens": eng.max_tokens,
            "chunked_prefill": spec.chunked_prefill,
            "context_bucket": spec.context_bucket,
            "overlap": spec.overlap.model_dump(),
            "step_shapes_priced": len(eng.pricer._cache),
        },
    }
    warnings = []
    if eng.rejected:
        warnings.append(f"{eng.rejected} request(s) need more KV blocks than the cache holds "
                        f"({eng.total_blocks} of {eng.bs} tokens) and were refused")
    if eng.preemptions:
        warnings.append(f"KV cache ran out: {eng.preemptions} preemption(s) by recompute")
    if not measured:
        warnings.append("no request completed: the latency statistics are undefined")
    detail["warnings"] = warnings
    timeline = {"t_us": t, "waiting": wait_s, "running": run_s, "kv_usage": kv_s}
    return SimResult(sc.name, spec, seed, measured, metrics, detail, timeline)
