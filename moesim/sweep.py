"""Sweeps: many scenarios from one base scenario and a few axes, evaluated fast, one row each.

A sweep file (YAML or JSON)::

    name: mixtral-grid
    base: ../mixtral-8x7b_2xh100_tp2.json    # a scenario file (relative to this file) or inline
    sampling: grid                            # grid (every combination) or random
    # samples: 2000                           # random: how many points
    # seed: 0                                 # random: the sampler's seed
    axes:
      deployment.tp: [1, 2, 4, 8]             # any scenario field by dotted path: a list ...
      workload.batch_size: {start: 1, stop: 1024, factor: 2}    # ... or a range
      workload.input_len: {start: 128, stop: 4096, num: 6, scale: log, integer: true}
      dtype:                                  # a linked axis (not a field name): each value
        - {deployment.weight_dtype: bf16}     # sets several fields together
        - {deployment.weight_dtype: fp8, deployment.activation_dtype: fp8}

Ranges: ``{start, stop, step}`` (arithmetic, ``stop`` included when reached), ``{start, stop,
factor}`` (geometric), ``{start, stop, num, scale: linear|log}``; values are rounded to integers
(duplicates dropped) when ``start`` and ``stop`` (and ``step``) are integers, or with
``integer: true``. Random sampling draws every axis independently and uniformly, over its values
or, for ``{low, high, scale, integer}``, over the interval.

``hardware.<field>`` on a hardware given as a bare profile id turns it into ``{profile: id, ...}``;
``model.<key>`` on a preset name edits a copy of the preset's Hugging Face ``config.json``.

Each point becomes one row: the values the axes set, ``feasible`` and ``error`` (a point whose
scenario is invalid is kept, with the one-line reason), and the outputs of :func:`predict`
(:data:`OUTPUT_COLUMNS`).

Speed. ``predict`` costs milliseconds a point, so a sweep does not call it point by point.
Points are grouped by everything except the workload (batch size, lengths); each group is
resolved once and evaluated by :class:`FastEvaluator` (balanced routing, or a dense model) or
:class:`StochasticEvaluator` (drawn routing: zipf, power_law, uniform, ...). Both call the
driver's own ``analytic.steady_state`` and ``serving_times`` / ``benchmark_means`` (for drawn
routing their twins ``serving_times_rows`` / ``benchmark_means_rows``, all of a group's points at
once, bit for bit the same) and only price the steps differently: the steps all points of the
group need (the steady state's decode step and the iterations carrying prefill, the first
wave's prefill steps) are collected first and priced together, each distinct step once, by
:class:`~moesim.vstep.StepPricer`, the vectorised twin of ``step.build_step`` (numpy over the
steps; ``tests/test_sweep.py`` holds every twin to its scalar original). With drawn routing each
point replays the order in which ``predict`` first prices its steps, which fixes each step's
draw; the draws are kept in a tree shared by all points and groups that draw the same way
(:class:`Draws`), and the MoE layers of every distinct draw are priced together
(``StepPricer.moe_draws``). The driver helpers that read the workload (``analytic.prefill_plan``,
``memory.activation_bytes``, the scenario checks) are memoised on the workload fields they
actually read (:class:`WorkloadMemo`). The first point of every group is also run through
:func:`predict` and compared (relative 1e-9); on a mismatch the group falls back to ``predict``
with a warning. Routing the fast path does not cover (a capacity cap, EPLB placement, the
grouped / naive MoE kernels, drawn routing with speculative decoding) goes through ``predict``.
Groups can be spread over local processes (``workers``) or a Ray cluster (``ray_address``; Ray is
optional). Figures: ``benchmarks/bench_sweep.py``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import gc
import itertools
import json
import math
import operator
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import yaml

from .errors import InputError
from .vstep import HOST, STALL, finish

#: Outputs of every row, after the axis columns.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "feasible", "error", "evaluator",
    "ttft_ms", "ttft_ms_first_wave", "tpot_ms", "throughput_output_tok_per_s",
    "throughput_output_tok_per_s_per_gpu", "prefill_total_ms", "num_gpus",
    "memory_weights_bytes", "memory_kv_cache_bytes", "memory_activations_bytes",
    "memory_reserved_bytes", "memory_total_bytes", "memory_capacity_bytes",
    "fits", "max_batch_size",
    "prefill_step_tokens", "prefill_step_us", "decode_step_batch", "decode_step_us",
    "mixed_fraction", "queued_requests",
    "prefill_bound_compute", "prefill_bound_memory", "prefill_bound_network",
    "prefill_bound_launch",
    "decode_bound_compute", "decode_bound_memory", "decode_bound_network", "decode_bound_launch",
    "routing_samples", "warnings",
)
BOUNDS: tuple[str, ...] = ("compute", "memory", "network", "launch")
#: Numeric outputs the fast path must reproduce (the self-check compares these).
NUMERIC_OUTPUTS: tuple[str, ...] = tuple(
    c for c in OUTPUT_COLUMNS if c not in ("feasible", "error", "evaluator", "fits", "warnings"))
VERIFY_RTOL = 1e-9
MAX_POINTS = 20_000_000
# A group is resolved with a workload that passes every check; the points' own workloads are
# checked one by one (see evaluate_group).
_NEUTRAL_WORKLOAD = {"batch_size": 2 ** 30, "input_len": 1, "output_len": 1}

Row = dict[str, Any]


# =============================================================================================
# The sweep file
# =============================================================================================

@dataclass(frozen=True)
class Axis:
    """One axis. A plain axis sets one field (``name`` is its dotted path) to each of
    ``values``; a linked axis's values are mappings ``{path: value}`` set together. In random
    sampling with ``interval`` the axis draws from ``[low, high]`` instead of ``values``."""

    name: str
    values: tuple[Any, ...]
    linked: bool = False
    interval: Optional[tuple[float, float, str, bool]] = None  # low, high, scale, integer

    @property
    def paths(self) -> tuple[str, ...]:
        if not self.linked:
            return (self.name,)
        seen: dict[str, None] = {}
        for v in self.values:
            for p in v:
                seen.setdefault(p, None)
        return tuple(seen)

    @property
    def workload_only(self) -> bool:
        return all(p.startswith("workload.") for p in self.paths)

    def assignments(self, v: Any) -> list[tuple[str, Any]]:
        """(path, value) pairs for this axis's slot ``v`` of a point (for linked axes ``v`` is the
        index of the value)."""
        if self.linked:
            return list(self.values[v].items())
        return [(self.name, v)]

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep: the base scenario document, its directory (for relative references in it)
    and the axes."""

    base: dict[str, Any]
    axes: tuple[Axis, ...]
    base_dir: Optional[Path] = None
    sampling: str = "grid"
    samples: int = 0
    seed: int = 0
    name: str = "sweep"

    def __len__(self) -> int:
        if self.sampling == "random":
            return self.samples
        return math.prod(len(a) for a in self.axes) if self.axes else 1

    def points(self) -> Iterator[tuple[Any, ...]]:
        """One tuple per point, one slot per axis (a value, or a value index for linked axes);
        grid order is the axes' order, the last axis fastest."""
        if self.sampling == "random":
            rng = np.random.default_rng(self.seed)
            cols = [_draw_axis(a, self.samples, rng) for a in self.axes]
            yield from zip(*cols) if cols else (() for _ in range(self.samples))
            return
        slots = [range(len(a)) if a.linked else a.values for a in self.axes]
        yield from itertools.product(*slots)

    def assignments(self, point: Sequence[Any]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for a, v in zip(self.axes, point):
            out += a.assignments(v)
        return out

    def input_columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for a in self.axes:
            if a.linked:
                seen.setdefault(a.name, None)
            for p in a.paths:
                seen.setdefault(p, None)
        return list(seen)

    def scenario(self, point: Sequence[Any]) -> dict[str, Any]:
        """The scenario document of one point."""
        doc = copy.deepcopy(self.base)
        for path, value in self.assignments(point):
            set_path(doc, path, value)
        return doc


def _draw_axis(a: Axis, n: int, rng: np.random.Generator) -> list[Any]:
    if a.interval is not None:
        lo, hi, scale, integer = a.interval
        if scale == "log":
            x = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        else:
            x = rng.uniform(lo, hi, n)
        if integer:
            return [int(v) for v in np.clip(np.rint(x), math.ceil(lo), math.floor(hi))]
        return [float(v) for v in x]
    idx = rng.integers(len(a.values), size=n)
    if a.linked:
        return [int(i) for i in idx]
    return [a.values[i] for i in idx]


def _scenario_fields() -> tuple[str, ...]:
    from .spec.scenario import ScenarioFile

    return tuple(ScenarioFile.model_fields)


def _check_path(path: str, where: str) -> None:
    """Reject a path whose first two components cannot name a scenario field (fail fast, rather
    than 50,000 infeasible rows)."""
    from .spec.deployment import Deployment
    from .spec.routing import RoutingSpec
    from .spec.scenario import HardwareRef
    from .spec.workload import Workload

    parts = path.split(".")
    if not all(parts):
        raise InputError(where, f"{path!r} is not a dotted field path", "e.g. deployment.tp")
    fields = _scenario_fields()
    if parts[0] not in fields:
        raise InputError(where, f"{parts[0]!r} is not a scenario field",
                         f"valid: {', '.join(fields)}; a linked axis's values are mappings")
    models = {"deployment": Deployment, "workload": Workload, "routing": RoutingSpec,
              "hardware": HardwareRef}
    m = models.get(parts[0])
    if m is not None and len(parts) > 1:
        if parts[1] not in m.model_fields:
            raise InputError(where, f"{parts[0]} has no field {parts[1]!r}",
                             f"valid: {', '.join(m.model_fields)}")
        if len(parts) > 2 and parts[0] != "routing":
            raise InputError(where, f"{'.'.join(parts[:2])} is not an object",
                             f"set {'.'.join(parts[:2])} itself")
    if parts[0] in ("name", "description") and len(parts) > 1:
        raise InputError(where, f"{parts[0]} is a string", f"set {parts[0]} itself")


def _expand_range(spec: dict[str, Any], where: str, sampling: str
                  ) -> tuple[tuple[Any, ...], Optional[tuple[float, float, str, bool]]]:
    keys = set(spec)
    allowed = {"start", "stop", "step", "factor", "num", "scale", "integer", "low", "high"}
    if keys - allowed:
        raise InputError(where, f"unknown range key(s) {sorted(keys - allowed)}",
                         "a range is {start, stop, step} | {start, stop, factor} | "
                         "{start, stop, num, scale, integer} | {low, high, scale, integer}")
    scale = spec.get("scale", "linear")
    if scale not in ("linear", "log"):
        raise InputError(f"{where}.scale", f"unknown scale {scale!r}", "use linear or log")
    integer = spec.get("integer")

    def num(key: str) -> float:
        v = spec.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{where}.{key}", f"needs a finite number; got {v!r}")
        return v

    if "low" in keys or "high" in keys:
        if keys & {"start", "stop", "step", "factor", "num"}:
            raise InputError(where, "mixes {low, high} with {start, stop, ...}", "use one form")
        lo, hi = num("low"), num("high")
        if not lo < hi:
            raise InputError(where, f"low={lo} must be below high={hi}")
        if scale == "log" and lo <= 0:
            raise InputError(where, "a log interval needs low > 0")
        if sampling != "random":
            raise InputError(where, "{low, high} draws from an interval: random sampling only",
                             "give {start, stop, num} for a grid")
        if integer is None:
            integer = isinstance(spec["low"], int) and isinstance(spec["high"], int)
        return (), (float(lo), float(hi), scale, bool(integer))
    start, stop = num("start"), num("stop")
    if integer is None:  # integers in, integers out (batch sizes, lengths)
        integer = all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                      for k in ("start", "stop", "step") if k in spec)
    forms = [k for k in ("step", "factor", "num") if k in keys]
    if len(forms) != 1:
        raise InputError(where, "a range needs exactly one of step, factor, num",
                         "e.g. {start: 1, stop: 64, factor: 2}")
    form = forms[0]
    vals: list[float] = []
    if form == "step":
        step = num("step")
        if step == 0 or (stop - start) * step < 0:
            raise InputError(f"{where}.step", f"step={step} never goes from {start} to {stop}")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        if n > MAX_POINTS:
            raise InputError(where, f"{n} values is too many")
        vals = [start + i * step for i in range(n)]
    elif form == "factor":
        factor = num("factor")
        if start <= 0 or factor <= 0 or factor == 1 or (stop - start) * (factor - 1) < 0:
            raise InputError(f"{where}.factor", f"factor={factor} never goes from {start} to "
                             f"{stop}", "use start > 0 and factor > 1 for an increasing range")
        v = float(start)
        while (v <= stop * (1 + 1e-12)) if factor > 1 else (v >= stop * (1 - 1e-12)):
            vals.append(v)
            v *= factor
            if len(vals) > 10_000:
                raise InputError(where, "more than 10,000 values")
    else:
        n = spec.get("num")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"{where}.num", f"needs an integer >= 1; got {n!r}")
        if scale == "log":
            if start <= 0 or stop <= 0:
                raise InputError(where, "a log range needs start, stop > 0")
            vals = list(np.geomspace(start, stop, n)) if n > 1 else [float(start)]
        else:
            vals = list(np.linspace(start, stop, n)) if n > 1 else [float(start)]
    if integer:
        out: list[Any] = []
        for v in vals:
            iv = int(round(v))
            if not out or out[-1] != iv:  # log ranges of small integers repeat values
                out.append(iv)
        return tuple(out), None
    return tuple(float(v) for v in vals), None


def _axis(name: str, raw: Any, sampling: str) -> Axis:
    where = f"axes.{name}"
    if not isinstance(name, str) or not name:
        raise InputError("axes", f"axis name {name!r} is not a string")
    is_path = name.split(".")[0] in _scenario_fields()
    if "." in name and not is_path:
        _check_path(name, where)  # a dotted name must be a field path: say which part is wrong
    if isinstance(raw, dict):
        if not is_path:
            raise InputError(where, f"{name!r} is not a scenario field, so it is a linked axis "
                             "and needs a list of {path: value} mappings")
        _check_path(name, where)
        values, interval = _expand_range(raw, where, sampling)
        return Axis(name, values, False, interval)
    if not isinstance(raw, list) or not raw:
        raise InputError(where, "an axis needs a non-empty list of values or a range")
    if is_path:
        _check_path(name, where)
        return Axis(name, tuple(raw))
    for i, v in enumerate(raw):
        if not isinstance(v, dict) or not v:
            raise InputError(f"{where}[{i}]", f"{name!r} is not a scenario field, so it is a "
                             "linked axis: each value must be a mapping {dotted.path: value}",
                             f"or name a field: {', '.join(_scenario_fields())}")
        for p in v:
            _check_path(str(p), f"{where}[{i}].{p}")
    return Axis(name, tuple(dict(v) for v in raw), linked=True)


_SWEEP_KEYS = {"name", "description", "base", "sampling", "samples", "seed", "axes"}


def parse_sweep(data: Any, *, base_dir: Optional[Path] = None) -> SweepSpec:
    """Check a sweep document (see the module docstring); ``base_dir``: the sweep file's folder."""
    if not isinstance(data, dict):
        raise InputError("sweep", "a sweep file is a mapping", "see examples/sweeps/")
    extra = set(data) - _SWEEP_KEYS
    if extra:
        raise InputError(f"{sorted(extra)[0]}", "unknown field in the sweep file",
                         f"valid: {', '.join(sorted(_SWEEP_KEYS))}")
    if "base" not in data:
        raise InputError("base", "required field is missing",
                         "give a scenario (a path or an inline mapping)")
    base = data["base"]
    scenario_dir = base_dir
    if isinstance(base, str):
        p = Path(base)
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        base = read_document(p, field="base")
        scenario_dir = p.parent
    if not isinstance(base, dict):
        raise InputError("base", "the base scenario must be a mapping or a path to a scenario "
                         "file")
    sampling = data.get("sampling", "grid")
    if sampling not in ("grid", "random"):
        raise InputError("sampling", f"unknown sampling {sampling!r}", "use grid or random")
    samples = data.get("samples", 0 if sampling == "grid" else None)
    seed = data.get("seed", 0)
    if sampling == "random":
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InputError("samples", f"random sampling needs samples >= 1; got {samples!r}")
    elif "samples" in data:
        raise InputError("samples", "only random sampling draws samples", "remove it")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError("seed", f"needs an integer >= 0; got {seed!r}")
    raw_axes = data.get("axes", {})
    if raw_axes is None:
        raw_axes = {}
    if not isinstance(raw_axes, dict):
        raise InputError("axes", "axes is a mapping {dotted.path or linked-axis name: values}")
    axes = tuple(_axis(str(k), v, sampling) for k, v in raw_axes.items())
    spec = SweepSpec(base=base, axes=axes, base_dir=scenario_dir, sampling=sampling,
                     samples=int(samples or 0), seed=int(seed),
                     name=str(data.get("name") or "sweep"))
    if len(spec) > MAX_POINTS:
        raise InputError("axes", f"{len(spec):,} points is more than {MAX_POINTS:,}",
                         "use fewer values or random sampling")
    return spec


def read_document(path: Union[str, Path], field: str = "sweep") -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(field, f"cannot read {p}: {exc.strerror}", "give an existing file") \
            from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(field, f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0]}", "fix the syntax") from None


def load_sweep(path: Union[str, Path]) -> SweepSpec:
    p = Path(path)
    return parse_sweep(read_document(p), base_dir=p.parent)


# ---------------------------------------------------------------------------------------------
def _preset_config(name: str) -> Optional[dict[str, Any]]:
    from .spec.presets import PRESETS, PRESETS_DIR, resolve_preset

    try:
        short = resolve_preset(name)
    except KeyError:
        return None
    folder = PRESETS_DIR / PRESETS[short].replace("/", "--")
    return json.loads((folder / "config.json").read_text())


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``doc[a][b]... = value`` for ``path = "a.b..."``, creating mappings on the way.

    ``hardware: "h100_sxm"`` becomes ``{profile: "h100_sxm"}`` before a ``hardware.<field>`` is
    set; a preset name under ``model`` becomes a copy of its HF ``config.json``."""
    parts = path.split(".")
    cur: Any = doc
    for i, key in enumerate(parts[:-1]):
        nxt = cur.get(key) if isinstance(cur, dict) else None
        if nxt is None:
            nxt = {}
        elif isinstance(nxt, str) and i == 0 and key == "hardware":
            nxt = {"profile": nxt}
        elif isinstance(nxt, str) and i == 0 and key == "model":
            cfg = _preset_config(nxt)
            if cfg is None:
                raise InputError(path, f"model {nxt!r} is not a preset, so {path} cannot edit it",
                                 "give the model inline or as a preset name")
            nxt = cfg
        elif not isinstance(nxt, dict):
            raise InputError(path, f"{'.'.join(parts[:i + 1])} is not a mapping",
                             "set the whole value instead")
        cur[key] = nxt
        cur = nxt
    cur[parts[-1]] = copy.deepcopy(value)


def _freeze(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, float) and v.is_integer():
        return ("f", v)  # 2.0 and 2 are different inputs (the scenario checks types)
    return v


# =============================================================================================
# Outputs of one point: from a prediction (the reference) or from the fast evaluator
# =============================================================================================

_COL = {c: i for i, c in enumerate(OUTPUT_COLUMNS)}
_BOUND_INDEX = {b: i + 1 for i, b in enumerate(BOUNDS)}
Outputs = tuple  # one value per OUTPUT_COLUMNS entry


def outputs_dict(out: Outputs) -> Row:
    return dict(zip(OUTPUT_COLUMNS, out))


def _bound_vector(ops: Iterable[Any]) -> list[float]:
    """[time, compute, memory, network, launch] µs of a list of (count-scaled) ops."""
    v = [0.0] * 5
    for o in ops:
        t = o.count * o.total_us
        v[0] += t
        v[_BOUND_INDEX[o.bound]] += t
    return v


def _shares(v: Sequence[float]) -> tuple[float, float, float, float]:
    total = v[1] + v[2] + v[3] + v[4]
    if total <= 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (v[1] / total, v[2] / total, v[3] / total, v[4] / total)


def _outputs(evaluator: str, ttft: float, ttft_first_wave: float, tpot: float,
             throughput: float, prefill_ms: float, num_gpus: int, mem: Any, prefill_tokens: int,
             pvec: Sequence[float], decode_batch: int, dvec: Sequence[float],
             mixed_fraction: float, queued: float, samples: int, warnings: list[str]
             ) -> Outputs:
    return (True, "", evaluator, ttft, ttft_first_wave, tpot, throughput, throughput / num_gpus,
            prefill_ms, num_gpus, mem.weights, mem.kv_cache, mem.activations, mem.reserved,
            mem.total, mem.capacity, mem.fits, mem.max_batch_size, prefill_tokens,
            float(pvec[0]), decode_batch, float(dvec[0]), mixed_fraction, queued) + \
        _shares(pvec) + _shares(dvec) + (samples, " | ".join(warnings))


def prediction_outputs(p: Any) -> Outputs:
    """The output columns of one :class:`~moesim.analytic.Prediction` (the reference that the
    fast path reproduces)."""
    assert p.throughput_output_tok_per_s_per_gpu == \
        p.throughput_output_tok_per_s / p.scenario.num_gpus
    return _outputs("predict", p.ttft_ms, p.ttft_ms_first_wave, p.tpot_ms,
                    p.throughput_output_tok_per_s, p.prefill_total_ms, p.scenario.num_gpus,
                    p.memory, p.prefill_step.batch.tokens, _bound_vector(p.prefill_step.ops),
                    p.decode_step.batch.num_seqs, _bound_vector(p.decode_step.ops),
                    p.mixed_fraction, p.queued_requests, p.samples, p.warnings)


def error_outputs(exc: InputError) -> Outputs:
    out: list[Any] = [""] * len(OUTPUT_COLUMNS)
    out[_COL["feasible"]] = False
    out[_COL["error"]] = exc.one_line()
    out[_COL["evaluator"]] = "parse"
    return tuple(out)


class _WithWorkload:
    """A resolved scenario seen with another (validated) workload: the drivers' helpers read
    ``sc.workload`` and otherwise only workload-independent fields."""

    __slots__ = ("_sc", "workload")

    def __init__(self, sc: Any, workload: Any) -> None:
        self._sc = sc
        self.workload = workload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sc, name)


_MISS = object()


class _ReadRecorder:
    """A workload that notes which of its fields are read (``*`` for anything else: a method
    could read every field)."""

    __slots__ = ("_wl", "_reads")

    def __init__(self, wl: Any) -> None:
        self._wl = wl
        self._reads: dict[str, None] = {}

    def __getattr__(self, name: str) -> Any:
        from .spec.workload import Workload

        self._reads[name if name in Workload.model_fields else "*"] = None
        return getattr(self._wl, name)


class WorkloadMemo:
    """Memo of ``fn(scenario_with_workload)`` for one resolved scenario, keyed by the workload
    fields ``fn`` actually read (recorded on the first call of each shape).

    Exact for any deterministic ``fn`` that sees the workload only through ``sc.workload``: a
    call whose read fields have the values an earlier call read takes the same path and returns
    the same result. An ``InputError`` raised by ``fn`` is memoised and re-raised."""

    def __init__(self, sc: Any, fn: Callable[[Any], Any]) -> None:
        self.sc, self.fn = sc, fn
        self.tables: dict[tuple[str, ...], dict[Any, Any]] = {}
        # (key of a workload, table) per shape of reads: the lookup runs once per sweep point
        self._keyed: list[tuple[Callable[[Any], Any], dict[Any, Any]]] = []
        self.calls = 0

    def __call__(self, wl: Any) -> Any:
        for key, table in self._keyed:
            hit = table.get(key(wl), _MISS)
            if hit is not _MISS:
                break
        else:
            rec = _ReadRecorder(wl)
            self.calls += 1
            try:
                hit = self.fn(_WithWorkload(self.sc, rec))
            except InputError as exc:
                hit = exc
            reads = tuple(rec._reads)
            if "*" in reads:
                from .spec.workload import Workload

                reads = tuple(Workload.model_fields)
            table = self.tables.get(reads)
            if table is None:
                table = self.tables[reads] = {}
                # attrgetter of one name gives the value, of several a tuple: either is a key
                self._keyed.append((operator.attrgetter(*reads) if reads else _no_key, table))
            key = next(k for k, t in self._keyed if t is table)
            table[key(wl)] = hit
        if isinstance(hit, InputError):
            raise hit
        return hit


def _no_key(wl: Any) -> tuple[()]:
    return ()


class _ScenarioView:
    """Base of :func:`_view_class`: anything not copied onto the class is read from the
    resolved scenario."""

    __slots__ = ("workload",)
    _sc: Any = None

    def __init__(self, workload: Any) -> None:
        self.workload = workload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sc, name)


def _view_class(sc: Any) -> type:
    """A class whose instances are ``sc`` seen with another (validated) workload, like
    :class:`_WithWorkload` but faster to read: the scenario's other fields and its properties
    (all workload-independent) are class attributes. One instance per sweep point."""
    attrs: dict[str, Any] = {"_sc": sc, "__slots__": ()}
    for name in type(sc).model_fields:
        if name != "workload":
            attrs[name] = getattr(sc, name)
    for name, member in vars(type(sc)).items():
        if isinstance(member, property) and name != "workload":
            attrs[name] = getattr(sc, name)
    return type("ScenarioView", (_ScenarioView,), attrs)


def deterministic(sc: Any) -> bool:
    """True when ``predict(sc)`` makes no routing draws (the fast path's domain)."""
    return sc.model.moe is None or sc.routing.distribution == "balanced"


def with_workload(sc: Any, wl: Any) -> Any:
    """``sc`` with another (validated) workload, as :func:`parse_scenario` would build it."""
    return sc.model_copy(update={"workload": wl,
                                 "source": sc.source.model_copy(update={"workload": wl})})


def _step_key(b: Any) -> Any:
    """A batch as a flat tuple: hashed and compared in C, where the dataclass's own hash and
    equality run Python code (the sweep looks steps up a few times per point)."""
    p = b.prefill
    if p is None:
        return (b.phase, b.num_seqs, b.new_tokens, b.context)
    if p.prefill is None:
        return (b.phase, b.num_seqs, b.new_tokens, b.context, p.phase, p.num_seqs,
                p.new_tokens, p.context)
    return b


class FastEvaluator:
    """``predict`` for many workloads of one resolved scenario with deterministic routing.

    ``predict`` = the closed loop's steady state (``analytic.steady_state``: the iteration mix),
    its steps priced, combined by ``analytic.serving_times`` (and ``benchmark_means``); plus
    the first-wave prefill timeline and the memory. This evaluator calls the same
    ``steady_state``, ``serving_times`` and ``benchmark_means`` for every workload and only
    prices the steps its own way: the steps all workloads of a batch of points need are
    collected first and priced together by :class:`~moesim.vstep.StepPricer` (numpy over the
    steps: the vectorised twin of ``build_step``), each distinct step once; ``serving_times``
    then looks them up. The prefill plan, the first wave, the activation memory and the
    scenario checks are memoised on the workload fields they read (:class:`WorkloadMemo`).
    Exact to rounding: the per-group self-check in :func:`evaluate_group` and
    ``tests/test_sweep.py`` compare it with ``predict``.
    """

    def __init__(self, sc: Any, states: Optional[dict[Any, Any]] = None) -> None:
        from . import analytic
        from .memory import MemoryBreakdown, activation_bytes, kv_bytes_per_seq, \
            weight_bytes_per_gpu
        from .step import Batch
        from .vstep import StepPricer

        if sc.deployment.ep_comm_backend != "nccl" and sc.deployment.attention_dp > 1:
            # vstep's pricer mirrors the NCCL all-to-all only; DeepEP steps are priced by
            # predict (step.py), not by the sweep's fast path.
            from .errors import InputError
            raise InputError("deployment.ep_comm_backend", "the sweep prices dispatch/combine "
                             "with the NCCL all-to-all only", "sweep with ep_comm_backend nccl "
                             "or run moesim predict for DeepEP scenarios")
        if not deterministic(sc) and type(self) is FastEvaluator:
            raise ValueError("FastEvaluator needs deterministic (balanced) routing; "
                             "StochasticEvaluator draws routing loads")
        self.sc = sc
        self.pricer = StepPricer(sc)
        self.mixed = bool(sc.framework.mixed_batching.value)
        self._vectors: dict[Any, tuple[float, ...]] = {}  # step key -> step vector
        self._times: dict[Any, float] = {}  # step key -> step time
        self._shares: dict[Any, tuple[float, ...]] = {}  # step key -> bound shares
        self._drafts: dict[Any, float] = {}
        self._kv: dict[float, float] = {}
        self._weights = weight_bytes_per_gpu(sc)
        cap = sc.hardware.memory.hbm_capacity_bytes.value
        self._cap = cap
        self._reserved = (1.0 - sc.gpu_memory_utilization) * cap + \
            sc.hardware.overheads.runtime_reserved_bytes.value
        self._overhead_us = sc.framework.request_overhead_us.value
        self._view = _view_class(sc)
        # steady_state reads the workload's batch size and lengths (and its speculative
        # settings), the attention DP, the token budget and mixed batching: groups agreeing on
        # the last three share the steady states of their points (``states``: kept by a
        # process for all its groups), by (batch size, input length, output length)
        self._states = ({} if states is None else states).setdefault(
            (sc.deployment.attention_dp, sc.max_num_batched_tokens, self.mixed), {})
        # Per prompt shape (what prefill_plan reads): [the prefill plan, then (lazily, once its
        # steps are priced) its first wave].
        self._prompt = WorkloadMemo(sc, lambda psc: [analytic.prefill_plan(psc), None])
        self._activations = WorkloadMemo(sc, activation_bytes)
        # the drivers' functions, looked up once (a sweep calls them per point)
        self._an = analytic
        self._Batch, self._Memory, self._kv_bytes = Batch, MemoryBreakdown, kv_bytes_per_seq
        self.step_builds = 0  # vectorised pricing calls (each prices many steps)
        get, me = self._times.get, weakref.ref(self)  # no reference cycle through the closure

        def time_of(b: Any) -> float:
            t = get(_step_key(b))
            return t if t is not None else me().step(b)[0]  # type: ignore[union-attr]

        self.time_of = time_of  # ``build_step(sc, b).time_us``: serving_times's step pricer

    # -- steps -----------------------------------------------------------------------------------
    def price(self, batches: Union[Iterable[Any], dict[Any, Any]]) -> None:
        """Price every batch not priced yet, all in one vectorised call. ``batches``: batches,
        or ``{step key: batch or (decode batch, prefill chunk riding in it)}``."""
        vectors, Batch = self._vectors, self._Batch
        if not isinstance(batches, dict):
            batches = {_step_key(b): b for b in batches}
        new = [(k, b) for k, b in batches.items() if k not in vectors]
        if not new:
            return
        self.step_builds += 1
        steps = [b if type(b) is not tuple else
                 Batch(b[0].phase, b[0].num_seqs, b[0].new_tokens, b[0].context, b[1])
                 for _, b in new]
        times = self._times
        for (k, _), v in zip(new, self._vectorise(steps).tolist()):
            vectors[k] = v = tuple(v)
            times[k] = v[0]

    def _vectorise(self, steps: list[Any]) -> np.ndarray:
        """Step vectors of new steps."""
        return self.pricer.vectors(steps)

    def step(self, b: Any) -> tuple[float, ...]:
        """[time, compute, memory, network, launch] µs of ``build_step(sc, b)``."""
        k = _step_key(b)
        v = self._vectors.get(k)
        if v is None:
            self.price({k: b})
            v = self._vectors[k]
        return v

    def _draft(self, view: Any, ss: Any) -> float:
        """``analytic.draft_us`` of the one-token decode step (speculative decoding only)."""
        from .step import build_step

        b = replace(ss.decode, new_tokens=1)
        key = (b, view.workload.speculative)  # draft_us reads the drafting settings
        t = self._drafts.get(key)
        if t is None:
            t = self._drafts[key] = self._an.draft_us(view, build_step(self.sc, b))
        return t

    def _first_wave(self, plan: Any) -> tuple[float, float, int, tuple[float, ...],
                                              tuple[float, ...]]:
        """(first-wave TTFT µs summed over requests / requests, before the request overhead;
        prefill total µs; the largest prefill step's tokens, vector and bound shares) of a
        prefill plan: ``predict``'s first-wave loop, each repeated block summed in closed
        form (its steps were priced with the group's: outputs_many)."""
        time_of = self.time_of
        clock = ttft_sum = 0.0
        finished = 0
        big: Optional[Any] = None
        for chunks, repeat in plan:
            block = 0.0
            for batch, done in chunks:
                block += time_of(batch)
                if done:
                    # the r-th repeat (r = 0..R-1) ends this chunk at clock + r * B + block
                    ttft_sum += done * repeat * (clock + block)
                    finished += done * repeat
                if big is None or batch.tokens > big.tokens:
                    big = batch
            ttft_sum += sum(done for _, done in chunks) * block * repeat * (repeat - 1) / 2.0
            clock += repeat * block
        assert big is not None and finished > 0
        vec = self.step(big)
        return ttft_sum / finished, clock, big.tokens, vec, _shares(vec)

    # -- points ----------------------------------------------------------------------------------
    def outputs(self, workload: Any) -> Outputs:
        """The output columns of ``predict`` for this scenario with ``workload`` (a validated
        :class:`~moesim.spec.workload.Workload` that passed the scenario's checks)."""
        return self.outputs_many([workload])[0]

    def outputs_many(self, workloads: Sequence[Any]) -> list[Outputs]:
        """:meth:`outputs` of many workloads: the steps they all need (the steps ``predict``
        prices: the steady state's decode step and the iterations carrying prefill, the
        first wave's prefill steps) are priced together first; one missed here would be
        priced on demand."""
        steady_state, prompt_of, Batch = self._an.steady_state, self._prompt, self._Batch
        view = self._view
        views = [view(wl) for wl in workloads]
        shared = self._states
        states = []
        for v, wl in zip(views, workloads):
            if wl.speculative is not None:
                states.append(steady_state(v))
                continue
            key = (wl.batch_size, wl.input_len, wl.output_len)
            ss = shared.get(key)
            if ss is None:
                ss = shared[key] = steady_state(v)
            states.append(ss)
        prompts = [prompt_of(wl) for wl in workloads]
        seen: set[int] = set()
        need: dict[Any, Any] = {}
        mixed = self.mixed
        for ss, prompt in zip(states, prompts):
            d = ss.decode
            dk = _step_key(d)
            need[dk] = d
            for p, _ in ss.mixes:
                if not mixed:
                    need[_step_key(p)] = p
                elif d.prefill is None and p.prefill is None:  # the key without the batch
                    need[dk + (p.phase, p.num_seqs, p.new_tokens, p.context)] = (d, p)
                else:
                    b = Batch(d.phase, d.num_seqs, d.new_tokens, d.context, p)
                    need[_step_key(b)] = b
            if id(prompt) not in seen:  # a memoised plan's steps are listed once
                seen.add(id(prompt))
                for chunks, _ in prompt[0]:
                    for b, _ in chunks:
                        need[_step_key(b)] = b
        self.price(need)
        point = self._point
        return [point(*args) for args in zip(views, states, prompts)]

    def _run_means(self, view: Any, served: Any, first_wave: tuple) -> tuple:
        """analytic.predict's first wave and its mix with the steady state: (TTFT, TPOT,
        first-wave TTFT, first-wave prefill), ms (per draw where ``served`` has draws)."""
        first_us, clock = first_wave[0], first_wave[1]
        first_ms = (first_us + self._overhead_us) / 1e3
        prefill_ms = clock / 1e3
        ttft, tpot = self._an.benchmark_means(view, served, first_ms, prefill_ms)
        return ttft, tpot, first_ms, prefill_ms

    def _memory(self, sc: Any, wl: Any, dp: int) -> Any:
        """``memory.memory_per_gpu`` of a point, its workload-independent parts computed
        once."""
        seq_len = wl.input_len + wl.output_len
        per_seq = self._kv.get(seq_len)
        if per_seq is None:
            per_seq = self._kv[seq_len] = self._kv_bytes(sc, seq_len)
        act = self._activations(wl)
        free = self._cap - self._weights - act - self._reserved
        max_batch = max(0, int(free // per_seq)) * dp if per_seq > 0 else 0
        kv = -(-wl.batch_size // dp) * per_seq
        return self._Memory(self._weights, kv, act, self._reserved, self._cap, per_seq,
                            max_batch)

    def _point(self, view: Any, ss: Any, prompt: list[Any]) -> Outputs:
        sc, wl, an = self.sc, view.workload, self._an
        dp = sc.deployment.attention_dp
        draft = self._draft(view, ss) if wl.speculative is not None else 0.0
        served = an.serving_times(view, ss, self.time_of, draft)
        if prompt[1] is None:
            prompt[1] = self._first_wave(prompt[0])
        _, _, big_tokens, big_vec, big_shares = prompt[1]
        ttft, tpot, first_ms, prefill_ms = self._run_means(view, served, prompt[1])
        d = ss.decode
        dk = _step_key(d)
        dvec = self._vectors.get(dk) or self.step(d)
        dshares = self._shares.get(dk)
        if dshares is None:
            dshares = self._shares[dk] = _shares(dvec)
        mem = self._memory(sc, wl, dp)
        kv, act, total, max_batch = mem.kv_cache, mem.activations, mem.total, mem.max_batch_size
        thr = served.throughput_output_tok_per_s
        return (True, "", "fast", float(ttft), first_ms, float(tpot), thr, thr / sc.num_gpus,
                prefill_ms, sc.num_gpus, self._weights, kv, act, self._reserved, total,
                self._cap, total <= self._cap, max_batch, big_tokens, big_vec[0], d.num_seqs,
                dvec[0], served.mixed_fraction, ss.queued_requests * dp) + big_shares + \
            dshares + (1, " | ".join(an._warnings(view, mem, ss)))


class _Draw:
    """A node of :class:`Draws`: the routing loads ``[samples, L, E]`` drawn for one step, and
    the generator state after the draw."""

    __slots__ = ("id", "loads", "state", "children", "tokens")

    def __init__(self, id_: int, tokens: int, loads: Optional[np.ndarray], state: Any) -> None:
        self.id, self.tokens, self.loads, self.state = id_, tokens, loads, state
        self.children: dict[int, "_Draw"] = {}


class Draws:
    """The routing draws ``predict`` makes, shared by every scenario that draws the same way.

    ``predict`` seeds one generator per scenario (``routing.seed``) and draws
    ``routing.samples`` loads for each distinct step, in the order it first prices them, with
    ``sample_loads(routing, tokens, E, k, L, rng)``: the draws of a step depend only on the
    global token counts of the steps drawn before it and its own. This is a tree of them keyed
    by those token counts (the root: the seeded generator), so points sharing a prefix of steps
    (the same prompt shape, then the same decode batch, ...) and scenarios with the same routing
    and model shape share the draws (:meth:`child`)."""

    def __init__(self, routing: Any, num_experts: int, top_k: int, num_layers: int) -> None:
        self.routing, self.E, self.k, self.L = routing, num_experts, top_k, num_layers
        self.samples = int(routing.samples)
        self.root = _Draw(0, 0, None, np.random.default_rng(routing.seed).bit_generator.state)
        self.count = 1
        self.nbytes = 0  # of the loads held
        # What points of scenarios with the same (attention DP, token budget, mixed batching)
        # share, by (batch size, input length, output length): their steady state and replayed
        # steps (StochasticEvaluator.outputs_many); a grid repeats them in every layout and
        # precision with that attention DP.
        self.points: dict[tuple[Any, ...], dict[tuple[int, int, int], tuple[Any, ...]]] = {}

    def child(self, node: _Draw, tokens: int) -> _Draw:
        """The draw after ``node`` for a step of ``tokens`` global tokens."""
        c = node.children.get(tokens)
        if c is None:
            from .routing import sample_loads

            rng = np.random.default_rng()
            rng.bit_generator.state = node.state
            loads = sample_loads(self.routing, tokens, self.E, self.k, self.L, rng,
                                 num_samples=self.samples)
            c = node.children[tokens] = _Draw(self.count, tokens, loads, rng.bit_generator.state)
            self.count += 1
            self.nbytes += loads.nbytes
        return c


def _draws_key(sc: Any) -> tuple[Any, ...]:
    mo = sc.model.moe
    return (sc.routing.model_dump_json(), mo.num_experts, mo.top_k, sc.model.num_moe_layers)


def stochastic_supported(sc: Any) -> bool:
    """Whether :class:`StochasticEvaluator` covers ``sc`` (routing draws priced by the
    vectorised MoE path: fused kernels, no capacity cap, a static placement); else ``predict``
    evaluates it."""
    rs = sc.routing
    return (not deterministic(sc) and sc.deployment.strategy == "fused"
            and (rs.capacity_factor is None or rs.overflow == "dropless")
            and rs.placement != "eplb")


class StochasticEvaluator(FastEvaluator):
    """``predict`` for many workloads of one resolved scenario whose routing is drawn (zipf,
    power_law, uniform, ...; :func:`stochastic_supported`).

    The same plan as :class:`FastEvaluator` (``steady_state`` per workload, shared by the
    groups that draw alike; ``serving_times`` and ``benchmark_means`` as their row-wise twins,
    all points at once: :meth:`_rows`; steps priced together), with ``predict``'s draws: each
    point replays the order in which ``predict`` first prices its steps (the first wave's
    prefill steps, the decode step, then the iterations carrying each prefill in the order
    ``serving_times`` prices them: :meth:`_replay`), which fixes each step's draw
    (:class:`Draws`).
    A step's time per sample is its non-MoE part (:class:`~moesim.vstep.StepPricer`, each step
    once) plus its MoE layers for its draw (``StepPricer.moe_draws``, each draw and launch
    mode once)."""

    def __init__(self, sc: Any, draws: Draws) -> None:
        super().__init__(sc)
        # Here FastEvaluator's tables (``price``, ``step``, ``time_of``) hold each step's ops
        # outside the MoE layers (see _vectorise); ``_svector`` / ``_stimes`` add the draws'.
        self.draws = draws
        self.S = draws.samples
        self._moe: dict[tuple[int, bool], np.ndarray] = {}  # (draw, graph) -> [S, RAW_WIDTH]
        # (step key, draw) -> [S, 5] vectors and their times
        self._svec: dict[tuple[Any, int], np.ndarray] = {}
        self._stime: dict[tuple[Any, int], np.ndarray] = {}
        # MoE (GPU time without eager stalls, host time) [S] by draw, graph
        self._moe_t: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}
        self._gflag: dict[Any, bool] = {}  # step key -> graph-covered MoE
        self._sfirst_memo: dict[tuple[Any, int], tuple[float, tuple[float, ...]]] = {}

    def _graph(self, b: Any, k: Any = None) -> bool:
        """Whether a CUDA graph covers ``b``'s MoE ops (``step.graphs_cover``); ``k``: the
        step's key, to remember the answer by (points ask for the same steps again)."""
        if k is not None:
            g = self._gflag.get(k)
            if g is not None:
                return g
        p = self.pricer
        g = p.graphs and b.tokens <= p.graph_max
        g = bool(g and ((b.phase == "decode" and b.prefill is None) or p.piecewise))
        if k is not None:
            self._gflag[k] = g
        return g

    def _replay(self, view: Any, ss: Any, prompt: list[Any]
                ) -> tuple[Any, list[Any], dict[Any, Any]]:
        """One point's steps with their draws, in ``predict``'s order: (the decode step, the
        iterations carrying ``ss.mixes`` then ``ss.ttft_mixes``), each as (step key, batch,
        draw); and {step key: (batch, draw)} of the steps drawn after the prompt shape's first
        wave (``prompt[2]``: its steps and draws, shared by the points of that shape)."""
        draws, dp = self.draws, self.sc.deployment.attention_dp
        if len(prompt) < 3:  # the first wave's steps come first: the same for a prompt shape
            seq: dict[Any, tuple[Any, _Draw]] = {}
            node = draws.root
            for chunks, _ in prompt[0]:
                for b, _ in chunks:
                    k = _step_key(b)
                    if k not in seq:
                        node = draws.child(node, b.tokens * dp)
                        seq[k] = (b, node)
            prompt.append((seq, node))
        seq0, node = prompt[2]
        added: dict[Any, tuple[Any, _Draw]] = {}
        # Then the decode step and the iterations carrying each prefill, in the order
        # ``serving_times`` first prices them (its ``carrying``: ``mixes``, then the
        # ``ttft_mixes`` not among them); predict's other steps repeat these. Listed here rather
        # than recorded by a second serving_times call per point, which cost as much as the
        # one that prices; a different order would change the draws, which the group's check
        # against predict and the twin tests catch.
        d = ss.decode
        dk = _step_key(d)
        e = seq0.get(dk)
        if e is None:
            node = draws.child(node, d.tokens * dp)
            e = added[dk] = (d, node)
        dec = (dk,) + e
        Batch = self._Batch
        mixed = self.mixed
        carried = []
        for p, _ in itertools.chain(ss.mixes, ((p, 0.0) for p in ss.ttft_mixes)):
            b = Batch(d.phase, d.num_seqs, d.new_tokens, d.context, p) if mixed else p
            k = _step_key(b)
            e = seq0.get(k) or added.get(k)  # (batch, draw) tuples are never falsy
            if e is None:
                node = draws.child(node, b.tokens * dp)
                e = added[k] = (b, node)
            carried.append((k,) + e)
        return dec, carried, added

    def outputs_many(self, workloads: Sequence[Any]) -> list[Outputs]:
        if any(wl.speculative is not None for wl in workloads):
            raise NotImplementedError("speculative decoding with drawn routing: use predict")
        steady_state, prompt_of = self._an.steady_state, self._prompt
        view = self._view
        views = [view(wl) for wl in workloads]
        prompts = [prompt_of(wl) for wl in workloads]
        # steady_state reads the workload's batch size and lengths (and its speculative
        # settings: none here), the attention DP, the token budget and mixed batching;
        # prefill_plan fewer of these; _replay those and the draws (this tree): points that
        # agree on all of them have the same steady state and steps, whatever the group.
        sc = self.sc
        shared = self.draws.points.setdefault(
            (sc.deployment.attention_dp, sc.max_num_batched_tokens, self.mixed), {})
        states, replays = [], []
        for v, wl, pr in zip(views, workloads, prompts):
            key = (wl.batch_size, wl.input_len, wl.output_len)
            hit = shared.get(key)
            if hit is None:
                ss = steady_state(v)
                hit = shared[key] = (ss, self._replay(v, ss, pr), pr[2])
            elif len(pr) < 3:  # this group's first point of the prompt shape: its first wave
                pr.append(hit[2])
            states.append(hit[0])
            replays.append(hit[1])
        steps: dict[Any, Any] = {}
        moe: dict[tuple[int, bool], _Draw] = {}
        graph = self._graph
        seen: set[int] = set()
        for pr, (_, _, added) in zip(prompts, replays):
            if id(pr) not in seen:  # a prompt shape's first-wave steps, listed once
                seen.add(id(pr))
                for k, (b, node) in pr[2][0].items():
                    steps[k] = b
                    moe.setdefault((node.id, graph(b, k)), node)
            for k, (b, node) in added.items():
                steps[k] = b
                moe.setdefault((node.id, graph(b, k)), node)
        self.price(steps)  # the parts outside the MoE layers (_vectorise)
        new = [(k, n) for k, n in moe.items() if k not in self._moe]
        if new:
            tokens = np.array([n.tokens for _, n in new], dtype=np.float64) / \
                self.sc.deployment.attention_dp
            loads = np.stack([n.loads for _, n in new])
            cov = np.array([g for (_, g), _ in new])
            for ((k, _), v) in zip(new, self.pricer.moe_draws(tokens, loads, cov)):
                self._moe[k] = v
        return self._rows(views, states, prompts, replays)

    def _rows(self, views: list[Any], states: list[Any], prompts: list[Any],
              replays: list[Any]) -> list[Outputs]:
        """The points' outputs: ``serving_times`` and ``benchmark_means`` of all of them at
        once (``analytic.serving_times_rows`` / ``benchmark_means_rows``, one row per point;
        per point they cost more in numpy's per-call overhead than in arithmetic), on the
        per-sample step times of each point's steps with its draws."""
        an, S, sc = self._an, self.S, self.sc
        dp, mixed = sc.deployment.attention_dp, self.mixed
        # every (step, draw) the points use, as rows of one table; row 0: zeros (the padding)
        table: list[np.ndarray] = [np.zeros(S)]
        row_of: dict[tuple[Any, int], int] = {}
        stimes = self._stimes

        def row(k: Any, b: Any, node: _Draw) -> int:
            r = row_of.get((k, node.id))
            if r is None:
                r = row_of[(k, node.id)] = len(table)
                table.append(stimes(k, b, node))
            return r

        P = len(views)
        n_mix = max(len(ss.mixes) for ss in states)
        n_own = max(len(ss.ttft_mixes) for ss in states)
        dec = np.zeros(P, dtype=np.intp)
        mix = np.zeros((P, n_mix), dtype=np.intp)
        mix_w = np.zeros((P, n_mix))
        own = np.zeros((P, n_own), dtype=np.intp)
        share = np.empty(P)
        wait = np.empty(P)
        num = np.empty(P)
        first = np.full(P, np.nan)
        osl = np.empty(P, dtype=np.int64)
        fw_rows: list[int] = []  # each point's prompt shape, as a row of fw_ttft / fw_prefill
        fw_of: dict[int, int] = {}
        fw_list: list[tuple[Any, ...]] = []
        overlap = self.sc.framework.overlap_scheduler.value
        for i, (view, ss, prompt, (d_step, carried, _)) in enumerate(
                zip(views, states, prompts, replays)):
            wl = view.workload
            dec[i] = row(*d_step)
            m = len(ss.mixes)
            for j, (step, (_, w)) in enumerate(zip(carried, ss.mixes)):
                mix[i, j] = row(*step)
                mix_w[i, j] = w
            for j, step in enumerate(carried[m:]):
                own[i, j] = row(*step)
            share[i] = sum(w for _, w in ss.mixes)
            wait[i] = overlap + ss.queue_iterations
            num[i] = dp * ss.prompts_per_iteration * wl.output_len
            if wl.num_requests is not None:
                first[i] = wl.batch_size / wl.num_requests
            osl[i] = wl.output_len
            if prompt[1] is None:
                prompt[1] = self._sfirst_wave(prompt[0], prompt[2][0])
            r = fw_of.get(id(prompt))
            if r is None:
                r = fw_of[id(prompt)] = len(fw_list)
                fw_list.append(prompt[1])
            fw_rows.append(r)
        T = np.stack(table)
        t_dec = T[dec]
        if mixed:  # the iteration carrying a chunk, as the decodes and as its request see it
            carry, own_t = T[mix], T[own]
        else:  # the chunk's own step after the decode step / the chunk's step alone
            carry, own_t = t_dec[:, None] + T[mix], T[own]
        ttft_ss, tpot_ss, thr = an.serving_times_rows(
            t_dec, carry, mix_w, own_t, share, wait, num, 1.0, self._overhead_us)
        fw_idx = np.array(fw_rows, dtype=np.intp)
        fw_ttft = np.stack([f[5] for f in fw_list])[fw_idx]
        fw_prefill = np.stack([f[6] for f in fw_list])[fw_idx]
        ttft, tpot = an.benchmark_means_rows(ttft_ss, tpot_ss, fw_ttft, fw_prefill, first, osl)
        # _mean per row (np.add.reduce of a contiguous row sums as one row alone does)
        ttft_l = (np.add.reduce(ttft, axis=1) / S).tolist()
        tpot_l = (np.add.reduce(tpot, axis=1) / S).tolist()
        thr_l = thr.tolist()
        share_l = share.tolist()
        out: list[Outputs] = []
        memory, warnings, sfirst = self._memory, an._warnings, self._sfirst
        num_gpus, weights, reserved, cap = sc.num_gpus, self._weights, self._reserved, self._cap
        for i, (view, ss, prompt, (d_step, _, _)) in enumerate(
                zip(views, states, prompts, replays)):
            _, _, big_tokens, big_us, big_shares, _, _, first_mean, prefill_mean = prompt[1]
            d = ss.decode
            d_us, d_shares = sfirst(*d_step)
            mem = memory(sc, view.workload, dp)
            total = mem.total
            t = thr_l[i]
            out.append((True, "", "fast", ttft_l[i], first_mean, tpot_l[i], t, t / num_gpus,
                        prefill_mean, num_gpus, weights, mem.kv_cache, mem.activations,
                        reserved, total, cap, total <= cap, mem.max_batch_size, big_tokens,
                        big_us, d.num_seqs, d_us, share_l[i], ss.queued_requests * dp)
                       + big_shares + d_shares + (S, " | ".join(warnings(view, mem, ss))))
        return out

    def _vectorise(self, steps: list[Any]) -> np.ndarray:
        """Step vectors of new steps without their MoE layers (priced per draw)."""
        return self.pricer.vectors(steps, moe=False)

    def _svector(self, k: Any, b: Any, node: _Draw) -> np.ndarray:
        """[S, 5] step vectors of step ``b`` (key ``k``) with draw ``node``."""
        v = self._svec.get((k, node.id))
        if v is None:
            v = self._svec[(k, node.id)] = finish(
                np.asarray(self._vectors[k]) + self._moe[(node.id, self._graph(b, k))])
        return v

    def _sfirst(self, k: Any, b: Any, node: _Draw) -> tuple[float, tuple[float, ...]]:
        """(time µs, bound shares) of step ``b`` (key ``k``) with the first sample of draw
        ``node``: what a row reports of a step (as predict's ``steps[0]``), once per step and
        draw rather than per point."""
        r = self._sfirst_memo.get((k, node.id))
        if r is None:
            v = self._svector(k, b, node)[0]
            # the shares stay numpy floats: the CSV writes them as it always has (full repr)
            r = self._sfirst_memo[(k, node.id)] = (float(v[0]), _shares(v))
        return r

    def _stimes(self, k: Any, b: Any, node: _Draw) -> np.ndarray:
        """[S] step times of step ``b`` (key ``k``) with draw ``node``: its non-MoE time plus
        its MoE layers' with that draw (the time column of :meth:`_svector`, for less)."""
        t = self._stime.get((k, node.id))
        if t is None:
            g = self._graph(b, k)
            m = self._moe_t.get((node.id, g))
            if m is None:
                raw = self._moe[(node.id, g)]
                m = self._moe_t[(node.id, g)] = (raw[:, 0] - raw[:, STALL], raw[:, HOST].copy())
            v = self._vectors[k]
            # vstep.finish's time: max(GPU time, host time) of the parts' sums
            t = self._stime[(k, node.id)] = np.maximum((v[0] - v[STALL]) + m[0], v[HOST] + m[1])
        return t

    def _sfirst_wave(self, plan: Any, seq: dict[Any, Any]) -> tuple[Any, ...]:
        """:meth:`FastEvaluator._first_wave` per sample (arrays), then the first wave's TTFT
        and prefill ms per sample and their means (the same for every point of the prompt
        shape)."""
        clock = ttft_sum = np.zeros(self.S)
        finished = 0
        big: Optional[Any] = None
        for chunks, repeat in plan:
            block = np.zeros(self.S)
            for batch, done in chunks:
                k = _step_key(batch)
                block = block + self._stimes(k, *seq[k])
                if done:
                    ttft_sum = ttft_sum + done * repeat * (clock + block)
                    finished += done * repeat
                if big is None or batch.tokens > big.tokens:
                    big = batch
            ttft_sum = ttft_sum + sum(done for _, done in chunks) * block * repeat * \
                (repeat - 1) / 2.0
            clock = clock + repeat * block
        assert big is not None and finished > 0
        bk = _step_key(big)
        # and what every point with this prompt shape reports of it (_run_means's first part)
        first_ms = (ttft_sum / finished + self._overhead_us) / 1e3
        prefill_ms = clock / 1e3
        return (ttft_sum / finished, clock, big.tokens) + self._sfirst(bk, *seq[bk]) + \
            (first_ms, prefill_ms, _mean(first_ms), _mean(prefill_ms))


def _mean(x: np.ndarray) -> float:
    """``float(x.mean())`` (the same sum over the same count), without its overhead."""
    return float(np.add.reduce(x)) / x.size


def evaluator_for(sc: Any, draws: Optional[dict[Any, Draws]] = None,
                  states: Optional[dict[Any, Any]] = None) -> Optional[FastEvaluator]:
    """The fast evaluator of a resolved scenario (None: only ``predict`` covers it);
    ``draws``: routing draws to share (:class:`Draws` by :func:`_draws_key`); ``states``:
    steady states to share (:class:`FastEvaluator`)."""
    if deterministic(sc):
        return FastEvaluator(sc, states)
    if not stochastic_supported(sc):
        return None
    shared = {} if draws is None else draws
    key = _draws_key(sc)
    if key not in shared:
        shared[key] = Draws(sc.routing, sc.model.moe.num_experts, sc.model.moe.top_k,
                            sc.model.num_moe_layers)
    return StochasticEvaluator(sc, shared[key])


def outputs_agree(fast: Outputs, ref: Outputs, rtol: float = VERIFY_RTOL) -> Optional[str]:
    """None when two outputs agree (numbers within ``rtol``); else the first difference."""
    for c in NUMERIC_OUTPUTS:
        a, b = fast[_COL[c]], ref[_COL[c]]
        if not math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-9):
            return f"{c}: fast {a!r} != predict {b!r}"
    for c in ("feasible", "fits", "warnings"):
        if fast[_COL[c]] != ref[_COL[c]]:
            return f"{c}: fast {fast[_COL[c]]!r} != predict {ref[_COL[c]]!r}"
    return None


# =============================================================================================
# Evaluating groups of points
# =============================================================================================

@dataclass
class GroupTask:
    """Points that differ only in their workload: the structural assignments, and per point its
    index and workload assignments."""

    structural: list[tuple[str, Any]]
    points: list[tuple[int, list[tuple[str, Any]]]]


@dataclass
class GroupResult:
    outputs: list[tuple[int, Outputs]]
    warnings: list[str] = field(default_factory=list)
    step_builds: int = 0
    cells: list[str] = field(default_factory=list)  # each output's CSV cells (csv_cells)


def _merged_workload(doc: dict[str, Any], assigns: list[tuple[str, Any]]) -> Any:
    wl = doc.get("workload")
    if not assigns:
        return wl
    wl = dict(wl) if isinstance(wl, dict) else {}
    for path, value in assigns:
        wl[path.split(".", 1)[1]] = value
    return wl


def _full_parse(doc: dict[str, Any], base_dir: Optional[Path]) -> tuple[Any, Optional[InputError]]:
    from .spec.scenario import parse_scenario

    try:
        return parse_scenario(doc, base_dir=base_dir), None
    except InputError as exc:
        return None, exc


def evaluate_group(base: dict[str, Any], base_dir: Optional[Path], task: GroupTask, *,
                   verify: bool = True, fast: bool = True,
                   workloads: Optional[dict[Any, Any]] = None,
                   draws: Optional[dict[Any, Draws]] = None,
                   states: Optional[dict[Any, Any]] = None) -> GroupResult:
    """Outputs of one group's points.

    The group is resolved once with a workload that passes every check; each point's workload is
    then validated and checked against the resolved scenario (``_check_consistency``), which
    reports the same first error as parsing the point's whole scenario would. Where that order
    could differ (an invalid workload field, or a routing-file error) the point is parsed whole.
    ``workloads``: validated workloads by their documents' items, and ``draws``: routing draws
    (:class:`Draws`), both shared by the groups one process evaluates (a grid repeats every
    workload in every group, and the draws of every routing)."""
    from pydantic import ValidationError

    from .analytic import predict
    from .errors import from_pydantic
    from .spec.scenario import _check_consistency
    from .spec.workload import Workload

    res = GroupResult([])
    doc = copy.deepcopy(base)
    group_err: Optional[InputError] = None
    sc = None
    try:
        for path, value in task.structural:
            set_path(doc, path, value)
        gdoc = dict(doc)
        gdoc["workload"] = dict(_NEUTRAL_WORKLOAD)
        sc, group_err = _full_parse(gdoc, base_dir)
    except InputError as exc:
        group_err = exc
    evaluator: Optional[FastEvaluator] = None
    if fast and sc is not None and len(task.points) >= 4:
        if draws and sum(d.nbytes for d in draws.values()) > _MAX_DRAW_BYTES:
            draws.clear()  # drawn again when needed: the same draws
        evaluator = evaluator_for(sc, draws, states)
    wl_cache: dict[Any, Any] = {} if workloads is None else workloads
    out = res.outputs
    pending: list[tuple[int, Any]] = []  # points for the fast evaluator
    check = None
    if sc is not None:
        check = WorkloadMemo(sc, lambda s: _check_consistency(
            sc.model, sc.hardware, sc.num_gpus, sc.gpus_per_node, sc.deployment, s.workload,
            sc.routing))

    for idx, assigns in task.points:
        wl_doc = _merged_workload(doc, assigns)
        key = tuple(wl_doc.items()) if isinstance(wl_doc, dict) else _freeze(wl_doc)
        try:
            wl = wl_cache.get(key)
        except TypeError:  # unhashable values: let pydantic say what is wrong
            key, wl = _freeze(wl_doc), None
            wl = wl_cache.get(key)
        if wl is None:
            try:
                wl = Workload.model_validate(wl_doc)
            except ValidationError as exc:
                wl = from_pydantic(exc, prefix="workload")
            wl_cache[key] = wl
        if isinstance(wl, InputError) or (group_err is not None and (
                group_err.field == "routing" or group_err.field.startswith("workload"))):
            # Which error a whole parse reports first depends on both parts: ask it.
            pdoc = dict(doc)
            pdoc["workload"] = wl_doc
            psc, err = _full_parse(pdoc, base_dir)
            out.append((idx, error_outputs(err) if err is not None
                        else prediction_outputs(predict(psc))))
            continue
        if group_err is not None:
            out.append((idx, error_outputs(group_err)))
            continue
        try:
            check(wl)
        except InputError as exc:
            out.append((idx, error_outputs(exc)))
            continue
        if evaluator is None:
            out.append((idx, prediction_outputs(predict(with_workload(sc, wl)))))
            continue
        pending.append((idx, wl))
    if pending:
        # All points at once: their steps are priced together (FastEvaluator.outputs_many).
        assert evaluator is not None and sc is not None
        try:
            outs = evaluator.outputs_many([wl for _, wl in pending])
        except NotImplementedError:  # a case the evaluator leaves to predict
            outs = [prediction_outputs(predict(with_workload(sc, wl))) for _, wl in pending]
            evaluator = None
        if verify and evaluator is not None:
            # One point a group is checked against predict; the one with the fewest tokens in
            # flight is the cheapest to predict (fewest distinct steps to draw and price).
            j = min(range(len(pending)), key=lambda i: (
                pending[i][1].batch_size * (pending[i][1].input_len + pending[i][1].output_len),
                i))
            ref = prediction_outputs(predict(with_workload(sc, pending[j][1])))
            diff = outputs_agree(outs[j], ref)
            if diff is not None:
                res.warnings.append(f"fast path disagrees with predict ({diff}) for "
                                    f"{dict(task.structural)}: group evaluated with predict")
                outs = [prediction_outputs(predict(with_workload(sc, wl)))
                        for _, wl in pending]
                evaluator = None
        out.extend((idx, o) for (idx, _), o in zip(pending, outs))
    if evaluator is not None:
        res.step_builds = evaluator.step_builds
    return res


def _run_tasks(args: tuple[dict[str, Any], Optional[Path], list[GroupTask], bool, bool]
               ) -> list[GroupResult]:
    base, base_dir, tasks, verify, fast = args
    workloads, draws, states = _worker_caches()
    with _no_gc():
        out = [evaluate_group(base, base_dir, t, verify=verify, fast=fast, workloads=workloads,
                              draws=draws, states=states) for t in tasks]
        # The output part of each CSV line is formatted here, in parallel, rather than by the
        # parent after every worker has finished (write_csv uses it).
        for g in out:
            g.cells = csv_cells(o for _, o in g.outputs)
        return out


# A worker process's caches, kept from one batch of groups to the next (the same workloads and
# routing draws and steady states recur in every group of a grid); see _worker_caches.
_WORKER_CACHES: tuple[dict[Any, Any], dict[Any, "Draws"], dict[Any, Any]] = ({}, {}, {})
_MAX_DRAW_BYTES = 256 * 1024 * 1024


def _worker_caches() -> tuple[dict[Any, Any], dict[Any, "Draws"], dict[Any, Any]]:
    """This process's (validated workloads, routing draws, steady states), emptied when the
    draws hold more than :data:`_MAX_DRAW_BYTES` of loads or the workloads or steady states
    number more than a million (a long-lived process serves many sweeps)."""
    workloads, draws, states = _WORKER_CACHES
    if sum(d.nbytes for d in draws.values()) > _MAX_DRAW_BYTES or len(workloads) > 1_000_000 \
            or sum(len(t) for t in states.values()) > 1_000_000:
        workloads.clear()
        draws.clear()
        states.clear()
    return workloads, draws, states


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Cyclic garbage collection off while groups are evaluated: a sweep allocates millions of
    small objects and keeps large memo tables alive, so the collector's passes cost a quarter of
    the time while finding next to nothing (reference counting still frees everything that is
    not in a cycle)."""
    was, frozen = gc.isenabled(), gc.get_freeze_count()
    gc.disable()
    try:
        yield
    finally:
        # Everything made meanwhile (still alive: the results and memo tables) would be walked
        # by the first collection after re-enabling, a quarter of a second for a big sweep:
        # move it straight to the oldest generation instead (freeze, then unfreeze into the
        # oldest generation, unless something else froze objects first).
        gc.freeze()
        if not frozen:
            gc.unfreeze()
        if was:
            gc.enable()


def _slot(a: Axis, j: int) -> Any:
    return j if a.linked else a.values[j]


def make_tasks(spec: SweepSpec, limit: Optional[int] = None) -> tuple[list[GroupTask], int]:
    """Group the points by their non-workload assignments. Returns the groups and the number of
    points (``limit``: only the first so many)."""
    axes = spec.axes
    s_axes = [i for i, a in enumerate(axes) if not a.workload_only]
    w_axes = [i for i, a in enumerate(axes) if a.workload_only]
    n = len(spec) if limit is None else min(limit, len(spec))
    if spec.sampling == "grid":
        lens = [len(a) for a in axes]
        strides = [math.prod(lens[i + 1:]) for i in range(len(axes))]
        w_combos = list(itertools.product(*[range(lens[i]) for i in w_axes]))
        w_assign: list[list[tuple[str, Any]]] = []
        w_off = np.zeros(len(w_combos), dtype=np.int64)
        for c, combo in enumerate(w_combos):
            lst: list[tuple[str, Any]] = []
            for i, j in zip(w_axes, combo):
                lst += axes[i].assignments(_slot(axes[i], j))
                w_off[c] += j * strides[i]
            w_assign.append(lst)
        tasks = []
        for combo in itertools.product(*[range(lens[i]) for i in s_axes]):
            off = sum(j * strides[i] for i, j in zip(s_axes, combo))
            st: list[tuple[str, Any]] = []
            for i, j in zip(s_axes, combo):
                st += axes[i].assignments(_slot(axes[i], j))
            idx = (w_off + off).tolist()
            pts = [(k, w) for k, w in zip(idx, w_assign) if k < n]
            if pts:
                tasks.append(GroupTask(st, pts))
        return tasks, n
    groups: dict[tuple[Any, ...], GroupTask] = {}
    for idx, point in zip(range(n), spec.points()):
        key = tuple(_freeze(point[i]) for i in s_axes)
        g = groups.get(key)
        if g is None:
            st = []
            for i in s_axes:
                st += axes[i].assignments(point[i])
            g = groups[key] = GroupTask(st, [])
        wa: list[tuple[str, Any]] = []
        for i in w_axes:
            wa += axes[i].assignments(point[i])
        g.points.append((idx, wa))
    return list(groups.values()), n


def _input_columns(spec: SweepSpec, n: int) -> tuple[list[str], list[list[Any]]]:
    """The axis columns of the first ``n`` points, column by column."""
    names = spec.input_columns()
    pos = {c: i for i, c in enumerate(names)}
    cols: list[list[Any]] = [[""] * n for _ in names]
    if spec.sampling == "grid":
        lens = [len(a) for a in spec.axes]
        idx = np.arange(n, dtype=np.int64)
        for i, a in enumerate(spec.axes):
            j = (idx // math.prod(lens[i + 1:])) % lens[i]
            if a.linked:
                cols[pos[a.name]] = j.tolist()
                for p in a.paths:
                    vals = np.empty(len(a.values), dtype=object)
                    vals[:] = [_cell(v.get(p, "")) for v in a.values]
                    cols[pos[p]] = vals[j].tolist()
            else:
                vals = np.empty(len(a.values), dtype=object)
                vals[:] = [_cell(v) for v in a.values]
                cols[pos[a.name]] = vals[j].tolist()
        return names, cols
    for k, point in zip(range(n), spec.points()):
        for a, v in zip(spec.axes, point):
            if a.linked:
                cols[pos[a.name]][k] = v
            for p, value in a.assignments(v):
                cols[pos[p]][k] = _cell(value)
    return names, cols


def _batches(tasks: list[GroupTask], parts: int, base: Optional[dict[str, Any]] = None,
             processes: Optional[int] = None) -> list[list[GroupTask]]:
    """Split groups into about ``parts`` batches of similar cost (big ones first) for
    ``processes`` processes (default ``parts``): a point costs about 2.2 times as much with
    drawn routing as with balanced routing (in ``base`` with the group's assignments;
    benchmarks/bench_sweep.py).

    Groups with the same drawn routing and attention DP replay the same routing draws and
    steady states (:class:`Draws`, kept by each process for all its groups): they go to one
    batch, so one process draws them, unless together they cost more than a process's share
    (then they are split into as few parts as keep the shares even). Only where groups run
    depends on this, never their rows."""
    parts = max(1, min(parts, len(tasks)))
    routing = (base or {}).get("routing")
    base_dep = (base or {}).get("deployment")
    base_dp = base_dep.get("attention_dp", 1) if isinstance(base_dep, dict) else None

    def drawn_family(t: GroupTask) -> Optional[tuple[str, Any]]:
        """(routing, attention DP) of a group with drawn routing; None for balanced."""
        r = dict(routing) if isinstance(routing, dict) else {}
        dp = base_dp
        for path, value in t.structural:
            if path == "routing" and isinstance(value, dict):
                r = dict(value)
            elif path.startswith("routing."):
                r[path.split(".", 1)[1]] = value
            elif path == "deployment.attention_dp":
                dp = value
            elif path == "deployment":
                dp = None
        if r.get("distribution", "balanced") == "balanced":
            return None
        return json.dumps(r, sort_keys=True, default=str), (dp if dp is not None else id(t))

    def cost(t: GroupTask) -> float:
        return len(t.points) * (1.0 if drawn_family(t) is None else 2.2)

    families: dict[Any, list[GroupTask]] = {}
    units: list[tuple[float, list[GroupTask]]] = []
    for t in tasks:
        f = drawn_family(t)
        if f is None:
            units.append((cost(t), [t]))
        else:
            families.setdefault(f, []).append(t)
    share = sum(cost(t) for t in tasks) / max(1, min(processes or parts, len(tasks)))
    for fam in families.values():
        total = sum(cost(t) for t in fam)
        k = max(1, math.ceil(total / share - 1e-9))
        fam.sort(key=lambda t: -cost(t))
        for i in range(k):
            part = fam[i::k]
            units.append((sum(cost(t) for t in part), part))
    units.sort(key=lambda u: -u[0])
    bins: list[list[GroupTask]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for c, part in units:
        i = loads.index(min(loads))
        bins[i].extend(part)
        loads[i] += c
    order = sorted(range(parts), key=lambda i: -loads[i])  # the biggest batches start first
    return [bins[i] for i in order if bins[i]]


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: Optional[bool] = None, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done = total, 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.1 and self.done < self.total):
            return
        self._last = now
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r  [{bar:<30}] {self.done:,}/{self.total:,} points "
                          f"{100 * frac:5.1f}%  {rate:,.0f}/s  eta {eta:4.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class SweepResult:
    """One row per point: the axis columns, then :data:`OUTPUT_COLUMNS`."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    seconds: float
    warnings: list[str]
    step_builds: int = 0
    # (the rows they belong to, each row's output cells as a CSV fragment, and its axis cells
    # or None): formatted by the worker processes (the axis cells by the parent while they
    # run); write_csv uses them while ``rows`` is still that list
    _cells: Optional[tuple[list[Any], list[str], Optional[list[str]]]] = field(
        default=None, repr=False, compare=False)

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def dicts(self) -> list[Row]:
        return [dict(zip(self.columns, r)) for r in self.rows]

    @property
    def feasible(self) -> int:
        return sum(1 for v in self.column("feasible") if v)


def _ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--ray", "Ray is not installed", "pip install 'ray>=2' (an optional "
                         "extra), or use --workers N for local processes") from None
    return ray


def _execute(tasks: list[GroupTask], n: int, base: dict[str, Any], base_dir: Optional[Path], *,
             workers: int = 1, ray_address: Optional[str] = None, progress: Optional[bool] = None,
             verify: bool = True, fast: bool = True,
             meanwhile: Optional[Callable[[], Any]] = None
             ) -> tuple[list[Outputs], list[str], int, Optional[list[str]], Any]:
    """Evaluate the groups; ``meanwhile``: parent work run while worker processes (or Ray)
    evaluate, else after; its result is returned last."""
    ray = _ray_module() if ray_address else None
    side: Any = None
    results: list[Optional[Outputs]] = [None] * n
    bar = Progress(n, progress)
    warnings: list[str] = []
    builds = 0

    cells: list[str] = [""] * n
    formatted = True

    def take(batch: list[GroupResult]) -> None:
        nonlocal builds, formatted
        for g in batch:
            for idx, o in g.outputs:
                results[idx] = o
            if g.cells:
                for (idx, _), c in zip(g.outputs, g.cells):
                    cells[idx] = c
            elif g.outputs:
                formatted = False
            warnings.extend(g.warnings)
            builds += g.step_builds
            bar.update(len(g.outputs))

    if ray is not None:
        if not ray.is_initialized():
            ray.init(address=None if ray_address == "local" else ray_address,
                     log_to_driver=False)
        remote = ray.remote(_run_tasks)
        size = max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending = [remote.remote((base, base_dir, b, verify, fast))
                   for b in _batches(tasks, 4 * size, base, size)]
        side = meanwhile() if meanwhile else None
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            take(ray.get(done[0]))
    elif workers > 1 and len(tasks) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [pool.submit(_run_tasks, (base, base_dir, b, verify, fast))
                    for b in _batches(tasks, 4 * workers, base, workers)]
            side = meanwhile() if meanwhile else None
            for f in cf.as_completed(futs):
                take(f.result())
    else:
        workloads, draws, states = _worker_caches()
        with _no_gc():
            for t in tasks:
                take([evaluate_group(base, base_dir, t, verify=verify, fast=fast,
                                     workloads=workloads, draws=draws, states=states)])
        side = meanwhile() if meanwhile else None
    bar.close()
    assert all(r is not None for r in results)
    return results, warnings, builds, (cells if formatted else None), side  # type: ignore


def run_sweep(spec: SweepSpec, *, workers: int = 1, ray_address: Optional[str] = None,
              progress: Optional[bool] = None, verify: bool = True, fast: bool = True,
              limit: Optional[int] = None) -> SweepResult:
    """Evaluate every point of ``spec`` (or the first ``limit``): in this process, over
    ``workers`` local processes, or on the Ray cluster at ``ray_address`` (``auto``: the cluster
    this machine belongs to; ``local``: start one here). ``progress``: a bar on stderr (default:
    when stderr is a terminal); ``verify``: check each group's first point against predict;
    ``fast=False``: predict every point."""
    t0 = time.perf_counter()
    if ray_address:
        _ray_module()
    tasks, n = make_tasks(spec, limit)

    def axis_columns() -> tuple[list[str], list[list[Any]], Optional[list[str]]]:
        # the axis columns and their CSV cells: parent work that overlaps the workers'
        names, cols = _input_columns(spec, n)
        heads = csv_cells(zip(*cols)) if cols and (workers > 1 or ray_address) else None
        return names, cols, heads

    results, warnings, builds, cells, (names, cols, heads) = _execute(
        tasks, n, spec.base, spec.base_dir, workers=workers, ray_address=ray_address,
        progress=progress, verify=verify, fast=fast, meanwhile=axis_columns)
    rows = [tuple(inp) + o for inp, o in zip(zip(*cols), results)] if cols \
        else [tuple(o) for o in results]
    res = SweepResult(names + list(OUTPUT_COLUMNS), rows, time.perf_counter() - t0, warnings,
                      builds)
    if cells is not None:
        res._cells = (rows, cells, heads)
    return res


def evaluate(base: dict[str, Any], points: Sequence[Sequence[tuple[str, Any]]], *,
             base_dir: Optional[Path] = None, workers: int = 1, verify: bool = True,
             fast: bool = True) -> list[Row]:
    """Outputs (a dict per point, :data:`OUTPUT_COLUMNS`) of ``base`` with each point's
    ``(dotted.path, value)`` assignments applied: the sweep machinery for an explicit list."""
    groups: dict[Any, GroupTask] = {}
    for idx, assigns in enumerate(points):
        st = [(p, v) for p, v in assigns if not p.startswith("workload.")]
        wa = [(p, v) for p, v in assigns if p.startswith("workload.")]
        key = _freeze([[p, _freeze(v)] for p, v in st])
        groups.setdefault(key, GroupTask(st, [])).points.append((idx, wa))
    results, _, _, _, _ = _execute(list(groups.values()), len(points), base, base_dir,
                                workers=workers, progress=False, verify=verify, fast=fast)
    return [outputs_dict(o) for o in results]


# =============================================================================================
# Output
# =============================================================================================

def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def _quoted(v: str) -> str:
    """A CSV cell as ``csv.writer`` (QUOTE_MINIMAL) writes it."""
    if '"' in v:
        return '"' + v.replace('"', '""') + '"'
    if "," in v or "\n" in v:  # the delimiter or the line terminator
        return '"' + v + '"'
    return v


def _row_format(types: tuple[type, ...]) -> tuple[str, tuple[int, ...]]:
    """The ``%`` format of a CSV line whose cells have these types, and the positions of its
    string cells (quoted first): floats with 12 significant digits (``repr`` of every float
    costs twice as much and the model is nowhere near that precise; parquet keeps full
    precision), everything else as ``str``."""
    fmt = ",".join("%.12g" if t is float else "%s" for t in types) + "\n"
    return fmt, tuple(i for i, t in enumerate(types) if t is str)


def csv_lines(rows: Iterable[Sequence[Any]], end: str = "\n") -> list[str]:
    """The CSV lines of ``rows`` (what ``csv.writer`` writes for their formatted cells), one
    ``%`` format per distinct row of cell types: a few dozen µs a row. ``end``: the line
    terminator (:func:`csv_cells`: none)."""
    formats: dict[tuple[type, ...], tuple[str, tuple[int, ...]]] = {}
    out = []
    for row in rows:
        types = tuple(map(type, row))
        f = formats.get(types)
        if f is None:
            fmt, strs = _row_format(types)
            f = formats[types] = (fmt[:-1] + end, strs)
        fmt, strs = f
        if strs:
            row = list(row)
            for i in strs:
                row[i] = _quoted(row[i])
            row = tuple(row)
        out.append(fmt % row)
    return out


def csv_cells(rows: Iterable[Sequence[Any]]) -> list[str]:
    """:func:`csv_lines` without the line terminators: fragments of lines."""
    return csv_lines(rows, "")


def write_csv(result: SweepResult, stream: Any) -> None:
    csv.writer(stream, lineterminator="\n").writerow(result.columns)
    pre = result._cells
    if pre is None or pre[0] is not result.rows or not result.rows:
        stream.writelines(csv_lines(result.rows))
        return
    # The output cells came formatted from the workers: format the axis columns and join.
    cells = pre[1]
    k = len(result.columns) - len(OUTPUT_COLUMNS)
    if k == 0:
        stream.writelines(c + "\n" for c in cells)
        return
    heads = pre[2] if pre[2] is not None else csv_cells(r[:k] for r in result.rows)
    stream.writelines([h + "," + c + "\n" for h, c in zip(heads, cells)])


def write_table(result: SweepResult, out: Union[str, Path]) -> None:
    """CSV (``-``: stdout) or, when pyarrow is installed, parquet (a name ending ``.parquet``)."""
    out = str(out)
    if out == "-":
        write_csv(result, sys.stdout)
        return
    if out.endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("--out", "writing parquet needs pyarrow",
                             "pip install pyarrow, or write .csv") from None
        cols: dict[str, list[Any]] = {}
        for i, c in enumerate(result.columns):
            vals = [None if r[i] == "" else r[i] for r in result.rows]
            kinds = {type(v) for v in vals if v is not None}
            if len(kinds) > 1 and not kinds <= {int, float}:
                vals = [None if v is None else str(v) for v in vals]
            cols[c] = vals
        try:
            pq.write_table(pa.table(cols), out)
        except OSError as exc:
            raise InputError("--out", f"cannot write {out}: {exc}") from None
        return
    try:
        with open(out, "w", newline="") as fh:
            write_csv(result, fh)
    except OSError as exc:
        raise InputError("--out", f"cannot write {out}: {exc.strerror}") from None


def summary(result: SweepResult, out: str = "-") -> str:
    n = len(result.rows)
    rate = n / result.seconds if result.seconds > 0 else float("inf")
    fast = sum(1 for v in result.column("evaluator") if v == "fast")
    return (f"{n:,} points ({result.feasible:,} feasible, {n - result.feasible:,} infeasible; "
            f"{fast:,} by the fast path) in {result.seconds:.2f} s ({rate:,.0f} points/s)"
            + ("" if out == "-" else f" -> {out}"))
