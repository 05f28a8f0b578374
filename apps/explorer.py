"""moesim what-if explorer: ``streamlit run apps/explorer.py`` (needs the ``app`` extra).

Sidebar inputs build a scenario (the same JSON ``python -m moesim predict`` reads); the closed
form predicts it (cached on the scenario's JSON text, so an input change re-renders from cache
or in one prediction); the main page shows headline cards, charts, a compare mode against a
pinned scenario, and the discrete-event simulator behind buttons when ``moesim.des`` provides it.
Bad input is shown next to its field as one line, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import streamlit as st  # noqa: E402

from apps import charts  # noqa: E402
from apps.state import (ACTIVATION_DTYPES, AUTO, CUSTOM_MODEL, CUSTOM_MODEL_LABEL,  # noqa: E402
                        CUSTOM_PROFILE, DISTRIBUTIONS, FRAMEWORKS, KV_DTYPES, MOE_STRATEGIES,
                        OVERFLOWS, PASSTHROUGH, PLACEMENTS, SAME_AS_WEIGHTS, WEIGHT_DTYPES,
                        WIDGET_DEFAULTS, diff_scenarios, error_slot, read_scenario_text,
                        scenario_from_state, state_from_scenario)
from moesim import InputError, parse_scenario, predict  # noqa: E402
from moesim.spec.hardware import available_profiles, load_profile  # noqa: E402
from moesim.spec.presets import list_presets, load_model  # noqa: E402

ss = st.session_state


# ---------------------------------------------------------------------------------------------
# cached computations (keyed on the scenario's JSON text)
# ---------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=512)
def scenario_of(js: str):
    """The resolved scenario of a scenario JSON text (parsing reads the model and the hardware
    profile, so it is cached too)."""
    return parse_scenario(json.loads(js))


@st.cache_resource(show_spinner=False, max_entries=512)
def predict_json(js: str):
    """Prediction of a scenario given as JSON text. Predictions are frozen: sharing is safe."""
    return predict(scenario_of(js))


@st.cache_data(show_spinner=False)
def preset_labels() -> dict[str, str]:
    out = {}
    for name in list_presets():
        try:
            m = load_model(name)
            out[name] = f"{name} · {m.total_params / 1e9:.0f}B" + (
                f"/{m.active_params / 1e9:.1f}B, {m.moe.num_experts}E" if m.moe else " dense")
        except Exception:  # noqa: BLE001 - a broken preset still shows by name
            out[name] = name
    return out


@st.cache_data(show_spinner=False)
def profile_labels() -> dict[str, str]:
    out = {}
    for pid in available_profiles():
        try:
            hw = load_profile(pid)
            out[pid] = hw.display_name
        except Exception:  # noqa: BLE001
            out[pid] = pid
    return out


@st.cache_resource(show_spinner=False, max_entries=64)
def routing_sample(js: str, phase: str, layer: int):
    """Per-expert loads of one MoE layer in the prefill chunk or decode step the prediction
    prices (all attention-DP groups' tokens together), the per-EP-rank loads, and the cap."""
    from moesim.routing import apply_capacity, expert_capacity, rank_expert_loads, sample_loads

    sc = scenario_of(js)
    p = predict_json(js)
    m, d, rs = sc.model, sc.deployment, sc.routing
    step = p.decode_step if phase == "decode" else p.prefill_step
    tokens = step.batch.tokens * d.attention_dp
    rng = np.random.default_rng(rs.seed)
    loads = sample_loads(rs, tokens, m.moe.num_experts, m.moe.top_k, m.num_moe_layers, rng)
    row = np.asarray(loads[min(layer, m.num_moe_layers - 1)], dtype=np.int64)
    cap = None
    dropped = 0.0
    processed = row
    if rs.capacity_factor is not None and rs.overflow != "dropless":
        cap = expert_capacity(tokens, m.moe.num_experts, m.moe.top_k, rs.capacity_factor)
        res = apply_capacity(row, tokens, m.moe.top_k, rs.capacity_factor, rs.overflow)
        dropped = float(res.drop_fraction)
        processed = np.asarray(res.processed)  # what the experts compute (all passes)
    # as the step model places them: EPLB plans each layer on its own loads
    per_rank = rank_expert_loads(processed, d.ep, rs).sum(axis=-1)
    return row, per_rank, cap, tokens, dropped


# ---------------------------------------------------------------------------------------------
# session state, uploads, pinning
# ---------------------------------------------------------------------------------------------

def init_state() -> None:
    first = "initialised" not in ss
    for k, v in WIDGET_DEFAULTS.items():
        if k not in ss:
            ss[k] = v
    for k, v in ((CUSTOM_MODEL, None), (CUSTOM_MODEL_LABEL, ""), (CUSTOM_PROFILE, ""),
                 (PASSTHROUGH, {}), ("pinned", None), ("upload_error", None),
                 ("config_error", None)):
        if k not in ss:
            ss[k] = v
    ss["initialised"] = True
    if first:
        open_example_from_url()


def open_example_from_url() -> None:
    """``?example=<name>`` opens ``examples/<name>.json`` (a shareable link to a starting
    point); only when a session starts, so it never overrides the user's edits."""
    name = st.query_params.get("example")
    if not name:
        return
    path = ROOT / "examples" / f"{Path(str(name)).name.removesuffix('.json')}.json"
    try:
        if not path.is_file():
            names = ", ".join(p.stem for p in sorted((ROOT / "examples").glob("*.json")))
            raise InputError("example", f"no example named {name!r}", f"one of: {names}")
        apply_scenario(read_scenario_text(path.read_bytes()))
    except InputError as exc:
        ss["upload_error"] = exc.one_line()


def apply_scenario(data: dict) -> None:
    """Load a scenario object into the sidebar (raises InputError if the sidebar cannot show
    it)."""
    vals = state_from_scenario(data, profiles=available_profiles())
    for k, v in vals.items():
        ss[k] = v


def on_scenario_upload() -> None:
    f = ss.get("scenario_upload")
    ss["upload_error"] = None
    if f is None:
        return
    try:
        apply_scenario(read_scenario_text(f.getvalue()))
        ss["upload_note"] = f"loaded {f.name}"
    except InputError as exc:
        ss["upload_error"] = exc.one_line()


def on_config_upload() -> None:
    f = ss.get("config_upload")
    ss["config_error"] = None
    if f is None:
        return
    try:
        data = read_scenario_text(f.getvalue())
    except InputError as exc:
        ss["config_error"] = "model: " + exc.message
        return
    stem = Path(f.name).stem
    if "model_type" in data and "name" not in data and stem not in ("config", ""):
        data = {**data, "_name_or_path": data.get("_name_or_path") or stem}
    ss[CUSTOM_MODEL] = data
    ss[CUSTOM_MODEL_LABEL] = str(data.get("_name_or_path") or data.get("name")
                                 or data.get("model_type") or f.name)
    ss["model_source"] = "config.json"


def on_pin() -> None:
    try:
        scen = scenario_from_state(ss)
        predict_json(json.dumps(scen, sort_keys=True))
    except InputError:
        return
    ss["pinned"] = scen


def on_unpin() -> None:
    ss["pinned"] = None


# ---------------------------------------------------------------------------------------------
# sidebar
# ---------------------------------------------------------------------------------------------

def sidebar() -> tuple[dict[str, Any], Any]:
    """Draw the inputs; returns the error slots (field -> st.empty) and the download slot."""
    sb = st.sidebar
    slots: dict[str, Any] = {}

    def slot(name: str) -> None:
        slots[name] = sb.empty()

    sb.title("moesim explorer")
    sb.caption("What if: change a knob, read the prediction. Every input is a field of the "
               "scenario file that `python -m moesim predict` reads.")
    download_slot = sb.container()
    sb.file_uploader("Load a scenario (.json / .yaml)", type=["json", "yaml", "yml"],
                     key="scenario_upload", on_change=on_scenario_upload)
    slot("scenario")
    if ss.get("upload_error"):
        slots["scenario"].error(ss["upload_error"], icon=":material/error:")
    sb.text_input("Scenario name", key="name", placeholder="(automatic)")
    slot("name")

    sb.subheader("Model")
    sb.radio("Model from", ["preset", "config.json"], key="model_source", horizontal=True,
             format_func=lambda s: "preset" if s == "preset" else "HF config.json")
    if ss["model_source"] == "preset":
        labels = preset_labels()
        if ss["model_preset"] not in labels:
            ss["model_preset"] = WIDGET_DEFAULTS["model_preset"]
        sb.selectbox("Preset", list(labels), key="model_preset", format_func=labels.get)
    else:
        sb.file_uploader("Hugging Face config.json", type=["json"], key="config_upload",
                         on_change=on_config_upload)
        if ss.get(CUSTOM_MODEL) is not None:
            sb.caption(f"model: **{ss.get(CUSTOM_MODEL_LABEL) or 'custom'}**")
    slot("model")
    if ss.get("config_error"):
        slots["model"].error(ss["config_error"], icon=":material/error:")

    sb.subheader("Hardware and parallelism")
    plabels = dict(profile_labels())
    if ss.get(CUSTOM_PROFILE):
        plabels[CUSTOM_PROFILE] = f"file: {ss[CUSTOM_PROFILE]}"
    if ss["hw_profile"] not in plabels:
        ss["hw_profile"] = WIDGET_DEFAULTS["hw_profile"]
    sb.selectbox("GPU", list(plabels), key="hw_profile", format_func=plabels.get)
    slot("hardware.profile")
    c1, c2, c3 = sb.columns(3)
    c1.number_input("TP", min_value=1, max_value=1024, step=1, key="tp",
                    help="tensor parallel size of attention and dense layers")
    c2.number_input("EP", min_value=1, max_value=1024, step=1, key="ep",
                    help="expert parallel size of the MoE layers")
    c3.number_input("attn DP", min_value=1, max_value=1024, step=1, key="attention_dp",
                    help="data-parallel attention groups (tokens reach experts by all-to-all)")
    slot("deployment.tp")
    slot("deployment.ep")
    slot("deployment.attention_dp")
    tp, dp = int(ss["tp"]), int(ss["attention_dp"])
    g1, g2 = sb.columns([3, 2])
    g2.checkbox("auto", key="gpus_auto", help="GPU count = TP x attention-DP x PP")
    if ss["gpus_auto"]:
        ss["num_gpus"] = tp * dp * int(ss.get("pp", 1))
    g1.number_input("GPUs", min_value=1, max_value=4096, step=1, key="num_gpus",
                    disabled=bool(ss["gpus_auto"]))
    slot("hardware.num_gpus")

    sb.subheader("Precision")
    p1, p2 = sb.columns(2)
    p1.selectbox("weights", WEIGHT_DTYPES, key="weight_dtype",
                 help="attention, dense and shared-expert weights")
    p2.selectbox("expert weights", (SAME_AS_WEIGHTS,) + WEIGHT_DTYPES, key="expert_weight_dtype",
                 format_func=lambda v: "= weights" if v == SAME_AS_WEIGHTS else v,
                 help="routed experts (e.g. mxfp4 for gpt-oss)")
    slot("deployment.weight_dtype")
    slot("deployment.expert_weight_dtype")
    p3, p4 = sb.columns(2)
    p3.selectbox("activations", ACTIVATION_DTYPES, key="activation_dtype")
    p4.selectbox("KV cache", KV_DTYPES, key="kv_cache_dtype")
    slot("deployment.activation_dtype")
    slot("deployment.kv_cache_dtype")

    sb.subheader("Workload")
    w1, w2, w3 = sb.columns(3)
    w1.number_input("batch", min_value=1, max_value=1_000_000, step=1, key="batch_size",
                    help="concurrent sequences")
    w2.number_input("input", min_value=1, max_value=10_000_000, step=128, key="input_len",
                    help="prompt tokens per request")
    w3.number_input("output", min_value=1, max_value=10_000_000, step=128, key="output_len",
                    help="generated tokens per request")
    slot("workload.batch_size")
    slot("workload.input_len")
    slot("workload.output_len")

    sb.subheader("Routing")
    sb.selectbox("Distribution", DISTRIBUTIONS, key="distribution",
                 help="how tokens pick experts (moesim/spec/routing.py)")
    dist = ss["distribution"]
    if dist == "power_law":
        sb.number_input("alpha (Pareto exponent, != 1)", min_value=0.01, max_value=20.0,
                        step=0.1, key="alpha", format="%.2f")
    elif dist == "dirichlet":
        sb.number_input("alpha (concentration; small = skewed)", min_value=0.001,
                        max_value=1000.0, step=0.1, key="alpha", format="%.3f")
    elif dist == "zipf":
        sb.slider("s (Zipf exponent; 0 = uniform)", 0.0, 3.0, step=0.05, key="s")
    elif dist == "hot_experts":
        sb.text_input("hot expert ids", key="hot_experts", help="comma-separated expert ids")
        sb.slider("share of token-slots to the hot experts", 0.0, 1.0, step=0.01,
                  key="hot_fraction")
    elif dist == "histogram":
        sb.text_input("histogram file (CSV / .npy / .npz)", key="histogram_file")
    elif dist == "trace":
        sb.text_input("trace file (.npy / .npz of expert ids)", key="trace_file")
    if dist != "balanced":
        r1, r2 = sb.columns(2)
        r1.number_input("seed", min_value=0, step=1, key="seed")
        r2.number_input("draws", min_value=1, max_value=256, step=1, key="samples",
                        help="routing draws averaged per prediction (more = smoother, slower)")
    slot("routing")
    sb.checkbox("Cap expert capacity", key="cap_enabled",
                help="per-expert cap = ceil(capacity_factor x T x k / E)")
    if ss["cap_enabled"]:
        k1, k2 = sb.columns(2)
        k1.number_input("capacity factor", min_value=0.05, max_value=64.0, step=0.05,
                        key="capacity_factor", format="%.2f")
        k2.selectbox("overflow", OVERFLOWS, key="overflow")
    slot("routing.capacity_factor")
    slot("routing.overflow")
    sb.selectbox("Expert placement", PLACEMENTS, key="placement",
                 help="which EP rank holds which expert; eplb replicates and places experts "
                      "by load (EPLB)")
    if ss["placement"] == "eplb":
        sb.number_input("EPLB redundant experts", min_value=0, max_value=4096, step=1,
                        key="redundant_experts", help="extra replica slots over all EP ranks")
    slot("routing.placement")
    slot("routing.redundant_experts")

    sb.subheader("Engine")
    sb.selectbox("Framework", FRAMEWORKS, key="framework",
                 help="selects the engine defaults in moesim/frameworks/")
    slot("deployment.framework")
    with sb.expander("More engine and hardware options"):
        a1, a2 = st.columns(2)
        a1.number_input("PP", min_value=1, max_value=256, step=1, key="pp",
                        help="pipeline stages")
        a2.number_input("MoE TP (0 = auto)", min_value=0, max_value=1024, step=1, key="moe_tp")
        slots["deployment.pp"] = st.empty()
        slots["deployment.moe_tp"] = st.empty()
        st.selectbox("MoE kernel", MOE_STRATEGIES, key="moe_strategy")
        st.selectbox("CUDA graphs", [AUTO, "on", "off"], key="cuda_graphs")
        st.number_input("prefill chunk tokens (0 = framework default)", min_value=0,
                        step=1024, key="max_num_batched_tokens")
        st.number_input("GPU memory utilisation (0 = framework default)", min_value=0.0,
                        max_value=1.0, step=0.05, key="gpu_memory_utilization", format="%.2f")
        slots["deployment"] = st.empty()
        st.number_input("GPUs per node", min_value=1, max_value=1024, step=1,
                        key="gpus_per_node")
        st.checkbox("use the calibrated profile overlay", key="calibrated")
        slots["hardware.gpus_per_node"] = st.empty()
        slots["hardware"] = st.empty()
    slot("simulation")
    return slots, download_slot


def show_inline_error(exc: InputError, slots: dict[str, Any]) -> None:
    where = error_slot(exc.field, slots)
    (slots[where] if where else slots["scenario"]).error(exc.one_line(),
                                                         icon=":material/error:")
    st.error(f"**This scenario cannot be predicted.** {exc.one_line()}", icon=":material/error:")
    st.caption("The field is marked in the sidebar. Nothing was computed; fix the input and the "
               "page updates.")


# ---------------------------------------------------------------------------------------------
# main page pieces
# ---------------------------------------------------------------------------------------------

def pct(cur: float, ref: float) -> Optional[str]:
    if ref is None or not math.isfinite(ref) or ref == 0:
        return None
    return f"{(cur - ref) / ref * 100:+.1f}% vs pinned"


def headline(pred, pinned_pred=None) -> None:
    m = pred.memory
    c1, c2, c3, c4 = st.columns(4)
    ref = pinned_pred

    def card(col, label, value, cur, old, lower_is_better, help_):
        kw: dict[str, Any] = {}
        if ref is not None:
            d = pct(cur, old)
            if d is None or abs((cur - old) / old) < 5e-4:
                kw = {"delta": "no change vs pinned", "delta_color": "off",
                      "delta_arrow": "off"}
            else:
                kw = {"delta": d, "delta_color": "inverse" if lower_is_better else "normal"}
        col.metric(label, value, help=help_, border=True, **kw)

    card(c1, "TTFT", charts.fmt_ms(pred.ttft_ms), pred.ttft_ms, ref.ttft_ms if ref else 0, True,
         f"mean time to first token; p50 {pred.ttft_ms_p50:.1f} ms, p95 "
         f"{pred.ttft_ms_p95:.1f} ms over {pred.samples} routing draw(s)")
    card(c2, "TPOT", charts.fmt_ms(pred.tpot_ms), pred.tpot_ms, ref.tpot_ms if ref else 0, True,
         f"time per output token (one decode step); p95 {pred.tpot_ms_p95:.2f} ms; "
         f"{1e3 / pred.tpot_ms:.1f} tok/s per user")
    card(c3, "Throughput per GPU", f"{pred.throughput_output_tok_per_s_per_gpu:,.0f} tok/s",
         pred.throughput_output_tok_per_s_per_gpu,
         ref.throughput_output_tok_per_s_per_gpu if ref else 0, False,
         f"output tokens/s per GPU; {pred.throughput_output_tok_per_s:,.0f} tok/s on all "
         f"{pred.scenario.num_gpus} GPU(s)")
    card(c4, "Memory per GPU", f"{m.total / 1e9:.1f} / {m.capacity / 1e9:.0f} GB", m.total,
         ref.memory.total if ref else 0, True,
         f"weights {m.weights / 1e9:.1f} GB, KV cache {m.kv_cache / 1e9:.1f} GB, activations "
         f"{m.activations / 1e9:.1f} GB, reserved {m.reserved / 1e9:.1f} GB; largest batch "
         f"that fits: {m.max_batch_size}")
    if m.fits:
        c4.markdown(f":green-badge[:material/check: fits] &nbsp; up to batch "
                    f"{m.max_batch_size}")
    else:
        c4.markdown(f":red-badge[:material/close: does not fit] &nbsp; "
                    f"{(m.total - m.capacity) / 1e9:.1f} GB over; batch <= {m.max_batch_size}"
                    " fits")


def describe(sc) -> str:
    d, wl = sc.deployment, sc.workload
    par = f"TP{d.tp}" + (f" EP{d.ep}" if d.ep > 1 else "") + \
        (f" attn-DP{d.attention_dp}" if d.attention_dp > 1 else "") + \
        (f" PP{d.pp}" if d.pp > 1 else "") + (f" MoE-TP{d.moe_tp}" if sc.model.moe else "")
    return (f"{sc.model.name} on {sc.num_gpus}x {sc.hardware.display_name} · {par} · "
            f"{sc.framework.id} · weights {d.weight_dtype}/{d.experts_dtype}, act "
            f"{d.activation_dtype}, KV {d.kv_cache_dtype} · batch {wl.batch_size} x "
            f"({wl.input_len} in, {wl.output_len} out) · routing {sc.routing.distribution}")


def compare_section(current: dict, pred, pinned: Optional[dict], pinned_pred) -> None:
    b1, b2, _ = st.columns([1.3, 1, 4])
    b1.button("Pin this scenario" if pinned is None else "Pin current instead",
              on_click=on_pin, icon=":material/push_pin:", key="pin_button")
    if pinned is not None:
        b2.button("Unpin", on_click=on_unpin, key="unpin_button")
    if pinned is None or pinned_pred is None:
        st.caption("Pin a scenario to compare: the page then shows the current one beside it, "
                   "with the differences.")
        return
    import pandas as pd

    psc = pinned_pred.scenario
    st.markdown(f"**Compare** — pinned: *{psc.name}*")

    def row(label, a, b, fmt, better_low):
        ch = (b - a) / a * 100 if a else float("nan")
        return {"metric": label, "pinned": fmt(a), "current": fmt(b),
                "change": f"{ch:+.1f}%" if math.isfinite(ch) else "-",
                "better": "" if not math.isfinite(ch) or abs(ch) < 0.05 else
                ("current" if (ch < 0) == better_low else "pinned")}
    rows = [
        row("TTFT (ms)", pinned_pred.ttft_ms, pred.ttft_ms, lambda v: f"{v:.2f}", True),
        row("TPOT (ms)", pinned_pred.tpot_ms, pred.tpot_ms, lambda v: f"{v:.3f}", True),
        row("throughput / GPU (tok/s)", pinned_pred.throughput_output_tok_per_s_per_gpu,
            pred.throughput_output_tok_per_s_per_gpu, lambda v: f"{v:,.1f}", False),
        row("throughput (tok/s)", pinned_pred.throughput_output_tok_per_s,
            pred.throughput_output_tok_per_s, lambda v: f"{v:,.1f}", False),
        row("memory / GPU (GB)", pinned_pred.memory.total / 1e9, pred.memory.total / 1e9,
            lambda v: f"{v:.2f}", True),
        row("GPUs", psc.num_gpus, pred.scenario.num_gpus, lambda v: f"{v}", True),
    ]
    rows.append({"metric": "fits", "pinned": "yes" if pinned_pred.memory.fits else "no",
                 "current": "yes" if pred.memory.fits else "no", "change": "", "better": ""})
    c1, c2 = st.columns([3, 2])
    c1.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="compare_metrics")
    diffs = diff_scenarios(pinned, current)
    if diffs:
        c2.dataframe(pd.DataFrame([{"field": f, "pinned": "-" if a is None else str(a),
                                    "current": "-" if b is None else str(b)}
                                   for f, a, b in diffs]),
                     hide_index=True, width="stretch", key="compare_fields")
    else:
        c2.info("The current scenario is the pinned one.")


@st.cache_resource(show_spinner=False, max_entries=2048)
def sweep_point(base_js: str, batch: int, one_draw: bool, _js: str):
    """Prediction of the scenario ``_js`` at another batch size. The scenario is parsed once
    and copied with the new workload (only ``batch_size >= attention_dp`` depends on it, and
    :func:`charts.sweep_batches` keeps to that), so a sweep costs predictions only. Keyed on
    the scenario without its batch size: changing the batch alone reuses the whole sweep."""
    sc = scenario_of(_js)
    wl = sc.workload.model_copy(update={"batch_size": int(batch)})
    rs = sc.routing
    if one_draw:
        rs = rs.model_copy(update={"samples": 1})
    src = sc.source.model_copy(update={"workload": wl, "routing": rs})
    return predict(sc.model_copy(update={"workload": wl, "routing": rs, "source": src}))


def sweep_points(scenario: dict, js: str, batches: list[int], one_draw: bool):
    base = json.loads(js)
    base["workload"]["batch_size"] = 0
    base_js = json.dumps(base, sort_keys=True)
    out = []
    for b in batches:
        try:
            out.append((b, sweep_point(base_js, b, one_draw, js)))
        except (InputError, ValueError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# the discrete-event simulator (moesim.des), when it is there
# ---------------------------------------------------------------------------------------------

def des_entry_points() -> tuple[Optional[Callable], Optional[Callable], str]:
    """(serving ``simulate``, one-step ``simulate_one_step``, why a missing one is missing)."""
    try:
        des = importlib.import_module("moesim.des")
    except Exception as exc:  # noqa: BLE001 - work in progress elsewhere must not break the app
        return None, None, f"moesim.des cannot be imported ({type(exc).__name__}: " \
                           f"{str(exc).splitlines()[0] if str(exc) else ''})"
    simulate = getattr(des, "simulate", None)
    one = None
    why = "" if simulate else "moesim.des has no `simulate` yet (the serving simulator is " \
                              "being written)"
    try:
        one = getattr(importlib.import_module("moesim.des.step_sim"), "simulate_one_step", None)
    except Exception as exc:  # noqa: BLE001
        why = (why + "; " if why else "") + f"moesim.des.step_sim: {type(exc).__name__}"
    return simulate, one, why


def jsonable(x: Any, depth: int = 0) -> Any:
    if depth > 6:
        return str(x)
    if hasattr(x, "to_dict") and callable(x.to_dict):
        try:
            return jsonable(x.to_dict(), depth + 1)
        except Exception:  # noqa: BLE001
            pass
    if hasattr(x, "model_dump"):
        return jsonable(x.model_dump(), depth + 1)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name), depth + 1) for f in dataclasses.fields(x)
                if f.name != "scenario"}
    if isinstance(x, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in list(x.items())[:200]}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, depth + 1) for v in list(x)[:50]]
    if isinstance(x, np.ndarray):
        return x.tolist() if x.size <= 64 else f"array{list(x.shape)}"
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_serving_des(simulate: Callable, sc, requests: int) -> Any:
    """Run ``moesim.des.simulate`` with a progress indicator: a progress bar when it reports
    progress through a callback, otherwise a status line with the elapsed time (the run
    happens in a worker thread so that the page stays live)."""
    import threading

    params = inspect.signature(simulate).parameters
    kwargs: dict[str, Any] = {}
    if "requests" in params:
        kwargs["requests"] = int(requests)
    frac = {"v": None}

    def progress(*args, **_kw):
        if len(args) == 1 and isinstance(args[0], (int, float)):
            frac["v"] = float(args[0])
        elif len(args) >= 2 and all(isinstance(a, (int, float)) for a in args[:2]) and args[1]:
            frac["v"] = float(args[0]) / float(args[1])

    for name in ("progress", "progress_callback", "on_progress"):
        if name in params:
            kwargs[name] = progress
    box: dict[str, Any] = {}

    def work():
        try:
            box["result"] = simulate(sc, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the script thread
            box["error"] = exc

    status = st.status(f"Simulating {requests} requests...", expanded=False)
    bar = st.progress(0.0)
    worker = threading.Thread(target=work, daemon=True)
    t0 = time.perf_counter()
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
        el = time.perf_counter() - t0
        if frac["v"] is not None:
            bar.progress(min(max(frac["v"], 0.0), 1.0), text=f"{100 * frac['v']:.0f}% · "
                                                             f"{el:.1f} s")
        else:
            bar.progress(min(0.95, el / (el + 5.0)), text=f"{el:.1f} s elapsed")
    el = time.perf_counter() - t0
    bar.empty()
    if "error" in box:
        status.update(label="Simulation failed", state="error")
        raise box["error"]
    status.update(label=f"Simulated {requests} requests in {el:.1f} s", state="complete")
    return box["result"]


def show_serving_result(res: Any, pred) -> None:
    metrics = getattr(res, "metrics", None)
    if not isinstance(metrics, dict):
        st.json(jsonable(res), expanded=False)
        return
    n = pred.scenario.num_gpus

    def card(col, label, key, closed, fmt, inverse=True):
        v = metrics.get(key)
        if not isinstance(v, (int, float)):
            return
        delta = f"{(v - closed) / closed * 100:+.1f}% vs closed form" if closed else None
        col.metric(label, fmt(v), delta=delta, delta_color="inverse" if inverse else "normal",
                   border=True)

    c1, c2, c3, c4 = st.columns(4)
    card(c1, "DES TTFT (mean)", "ttft_ms_mean", pred.ttft_ms, charts.fmt_ms)
    card(c2, "DES TPOT (mean)", "tpot_ms_mean", pred.tpot_ms, charts.fmt_ms)
    thr = metrics.get("throughput_output_tok_per_s")
    if isinstance(thr, (int, float)):
        ref = pred.throughput_output_tok_per_s
        c3.metric("DES throughput per GPU", f"{thr / n:,.0f} tok/s",
                  delta=f"{(thr - ref) / ref * 100:+.1f}% vs closed form" if ref else None,
                  border=True)
    c4.metric("requests completed", f"{metrics.get('requests_completed', '-')}",
              help=f"p50/p90/p99 TTFT {metrics.get('ttft_ms_p50', float('nan')):.0f} / "
                   f"{metrics.get('ttft_ms_p90', float('nan')):.0f} / "
                   f"{metrics.get('ttft_ms_p99', float('nan')):.0f} ms", border=True)
    timeline = getattr(res, "timeline", None)
    if isinstance(timeline, dict) and len(timeline.get("t_us", [])):
        st.markdown("**Sequences running and waiting, KV-cache use** (dashed, right axis)")
        chart(charts.serving_chart(charts.serving_frame(timeline)), "serving_chart")
    with st.expander("All simulation results (JSON)"):
        st.json(jsonable(res), expanded=False)


@st.cache_resource(show_spinner=False, max_entries=16)
def one_step_trace(js: str, phase: str):
    _, one, _ = des_entry_points()
    from moesim.routing import sample_loads

    sc = scenario_of(js)
    p = predict_json(js)
    step = p.decode_step if phase == "decode" else p.prefill_step
    loads = None
    m = sc.model
    if m.moe is not None and sc.routing.distribution != "balanced":
        loads = sample_loads(sc.routing, step.batch.tokens * sc.deployment.attention_dp,
                             m.moe.num_experts, m.moe.top_k, m.num_moe_layers,
                             np.random.default_rng(sc.routing.seed))
    record: list = []
    cost = one(sc, step.batch, loads, record=record)
    return cost, record


def des_section(sc, js: str, slots) -> None:
    simulate, one, why = des_entry_points()
    st.subheader("Discrete-event simulation")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Per-rank timeline of one step** — which GPU waits for which at "
                    "dispatch / combine.")
        q1, q2 = st.columns(2)
        phase = q1.radio("step", ["decode", "prefill"], horizontal=True, key="des_phase")
        n_moe = sc.model.num_moe_layers if sc.model.moe else 1
        layer = q2.number_input("MoE layer", min_value=0, max_value=max(0, n_moe - 1), step=1,
                                key="des_layer", value=0)
        go = st.button("Simulate one step", disabled=one is None, key="des_step_button",
                       icon=":material/play_arrow:",
                       help=None if one else "moesim.des.step_sim.simulate_one_step is missing")
        if one is None:
            st.caption(f"Unavailable: {why or 'moesim.des.step_sim is missing'}.")
        key = (js, phase)
        if go:
            with st.spinner("simulating every rank..."):
                try:
                    ss["des_step"] = (key, one_step_trace(js, phase))
                except InputError as exc:
                    st.error(exc.one_line())
                except Exception as exc:  # noqa: BLE001 - a DES in progress: one line
                    st.error(f"the simulator failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}")
    with c2:
        st.markdown("**Serving simulation** — requests arriving, continuous batching, paged "
                    "KV cache (`moesim.des.simulate`).")
        requests = st.number_input("requests", min_value=10, max_value=100_000, step=50,
                                   key="des_requests", value=200)
        run = st.button("Simulate serving", disabled=simulate is None, key="des_serving_button",
                        icon=":material/play_arrow:",
                        help=None if simulate else "moesim.des.simulate is not there yet")
        if simulate is None:
            st.caption(f"Disabled: {why}. The closed form above does not need it.")
    got = ss.get("des_step")
    if got and got[0] == (js, phase):
        show_step_timeline(got[1], js, phase, int(layer))
    if run and simulate is not None:
        try:
            ss["des_serving"] = ((js, int(requests)), run_serving_des(simulate, sc,
                                                                      int(requests)))
        except InputError as exc:
            slot = error_slot(exc.field, slots)
            st.error(exc.one_line(), icon=":material/error:")
            if slot:
                slots[slot].error(exc.one_line(), icon=":material/error:")
        except Exception as exc:  # noqa: BLE001 - a simulator in progress: one line
            st.error(f"the simulator failed: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
    got = ss.get("des_serving")
    if got and got[0] == (js, int(requests)):
        show_serving_result(got[1], predict_json(js))


def show_step_timeline(result, js: str, phase: str, layer: int) -> None:
    cost, record = result
    df, summary = charts.timeline_frame(record, layer)
    if df.empty:
        st.info("The simulator recorded no events for this step.")
        return
    p = predict_json(js)
    closed = (p.decode_step if phase == "decode" else p.prefill_step).time_us
    st.markdown(f"**{phase.capitalize()} step, MoE layer {layer}, every GPU** — grey: a GPU "
                "idle at a collective, waiting for the slowest member")
    chart(charts.timeline_chart(df), "timeline_chart")
    waits = summary.get("waits_us", {})
    slow = summary.get("slowest_rank")
    msg = f"Whole step {cost.time_us / 1e3:.3f} ms simulated; closed form " \
          f"{closed / 1e3:.3f} ms."
    exp = summary.get("experts_us", {})
    if slow is not None and len(exp) > 1:
        lo, hi = min(exp.values()), max(exp.values())
        if hi > lo * 1.005:
            msg += f" Expert time per GPU in this layer: {lo:.1f} to {hi:.1f} us, GPU {slow} " \
                   "the slowest"
            msg += (f"; the others wait up to {max(waits.values()):.1f} us for it."
                    if waits else ".")
        else:
            msg += f" Expert time is even over the GPUs in this layer ({hi:.1f} us)."
    st.caption(msg)


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

def main() -> None:
    st.set_page_config(page_title="moesim explorer", layout="wide",
                       initial_sidebar_state="expanded")
    t_page = time.perf_counter()
    timings: dict[str, float] = {}
    init_state()
    slots, download_slot = sidebar()

    try:
        current = scenario_from_state(ss)
        js = json.dumps(current, sort_keys=True)
        t0 = time.perf_counter()
        pred = predict_json(js)
        elapsed = time.perf_counter() - t0
    except InputError as exc:
        download_slot.download_button("Download scenario JSON", data="{}", disabled=True,
                                      key="download_disabled", help="fix the input first")
        show_inline_error(exc, slots)
        return
    except Exception as exc:  # noqa: BLE001 - never a traceback on the page
        download_slot.download_button("Download scenario JSON", data="{}", disabled=True,
                                      key="download_disabled", help="fix the input first")
        first = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, ValueError):  # a check below the spec layer: still bad input
            show_inline_error(InputError("", first), slots)
        else:  # a bug in moesim: one line here, the traceback in the server log
            import traceback

            traceback.print_exc()
            st.error(f"moesim failed on this scenario ({type(exc).__name__}: {first}); this is "
                     "a bug, the traceback is in the server log", icon=":material/bug_report:")
        return
    sc = pred.scenario
    text = json.dumps(current, indent=2)
    fname = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sc.name)[:80] or "scn"
    download_slot.download_button("Download scenario JSON", data=text,
                                  file_name=f"{fname}.json", mime="application/json",
                                  icon=":material/download:", key="download_scenario",
                                  help="a file `python -m moesim predict` reads")

    pinned = ss.get("pinned")
    pinned_pred = None
    if pinned is not None:
        try:
            pinned_pred = predict_json(json.dumps(pinned, sort_keys=True))
        except (InputError, ValueError):
            ss["pinned"] = pinned = None

    st.markdown(f"#### {sc.name}")
    st.caption(describe(sc) + f" · predicted in {elapsed * 1e3:.0f} ms"
               + (" (cached)" if elapsed < 0.005 else ""))
    headline(pred, pinned_pred)
    for w in pred.warnings:
        st.warning(w, icon=":material/warning:")
    compare_section(current, pred, pinned, pinned_pred)

    labels = ["current"] + (["pinned"] if pinned_pred is not None else [])
    preds = [pred] + ([pinned_pred] if pinned_pred is not None else [])
    import pandas as pd

    ops = pd.concat([charts.ops_frame(p, lab) for p, lab in zip(preds, labels)],
                    ignore_index=True)
    steps = {"prefill": f"{pred.prefill_step.batch.tokens} tokens",
             "decode": f"{pred.decode_step.batch.num_seqs} sequences"}

    n = len(preds)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Time per op category** — one prefill chunk "
                    f"({steps['prefill']}) and one decode step ({steps['decode']}), "
                    "slowest GPU")
        chart(charts.category_chart(ops, "prefill", n), "cat_prefill")
        chart(charts.category_chart(ops, "decode", n), "cat_decode")
    with c2:
        st.markdown("**Memory per GPU** — red tick: HBM capacity")
        mem = pd.concat([charts.memory_frame(p, lab) for p, lab in zip(preds, labels)],
                        ignore_index=True)
        chart(charts.memory_chart(mem), "memory_chart")
        kv = pred.memory.kv_bytes_per_seq
        st.caption(f"KV cache {kv / 1e6:.1f} MB per sequence at full length; largest batch "
                   f"that fits: {pred.memory.max_batch_size}.")

    c3, c4 = st.columns(2)
    with c3:
        st.markdown(f"**Roofline** on {sc.hardware.display_name} — every GEMM, MoE and "
                    "attention op of both steps (size: time share)")
        chart(charts.roofline_chart(ops[ops["scenario"] == "current"], sc.hardware),
              "roofline_chart")
    with c4:
        t_r = time.perf_counter()
        routing_panel(sc, js, pred)
        timings["routing"] = time.perf_counter() - t_r

    t_s = time.perf_counter()
    sweep_section(sc, current, js, pinned, pinned_pred)
    timings["sweep"] = time.perf_counter() - t_s

    with st.expander("Ops of one step, slowest first"):
        t1, t2 = st.columns(2)
        t1.markdown(f"prefill: {steps['prefill']}, {pred.prefill_step.time_us / 1e3:.2f} ms")
        t1.dataframe(charts.top_ops_table(ops[ops["scenario"] == "current"], "prefill"),
                     hide_index=True, width="stretch")
        t2.markdown(f"decode: {steps['decode']}, {pred.decode_step.time_us / 1e3:.3f} ms")
        t2.dataframe(charts.top_ops_table(ops[ops["scenario"] == "current"], "decode"),
                     hide_index=True, width="stretch")

    des_section(sc, js, slots)

    with st.expander("Scenario JSON (what the download button saves)"):
        st.code(text, language="json")
        st.caption("Run it from a shell: `python -m moesim predict scenario.json`")
    ss["page_ms"] = (time.perf_counter() - t_page) * 1e3
    timings["predict"] = elapsed
    ss["timings_ms"] = {k: round(v * 1e3, 1) for k, v in timings.items()}
    st.caption(f"page computed in {ss['page_ms']:.0f} ms (prediction {elapsed * 1e3:.0f} ms, "
               f"batch sweep {timings['sweep'] * 1e3:.0f} ms, routing sample "
               f"{timings.get('routing', 0) * 1e3:.0f} ms)")


def chart(spec: dict, key: str) -> None:
    st.vega_lite_chart(spec=spec, width="stretch", key=key)


def stochastic(sc) -> bool:
    return sc.model.moe is not None and sc.routing.distribution != "balanced"


def sweep_section(sc, current: dict, js: str, pinned: Optional[dict], pinned_pred) -> None:
    import pandas as pd

    st.markdown("**Batch size sweep** — throughput per GPU, and the latency-throughput "
                "frontier (filled: fits in memory; hollow: does not; ringed: current batch)")
    skewed = stochastic(sc) or (pinned_pred is not None and stochastic(pinned_pred.scenario))
    if skewed:
        on = st.checkbox("sweep with the chosen routing skew (batch 1, 4, 16, 64, 256 and the "
                         "current one; one draw per point, and every draw re-prices each MoE "
                         "layer of every prefill chunk, so this takes seconds)", key="sweep_skew")
        if not on:
            st.caption("Sweep off for random routing; tick the box to compute it.")
            return
    frames = []
    with st.spinner("sweeping batch sizes..."):
        for label, scen, sjs, s_ in [("current", current, js, sc)] + (
                [("pinned", pinned, json.dumps(pinned, sort_keys=True), pinned_pred.scenario)]
                if pinned_pred is not None else []):
            # random routing re-draws every prefill chunk of every point: fewer, smaller points
            batches = charts.sweep_batches(s_.workload.batch_size, s_.deployment.attention_dp,
                                           *((256, 4) if stochastic(s_) else (1024, 2)))
            frames.append(charts.sweep_frame(sweep_points(scen, sjs, batches, stochastic(s_)),
                                             label, s_.workload.batch_size))
    sw = pd.concat(frames, ignore_index=True)
    if sw.empty:
        st.info("No batch size of the sweep could be predicted.")
        return
    s1, s2 = st.columns(2)
    with s1:
        chart(charts.throughput_chart(sw), "throughput_chart")
    with s2:
        chart(charts.frontier_chart(sw), "frontier_chart")


def routing_panel(sc, js: str, pred) -> None:
    m = sc.model
    st.markdown("**Expert loads** — one MoE layer, one routing draw")
    if m.moe is None:
        st.info(f"{m.name} is a dense model: no experts to route to.")
        return
    q1, q2 = st.columns(2)
    phase = q1.radio("tokens of", ["decode", "prefill"], horizontal=True, key="load_phase",
                     help="the decode step or the largest prefill chunk the prediction prices")
    layer = q2.number_input("MoE layer", min_value=0, max_value=max(0, m.num_moe_layers - 1),
                            step=1, key="load_layer", value=0)
    try:
        row, per_rank, cap, tokens, dropped = routing_sample(js, phase, int(layer))
    except (InputError, ValueError) as exc:
        st.error(str(exc).splitlines()[0])
        return
    mean = tokens * m.moe.top_k / m.moe.num_experts
    chart(charts.expert_load_chart(row, mean, cap), "expert_chart")
    ratio = per_rank.max() / per_rank.mean() if per_rank.mean() > 0 else 1.0
    st.markdown(f"**Per EP rank** — max/mean {ratio:.2f}" +
                (f" (EP=1: every GPU holds every expert, split by MoE-TP "
                 f"{sc.deployment.moe_tp})" if sc.deployment.ep == 1 else ""))
    chart(charts.rank_load_chart(per_rank), "rank_chart")
    step = pred.decode_step if phase == "decode" else pred.prefill_step
    st_ = step.moe_stats.get("moe")
    parts = [f"{tokens} tokens x top-{m.moe.top_k} over {m.moe.num_experts} experts",
             f"{int(np.count_nonzero(row))} experts touched"]
    if cap is not None:
        parts.append(f"cap {cap} token-slots/expert, {100 * dropped:.2f}% dropped in this draw")
    if st_ is not None:
        parts.append(f"prediction (all layers): rank max/mean {st_.rank_load_max_over_mean:.2f}"
                     + (f", dropped {100 * st_.dropped_fraction:.2f}%" if st_.dropped_fraction
                        else "")
                     + (f", rerouted {100 * st_.rerouted_fraction:.2f}%"
                        if st_.rerouted_fraction else ""))
    st.caption("; ".join(parts) + ".")


main()
