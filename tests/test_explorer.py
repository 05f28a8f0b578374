"""The what-if explorer (``apps/explorer.py``) under Streamlit's ``AppTest``: every input group,
compare mode, bad input shown inline, the scenario JSON download / upload round trip, the DES
buttons, and the pure helpers in ``apps/state.py`` / ``apps/charts.py``.

Needs the ``app`` extra (streamlit, altair); skipped without it so the core suite runs bare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("altair")

from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "explorer.py"
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from apps import charts  # noqa: E402
from apps.state import (WIDGET_DEFAULTS, diff_scenarios, error_slot,  # noqa: E402
                        scenario_from_state, state_from_scenario)
from moesim import InputError, parse_scenario, predict  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def fresh() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    """No traceback on the page and no error box anywhere."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def scenario(at: AppTest) -> dict:
    """The scenario the page shows in its JSON block (the download button's payload)."""
    assert len(at.code) == 1
    return json.loads(at.code[0].value)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def charts_on_page(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def chart_data(at: AppTest, dataset: str):
    """The DataFrame a chart on the page received under ``dataset`` (Arrow in the proto)."""
    import pyarrow as pa

    for c in at.get("vega_lite_chart"):
        for d in c.proto.datasets:
            if d.name == dataset:
                return pa.ipc.open_stream(d.data.data).read_all().to_pandas()
    raise AssertionError(f"no chart with dataset {dataset!r}")


HEADLINE = {"TTFT", "TPOT", "Throughput per GPU", "Memory per GPU"}


@pytest.fixture
def at() -> AppTest:
    return fresh()


# ---------------------------------------------------------------------------------------------
# the page as it opens
# ---------------------------------------------------------------------------------------------

def test_opens_with_cards_charts_and_a_valid_scenario(at):
    assert HEADLINE <= set(metrics(at))
    # categories x2, memory, roofline, expert loads, per-rank loads, throughput, frontier
    assert charts_on_page(at) >= 8
    sc = scenario(at)
    p = predict(parse_scenario(sc))
    assert metrics(at)["TTFT"] == charts.fmt_ms(p.ttft_ms)
    assert metrics(at)["TPOT"] == charts.fmt_ms(p.tpot_ms)
    assert at.get("download_button"), "no download button"
    assert at.get("download_button")[0].proto.url.endswith(".json")
    assert any("fits" in m.value for m in at.markdown)


def test_rerender_is_fast(at):
    # A change reuses the cached parse / prediction / sweep where it can; the page reports its
    # own compute time. Generous bound: this guards against uncached work, it is no benchmark.
    at.number_input(key="batch_size").set_value(32).run()
    at.number_input(key="batch_size").set_value(64).run()
    assert_clean(at)
    assert at.session_state["page_ms"] < 1500, at.session_state["timings_ms"]


# ---------------------------------------------------------------------------------------------
# every input group
# ---------------------------------------------------------------------------------------------

def test_model_preset(at):
    at.selectbox(key="model_preset").set_value("mixtral-8x7b").run()
    assert_clean(at)
    assert scenario(at)["model"] == "mixtral-8x7b"
    assert "mixtral-8x7b" in at.caption[0].value


def test_model_from_uploaded_hf_config(at):
    config = (ROOT / "moesim" / "presets" / "allenai--OLMoE-1B-7B-0924" / "config.json")
    at.radio(key="model_source").set_value("config.json").run()
    # no config yet: said next to the model field, not a traceback
    assert not at.exception
    assert any("config.json" in e.value for e in at.sidebar.error)
    at.get("file_uploader")[1].set_value(("config.json", config.read_bytes(),
                                          "application/json"))
    at.run()
    assert_clean(at)
    sc = scenario(at)
    assert isinstance(sc["model"], dict) and sc["model"]["model_type"] == "olmoe"
    assert HEADLINE <= set(metrics(at))
    # the uploaded model survives into the CLI-readable scenario
    assert parse_scenario(sc).model.moe.num_experts == 64


def test_hardware_and_gpu_count(at):
    at.selectbox(key="hw_profile").set_value("h200_sxm").run()
    assert_clean(at)
    assert scenario(at)["hardware"]["profile"] == "h200_sxm"
    from moesim.spec.hardware import load_profile

    cap = load_profile("h200_sxm").memory.hbm_capacity_bytes.value / 1e9
    assert metrics(at)["Memory per GPU"].endswith(f"/ {cap:.0f} GB")
    # GPU count by hand, inconsistent with TP x attention-DP: explained next to the field
    at.checkbox(key="gpus_auto").uncheck().run()
    at.number_input(key="num_gpus").set_value(4).run()
    assert not at.exception
    side = [e.value for e in at.sidebar.error]
    assert len(side) == 1 and side[0].startswith("hardware.num_gpus:"), side
    at.number_input(key="num_gpus").set_value(2).run()
    assert_clean(at)


def test_parallelism(at):
    at.number_input(key="tp").set_value(2).run()
    assert_clean(at)
    sc = scenario(at)
    assert sc["deployment"]["tp"] == 2 and sc["hardware"]["num_gpus"] == 4
    at.number_input(key="attention_dp").set_value(1).run()
    at.number_input(key="ep").set_value(1).run()
    assert_clean(at)
    sc = scenario(at)
    assert (sc["deployment"]["attention_dp"], sc["deployment"]["ep"]) == (1, 1)
    assert parse_scenario(sc).deployment.moe_tp == 2


def test_precision(at):
    at.selectbox(key="weight_dtype").set_value("fp8").run()
    at.selectbox(key="activation_dtype").set_value("fp8").run()
    at.selectbox(key="kv_cache_dtype").set_value("fp8").run()
    at.selectbox(key="expert_weight_dtype").set_value("int4").run()
    assert_clean(at)
    dep = scenario(at)["deployment"]
    assert (dep["weight_dtype"], dep["activation_dtype"], dep["kv_cache_dtype"],
            dep["expert_weight_dtype"]) == ("fp8", "fp8", "fp8", "int4")


def test_workload(at):
    before = metrics(at)["TTFT"]
    at.number_input(key="batch_size").set_value(16).run()
    at.number_input(key="input_len").set_value(4096).run()
    at.number_input(key="output_len").set_value(128).run()
    assert_clean(at)
    assert scenario(at)["workload"] == {"batch_size": 16, "input_len": 4096, "output_len": 128}
    assert metrics(at)["TTFT"] != before
    # a batch that does not fit is no error: the memory card says so
    at.number_input(key="batch_size").set_value(4096).run()
    assert_clean(at)
    assert any("does not fit" in m.value for m in at.markdown)
    assert any("does not fit" in w.value for w in at.warning)


def test_routing_skew_capacity_and_eplb(at):
    at.session_state["samples"] = 2  # the draws input appears with a random distribution
    at.selectbox(key="distribution").set_value("zipf").run()
    at.slider(key="s").set_value(1.2).run()
    assert_clean(at)
    # the random-routing sweep is opt-in (seconds of work); ticking it draws both charts
    n = charts_on_page(at)
    at.checkbox(key="sweep_skew").check().run()
    assert_clean(at)
    assert charts_on_page(at) == n + 2
    assert set(chart_data(at, "sweep")["batch"]) == {4, 16, 64, 256}
    at.checkbox(key="sweep_skew").uncheck().run()
    at.checkbox(key="cap_enabled").check().run()
    at.number_input(key="capacity_factor").set_value(1.0).run()
    at.selectbox(key="overflow").set_value("drop").run()
    at.selectbox(key="placement").set_value("eplb").run()
    at.number_input(key="redundant_experts").set_value(2).run()
    assert_clean(at)
    r = scenario(at)["routing"]
    assert r == {"distribution": "zipf", "s": 1.2, "seed": 0, "samples": 2,
                 "capacity_factor": 1.0, "overflow": "drop", "placement": "eplb",
                 "redundant_experts": 2}
    caps = " ".join(c.value for c in at.caption)
    assert "cap " in caps and "dropped" in caps
    # other distributions and their parameter
    at.selectbox(key="distribution").set_value("power_law").run()
    at.number_input(key="alpha").set_value(1.3).run()
    assert_clean(at)
    assert scenario(at)["routing"]["alpha"] == 1.3
    at.selectbox(key="distribution").set_value("hot_experts").run()
    at.text_input(key="hot_experts").input("0, 5").run()
    at.slider(key="hot_fraction").set_value(0.2).run()
    assert_clean(at)
    r = scenario(at)["routing"]
    assert r["hot_experts"] == [0, 5] and r["hot_fraction"] == 0.2


def test_framework_and_engine_options(at):
    at.selectbox(key="framework").set_value("sglang").run()
    at.selectbox(key="moe_strategy").set_value("grouped").run()
    at.selectbox(key="cuda_graphs").set_value("off").run()
    at.number_input(key="max_num_batched_tokens").set_value(4096).run()
    assert_clean(at)
    dep = scenario(at)["deployment"]
    assert dep["framework"] == "sglang" and dep["moe_strategy"] == "grouped"
    assert dep["cuda_graphs"] is False and dep["max_num_batched_tokens"] == 4096
    assert "sglang" in at.caption[0].value


# ---------------------------------------------------------------------------------------------
# invalid input: one line next to the field, never a traceback
# ---------------------------------------------------------------------------------------------

def test_invalid_tp_is_explained_next_to_the_field(at):
    at.number_input(key="tp").set_value(3).run()
    assert not at.exception
    side = [e.value for e in at.sidebar.error]
    assert side == ["deployment.tp: tp=3 does not divide the model's 32 attention heads "
                    "(use one of [1, 2, 4, 8, 16, 32])"]
    assert "\n" not in side[0] and "Traceback" not in side[0]
    # the main page says so once and shows no stale numbers
    assert len(at.main.error) == 1 and "cannot be predicted" in at.main.error[0].value
    assert not at.metric
    assert at.get("download_button")[0].proto.disabled
    # fixing it brings the page back
    at.number_input(key="tp").set_value(2).run()
    assert_clean(at)
    assert HEADLINE <= set(metrics(at))


def test_batch_below_attention_dp_is_explained(at):
    at.number_input(key="batch_size").set_value(1).run()
    assert not at.exception
    side = [e.value for e in at.sidebar.error]
    assert len(side) == 1 and side[0].startswith("workload.batch_size:"), side


def test_bad_upload_is_explained_inline(at):
    at.get("file_uploader")[0].set_value(("broken.json", b"{not json", "application/json"))
    at.run()
    assert not at.exception
    side = [e.value for e in at.sidebar.error]
    assert len(side) == 1 and side[0].startswith("scenario: not valid JSON"), side
    assert HEADLINE <= set(metrics(at))  # the previous scenario stays


# ---------------------------------------------------------------------------------------------
# compare mode
# ---------------------------------------------------------------------------------------------

def test_compare_pinned_and_current(at):
    at.button(key="pin_button").click().run()
    assert_clean(at)
    assert all(m.delta == "no change vs pinned" for m in at.metric)
    at.number_input(key="batch_size").set_value(128).run()
    at.selectbox(key="framework").set_value("sglang").run()
    assert_clean(at)
    # every headline card carries its change against the pinned scenario
    assert all(m.delta and m.delta.endswith("vs pinned") for m in at.metric)
    # two tables: the headline numbers side by side, and the fields that differ
    assert len(at.dataframe) == 4  # + the two op tables of the expander
    table = at.dataframe[0].value
    assert list(table["metric"][:2]) == ["TTFT (ms)", "TPOT (ms)"]
    assert set(table.columns) >= {"pinned", "current", "change"}
    fields = at.dataframe[1].value
    rows = {r["field"]: (r["pinned"], r["current"]) for _, r in fields.iterrows()}
    assert rows == {"workload.batch_size": ("64", "128"),
                    "deployment.framework": ("vllm", "sglang")}
    # the charts draw both scenarios
    assert set(chart_data(at, "mem")["scenario"]) == {"current", "pinned"}
    assert set(chart_data(at, "cat")["scenario"]) == {"current", "pinned"}
    assert set(chart_data(at, "sweep")["scenario"]) == {"current", "pinned"}
    at.button(key="unpin_button").click().run()
    assert_clean(at)
    assert not any(m.delta for m in at.metric)
    assert len(at.dataframe) == 2
    assert set(chart_data(at, "mem")["scenario"]) == {"current"}


# ---------------------------------------------------------------------------------------------
# download / upload round trip
# ---------------------------------------------------------------------------------------------

def test_json_download_runs_in_the_cli_and_uploads_back(at, tmp_path):
    at.selectbox(key="model_preset").set_value("mixtral-8x7b").run()
    at.selectbox(key="distribution").set_value("power_law").run()
    at.number_input(key="samples").set_value(2).run()
    assert_clean(at)
    downloaded = scenario(at)
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(downloaded, indent=2))
    # what `python -m moesim predict` makes of the downloaded file = what the page shows
    out = subprocess.run([sys.executable, "-m", "moesim", "predict", str(path), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert metrics(at)["TTFT"] == charts.fmt_ms(cli["ttft_ms"])
    assert metrics(at)["TPOT"] == charts.fmt_ms(cli["tpot_ms"])

    # upload a modified copy into a fresh session: every widget follows the file
    edited = json.loads(json.dumps(downloaded))
    edited["name"] = "round trip"
    edited["workload"]["batch_size"] = 24
    edited["deployment"]["framework"] = "trtllm"
    edited["routing"].update({"alpha": 1.5, "capacity_factor": 2.0, "overflow": "reroute"})
    other = fresh()
    other.get("file_uploader")[0].set_value(("edited.json", json.dumps(edited).encode(),
                                             "application/json"))
    other.run()
    assert_clean(other)
    assert other.number_input(key="batch_size").value == 24
    assert other.selectbox(key="framework").value == "trtllm"
    assert other.selectbox(key="model_preset").value == "mixtral-8x7b"
    assert other.checkbox(key="cap_enabled").value is True
    assert scenario(other) == edited


def test_uploaded_keys_the_sidebar_lacks_are_kept_and_checked(at):
    data = json.loads((ROOT / "examples" / "mixtral-8x7b_2xh100_tp2.json").read_text())
    data["workload"]["bogus"] = 1
    at.get("file_uploader")[0].set_value(("x.json", json.dumps(data).encode(),
                                          "application/json"))
    at.run()
    assert not at.exception
    side = [e.value for e in at.sidebar.error]
    assert side == ["workload.bogus: unknown field (remove it or check its spelling)"], side


# ---------------------------------------------------------------------------------------------
# the discrete-event simulator, when it is there
# ---------------------------------------------------------------------------------------------

def _des():
    try:
        import moesim.des as des
        return getattr(des, "simulate", None), getattr(des, "simulate_one_step", None)
    except Exception:  # noqa: BLE001
        return None, None


def test_des_buttons(at):
    simulate, one = _des()
    serving = at.button(key="des_serving_button")
    step = at.button(key="des_step_button")
    assert serving.disabled == (simulate is None)
    assert step.disabled == (one is None)
    if one is not None:
        n = charts_on_page(at)
        step.click().run()
        assert_clean(at)
        assert charts_on_page(at) == n + 1  # the per-rank timeline
        assert any("closed form" in c.value for c in at.caption)
    if simulate is not None:
        at.number_input(key="des_requests").set_value(20).run()
        at.button(key="des_serving_button").click().run()
        assert_clean(at)
        labels = {m.label for m in at.metric}
        assert {"DES TTFT (mean)", "DES TPOT (mean)", "requests completed"} <= labels
    else:
        assert any("Disabled" in c.value for c in at.caption)


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_survive_state_round_trip(path):
    data = json.loads(path.read_text())
    back = scenario_from_state(state_from_scenario(data))
    a, b = parse_scenario(data), parse_scenario(back)
    assert (a.model.name, a.hardware.id, a.num_gpus) == (b.model.name, b.hardware.id, b.num_gpus)
    assert a.deployment == b.deployment
    assert a.workload == b.workload
    assert a.routing == b.routing
    # and the state's own scenario is a fixed point
    assert scenario_from_state(state_from_scenario(back)) == back


def test_default_state_is_a_valid_scenario():
    sc = parse_scenario(scenario_from_state(dict(WIDGET_DEFAULTS)))
    assert sc.model.moe is not None and sc.deployment.ep > 1


def test_error_slot_and_diff():
    slots = ["scenario", "model", "hardware.profile", "hardware.num_gpus", "deployment.tp",
             "deployment.activation_dtype", "routing", "routing.capacity_factor",
             "workload.batch_size", "deployment"]
    assert error_slot("deployment.tp", slots) == "deployment.tp"
    assert error_slot("routing.alpha", slots) == "routing"
    assert error_slot("routing.capacity_factor", slots) == "routing.capacity_factor"
    assert error_slot("model.moe.top_k", slots) == "model"
    assert error_slot("hardware", slots) == "hardware.profile"
    assert error_slot("hardware.compute.peak_dense_tflops.fp8", slots) == \
        "deployment.activation_dtype"
    assert error_slot("deployment.fused_moe", slots) == "deployment"
    assert error_slot("workload", slots) == "workload.batch_size"
    a = {"model": "x", "workload": {"batch_size": 1, "input_len": 2}}
    b = {"model": "x", "workload": {"batch_size": 3, "input_len": 2}, "name": "n"}
    assert diff_scenarios(a, b) == [("workload.batch_size", 1, 3), ("name", None, "n")]


def test_unrepresentable_upload_is_an_input_error():
    data = json.loads(EXAMPLES[0].read_text())
    data["deployment"]["framework"] = "tensorrt"
    with pytest.raises(InputError, match="deployment.framework"):
        state_from_scenario(data)


def test_chart_specs_are_valid_vega_lite():
    sc = parse_scenario(scenario_from_state(dict(WIDGET_DEFAULTS)))
    p = predict(sc)
    ops = charts.ops_frame(p)
    specs = [charts.category_chart(ops, "prefill"), charts.category_chart(ops, "decode"),
             charts.roofline_chart(ops, sc.hardware),
             charts.memory_chart(charts.memory_frame(p))]
    for spec in specs:
        assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        assert spec["datasets"] and all(len(df) for df in spec["datasets"].values())
    # the roofline's ops sit under the roofs (no op beats the hardware)
    pts = charts.roofline_frame(ops)
    bw, peaks = charts.roofs(sc.hardware)
    assert (pts["tflops"] <= max(peaks.values()) * 1.0001).all()
    assert (pts["tflops"] <= bw * pts["intensity"] * 1.0001).all()
    # sweep batches respect attention-DP and include the current batch
    assert charts.sweep_batches(48, 4) == [4, 8, 16, 32, 48, 64, 128, 256, 512, 1024]
    assert charts.sweep_batches(48, 2, 256, 4) == [4, 16, 48, 64, 256]


def test_timeline_shows_who_waits_under_skew():
    _, one = _des()
    if one is None:
        pytest.skip("moesim.des.simulate_one_step is not there")
    import numpy as np

    from moesim.routing import sample_loads

    data = json.loads((ROOT / "examples" / "deepseek-v3_8xh200_ep8_fp8.json").read_text())
    data["routing"] = {"distribution": "zipf", "s": 1.2, "samples": 1}
    sc = parse_scenario(data)
    step = predict(sc).decode_step
    m = sc.model
    loads = sample_loads(sc.routing, step.batch.tokens * sc.deployment.attention_dp,
                         m.moe.num_experts, m.moe.top_k, m.num_moe_layers,
                         np.random.default_rng(0))
    record: list = []
    one(sc, step.batch, loads, record=record)
    df, summary = charts.timeline_frame(record, 0)
    assert {"dispatch", "experts", "combine"} <= set(df["group"])
    slow = summary["slowest_rank"]
    waits = summary["waits_us"]
    # the slowest GPU waits least before the combine; some other GPU waits for it
    assert waits and max(waits.values()) > waits.get(slow, 0.0)
    assert df["end"].max() <= summary["window_us"] + 1e-6
    assert charts.timeline_chart(df)["datasets"]["events"] is df


@pytest.mark.skipif(os.environ.get("MOESIM_BROWSER_CHECK") != "1",
                    reason="set MOESIM_BROWSER_CHECK=1 to run the headless-Chromium check")
def test_browser_check(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "browser_check.py"),
                          "--out", str(tmp_path / "explorer.png")],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
