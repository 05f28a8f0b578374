"""Tables and altair charts of the explorer, built from moesim's result objects (no Streamlit).

Every function takes plain moesim objects (``Prediction``, ``Step``, numpy loads, a hardware
profile) or the DataFrames made here, and returns a DataFrame or an ``alt.Chart``; the explorer
only places them. Units on screen: ms for steps and latencies, us inside one step, GB (1e9 B).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

CATEGORIES = ["attention", "gemm", "moe", "comm", "elementwise", "overhead"]
CATEGORY_COLORS = ["#4c78a8", "#72b7b2", "#f58518", "#e45756", "#54a24b", "#9d755d"]
MEMORY_PARTS = ["weights", "kv_cache", "activations", "reserved"]
MEMORY_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#bab0ac"]
SCENARIO_COLORS = ["#1f77b4", "#ff7f0e"]  # current, pinned


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------

def ops_frame(pred: Any, label: str = "current") -> pd.DataFrame:
    """One row per op entry of the prefill and decode steps (``time_ms``: all its layers)."""
    rows = []
    for phase, step in (("prefill", pred.prefill_step), ("decode", pred.decode_step)):
        for o in step.ops:
            rows.append({
                "scenario": label, "phase": phase, "name": o.name, "category": o.category,
                "layer_kind": o.layer_kind, "count": o.count, "bound": o.bound,
                "each_us": o.total_us, "kernel_us": o.time_us, "launch_us": o.launch_us,
                "time_ms": o.count * o.total_us / 1e3, "flops": o.flops, "bytes": o.bytes,
                "ideal_compute_us": o.ideal_compute_us, "ideal_memory_us": o.ideal_memory_us,
            })
    df = pd.DataFrame(rows)
    if not df.empty:
        tot = df.groupby("phase")["time_ms"].transform("sum")
        df["share"] = df["time_ms"] / tot.where(tot > 0, 1.0)
    return df


def top_ops_table(ops: pd.DataFrame, phase: str, limit: int = 15) -> pd.DataFrame:
    d = ops[ops["phase"] == phase].sort_values("time_ms", ascending=False).head(limit)
    return pd.DataFrame({
        "op": d["name"], "layers": d["layer_kind"], "x": d["count"],
        "each (us)": d["each_us"].round(2), "total (ms)": d["time_ms"].round(3),
        "share": (100 * d["share"]).round(1).astype(str) + "%", "bound": d["bound"],
    }).reset_index(drop=True)


def memory_frame(pred: Any, label: str = "current") -> pd.DataFrame:
    m = pred.memory
    return pd.DataFrame([{"scenario": label, "part": part, "GB": getattr(m, part) / 1e9,
                          "capacity_GB": m.capacity / 1e9, "order": i}
                         for i, part in enumerate(MEMORY_PARTS)])


def sweep_frame(points: Iterable[tuple[int, Any]], label: str, current_batch: int) -> pd.DataFrame:
    """``points``: (batch size, Prediction) pairs."""
    rows = []
    for b, p in points:
        rows.append({"scenario": label, "batch": int(b), "ttft_ms": p.ttft_ms,
                     "tpot_ms": p.tpot_ms,
                     "tok_s_per_user": 1e3 / p.tpot_ms if p.tpot_ms > 0 else float("nan"),
                     "throughput_per_gpu": p.throughput_output_tok_per_s_per_gpu,
                     "throughput": p.throughput_output_tok_per_s,
                     "memory_GB": p.memory.total / 1e9,
                     "fits": "fits" if p.memory.fits else "does not fit",
                     "current": int(b) == int(current_batch)})
    return pd.DataFrame(rows)


def sweep_batches(current: int, attention_dp: int, upper: int = 1024) -> list[int]:
    """Powers of two from ``attention_dp`` (every attention-DP group needs a sequence) to
    ``max(upper, current)``, plus the current batch size."""
    top = max(upper, current)
    out = {current}
    b = 1
    while b <= top:
        if b >= attention_dp:
            out.add(b)
        b *= 2
    return sorted(x for x in out if x >= attention_dp)


# ---------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------

def _scenario_scale(labels: Sequence[str]) -> alt.Scale:
    return alt.Scale(domain=list(labels), range=SCENARIO_COLORS[:len(labels)])


def category_chart(ops: pd.DataFrame, steps: Optional[dict[str, str]] = None) -> alt.FacetChart:
    """Stacked bars of step time per op category, one row per phase (own x scales)."""
    agg = ops.groupby(["scenario", "phase", "category"], as_index=False)["time_ms"].sum()
    agg["ms"] = agg["time_ms"].round(4)
    agg["order"] = agg["category"].map({c: i for i, c in enumerate(CATEGORIES)}).fillna(99)
    if steps:
        agg["step"] = agg["phase"].map(steps).fillna("")
    else:
        agg["step"] = ""
    n = agg["scenario"].nunique()
    return alt.Chart(agg).mark_bar().encode(
        x=alt.X("sum(time_ms):Q", title="time of one step (ms)"),
        y=alt.Y("scenario:N", title=None, sort=["current", "pinned"]),
        color=alt.Color("category:N", scale=alt.Scale(domain=CATEGORIES, range=CATEGORY_COLORS),
                        legend=alt.Legend(orient="bottom", title=None, columns=6)),
        order=alt.Order("order:Q"),
        tooltip=["scenario", "phase", "step", "category", alt.Tooltip("ms:Q", title="ms")],
    ).properties(height=34 * n + 10, width="container").facet(
        row=alt.Row("phase:N", sort=["prefill", "decode"], title=None,
                    header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold")),
    ).resolve_scale(x="independent")


def roofline_frame(ops: pd.DataFrame) -> pd.DataFrame:
    """Ops that do arithmetic on HBM data: intensity (FLOP/byte) and achieved TFLOP/s of their
    kernel time (launch gaps left out)."""
    d = ops[(ops["flops"] > 0) & (ops["bytes"] > 0) & (ops["kernel_us"] > 0)
            & ops["category"].isin(["gemm", "moe", "attention"])].copy()
    d["intensity"] = d["flops"] / d["bytes"]
    d["tflops"] = d["flops"] / d["kernel_us"] / 1e6
    d["kernel_us_r"] = d["kernel_us"].round(2)
    return d


def roofs(hw: Any) -> tuple[float, dict[str, float]]:
    """(HBM peak in TB/s, {compute dtype: dense peak TFLOP/s}) of a hardware profile."""
    bw_tb_s = hw.memory.hbm_peak_gb_per_s.value / 1e3
    peaks = {}
    pk = hw.compute.peak_dense_tflops
    for name in ("fp4", "fp8", "int8", "bf16"):
        q = getattr(pk, name, None)
        if q is not None and name != "int8":
            peaks[name] = float(q.value)
    return bw_tb_s, peaks


def roofline_chart(ops: pd.DataFrame, hw: Any) -> alt.LayerChart:
    pts = roofline_frame(ops)
    bw, peaks = roofs(hw)
    lo_i = min([pts["intensity"].min() if len(pts) else 1.0, 1.0]) / 2
    hi_peak = max(peaks.values()) if peaks else 1000.0
    ridge_max = hi_peak / bw
    hi_i = max([pts["intensity"].max() if len(pts) else 1.0, ridge_max * 8])
    roof_rows = []
    for name, p in peaks.items():
        ridge = p / bw
        for x in (lo_i, ridge, hi_i):
            roof_rows.append({"roof": f"{name} {p:.0f} TFLOP/s", "intensity": x,
                              "tflops": min(p, bw * x)})
    roof_df = pd.DataFrame(roof_rows)
    label_df = roof_df.groupby("roof", as_index=False).last()
    x = alt.X("intensity:Q", scale=alt.Scale(type="log", domain=[lo_i, hi_i]),
              title="arithmetic intensity (FLOP / HBM byte)")
    y_dom = [max(1e-3, (pts["tflops"].min() if len(pts) else 1.0) / 2), hi_peak * 1.6]
    y = alt.Y("tflops:Q", scale=alt.Scale(type="log", domain=y_dom),
              title="achieved TFLOP/s (kernel time)")
    lines = alt.Chart(roof_df).mark_line(color="#888", strokeWidth=1.5).encode(
        x=x, y=y, detail="roof:N", strokeDash=alt.StrokeDash("roof:N", legend=None))
    labels = alt.Chart(label_df).mark_text(align="right", dy=-6, fontSize=10,
                                           color="#555").encode(x=x, y=y, text="roof:N")
    hbm = pd.DataFrame([{"intensity": lo_i * 1.3, "tflops": bw * lo_i * 1.3,
                         "t": f"HBM {bw:.2f} TB/s"}])
    hbm_label = alt.Chart(hbm).mark_text(align="left", dy=-8, fontSize=10, angle=0,
                                         color="#555").encode(x=x, y=y, text="t:N")
    dots = alt.Chart(pts).mark_point(filled=True, opacity=0.85).encode(
        x=x, y=y,
        color=alt.Color("phase:N", scale=alt.Scale(domain=["prefill", "decode"],
                                                   range=["#4c78a8", "#e45756"]),
                        legend=alt.Legend(orient="bottom", title=None)),
        shape=alt.Shape("category:N", legend=alt.Legend(orient="bottom", title=None)),
        size=alt.Size("time_ms:Q", scale=alt.Scale(range=[30, 400]), legend=None),
        tooltip=["phase", "name", "layer_kind", "bound",
                 alt.Tooltip("kernel_us_r:Q", title="kernel us"),
                 alt.Tooltip("intensity:Q", format=".1f", title="FLOP/byte"),
                 alt.Tooltip("tflops:Q", format=".1f", title="TFLOP/s")])
    return alt.layer(lines, labels, hbm_label, dots).properties(height=340, width="container")


def expert_load_frame(loads: np.ndarray, capacity: Optional[int]) -> pd.DataFrame:
    """Per expert, sorted by load: token-slots within the cap and above it."""
    order = np.argsort(-loads, kind="stable")
    rows = []
    for pos, e in enumerate(order):
        n = int(loads[e])
        kept = n if capacity is None else min(n, capacity)
        rows.append({"position": pos, "expert": int(e), "part": "within capacity",
                     "slots": kept, "load": n})
        if n > kept:
            rows.append({"position": pos, "expert": int(e), "part": "over capacity",
                         "slots": n - kept, "load": n})
    return pd.DataFrame(rows)


def expert_load_chart(loads: np.ndarray, mean: float, capacity: Optional[int]) -> alt.LayerChart:
    df = expert_load_frame(loads, capacity)
    bars = alt.Chart(df).mark_bar(width={"band": 0.9} if len(loads) <= 64 else alt.Undefined
                                  ).encode(
        x=alt.X("position:O", title="experts, most loaded first",
                axis=alt.Axis(labels=len(loads) <= 32, ticks=len(loads) <= 32)),
        y=alt.Y("sum(slots):Q", title="token-slots"),
        color=alt.Color("part:N", scale=alt.Scale(domain=["within capacity", "over capacity"],
                                                  range=["#4c78a8", "#e45756"]),
                        legend=alt.Legend(orient="bottom", title=None)),
        tooltip=["expert", "load", "part", "slots"])
    rules = [{"what": f"mean {mean:.1f}", "y": mean}]
    if capacity is not None:
        rules.append({"what": f"capacity {capacity}", "y": float(capacity)})
    rdf = pd.DataFrame(rules)
    rule = alt.Chart(rdf).mark_rule(strokeDash=[4, 3], color="#333").encode(y="y:Q")
    text = alt.Chart(rdf).mark_text(align="right", baseline="bottom", dy=-2, fontSize=10,
                                    x="width").encode(y="y:Q", text="what:N")
    return alt.layer(bars, rule, text).properties(height=220, width="container")


def rank_load_chart(rank_loads: np.ndarray) -> alt.LayerChart:
    mean = float(np.mean(rank_loads)) if len(rank_loads) else 0.0
    top = int(np.argmax(rank_loads)) if len(rank_loads) else 0
    df = pd.DataFrame({"rank": [f"EP {r}" for r in range(len(rank_loads))],
                       "r": list(range(len(rank_loads))),
                       "slots": rank_loads.astype(float),
                       "vs_mean": rank_loads / mean if mean > 0 else 1.0,
                       "slowest": ["most loaded" if r == top else "other"
                                   for r in range(len(rank_loads))]})
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("rank:N", sort=alt.SortField("r"), title=None),
        y=alt.Y("slots:Q", title="token-slots on rank"),
        color=alt.Color("slowest:N", scale=alt.Scale(domain=["most loaded", "other"],
                                                     range=["#e45756", "#4c78a8"]), legend=None),
        tooltip=["rank", "slots", alt.Tooltip("vs_mean:Q", format=".2f", title="x mean")])
    rule = alt.Chart(pd.DataFrame({"y": [mean]})).mark_rule(strokeDash=[4, 3],
                                                              color="#333").encode(y="y:Q")
    return alt.layer(bars, rule).properties(height=180, width="container")


def memory_chart(mem: pd.DataFrame) -> alt.LayerChart:
    n = mem["scenario"].nunique()
    mem = mem.assign(GB_r=mem["GB"].round(2))
    bars = alt.Chart(mem).mark_bar().encode(
        x=alt.X("sum(GB):Q", title="GB per GPU"),
        y=alt.Y("scenario:N", title=None, sort=["current", "pinned"]),
        color=alt.Color("part:N", scale=alt.Scale(domain=MEMORY_PARTS, range=MEMORY_COLORS),
                        legend=alt.Legend(orient="bottom", title=None)),
        order=alt.Order("order:Q"),
        tooltip=["scenario", "part", alt.Tooltip("GB_r:Q", title="GB")])
    cap = mem.groupby("scenario", as_index=False)["capacity_GB"].first()
    cap["label"] = cap["capacity_GB"].map(lambda v: f"HBM {v:.0f} GB")
    tick = alt.Chart(cap).mark_tick(color="#d62728", thickness=3, size=30).encode(
        x="capacity_GB:Q", y=alt.Y("scenario:N", sort=["current", "pinned"]),
        tooltip=["scenario", "label"])
    return alt.layer(bars, tick).properties(height=44 * n + 50, width="container")


def sweep_charts(sw: pd.DataFrame) -> tuple[alt.LayerChart, alt.LayerChart]:
    """(throughput per GPU vs batch size, latency-throughput frontier)."""
    labels = [s for s in ("current", "pinned") if s in set(sw["scenario"])]
    color = alt.Color("scenario:N", scale=_scenario_scale(labels),
                      legend=alt.Legend(orient="bottom", title=None) if len(labels) > 1
                      else None)
    tips = ["scenario", "batch", alt.Tooltip("throughput_per_gpu:Q", format=".1f",
                                              title="tok/s/GPU"),
            alt.Tooltip("tpot_ms:Q", format=".2f", title="TPOT ms"),
            alt.Tooltip("ttft_ms:Q", format=".1f", title="TTFT ms"),
            alt.Tooltip("memory_GB:Q", format=".1f", title="GB/GPU"), "fits"]
    fill = alt.Fill("fits:N", scale=alt.Scale(domain=["fits", "does not fit"],
                                              range=["currentColor", "white"]), legend=None)
    shape = alt.Shape("fits:N", scale=alt.Scale(domain=["fits", "does not fit"],
                                                range=["circle", "circle"]),
                      legend=alt.Legend(orient="bottom", title=None))
    x_b = alt.X("batch:Q", scale=alt.Scale(type="log", base=2), title="batch size (sequences)")
    y_t = alt.Y("throughput_per_gpu:Q", title="output tok/s per GPU")
    base = alt.Chart(sw)
    thr = alt.layer(
        base.mark_line(opacity=0.6).encode(x=x_b, y=y_t, color=color, detail="scenario:N"),
        base.mark_point(size=60, strokeWidth=2).encode(
            x=x_b, y=y_t, color=color, fill=alt.condition("datum.fits == 'fits'",
                                                          alt.Color("scenario:N",
                                                                    scale=_scenario_scale(labels),
                                                                    legend=None),
                                                          alt.value("white")),
            shape=shape, tooltip=tips),
        base.transform_filter("datum.current").mark_point(size=260, shape="circle",
                                                          color="#222", strokeWidth=1.5
                                                          ).encode(x=x_b, y=y_t),
    ).properties(height=280, width="container")
    x_u = alt.X("tok_s_per_user:Q", title="output tok/s per user (1000 / TPOT)",
                scale=alt.Scale(zero=False))
    front = alt.layer(
        base.mark_line(opacity=0.6).encode(x=x_u, y=y_t, color=color, order="batch:Q",
                                           detail="scenario:N"),
        base.mark_point(size=60, strokeWidth=2).encode(
            x=x_u, y=y_t, color=color, fill=alt.condition("datum.fits == 'fits'",
                                                          alt.Color("scenario:N",
                                                                    scale=_scenario_scale(labels),
                                                                    legend=None),
                                                          alt.value("white")),
            shape=shape, tooltip=tips),
        base.mark_text(dx=7, dy=-7, fontSize=10, align="left", color="#444").encode(
            x=x_u, y=y_t, text="batch:Q"),
        base.transform_filter("datum.current").mark_point(size=260, shape="circle",
                                                          color="#222", strokeWidth=1.5
                                                          ).encode(x=x_u, y=y_t),
    ).properties(height=280, width="container")
    _ = fill  # the fill rule is expressed with alt.condition above
    return thr, front


# ---------------------------------------------------------------------------------------------
# the DES one-step timeline
# ---------------------------------------------------------------------------------------------

_GROUPS = {
    "router_gemm": "router", "topk": "router", "dispatch": "dispatch", "combine": "combine",
    "experts": "experts", "moe_all_reduce": "all-reduce", "attn_all_reduce": "all-reduce",
    "mlp_all_reduce": "all-reduce",
}
TIMELINE_GROUPS = ["attention", "router", "dispatch", "experts", "shared expert", "combine",
                   "all-reduce", "other", "waiting"]
TIMELINE_COLORS = ["#4c78a8", "#b279a2", "#e45756", "#f58518", "#eeca3b", "#72b7b2",
                   "#9d755d", "#bab0ac", "#d3d3d3"]
_ATTN = ("proj", "attention", "absorb", "mla_decode", "attn", "norms_rope", "linear_attn")


def _group(name: str) -> str:
    if name in _GROUPS:
        return _GROUPS[name]
    if name.startswith("shared_expert"):
        return "shared expert"
    if any(t in name for t in _ATTN) or name.startswith("attention"):
        return "attention"
    return "other"


def timeline_frame(events: Sequence[Any], moe_layer: int = 0) -> tuple[pd.DataFrame, dict]:
    """Events of one MoE layer (router .. combine, every rank) from a DES trace, plus the waits
    each rank spends at collectives (gap between its last compute op and the collective's
    start). Returns the frame (times in us from the window start) and a summary dict."""
    ev = [e for e in events if getattr(e, "rank", -1) >= 0]
    if not ev:
        return pd.DataFrame(), {}
    experts = [e for e in ev if e.name == "experts" and e.args.get("moe_layer") == moe_layer]
    ranks = sorted({e.rank for e in ev})
    if experts:
        t0s, t1s = [], []
        for x in experts:
            mine = sorted((e for e in ev if e.rank == x.rank), key=lambda e: e.start_us)
            before = [e for e in mine if e.name == "router_gemm" and e.start_us <= x.start_us]
            t0s.append(before[-1].start_us if before else x.start_us)
            after = [e for e in mine if e.stream != "compute" and e.start_us >= x.start_us
                     + x.dur_us - 1e-6]
            t1s.append(after[0].start_us + after[0].dur_us if after else x.start_us + x.dur_us)
        t0, t1 = min(t0s), max(t1s)
    else:  # dense model: the first layer's worth of time
        end = max(e.start_us + e.dur_us for e in ev)
        n_layers = max(1, sum(1 for e in ev if e.rank == ranks[0] and e.name == "o_proj"))
        t0, t1 = 0.0, end / n_layers * 1.2
    t0 -= 1e-6
    sel = [e for e in ev if e.start_us < t1 and e.start_us + e.dur_us > t0]
    rows = []
    for e in sel:
        rows.append({"lane": f"GPU {e.rank} {'compute' if e.stream == 'compute' else 'comm'}",
                     "rank": e.rank, "stream": e.stream, "name": e.name, "group": _group(e.name),
                     "start": max(e.start_us, t0) - t0,
                     "end": min(e.start_us + e.dur_us, t1) - t0,
                     "dur_us": round(e.dur_us, 2)})
    waits: dict[int, float] = {}
    for r in ranks:
        mine = sorted((e for e in ev if e.rank == r), key=lambda e: e.start_us)
        comp_end = 0.0
        for e in mine:
            if e.stream == "compute":
                comp_end = max(comp_end, e.start_us + e.dur_us)
            elif t0 <= e.start_us <= t1 and e.start_us - comp_end > 0.05:
                w0 = max(comp_end, t0)
                rows.append({"lane": f"GPU {r} compute", "rank": r, "stream": "compute",
                             "name": f"waits for {e.name}", "group": "waiting",
                             "start": w0 - t0, "end": e.start_us - t0,
                             "dur_us": round(e.start_us - w0, 2)})
                waits[r] = waits.get(r, 0.0) + e.start_us - w0
    df = pd.DataFrame(rows)
    exp_us = {x.rank: x.dur_us for x in experts}
    summary = {"window_us": t1 - t0, "experts_us": exp_us, "waits_us": waits}
    if exp_us:
        summary["slowest_rank"] = max(exp_us, key=exp_us.get)
    return df, summary


def timeline_chart(df: pd.DataFrame) -> alt.Chart:
    lanes = sorted(df["lane"].unique(), key=lambda s: (int(s.split()[1]), s.split()[2]))
    return alt.Chart(df).mark_bar(height={"band": 0.8}).encode(
        x=alt.X("start:Q", title="us since the layer's router"),
        x2="end:Q",
        y=alt.Y("lane:N", sort=lanes, title=None),
        color=alt.Color("group:N", scale=alt.Scale(domain=TIMELINE_GROUPS,
                                                   range=TIMELINE_COLORS),
                        legend=alt.Legend(orient="bottom", title=None, columns=9)),
        tooltip=["lane", "name", "group", alt.Tooltip("dur_us:Q", title="us"),
                 alt.Tooltip("start:Q", format=".1f"), alt.Tooltip("end:Q", format=".1f")],
    ).properties(height=max(120, 22 * len(lanes)), width="container")


def fmt_ms(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    if x >= 1000:
        return f"{x / 1e3:.2f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 10:
        return f"{x:.1f} ms"
    return f"{x:.2f} ms"
