"""Recommendations: the deployment of a scenario's model and workload on N GPUs with the best
output throughput per GPU that meets latency SLOs and fits in memory.

The search is a sweep (:mod:`moesim.sweep`) over

- every layout of the N GPUs as one instance (``pp = 1``): ``tp * attention_dp = N`` for attention
  and ``moe_tp * ep = N`` for the MoE layers (layouts the model cannot take, e.g. ``tp`` not
  dividing the heads, are dropped as infeasible);
- precisions (:data:`PRECISIONS`; ``scenario`` keeps the scenario's own dtypes);
- batch sizes (powers of two up to 2048 by default, then, per layout and precision, the largest
  batch that fits in memory).

The scenario's model, hardware, framework, workload lengths and routing are kept. "Throughput"
is output tokens per second per GPU in the closed loop of :func:`moesim.analytic.predict`.
The Pareto frontier is taken over the configurations that fit and meet the SLOs, trading
throughput per GPU against TPOT (per-user speed).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .errors import InputError
from .sweep import Axis, SweepResult, SweepSpec, evaluate, read_document, run_sweep

#: Precision choices: deployment fields each one sets.
PRECISIONS: dict[str, dict[str, Any]] = {
    "scenario": {},
    "bf16": {"weight_dtype": "bf16", "expert_weight_dtype": None, "activation_dtype": "bf16",
             "kv_cache_dtype": "bf16"},
    "fp8-w8a16": {"weight_dtype": "fp8", "expert_weight_dtype": None,
                  "activation_dtype": "bf16", "kv_cache_dtype": "bf16"},
    "fp8": {"weight_dtype": "fp8", "expert_weight_dtype": None, "activation_dtype": "fp8",
            "kv_cache_dtype": "bf16"},
    "fp8-kv8": {"weight_dtype": "fp8", "expert_weight_dtype": None, "activation_dtype": "fp8",
                "kv_cache_dtype": "fp8"},
}
DEFAULT_PRECISIONS = ("scenario", "bf16", "fp8", "fp8-kv8")
DEFAULT_BATCH_SIZES = tuple(2 ** i for i in range(12))  # 1 .. 2048

#: Columns of a configuration (then the sweep's outputs).
CONFIG_COLUMNS = ("num_gpus", "tp", "attention_dp", "ep", "moe_tp", "precision", "batch_size")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(gpus: int, moe: bool) -> list[dict[str, int]]:
    """Every (tp, attention_dp, ep, moe_tp) with tp*attention_dp = moe_tp*ep = ``gpus``."""
    out = []
    for tp in _divisors(gpus):
        for ep in (_divisors(gpus) if moe else [1]):
            out.append({"tp": tp, "attention_dp": gpus // tp, "ep": ep,
                        "moe_tp": gpus // ep if moe else gpus})
    return out


@dataclass
class Recommendation:
    scenario_name: str
    gpus: int
    slo_ttft_ms: Optional[float]
    slo_tpot_ms: Optional[float]
    candidates: list[dict[str, Any]]   # every evaluated configuration (one dict each)
    ranked: list[dict[str, Any]]       # fit + meet the SLOs, best throughput per GPU first
    frontier: list[dict[str, Any]]     # Pareto-optimal among ``ranked``, by TPOT
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return sum(1 for c in self.candidates if c["feasible"])

    @property
    def fitting(self) -> int:
        return sum(1 for c in self.candidates if c["feasible"] and c["fits"])


def _meets(c: dict[str, Any], ttft: Optional[float], tpot: Optional[float]) -> bool:
    return bool(c["feasible"] and c["fits"] and (ttft is None or c["ttft_ms"] <= ttft)
                and (tpot is None or c["tpot_ms"] <= tpot))


def pareto(rows: Sequence[dict[str, Any]], maximise: str = "throughput_output_tok_per_s_per_gpu",
           minimise: str = "tpot_ms") -> list[dict[str, Any]]:
    """Rows no other row beats on both ``maximise`` (higher) and ``minimise`` (lower), sorted by
    ``minimise``; ties keep the first."""
    order = sorted(rows, key=lambda r: (r[minimise], -r[maximise]))
    out: list[dict[str, Any]] = []
    best = -math.inf
    for r in order:
        if r[maximise] > best:
            out.append(r)
            best = r[maximise]
    return out


def _configs(result: SweepResult, names: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for d in result.dicts():
        lay = d["layout"]
        c = {"num_gpus": d["hardware.num_gpus"], "tp": d["deployment.tp"],
             "attention_dp": d["deployment.attention_dp"], "ep": d["deployment.ep"],
             "moe_tp": d["deployment.moe_tp"], "precision": names[d["precision"]],
             "batch_size": d["workload.batch_size"], "_layout": lay}
        c.update({k: v for k, v in d.items() if k not in c and "." not in k
                  and k not in ("layout", "precision")})
        out.append(c)
    return out


def recommend(scenario: Union[str, Path, dict[str, Any]], gpus: int, *,
              slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None,
              precisions: Sequence[str] = DEFAULT_PRECISIONS,
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, balanced: bool = False,
              base_dir: Optional[Path] = None, workers: int = 1,
              progress: Optional[bool] = False) -> Recommendation:
    """Search layouts x precisions x batch sizes for ``scenario`` on ``gpus`` GPUs."""
    from .spec.scenario import parse_scenario

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise InputError("--gpus", f"needs an integer >= 1; got {gpus!r}")
    for name, v in (("--slo-ttft-ms", slo_ttft_ms), ("--slo-tpot-ms", slo_tpot_ms)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise InputError(name, f"needs a positive number; got {v!r}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise InputError("--precisions", f"unknown precision {unknown[0] if unknown else ''!r}",
                         f"valid: {', '.join(PRECISIONS)}")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                              for b in batch_sizes):
        raise InputError("--batch-sizes", "needs integers >= 1")
    if isinstance(scenario, dict):
        base = copy.deepcopy(scenario)
    else:
        p = Path(scenario)
        base = read_document(p, field="scenario")
        base_dir = p.parent
        if not isinstance(base, dict):
            raise InputError("scenario", "the scenario must be a JSON/YAML object")
    sc = parse_scenario(base, base_dir=base_dir)  # bad input is reported as for `predict`
    if balanced:
        base["routing"] = {"distribution": "balanced"}
    warnings = []
    if not balanced and sc.model.moe is not None and sc.routing.distribution != "balanced":
        warnings.append(f"routing '{sc.routing.distribution}' draws loads per step, so every "
                        "configuration goes through predict (slow); --balanced searches with "
                        "balanced routing")
    # Deployment fields that would contradict a layout are the search's to set.
    dep = dict(base.get("deployment") or {})
    for k in ("tp", "ep", "moe_tp", "attention_dp", "pp"):
        dep.pop(k, None)
    base["deployment"] = dep
    names = list(dict.fromkeys(precisions))
    lay_values = []
    for lay in layouts(gpus, sc.model.moe is not None):
        v = {"hardware.num_gpus": gpus, "deployment.pp": 1}
        v.update({f"deployment.{k}": val for k, val in lay.items()})
        lay_values.append(v)
    prec_values = []
    for name in names:
        v = {f"deployment.{k}": val for k, val in PRECISIONS[name].items()}
        prec_values.append(v)
    sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    spec = SweepSpec(base=base, base_dir=base_dir, name="recommend", axes=(
        Axis("layout", tuple(lay_values), linked=True),
        Axis("precision", tuple(prec_values), linked=True),
        Axis("workload.batch_size", sizes)))
    result = run_sweep(spec, workers=workers, progress=progress)
    seconds = result.seconds
    cands = _configs(result, names)
    # Second pass: the largest batch that fits, per layout and precision.
    extra: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for c in cands:
        mb = c["max_batch_size"]
        key = (c["_layout"], names.index(c["precision"]), mb)
        if c["feasible"] and isinstance(mb, int) and mb >= max(1, c["attention_dp"]) \
                and mb not in sizes and key not in seen:
            seen.add(key)
            extra.append(key)
    if extra:
        import time

        t0 = time.perf_counter()
        pts = [[*lay_values[li].items(), *prec_values[pi].items(), ("workload.batch_size", mb)]
               for li, pi, mb in extra]
        outs = evaluate(base, pts, base_dir=base_dir, workers=workers)
        seconds += time.perf_counter() - t0
        for (li, pi, mb), o in zip(extra, outs):
            c = {"num_gpus": gpus, **{k: lay_values[li][f"deployment.{k}"]
                                      for k in ("tp", "attention_dp", "ep", "moe_tp")},
                 "precision": names[pi], "batch_size": mb, "_layout": li}
            c.update({k: v for k, v in o.items() if k not in c})
            cands.append(c)
    ranked = sorted((c for c in cands if _meets(c, slo_ttft_ms, slo_tpot_ms)),
                    key=lambda c: -c["throughput_output_tok_per_s_per_gpu"])
    return Recommendation(sc.name, gpus, slo_ttft_ms, slo_tpot_ms, cands, ranked,
                          pareto(ranked), seconds, warnings + result.warnings)


# ---------------------------------------------------------------------------------------------
def table(rec: Recommendation, top: int = 10) -> str:
    slo = []
    if rec.slo_ttft_ms is not None:
        slo.append(f"TTFT <= {rec.slo_ttft_ms:g} ms")
    if rec.slo_tpot_ms is not None:
        slo.append(f"TPOT <= {rec.slo_tpot_ms:g} ms")
    lines = [f"{rec.scenario_name}: best output throughput per GPU on {rec.gpus} GPU"
             f"{'s' if rec.gpus > 1 else ''}" + (f"; SLOs {', '.join(slo)}" if slo else
                                                  "; no SLOs"),
             f"  {len(rec.candidates):,} configurations: {rec.valid:,} valid, {rec.fitting:,} fit "
             f"in memory, {len(rec.ranked):,} also meet the SLOs ({rec.seconds:.2f} s)", ""]
    if not rec.ranked:
        lines.append("  no configuration fits and meets the SLOs")
        near = [c for c in rec.candidates if c["feasible"] and c["fits"]]
        if near:
            best = min(near, key=lambda c: max(
                c["ttft_ms"] / (rec.slo_ttft_ms or math.inf),
                c["tpot_ms"] / (rec.slo_tpot_ms or math.inf)))
            lines.append(f"  closest: tp={best['tp']} dp={best['attention_dp']} "
                         f"ep={best['ep']} {best['precision']} batch {best['batch_size']}: TTFT "
                         f"{best['ttft_ms']:.1f} ms, TPOT {best['tpot_ms']:.2f} ms")
        return "\n".join(lines)
    head = (f"  {'#':>3} {'tp':>3} {'dp':>3} {'ep':>3} {'moe_tp':>6}  {'precision':<10}"
            f"{'batch':>6} {'tok/s/GPU':>10} {'tok/s':>10} {'TTFT ms':>9} {'TPOT ms':>8}"
            f" {'mem GB':>7}")
    lines.append(head)
    for i, c in enumerate(rec.ranked[:top], 1):
        lines.append(f"  {i:>3} {c['tp']:>3} {c['attention_dp']:>3} {c['ep']:>3} "
                     f"{c['moe_tp']:>6}  {c['precision']:<10}{c['batch_size']:>6} "
                     f"{c['throughput_output_tok_per_s_per_gpu']:>10,.1f} "
                     f"{c['throughput_output_tok_per_s']:>10,.1f} {c['ttft_ms']:>9.1f} "
                     f"{c['tpot_ms']:>8.2f} {c['memory_total_bytes'] / 1e9:>7.1f}")
    lines.append("")
    lines.append(f"  Pareto frontier (throughput per GPU vs TPOT): {len(rec.frontier)} "
                 "configurations")
    for w in rec.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def frontier_rows(rec: Recommendation) -> tuple[list[str], list[list[Any]]]:
    from .sweep import OUTPUT_COLUMNS

    cols = list(CONFIG_COLUMNS) + [c for c in OUTPUT_COLUMNS if c not in ("num_gpus",)]
    return cols, [[r[c] for c in cols] for r in rec.frontier]


def write_frontier(rec: Recommendation, out: Union[str, Path]) -> None:
    import csv

    cols, rows = frontier_rows(rec)
    try:
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(cols)
            w.writerows(rows)
    except OSError as exc:
        raise InputError("--out", f"cannot write {out}: {exc.strerror}") from None


def to_dict(rec: Recommendation, top: int = 10) -> dict[str, Any]:
    def clean(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if not k.startswith("_")}

    return {"scenario": rec.scenario_name, "gpus": rec.gpus, "slo_ttft_ms": rec.slo_ttft_ms,
            "slo_tpot_ms": rec.slo_tpot_ms, "configurations": len(rec.candidates),
            "valid": rec.valid, "fit": rec.fitting, "meet_slos": len(rec.ranked),
            "top": [clean(c) for c in rec.ranked[:top]],
            "frontier": [clean(c) for c in rec.frontier], "warnings": rec.warnings}
