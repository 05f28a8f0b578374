"""Tables and altair charts of the explorer, built from moesim's result objects (no Streamlit).

Frames (``*_frame``) turn moesim objects (``Prediction``, ``Step``, numpy loads, DES trace
events) into pandas DataFrames. Charts are Vega-Lite specs (dicts) for ``st.vega_lite_chart``:
each is written with altair once, against *named* datasets, validated, and kept as a template;
a render copies the template and attaches the current DataFrames under those names. Building and
validating an altair chart costs 30-150 ms, which on every input change would be most of the
re-render budget; swapping data costs well under a millisecond.

Units on screen: ms for steps and latencies, us inside one step, GB (1e9 bytes).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

CATEGORIES = ["attention", "gemm", "moe", "comm", "elementwise", "overhead"]
CATEGORY_COLORS = ["#4c78a8", "#72b7b2", "#f58518", "#e45756", "#54a24b", "#9d755d"]
MEMORY_PARTS = ["weights", "kv_cache", "activations", "reserved"]
MEMORY_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#bab0ac"]
SCENARIOS = ["current", "pinned"]
SCENARIO_COLORS = ["#1f77b4", "#ff7f0e"]

_TEMPLATES: dict[tuple, dict] = {}


def _spec(key: tuple, build: Callable[[], alt.TopLevelMixin], **datasets: pd.DataFrame) -> dict:
    """A copy of the template ``key`` (built and validated once) with ``datasets`` attached."""
    tpl = _TEMPLATES.get(key)
    if tpl is None:
        tpl = _TEMPLATES[key] = build().to_dict()  # validates the template once
    spec = copy.deepcopy(tpl)
    # width follows the container, height is the plot's own (Streamlit's default "fit" would
    # squeeze axes and legends into ``height`` and flatten the small bar charts)
    spec["autosize"] = {"type": "fit-x", "contains": "padding"}
    # DataFrames go as they are: Streamlit ships named datasets to the browser as Arrow
    spec["datasets"] = dict(datasets)
    return spec


def _records(df: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN/inf -> None; numpy scalars -> Python)."""
    out = []
    for rec in df.to_dict("records"):
        row = {}
        for k, v in rec.items():
            if isinstance(v, (np.floating, float)):
                v = float(v)
                v = v if math.isfinite(v) else None
            elif isinstance(v, np.integer):
                v = int(v)
            elif isinstance(v, np.bool_):
                v = bool(v)
            row[k] = v
        out.append(row)
    return out


def _data(name: str) -> alt.Data:
    return alt.Data(name=name)


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


def category_frame(ops: pd.DataFrame, phase: str) -> pd.DataFrame:
    d = ops[ops["phase"] == phase]
    agg = d.groupby(["scenario", "category"], as_index=False)["time_ms"].sum()
    agg["order"] = agg["category"].map({c: i for i, c in enumerate(CATEGORIES)}).fillna(99)
    tot = agg.groupby("scenario")["time_ms"].transform("sum")
    agg["share"] = (100 * agg["time_ms"] / tot.where(tot > 0, 1.0)).round(1)
    agg["ms"] = agg["time_ms"].round(4)
    return agg


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
    return pd.DataFrame(rows, columns=["scenario", "batch", "ttft_ms", "tpot_ms",
                                       "tok_s_per_user", "throughput_per_gpu", "throughput",
                                       "memory_GB", "fits", "current"])


def sweep_batches(current: int, attention_dp: int, upper: int = 1024,
                  factor: int = 2) -> list[int]:
    """Powers of ``factor`` from ``attention_dp`` (every attention-DP group needs a sequence) to
    ``max(upper, current)``, plus the current batch size."""
    top = max(upper, current)
    out = {current}
    b = 1
    while b <= top:
        if b >= attention_dp:
            out.add(b)
        b *= factor
    return sorted(x for x in out if x >= attention_dp)


def roofline_frame(ops: pd.DataFrame) -> pd.DataFrame:
    """Ops that do arithmetic on HBM data: intensity (FLOP/byte) and achieved TFLOP/s of their
    kernel time (launch gaps left out)."""
    d = ops[(ops["flops"] > 0) & (ops["bytes"] > 0) & (ops["kernel_us"] > 0)
            & ops["category"].isin(["gemm", "moe", "attention"])].copy()
    d["intensity"] = d["flops"] / d["bytes"]
    d["tflops"] = d["flops"] / d["kernel_us"] / 1e6
    d["kernel_us_r"] = d["kernel_us"].round(2)
    return d[["phase", "name", "category", "layer_kind", "bound", "time_ms", "intensity",
              "tflops", "kernel_us_r"]]


def roofs(hw: Any) -> tuple[float, dict[str, float]]:
    """(HBM peak in TB/s, {compute dtype: dense peak TFLOP/s}) of a hardware profile."""
    bw_tb_s = hw.memory.hbm_peak_gb_per_s.value / 1e3
    peaks = {}
    pk = hw.compute.peak_dense_tflops
    for name in ("fp4", "fp8", "bf16"):
        q = getattr(pk, name, None)
        if q is not None:
            peaks[name] = float(q.value)
    return bw_tb_s, peaks


def roof_frames(pts: pd.DataFrame, hw: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(roof polylines, their labels) spanning the points' intensities."""
    bw, peaks = roofs(hw)
    lo_i = min(float(pts["intensity"].min()) if len(pts) else 1.0, 1.0) / 2
    hi_peak = max(peaks.values()) if peaks else 1000.0
    hi_i = max(float(pts["intensity"].max()) if len(pts) else 1.0, hi_peak / bw * 6)
    rows, labels = [], []
    for name, p in peaks.items():
        ridge = p / bw
        for x in (lo_i, ridge, hi_i):
            rows.append({"roof": f"{name} {p:.0f} TFLOP/s", "intensity": x,
                         "tflops": min(p, bw * x)})
        # each label starts at its own ridge point, so close peaks do not overprint
        labels.append({"text": f"{name} {p:.0f} TFLOP/s", "intensity": ridge,
                       "tflops": p, "align": "right"})
    labels.append({"text": f"HBM {bw:.2f} TB/s", "intensity": lo_i * 1.4,
                   "tflops": bw * lo_i * 1.4, "align": "left"})
    return pd.DataFrame(rows), pd.DataFrame(labels)


def expert_load_frame(loads: np.ndarray, capacity: Optional[int]) -> pd.DataFrame:
    """Per expert, most loaded first: token-slots within the cap and above it."""
    loads = np.asarray(loads)
    order = np.argsort(-loads, kind="stable")
    n = loads[order].astype(np.int64)
    kept = n if capacity is None else np.minimum(n, capacity)
    pos = np.arange(len(n))
    within = pd.DataFrame({"position": pos, "expert": order, "part": "within capacity",
                           "slots": kept, "load": n})
    over = pd.DataFrame({"position": pos, "expert": order, "part": "over capacity",
                         "slots": n - kept, "load": n})
    return pd.concat([within, over[over["slots"] > 0]], ignore_index=True)


def rank_load_frame(rank_loads: np.ndarray) -> pd.DataFrame:
    rank_loads = np.asarray(rank_loads, dtype=float)
    mean = float(rank_loads.mean()) if len(rank_loads) else 0.0
    top = int(np.argmax(rank_loads)) if len(rank_loads) else 0
    return pd.DataFrame({"rank": [f"EP {r}" for r in range(len(rank_loads))],
                         "r": np.arange(len(rank_loads)), "slots": rank_loads,
                         "vs_mean": rank_loads / mean if mean > 0 else np.ones(len(rank_loads)),
                         "who": ["most loaded" if r == top and rank_loads[r] > mean * 1.001
                                 else "other" for r in range(len(rank_loads))],
                         "mean": mean})


# ---------------------------------------------------------------------------------------------
# chart specs
# ---------------------------------------------------------------------------------------------

def _legend(**kw) -> alt.Legend:
    return alt.Legend(orient="bottom", title=None, **kw)


def category_chart(ops: pd.DataFrame, phase: str, n_scenarios: int = 1) -> dict:
    """Stacked bar of one step's time per op category (one bar per scenario)."""
    def build():
        return alt.Chart(_data("cat")).mark_bar().encode(
            x=alt.X("time_ms:Q", stack="zero", title=f"{phase} step (ms)"),
            y=alt.Y("scenario:N", title=None, sort=SCENARIOS),
            color=alt.Color("category:N", scale=alt.Scale(domain=CATEGORIES,
                                                          range=CATEGORY_COLORS),
                            legend=_legend(columns=6) if phase == "decode" else None),
            order=alt.Order("order:Q"),
            tooltip=[alt.Tooltip("scenario:N"), alt.Tooltip("category:N"),
                     alt.Tooltip("ms:Q", title="ms"), alt.Tooltip("share:Q", title="% of step")],
        ).properties(height=30 * n_scenarios + 6, width="container")
    return _spec(("category", phase, n_scenarios), build, cat=category_frame(ops, phase))


def roofline_chart(ops: pd.DataFrame, hw: Any) -> dict:
    pts = roofline_frame(ops)
    roof_df, label_df = roof_frames(pts, hw)

    def build():
        x = alt.X("intensity:Q", scale=alt.Scale(type="log"),
                  title="arithmetic intensity (FLOP / HBM byte)")
        y = alt.Y("tflops:Q", scale=alt.Scale(type="log"), title="achieved TFLOP/s (kernel time)")
        lines = alt.Chart(_data("roofs")).mark_line(color="#888", strokeWidth=1.5).encode(
            x=x, y=y, detail="roof:N")
        text_r = alt.Chart(_data("labels")).transform_filter("datum.align == 'right'").mark_text(
            align="right", dx=-4, dy=-6, fontSize=10, color="#555").encode(x=x, y=y,
                                                                           text="text:N")
        text_l = alt.Chart(_data("labels")).transform_filter("datum.align == 'left'").mark_text(
            align="left", dx=4, dy=-8, fontSize=10, color="#555").encode(x=x, y=y, text="text:N")
        dots = alt.Chart(_data("ops")).mark_point(filled=True, opacity=0.8).encode(
            x=x, y=y,
            color=alt.Color("phase:N", scale=alt.Scale(domain=["prefill", "decode"],
                                                       range=["#4c78a8", "#e45756"]),
                            legend=_legend()),
            shape=alt.Shape("category:N", scale=alt.Scale(domain=["gemm", "moe", "attention"],
                                                          range=["circle", "square",
                                                                 "triangle-up"]),
                            legend=_legend()),
            size=alt.Size("time_ms:Q", scale=alt.Scale(range=[25, 350]), legend=None),
            tooltip=[alt.Tooltip("phase:N"), alt.Tooltip("name:N"),
                     alt.Tooltip("layer_kind:N"), alt.Tooltip("bound:N"),
                     alt.Tooltip("kernel_us_r:Q", title="kernel us"),
                     alt.Tooltip("intensity:Q", format=".1f", title="FLOP/byte"),
                     alt.Tooltip("tflops:Q", format=".1f", title="TFLOP/s")])
        return alt.layer(lines, text_r, text_l, dots).properties(height=330, width="container")
    return _spec(("roofline",), build, roofs=roof_df, labels=label_df, ops=pts)


def expert_load_chart(loads: np.ndarray, mean: float, capacity: Optional[int]) -> dict:
    rules = [{"what": f"mean {mean:.1f}", "y": float(mean)}]
    if capacity is not None:
        rules.append({"what": f"capacity {capacity}", "y": float(capacity)})

    def build():
        bars = alt.Chart(_data("loads")).mark_bar().encode(
            x=alt.X("position:O", title="experts, most loaded first",
                    axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y("slots:Q", stack="zero", title="token-slots"),
            color=alt.Color("part:N", scale=alt.Scale(domain=["within capacity",
                                                              "over capacity"],
                                                      range=["#4c78a8", "#e45756"]),
                            legend=_legend()),
            tooltip=[alt.Tooltip("expert:Q"), alt.Tooltip("load:Q"), alt.Tooltip("part:N"),
                     alt.Tooltip("slots:Q")])
        rule = alt.Chart(_data("rules")).mark_rule(strokeDash=[4, 3], color="#333").encode(
            y="y:Q")
        text = alt.Chart(_data("rules")).mark_text(align="right", baseline="bottom", dy=-2,
                                                   fontSize=10, x="width").encode(
            y="y:Q", text="what:N")
        return alt.layer(bars, rule, text).properties(height=210, width="container")
    return _spec(("experts",), build, loads=expert_load_frame(loads, capacity),
                 rules=pd.DataFrame(rules))


def rank_load_chart(rank_loads: np.ndarray) -> dict:
    def build():
        bars = alt.Chart(_data("ranks")).mark_bar().encode(
            x=alt.X("rank:N", sort=alt.SortField("r"), title=None),
            y=alt.Y("slots:Q", title="token-slots on the rank"),
            color=alt.Color("who:N", scale=alt.Scale(domain=["most loaded", "other"],
                                                     range=["#e45756", "#4c78a8"]),
                            legend=None),
            tooltip=[alt.Tooltip("rank:N"), alt.Tooltip("slots:Q"),
                     alt.Tooltip("vs_mean:Q", format=".2f", title="x mean")])
        rule = alt.Chart(_data("ranks")).mark_rule(strokeDash=[4, 3], color="#333").encode(
            y="mean(mean):Q")
        return alt.layer(bars, rule).properties(height=170, width="container")
    return _spec(("ranks",), build, ranks=rank_load_frame(rank_loads))


def memory_chart(mem: pd.DataFrame) -> dict:
    n = int(mem["scenario"].nunique())
    mem = mem.assign(GB_r=mem["GB"].round(2))
    cap = mem.groupby("scenario", as_index=False)["capacity_GB"].first()
    cap["label"] = cap["capacity_GB"].map(lambda v: f"HBM {v:.0f} GB")

    def build():
        bars = alt.Chart(_data("mem")).mark_bar().encode(
            x=alt.X("GB:Q", stack="zero", title="GB per GPU"),
            y=alt.Y("scenario:N", title=None, sort=SCENARIOS),
            color=alt.Color("part:N", scale=alt.Scale(domain=MEMORY_PARTS, range=MEMORY_COLORS),
                            legend=_legend()),
            order=alt.Order("order:Q"),
            tooltip=[alt.Tooltip("scenario:N"), alt.Tooltip("part:N"),
                     alt.Tooltip("GB_r:Q", title="GB")])
        tick = alt.Chart(_data("cap")).mark_tick(color="#d62728", thickness=3).encode(
            x="capacity_GB:Q", y=alt.Y("scenario:N", sort=SCENARIOS),
            tooltip=[alt.Tooltip("scenario:N"), alt.Tooltip("label:N")])
        return alt.layer(bars, tick).properties(height=40 * n + 20, width="container")
    return _spec(("memory", n), build, mem=mem, cap=cap)


def _sweep_layer(x: alt.X, y: alt.Y, labels_on: bool, n: int) -> alt.LayerChart:
    color = alt.Color("scenario:N", scale=alt.Scale(domain=SCENARIOS, range=SCENARIO_COLORS),
                      legend=_legend() if n > 1 else None)
    tips = [alt.Tooltip("scenario:N"), alt.Tooltip("batch:Q"),
            alt.Tooltip("throughput_per_gpu:Q", format=",.1f", title="tok/s/GPU"),
            alt.Tooltip("tpot_ms:Q", format=".2f", title="TPOT ms"),
            alt.Tooltip("ttft_ms:Q", format=",.1f", title="TTFT ms"),
            alt.Tooltip("memory_GB:Q", format=".1f", title="GB/GPU"), alt.Tooltip("fits:N")]
    base = alt.Chart(_data("sweep"))
    layers = [
        base.mark_line(opacity=0.6).encode(x=x, y=y, color=color, order="batch:Q"),
        base.transform_filter("datum.fits == 'fits'").mark_point(
            size=55, filled=True, opacity=1).encode(x=x, y=y, color=color, tooltip=tips),
        base.transform_filter("datum.fits != 'fits'").mark_point(
            size=55, filled=False, strokeWidth=1.8).encode(x=x, y=y, color=color, tooltip=tips),
        base.transform_filter("datum.current").mark_point(size=260, color="#222",
                                                          strokeWidth=1.5).encode(x=x, y=y),
    ]
    if labels_on:
        layers.append(base.mark_text(dx=7, dy=-7, fontSize=10, align="left",
                                     color="#444").encode(x=x, y=y, text="batch:Q"))
    return alt.layer(*layers).properties(height=270, width="container")


def throughput_chart(sw: pd.DataFrame) -> dict:
    n = int(sw["scenario"].nunique())

    def build():
        return _sweep_layer(
            alt.X("batch:Q", scale=alt.Scale(type="log", base=2), title="batch size (sequences)"),
            alt.Y("throughput_per_gpu:Q", title="output tok/s per GPU"), labels_on=False, n=n)
    return _spec(("throughput", n), build, sweep=sw)


def frontier_chart(sw: pd.DataFrame) -> dict:
    n = int(sw["scenario"].nunique())

    def build():
        return _sweep_layer(
            alt.X("tok_s_per_user:Q", title="output tok/s per user (1000 / TPOT)",
                  scale=alt.Scale(zero=False)),
            alt.Y("throughput_per_gpu:Q", title="output tok/s per GPU"), labels_on=True, n=n)
    return _spec(("frontier", n), build, sweep=sw)


def serving_frame(timeline: dict, max_points: int = 600) -> pd.DataFrame:
    """Long-form series of a serving simulation's ``timeline`` (``t_us`` plus per-time
    arrays): sequences running and waiting, and KV-cache use in percent."""
    t = np.asarray(timeline.get("t_us", []), dtype=float)
    if t.size == 0:
        return pd.DataFrame(columns=["t_s", "series", "value", "panel"])
    idx = np.unique(np.linspace(0, t.size - 1, min(max_points, t.size)).astype(int))
    frames = []
    for key, label, panel, scale in (("running", "running", "sequences", 1.0),
                                     ("waiting", "waiting", "sequences", 1.0),
                                     ("kv_usage", "KV cache used (%)", "KV cache used (%)",
                                      100.0)):
        if key in timeline:
            v = np.asarray(timeline[key], dtype=float)[idx] * scale
            frames.append(pd.DataFrame({"t_s": t[idx] / 1e6, "series": label, "value": v,
                                        "panel": panel}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def serving_chart(df: pd.DataFrame) -> dict:
    def build():
        base = alt.Chart(_data("serving"))
        seqs = base.transform_filter("datum.panel == 'sequences'").mark_line(
            interpolate="step-after").encode(
            x=alt.X("t_s:Q", title="simulated time (s)"),
            y=alt.Y("value:Q", title="sequences"),
            color=alt.Color("series:N", scale=alt.Scale(domain=["running", "waiting",
                                                                "KV cache used (%)"],
                                                        range=["#4c78a8", "#e45756",
                                                               "#54a24b"]),
                            legend=_legend()),
            tooltip=[alt.Tooltip("t_s:Q", format=".3f"), alt.Tooltip("series:N"),
                     alt.Tooltip("value:Q", format=".1f")])
        kv = base.transform_filter("datum.panel != 'sequences'").mark_line(
            strokeDash=[4, 2]).encode(
            x="t_s:Q", y=alt.Y("value:Q", title="KV cache used (%)",
                               scale=alt.Scale(domain=[0, 100])),
            color=alt.Color("series:N"))
        return alt.layer(seqs, kv).resolve_scale(y="independent").properties(
            height=220, width="container")
    return _spec(("serving",), build, serving=df)


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
    if any(t in name for t in _ATTN):
        return "attention"
    return "other"


def timeline_frame(events: Sequence[Any], moe_layer: int = 0) -> tuple[pd.DataFrame, dict]:
    """Events of one MoE layer (router .. combine, every rank) from a DES trace, plus the waits
    each rank spends before its collectives (gap between its last compute op and the
    collective's start, i.e. waiting for the slowest member). Times in us from the window
    start; also returns a summary dict."""
    ev = [e for e in events if getattr(e, "rank", -1) >= 0]
    if not ev:
        return pd.DataFrame(), {}
    by_rank: dict[int, list] = {}
    for e in sorted(ev, key=lambda e: e.start_us):
        by_rank.setdefault(e.rank, []).append(e)
    experts = [e for e in ev if e.name == "experts" and e.args.get("moe_layer") == moe_layer]
    if experts:
        t0s, t1s = [], []
        for x in experts:
            mine = by_rank[x.rank]
            before = [e for e in mine if e.name == "router_gemm" and e.start_us <= x.start_us]
            t0s.append(before[-1].start_us if before else x.start_us)
            after = [e for e in mine if e.stream != "compute"
                     and e.start_us >= x.start_us + x.dur_us - 1e-6]
            t1s.append(after[0].start_us + after[0].dur_us if after else x.start_us + x.dur_us)
        t0, t1 = min(t0s), max(t1s)
    else:  # a dense model (or no such MoE layer): about the first layer
        first = by_rank[min(by_rank)]
        end = max(e.start_us + e.dur_us for e in first)
        n_layers = max(1, sum(1 for e in first if e.name == "o_proj"))
        t0, t1 = 0.0, end / n_layers * 1.2
    rows = []
    for e in ev:
        if e.start_us < t1 and e.start_us + e.dur_us > t0:
            rows.append({"lane": f"GPU {e.rank} {'compute' if e.stream == 'compute' else 'comm'}",
                         "rank": e.rank, "name": e.name, "group": _group(e.name),
                         "start": max(e.start_us, t0) - t0,
                         "end": min(e.start_us + e.dur_us, t1) - t0, "dur_us": round(e.dur_us, 2)})
    waits: dict[int, float] = {}
    for r, mine in by_rank.items():
        comp_end = 0.0
        for e in mine:
            if e.stream == "compute":
                comp_end = max(comp_end, e.start_us + e.dur_us)
            elif t0 <= e.start_us <= t1 and e.start_us - comp_end > 0.05:
                w0 = max(comp_end, t0)
                rows.append({"lane": f"GPU {r} compute", "rank": r,
                             "name": f"waits for {e.name}", "group": "waiting",
                             "start": w0 - t0, "end": e.start_us - t0,
                             "dur_us": round(e.start_us - w0, 2)})
                waits[r] = waits.get(r, 0.0) + e.start_us - w0
    df = pd.DataFrame(rows)
    df["lane_order"] = df["rank"] * 2 + df["lane"].str.endswith("comm").astype(int)
    exp_us = {x.rank: x.dur_us for x in experts}
    summary: dict[str, Any] = {"window_us": t1 - t0, "experts_us": exp_us, "waits_us": waits}
    if exp_us:
        summary["slowest_rank"] = max(exp_us, key=exp_us.get)
    return df, summary


def timeline_chart(df: pd.DataFrame) -> dict:
    lanes = int(df["lane"].nunique())

    def build():
        return alt.Chart(_data("events")).mark_bar(height={"band": 0.8}).encode(
            x=alt.X("start:Q", title="us since the layer's router"),
            x2="end:Q",
            y=alt.Y("lane:N", sort=alt.SortField("lane_order"), title=None),
            color=alt.Color("group:N", scale=alt.Scale(domain=TIMELINE_GROUPS,
                                                       range=TIMELINE_COLORS),
                            legend=_legend(columns=9)),
            tooltip=[alt.Tooltip("lane:N"), alt.Tooltip("name:N"), alt.Tooltip("group:N"),
                     alt.Tooltip("dur_us:Q", title="us"),
                     alt.Tooltip("start:Q", format=".1f"), alt.Tooltip("end:Q", format=".1f")],
        ).properties(height=max(120, 22 * lanes), width="container")
    return _spec(("timeline", lanes), build, events=df)


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
