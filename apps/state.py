"""The explorer's inputs as plain data, free of Streamlit (so it is testable on its own).

The sidebar edits a flat dict of widget values (``WIDGET_DEFAULTS`` names every key); this
module turns that dict into a scenario object that ``python -m moesim predict`` accepts
(:func:`scenario_from_state`) and back (:func:`state_from_scenario`, used when a scenario JSON is
uploaded), finds the sidebar slot next to which an :class:`moesim.errors.InputError` belongs
(:func:`error_slot`), and lists the differences between two scenarios (:func:`diff_scenarios`).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional

from moesim.errors import InputError
from moesim.spec.presets import resolve_preset

#: Options the sidebar offers (the schema accepts a few more spellings; these are canonical).
DISTRIBUTIONS = ("balanced", "uniform", "power_law", "zipf", "dirichlet", "hot_experts",
                 "histogram", "trace")
OVERFLOWS = ("drop", "reroute", "second_pass")
PLACEMENTS = ("contiguous", "round_robin", "eplb")
FRAMEWORKS = ("vllm", "sglang", "trtllm", "generic")
MOE_STRATEGIES = ("fused", "grouped", "naive")
WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "fp8_block", "int8", "int4", "mxfp4", "nvfp4")
ACTIVATION_DTYPES = ("bf16", "fp16", "fp8")
KV_DTYPES = ("bf16", "fp16", "fp8")
SAME_AS_WEIGHTS = "same as weights"
AUTO = "auto"

#: Routing draws the explorer asks for when the user picks a random distribution (the schema's
#: default, 64, is what a scenario file without ``samples`` gets; see README of the explorer).
EXPLORER_SAMPLES = 8

#: Every widget key with its default: the explorer's opening scenario.
WIDGET_DEFAULTS: dict[str, Any] = {
    "name": "",
    "model_source": "preset",          # "preset" | "config.json"
    "model_preset": "qwen3-30b-a3b",
    "hw_profile": "h100_sxm",
    "gpus_auto": True,                  # num_gpus = tp * attention_dp * pp
    "num_gpus": 2,
    "gpus_per_node": 8,
    "calibrated": True,
    "tp": 1,
    "ep": 2,
    "attention_dp": 2,
    "pp": 1,
    "moe_tp": 0,                        # 0 = the engines' default, tp * attention_dp / ep
    "weight_dtype": "bf16",
    "expert_weight_dtype": SAME_AS_WEIGHTS,
    "activation_dtype": "bf16",
    "kv_cache_dtype": "bf16",
    "batch_size": 64,
    "input_len": 1024,
    "output_len": 512,
    "distribution": "balanced",
    "alpha": 1.2,
    "s": 0.8,
    "hot_experts": "0, 1, 2, 3",
    "hot_fraction": 0.3,
    "histogram_file": "",
    "trace_file": "",
    "seed": 0,
    "samples": EXPLORER_SAMPLES,
    "cap_enabled": False,
    "capacity_factor": 1.25,
    "overflow": "drop",
    "placement": "contiguous",
    "redundant_experts": 0,
    "framework": "vllm",
    "moe_strategy": "fused",
    "cuda_graphs": AUTO,                # auto | on | off
    "max_num_batched_tokens": 0,        # 0 = the framework's default
    "gpu_memory_utilization": 0.0,      # 0 = the framework's default
}

#: Keys of session state that hold data rather than widget values.
CUSTOM_MODEL = "custom_model"              # dict (HF config / ModelSpec) or str (path, HF id)
CUSTOM_MODEL_LABEL = "custom_model_label"
CUSTOM_PROFILE = "custom_profile"          # a profile path from an uploaded scenario
PASSTHROUGH = "passthrough"                # scenario keys the sidebar does not edit


# ---------------------------------------------------------------------------------------------
# state -> scenario
# ---------------------------------------------------------------------------------------------

def _hot_ids(text: str) -> Any:
    """``"0, 3, 7"`` -> ``[0, 3, 7]``; anything unparsable is passed on as written, so the
    scenario validator reports it on one line."""
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        return str(text)


def model_ref(s: Mapping[str, Any]) -> Any:
    if s.get("model_source") == "config.json":
        custom = s.get(CUSTOM_MODEL)
        if custom is None:
            raise InputError("model", "no config.json uploaded yet",
                             "upload a Hugging Face config.json or pick a preset")
        return custom
    return s["model_preset"]


def scenario_from_state(s: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario object (JSON-ready) the widget values describe. Optional fields the user
    left at their default are omitted, so the file stays short and reads like the examples."""
    g = lambda k: s.get(k, WIDGET_DEFAULTS[k])  # noqa: E731
    out: dict[str, Any] = {}
    passthrough = dict(s.get(PASSTHROUGH) or {})
    name = str(g("name")).strip()
    if name:
        out["name"] = name
    if "description" in passthrough:
        out["description"] = passthrough.pop("description")
    out["model"] = model_ref(s)

    tp, ep, dp, pp = int(g("tp")), int(g("ep")), int(g("attention_dp")), int(g("pp"))
    profile = g("hw_profile")
    if profile == CUSTOM_PROFILE and s.get(CUSTOM_PROFILE):
        profile = s[CUSTOM_PROFILE]
    hw: dict[str, Any] = {"profile": profile,
                          "num_gpus": tp * dp * pp if g("gpus_auto") else int(g("num_gpus"))}
    if int(g("gpus_per_node")) != 8:
        hw["gpus_per_node"] = int(g("gpus_per_node"))
    if not g("calibrated"):
        hw["calibrated"] = False
    out["hardware"] = hw

    dep: dict[str, Any] = {"tp": tp, "ep": ep, "attention_dp": dp}
    if pp != 1:
        dep["pp"] = pp
    if int(g("moe_tp")) > 0:
        dep["moe_tp"] = int(g("moe_tp"))
    dep["weight_dtype"] = g("weight_dtype")
    if g("expert_weight_dtype") not in (SAME_AS_WEIGHTS, None, ""):
        dep["expert_weight_dtype"] = g("expert_weight_dtype")
    dep["activation_dtype"] = g("activation_dtype")
    dep["kv_cache_dtype"] = g("kv_cache_dtype")
    if g("moe_strategy") != "fused":
        dep["moe_strategy"] = g("moe_strategy")
    if g("cuda_graphs") != AUTO:
        dep["cuda_graphs"] = g("cuda_graphs") == "on"
    if int(g("max_num_batched_tokens")) > 0:
        dep["max_num_batched_tokens"] = int(g("max_num_batched_tokens"))
    if float(g("gpu_memory_utilization")) > 0:
        dep["gpu_memory_utilization"] = float(g("gpu_memory_utilization"))
    dep["framework"] = g("framework")
    out["deployment"] = dep

    out["workload"] = {"batch_size": int(g("batch_size")), "input_len": int(g("input_len")),
                       "output_len": int(g("output_len"))}

    dist = g("distribution")
    r: dict[str, Any] = {"distribution": dist}
    if dist in ("power_law", "dirichlet"):
        r["alpha"] = float(g("alpha"))
    elif dist == "zipf":
        r["s"] = float(g("s"))
    elif dist == "hot_experts":
        r["hot_experts"] = _hot_ids(g("hot_experts"))
        r["hot_fraction"] = float(g("hot_fraction"))
    elif dist == "histogram":
        r["histogram_file"] = str(g("histogram_file"))
    elif dist == "trace":
        r["trace_file"] = str(g("trace_file"))
    r["seed"] = int(g("seed"))
    if dist != "balanced":
        r["samples"] = int(g("samples"))
    if g("cap_enabled"):
        r["capacity_factor"] = float(g("capacity_factor"))
        r["overflow"] = g("overflow")
    if g("placement") != "contiguous":
        r["placement"] = g("placement")
    if g("placement") == "eplb" and int(g("redundant_experts")) > 0:
        r["redundant_experts"] = int(g("redundant_experts"))
    out["routing"] = r
    # whatever an uploaded file held that the sidebar does not edit goes back out unchanged
    for key, val in passthrough.items():
        if key in out and isinstance(out[key], dict) and isinstance(val, dict):
            out[key] = {**val, **out[key]}
        elif key not in out:
            out[key] = val
    return out


def scenario_json(s: Mapping[str, Any]) -> str:
    """Canonical JSON text of the scenario (also the cache key of its prediction)."""
    return json.dumps(scenario_from_state(s), indent=2, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# scenario -> state (upload)
# ---------------------------------------------------------------------------------------------

def _choice(value: Any, options: Iterable[str], field: str) -> str:
    opts = tuple(options)
    if value not in opts:
        raise InputError(field, f"{value!r} is not offered by the explorer",
                         f"use one of {', '.join(opts)}")
    return value


def read_scenario_text(text: str | bytes) -> dict[str, Any]:
    """Parse an uploaded scenario (JSON, or YAML as the CLI also reads)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("scenario", "the file is not UTF-8 text",
                             "upload a scenario .json or .yaml") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            import yaml

            data = yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - any YAML failure: report the JSON error
            raise InputError("scenario", f"not valid JSON: {exc.msg} (line {exc.lineno})",
                             "fix the syntax") from None
    if not isinstance(data, dict):
        raise InputError("scenario", "the scenario must be a JSON object", "see examples/*.json")
    return data


def state_from_scenario(data: Mapping[str, Any], *,
                        profiles: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Widget values (plus custom model / profile / passthrough entries) for a scenario object.

    Values the sidebar cannot show are kept: an inline or path model becomes the custom model, a
    profile path the custom profile, unknown keys go to the passthrough (so that the scenario
    validator still names them). Choices the sidebar does not offer raise :class:`InputError`.
    """
    vals: dict[str, Any] = dict(WIDGET_DEFAULTS)
    vals[CUSTOM_MODEL] = None
    vals[CUSTOM_MODEL_LABEL] = ""
    vals[CUSTOM_PROFILE] = ""
    d = dict(data)
    passthrough: dict[str, Any] = {}
    known = {"name", "description", "model", "hardware", "deployment", "workload", "routing"}
    for key in list(d):
        if key not in known:
            passthrough[key] = d.pop(key)
    if "description" in d:
        passthrough["description"] = d.pop("description")
    vals["name"] = str(d.get("name") or "")

    model = d.get("model")
    if model is None:
        raise InputError("model", "required field is missing", "add it")
    short = None
    if isinstance(model, str):
        try:
            short = resolve_preset(model)
        except KeyError:
            short = None
    if short is not None:
        vals["model_source"], vals["model_preset"] = "preset", short
    else:
        vals["model_source"] = "config.json"
        vals[CUSTOM_MODEL] = model
        vals[CUSTOM_MODEL_LABEL] = (model if isinstance(model, str) else
                                  str(model.get("name") or model.get("_name_or_path")
                                      or model.get("model_type") or "inline config")
                                  if isinstance(model, dict) else "custom")

    hw = d.get("hardware")
    if isinstance(hw, str):
        hw = {"profile": hw}
    if not isinstance(hw, dict) or "profile" not in hw:
        raise InputError("hardware", "expected a profile id or {profile, num_gpus, ...}",
                         "see examples/*.json")
    hw = dict(hw)
    profs = list(profiles) if profiles is not None else None
    if profs is None or hw["profile"] in profs:
        vals["hw_profile"] = hw.pop("profile")
    else:
        vals["hw_profile"] = CUSTOM_PROFILE
        vals[CUSTOM_PROFILE] = hw.pop("profile")
    num_gpus = hw.pop("num_gpus", None)
    vals["gpus_per_node"] = int(hw.pop("gpus_per_node", 8))
    vals["calibrated"] = bool(hw.pop("calibrated", True))
    if hw:
        passthrough["hardware"] = hw

    dep = dict(d.get("deployment") or {})
    for k in ("tp", "ep", "attention_dp", "pp"):
        vals[k] = int(dep.pop(k, 1))
    vals["moe_tp"] = int(dep.pop("moe_tp", 0) or 0)
    for k, opts in (("weight_dtype", WEIGHT_DTYPES), ("activation_dtype", ACTIVATION_DTYPES),
                    ("kv_cache_dtype", KV_DTYPES)):
        if k in dep:
            vals[k] = _choice(_canon(dep.pop(k)), opts, f"deployment.{k}")
    ewd = dep.pop("expert_weight_dtype", None)
    vals["expert_weight_dtype"] = SAME_AS_WEIGHTS if ewd is None else _choice(
        _canon(ewd), WEIGHT_DTYPES, "deployment.expert_weight_dtype")
    fused = dep.pop("fused_moe", None)
    vals["moe_strategy"] = _choice(dep.pop("moe_strategy", "fused" if fused in (None, True)
                                         else "grouped"), MOE_STRATEGIES,
                                 "deployment.moe_strategy")
    cg = dep.pop("cuda_graphs", None)
    vals["cuda_graphs"] = AUTO if cg is None else ("on" if cg else "off")
    vals["max_num_batched_tokens"] = int(dep.pop("max_num_batched_tokens", 0) or 0)
    vals["gpu_memory_utilization"] = float(dep.pop("gpu_memory_utilization", 0.0) or 0.0)
    vals["framework"] = _choice(dep.pop("framework", "generic"), FRAMEWORKS,
                              "deployment.framework")
    if dep:
        passthrough["deployment"] = dep
    dp_gpus = vals["tp"] * vals["attention_dp"] * vals["pp"]
    vals["gpus_auto"] = num_gpus is None or int(num_gpus) == dp_gpus
    vals["num_gpus"] = dp_gpus if num_gpus is None else int(num_gpus)

    wl = dict(d.get("workload") or {})
    for k in ("batch_size", "input_len", "output_len"):
        if k not in wl:
            raise InputError(f"workload.{k}", "required field is missing", "add it")
        vals[k] = int(wl.pop(k))
    if wl:
        passthrough["workload"] = wl

    r = dict(d.get("routing") or {})
    dist = _choice(r.pop("distribution", "balanced"), DISTRIBUTIONS, "routing.distribution")
    vals["distribution"] = dist
    if "alpha" in r:
        vals["alpha"] = float(r.pop("alpha"))
    if "s" in r:
        vals["s"] = float(r.pop("s"))
    if "hot_experts" in r:
        ids = r.pop("hot_experts")
        vals["hot_experts"] = ", ".join(str(i) for i in ids) if isinstance(ids, list) else str(ids)
    if "hot_fraction" in r:
        vals["hot_fraction"] = float(r.pop("hot_fraction"))
    vals["histogram_file"] = str(r.pop("histogram_file", "") or "")
    vals["trace_file"] = str(r.pop("trace_file", "") or "")
    vals["seed"] = int(r.pop("seed", 0))
    vals["samples"] = int(r.pop("samples", 64))  # the schema's default, as the CLI would use
    cf = r.pop("capacity_factor", None)
    overflow = r.pop("overflow", "dropless")
    vals["cap_enabled"] = cf is not None
    if cf is not None:
        vals["capacity_factor"] = float(cf)
        vals["overflow"] = _choice(overflow, OVERFLOWS, "routing.overflow")
    elif overflow != "dropless":
        raise InputError("routing.overflow", f"overflow '{overflow}' needs capacity_factor",
                         "add capacity_factor or set overflow to dropless")
    vals["placement"] = _choice(r.pop("placement", "contiguous"), PLACEMENTS, "routing.placement")
    vals["redundant_experts"] = int(r.pop("redundant_experts", 0))
    if r:
        passthrough["routing"] = r
    vals[PASSTHROUGH] = passthrough
    return vals


def _canon(name: Any) -> Any:
    from moesim.spec.dtypes import canonical

    try:
        return canonical(str(name))
    except ValueError:
        return name


# ---------------------------------------------------------------------------------------------
# errors next to their field
# ---------------------------------------------------------------------------------------------

def error_slot(field: str, slots: Iterable[str]) -> Optional[str]:
    """The sidebar slot an error about ``field`` belongs to: the slot named exactly like the
    field, else the longest slot that is a prefix of it (``routing.alpha`` -> ``routing``),
    else a slot the field's first part maps to (``hardware.compute.peak_dense_tflops.fp8`` ->
    ``deployment.activation_dtype``: a dtype the GPU lacks)."""
    names = list(slots)
    f = field or ""
    if f in names:
        return f
    best = None
    for n in names:
        if f.startswith(n + ".") or f.startswith(n + "["):
            if best is None or len(n) > len(best):
                best = n
    if best is not None:
        return best
    if f.startswith("hardware.compute") or f.startswith("hardware.kernels"):
        for n in ("deployment.activation_dtype", "deployment.weight_dtype"):
            if n in names:
                return n
    if f.startswith("simulation") and "simulation" in names:
        return "simulation"
    head = f.split(".")[0].split("[")[0]
    for n in names:
        if n == head or n.startswith(head + "."):
            return n
    return None


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def diff_scenarios(pinned: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any,
                                                                                          Any]]:
    """``(field, pinned value, current value)`` for every field that differs (a missing field
    reads as ``None``, i.e. the default). An inline model config is compared as a whole."""
    def flat(s: Mapping[str, Any]) -> dict[str, Any]:
        s = dict(s)
        if isinstance(s.get("model"), dict):
            s["model"] = "inline config " + json.dumps(s["model"], sort_keys=True)[:60] + "..."
        return _flatten(s)

    a, b = flat(pinned), flat(current)
    rows = []
    for key in list(dict.fromkeys([*a, *b])):
        if a.get(key) != b.get(key):
            rows.append((key, a.get(key), b.get(key)))
    return rows
