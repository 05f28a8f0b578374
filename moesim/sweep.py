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

Speed. ``predict`` costs milliseconds a point, so a sweep does not call it point by point. Points
are grouped by everything except the workload (batch size, lengths); each group is resolved once
and, when its routing is deterministic (``balanced``, or a dense model), evaluated by
:class:`FastEvaluator`, which memoises the step builder's results by what each part of a step
depends on: the ops outside attention and the LM head depend only on the phase and the tokens in
the step (one :func:`~moesim.step.build_step` per distinct token count); the attention ops on the
batch shape and context; the head ops on the sequences. All of them are priced by the very same
functions (:func:`~moesim.step.build_step`, ``step._attention_ops``, ``step._head_ops``,
``step.with_launch``); the TTFT sum over a repeated prefill chunk is taken in closed form, and
the driver helpers that read the workload (``analytic.prefill_plan``, ``memory.activation_bytes``,
the scenario checks) are memoised on the workload fields they actually read
(:class:`WorkloadMemo`). The first point of every group is also run through :func:`predict` and
compared (relative 1e-9); on a mismatch the group falls back to ``predict`` with a warning.
Stochastic routing draws fresh loads for every prefill chunk and sample, so those groups always
go through ``predict`` (exact, slow). Groups can be spread over local processes (``workers``) or
a Ray cluster (``ray_address``; Ray is optional).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import yaml

from .errors import InputError

#: Outputs of every row, after the axis columns.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "feasible", "error", "evaluator",
    "ttft_ms", "tpot_ms", "throughput_output_tok_per_s", "throughput_output_tok_per_s_per_gpu",
    "prefill_total_ms", "num_gpus",
    "memory_weights_bytes", "memory_kv_cache_bytes", "memory_activations_bytes",
    "memory_reserved_bytes", "memory_total_bytes", "memory_capacity_bytes",
    "fits", "max_batch_size",
    "prefill_step_tokens", "prefill_step_us", "decode_step_batch", "decode_step_us",
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


def _outputs(evaluator: str, ttft: float, tpot: float, throughput: float, prefill_ms: float,
             num_gpus: int, mem: Any, prefill_tokens: int, pvec: Sequence[float],
             decode_batch: int, dvec: Sequence[float], samples: int, warnings: list[str]
             ) -> Outputs:
    return (True, "", evaluator, ttft, tpot, throughput, throughput / num_gpus, prefill_ms,
            num_gpus, mem.weights, mem.kv_cache, mem.activations, mem.reserved, mem.total,
            mem.capacity, mem.fits, mem.max_batch_size, prefill_tokens, float(pvec[0]),
            decode_batch, float(dvec[0])) + _shares(pvec) + _shares(dvec) + \
        (samples, " | ".join(warnings))


def prediction_outputs(p: Any) -> Outputs:
    """The output columns of one :class:`~moesim.analytic.Prediction` (the reference that the
    fast path reproduces)."""
    assert p.throughput_output_tok_per_s_per_gpu == \
        p.throughput_output_tok_per_s / p.scenario.num_gpus
    return _outputs("predict", p.ttft_ms, p.tpot_ms, p.throughput_output_tok_per_s,
                    p.prefill_total_ms, p.scenario.num_gpus, p.memory,
                    p.prefill_step.batch.tokens, _bound_vector(p.prefill_step.ops),
                    p.decode_step.batch.num_seqs, _bound_vector(p.decode_step.ops), p.samples,
                    p.warnings)


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
        self.tables: dict[tuple[str, ...], dict[tuple[Any, ...], Any]] = {}
        self.calls = 0

    def __call__(self, wl: Any) -> Any:
        for reads, table in self.tables.items():
            hit = table.get(tuple(getattr(wl, r) for r in reads), _MISS)
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
            self.tables.setdefault(reads, {})[tuple(getattr(wl, r) for r in reads)] = hit
        if isinstance(hit, InputError):
            raise hit
        return hit


def deterministic(sc: Any) -> bool:
    """True when ``predict(sc)`` makes no routing draws (the fast path's domain)."""
    return sc.model.moe is None or sc.routing.distribution == "balanced"


def with_workload(sc: Any, wl: Any) -> Any:
    """``sc`` with another (validated) workload, as :func:`parse_scenario` would build it."""
    return sc.model_copy(update={"workload": wl,
                                 "source": sc.source.model_copy(update={"workload": wl})})


class FastEvaluator:
    """``predict`` for many workloads of one resolved scenario with deterministic routing.

    A step's time is split into three memoised parts, each priced by the step builder's own
    functions: ``rest(phase, tokens)`` (every op but attention and the head: norms, all-reduces,
    MoE / dense MLP, pipeline sends, engine overhead; one :func:`~moesim.step.build_step` per
    distinct token count, minus the other two parts), attention (``step._attention_ops`` of the
    batch shape and context) and the head (``step._head_ops``), each op through
    ``step.with_launch``. Each part is a vector [time, compute, memory, network, launch] µs, so
    the bound shares come out too. Exact while ``build_step`` keeps that dependence: the
    per-group self-check in :func:`evaluate_group` and ``tests/test_sweep.py`` watch it.
    """

    def __init__(self, sc: Any) -> None:
        from .memory import weight_bytes_per_gpu

        if not deterministic(sc):
            raise ValueError("FastEvaluator needs deterministic (balanced) routing")
        self.sc = sc
        counts: dict[str, int] = {}
        for att in sc.model.layer_attention:
            counts[att] = counts.get(att, 0) + 1
        self._att_counts = list(counts.items())
        self._steps: dict[tuple[str, int, int, float], tuple[float, ...]] = {}
        self._rest: dict[tuple[str, int], list[float]] = {}
        self._head: dict[tuple[str, int, int], list[float]] = {}
        self._launch: dict[tuple[str, int, Any], tuple[float, int]] = {}
        self._kv: dict[int, float] = {}
        self._weights = weight_bytes_per_gpu(sc)
        cap = sc.hardware.memory.hbm_capacity_bytes.value
        self._cap = cap
        self._reserved = (1.0 - sc.gpu_memory_utilization) * cap + \
            sc.hardware.overheads.runtime_reserved_bytes.value
        self.step_builds = 0
        from .memory import activation_bytes

        self._prefill = WorkloadMemo(sc, self._prefill_timeline)
        self._activations = WorkloadMemo(sc, activation_bytes)

    def _launched(self, b: Any, ops: Iterable[Any], n: int, v: list[float]) -> None:
        """Add ``n`` x the launched cost of ``ops`` to ``v``."""
        from .step import with_launch

        for o in ops:
            key = (b.phase, b.num_seqs, o)
            try:
                hit = self._launch.get(key)
            except TypeError:  # an op with an unhashable field: no memo
                key, hit = None, None
            if hit is None:
                lo = with_launch(self.sc, b, o)
                hit = (lo.total_us, _BOUND_INDEX[lo.bound])
                if key is not None:
                    self._launch[key] = hit
            t = n * hit[0]
            v[0] += t
            v[hit[1]] += t

    def step(self, b: Any) -> tuple[float, ...]:
        """[time, compute, memory, network, launch] µs of ``build_step(sc, b)``."""
        key = (b.phase, b.num_seqs, b.new_tokens, b.context)
        out = self._steps.get(key)
        if out is not None:
            return out
        from .step import _attention_ops, _head_ops, build_step

        att = [0.0] * 5
        for kind, n in self._att_counts:
            self._launched(b, _attention_ops(self.sc, b, kind), n, att)
        hkey = (b.phase, b.num_seqs, b.tokens)
        head = self._head.get(hkey)
        if head is None:
            head = [0.0] * 5
            self._launched(b, _head_ops(self.sc, b), 1, head)
            self._head[hkey] = head
        rkey = (b.phase, b.tokens)
        rest = self._rest.get(rkey)
        if rest is None:
            full = _bound_vector(build_step(self.sc, b).ops)
            self.step_builds += 1
            rest = [f - a - h for f, a, h in zip(full, att, head)]
            tiny = 1e-9 * max(full[0], 1.0)
            rest[1:] = [0.0 if abs(x) < tiny else x for x in rest[1:]]
            self._rest[rkey] = rest
        out = self._steps[key] = tuple(r + a + h for r, a, h in zip(rest, att, head))
        return out

    def _prefill_timeline(self, psc: Any) -> tuple[float, float, int, tuple[float, ...]]:
        """(first group's prefill µs, prefill total µs, largest prefill step's tokens and vector):
        analytic.predict's prefill loop, each repeated block summed in closed form."""
        from .analytic import prefill_plan

        clock = 0.0
        group: Optional[float] = None
        big_tokens, big_vec = -1, (0.0,) * 5
        for chunks, repeat in prefill_plan(psc):
            block = 0.0
            for batch, done in chunks:
                v = self.step(batch)
                block += v[0]
                if done and group is None:
                    group = clock + block
                if batch.tokens > big_tokens:
                    big_tokens, big_vec = batch.tokens, v
            clock += repeat * block
        assert group is not None
        return group, clock, big_tokens, big_vec

    def outputs(self, workload: Any) -> Outputs:
        """The output columns of ``predict`` for this scenario with ``workload`` (a validated
        :class:`~moesim.spec.workload.Workload` that passed the scenario's checks)."""
        from .analytic import _warnings
        from .memory import MemoryBreakdown, kv_bytes_per_seq
        from .step import Batch

        sc = self.sc
        dp = sc.deployment.attention_dp
        bs, isl, osl = workload.batch_size, workload.input_len, workload.output_len
        group_us, clock, big_tokens, big_vec = self._prefill(workload)
        # analytic.predict's decode step, steady-state TTFT and throughput
        seqs = -(-bs // dp)
        dvec = self.step(Batch("decode", seqs, 1, isl + osl / 2.0))
        tpot = dvec[0] / 1e3
        ttft_us = group_us + 0.5 * dvec[0]
        prefill_ms = clock / 1e3
        throughput = bs * osl / ((prefill_ms + (osl - 1) * tpot) / 1e3)
        # memory.memory_per_gpu, its workload-independent parts computed once
        seq_len = isl + osl
        per_seq = self._kv.get(seq_len)
        if per_seq is None:
            per_seq = self._kv[seq_len] = kv_bytes_per_seq(sc, seq_len)
        act = self._activations(workload)
        free = self._cap - self._weights - act - self._reserved
        max_batch = max(0, int(free // per_seq)) * dp if per_seq > 0 else 0
        mem = MemoryBreakdown(self._weights, seqs * per_seq, act, self._reserved, self._cap,
                              per_seq, max_batch)
        return _outputs("fast", ttft_us / 1e3, tpot, throughput, prefill_ms, sc.num_gpus, mem,
                        big_tokens, big_vec, seqs, dvec, 1,
                        _warnings(_WithWorkload(sc, workload), mem))


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
                   verify: bool = True, fast: bool = True) -> GroupResult:
    """Outputs of one group's points.

    The group is resolved once with a workload that passes every check; each point's workload is
    then validated and checked against the resolved scenario (``_check_consistency``), which
    reports the same first error as parsing the point's whole scenario would. Where that order
    could differ (an invalid workload field, or a routing-file error) the point is parsed whole."""
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
    evaluator = FastEvaluator(sc) if (fast and sc is not None and deterministic(sc)
                                      and len(task.points) >= 4) else None
    checked = not verify
    wl_cache: dict[Any, Any] = {}
    out = res.outputs
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
        o = evaluator.outputs(wl)
        if not checked:
            checked = True
            ref = prediction_outputs(predict(with_workload(sc, wl)))
            diff = outputs_agree(o, ref)
            if diff is not None:
                res.warnings.append(f"fast path disagrees with predict ({diff}) for "
                                    f"{dict(task.structural)}: group evaluated with predict")
                evaluator = None
                o = ref
        out.append((idx, o))
    if evaluator is not None:
        res.step_builds = evaluator.step_builds
    return res


def _run_tasks(args: tuple[dict[str, Any], Optional[Path], list[GroupTask], bool, bool]
               ) -> list[GroupResult]:
    base, base_dir, tasks, verify, fast = args
    return [evaluate_group(base, base_dir, t, verify=verify, fast=fast) for t in tasks]


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


def _batches(tasks: list[GroupTask], parts: int) -> list[list[GroupTask]]:
    """Split groups into about ``parts`` batches of similar point counts (big groups first)."""
    parts = max(1, min(parts, len(tasks)))
    order = sorted(tasks, key=lambda t: -len(t.points))
    bins: list[list[GroupTask]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for t in order:
        i = loads.index(min(loads))
        bins[i].append(t)
        loads[i] += len(t.points)
    return [b for b in bins if b]


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
             verify: bool = True, fast: bool = True
             ) -> tuple[list[Outputs], list[str], int]:
    ray = _ray_module() if ray_address else None
    results: list[Optional[Outputs]] = [None] * n
    bar = Progress(n, progress)
    warnings: list[str] = []
    builds = 0

    def take(batch: list[GroupResult]) -> None:
        nonlocal builds
        for g in batch:
            for idx, o in g.outputs:
                results[idx] = o
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
                   for b in _batches(tasks, 4 * size)]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            take(ray.get(done[0]))
    elif workers > 1 and len(tasks) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [pool.submit(_run_tasks, (base, base_dir, b, verify, fast))
                    for b in _batches(tasks, 4 * workers)]
            for f in cf.as_completed(futs):
                take(f.result())
    else:
        for t in tasks:
            take([evaluate_group(base, base_dir, t, verify=verify, fast=fast)])
    bar.close()
    assert all(r is not None for r in results)
    return results, warnings, builds  # type: ignore[return-value]


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
    results, warnings, builds = _execute(tasks, n, spec.base, spec.base_dir, workers=workers,
                                         ray_address=ray_address, progress=progress,
                                         verify=verify, fast=fast)
    names, cols = _input_columns(spec, n)
    rows = [tuple(inp) + o for inp, o in zip(zip(*cols), results)] if cols \
        else [tuple(o) for o in results]
    return SweepResult(names + list(OUTPUT_COLUMNS), rows, time.perf_counter() - t0, warnings,
                       builds)


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
    results, _, _ = _execute(list(groups.values()), len(points), base, base_dir,
                             workers=workers, progress=False, verify=verify, fast=fast)
    return [outputs_dict(o) for o in results]


# =============================================================================================
# Output
# =============================================================================================

def _cell(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def _format_column(col: list[Any]) -> list[str]:
    """CSV cells of one column: floats with 12 significant digits (``repr`` of every float costs
    twice as much and the model is nowhere near that precise; parquet keeps full precision)."""
    out: list[str] = []
    for v in col:
        t = type(v)
        if t is float:
            out.append("%.12g" % v)
        elif t is str:
            out.append(v)
        else:
            out.append(str(v))
    return out


def write_csv(result: SweepResult, stream: Any) -> None:
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(result.columns)
    if not result.rows:
        return
    cols = [_format_column(list(c)) for c in zip(*result.rows)]
    w.writerows(zip(*cols))


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
