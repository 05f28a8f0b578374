"""`predict` end to end: every example runs, the JSON has the promised keys, and the numbers
move the way physics says they must."""

from __future__ import annotations

import json

import pytest

from moesim import load_scenario, parse_scenario, predict
from moesim.spec.hardware import HardwareProfile
from moesim.step import Batch, build_step

from .conftest import EXAMPLES, run_cli

JSON_KEYS = {"ttft_ms", "tpot_ms", "throughput_output_tok_per_s",
             "throughput_output_tok_per_s_per_gpu", "memory_per_gpu_bytes", "fits",
             "max_batch_size", "prefill_ops", "decode_ops", "warnings"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_predicts(path):
    p = predict(load_scenario(path))
    assert p.ttft_ms > 0 and p.tpot_ms > 0 and p.throughput_output_tok_per_s > 0
    assert p.memory.weights > 0 and p.memory.total > p.memory.weights
    # The step's total is the sum of its ops.
    assert p.decode_step.time_us == pytest.approx(
        sum(o.count * o.total_us for o in p.decode_step.ops))


def test_cli_json_keys():
    r = run_cli("predict", str(EXAMPLES[0]), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert JSON_KEYS <= out.keys()
    assert set(out["memory_per_gpu_bytes"]) >= {"weights", "kv_cache", "activations", "reserved",
                                                "total"}
    op = out["decode_ops"][0]
    assert {"name", "layer_kind", "time_us", "flops", "bytes", "bound"} <= op.keys()
    assert {o["bound"] for o in out["decode_ops"]} <= {"compute", "memory", "network", "launch"}


def test_cli_table_mentions_headlines():
    r = run_cli("predict", str(EXAMPLES[0]))
    assert r.returncode == 0, r.stderr
    for word in ("TTFT", "TPOT", "throughput", "memory/GPU", "fits", "decode step"):
        assert word in r.stdout


def test_same_scenario_same_numbers(scenario_dict):
    a = predict(parse_scenario(scenario_dict))
    b = predict(parse_scenario(scenario_dict))
    assert (a.ttft_ms, a.tpot_ms, a.memory.total) == (b.ttft_ms, b.tpot_ms, b.memory.total)


def test_does_not_fit_is_not_an_error(scenario_dict):
    d = dict(scenario_dict, model="deepseek-v3")
    d["deployment"] = {"tp": 2, "ep": 2, "moe_tp": 1, "framework": "vllm"}
    p = predict(parse_scenario(d))
    assert not p.memory.fits
    assert any("does not fit" in w and "GB more" in w for w in p.warnings)


def test_mixtral_weights_per_gpu(scenario_dict):
    # 46.7B parameters in bf16 split over 2 GPUs: 46.7 GB per GPU (+ norms, no replication).
    p = predict(parse_scenario(scenario_dict))
    assert p.memory.weights == pytest.approx(46.7e9, rel=0.02)


MODELS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b", "llama-3.1-8b"]


def _scenario(model, batch=8, isl=512, osl=128, **dep):
    return parse_scenario({"model": model, "hardware": "h100_sxm", "deployment": dep,
                           "workload": {"batch_size": batch, "input_len": isl,
                                        "output_len": osl}})


@pytest.mark.parametrize("model", MODELS)
def test_more_tokens_never_cheaper(model):
    sc = _scenario(model)
    prev = 0.0
    for tokens in (1, 16, 128, 512, 2048, 8192):
        t = build_step(sc, Batch("prefill", 1, tokens, 0.0)).time_us
        assert t >= prev * (1 - 1e-9), (tokens, t, prev)
        prev = t
    prev = 0.0
    for seqs in (1, 2, 8, 32, 128, 256):
        t = build_step(sc, Batch("decode", seqs, 1, 1024.0)).time_us
        assert t >= prev * (1 - 1e-9), (seqs, t, prev)
        prev = t
    prev = 0.0
    for ctx in (16, 256, 4096, 32768):
        t = build_step(sc, Batch("decode", 16, 1, float(ctx))).time_us
        assert t >= prev * (1 - 1e-9), (ctx, t, prev)
        prev = t


def _scaled(hw: HardwareProfile, path: tuple[str, ...], factor: float) -> HardwareProfile:
    """A copy of ``hw`` with the quantity at ``path`` (``*`` = every entry) times ``factor``."""
    data = hw.model_dump()
    nodes = [data]
    for key in path:
        nodes = [v for n in nodes for v in (n.values() if key == "*" else [n[key]])
                 if isinstance(v, dict)]
    for n in nodes:
        n["value"] *= factor
    return HardwareProfile.model_validate(data)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("path", [("memory", "hbm_peak_gb_per_s"),
                                  ("interconnect", "nvlink_gb_per_s_per_direction"),
                                  ("kernels", "*", "memory_efficiency"),
                                  ("collectives", "*", "bus_efficiency")])
def test_more_bandwidth_never_slower(model, path):
    base = _scenario(model, batch=16, tp=2)
    faster = base.model_copy(update={"hardware": _scaled(base.hardware, path, 1.25)})
    for batch in (Batch("decode", 16, 1, 1000.0), Batch("prefill", 4, 512, 0.0)):
        assert build_step(faster, batch).time_us <= build_step(base, batch).time_us * (1 + 1e-9)


def test_cli_models_and_hardware_lists():
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["mixtral-8x7b"]["total_params"] == pytest.approx(46.7e9, rel=0.02)
    assert rows["deepseek-v3"]["attention"] == "mla"
    r = run_cli("hardware", "--json")
    assert r.returncode == 0, r.stderr
    hw = {h["id"]: h for h in json.loads(r.stdout)}
    assert set(hw) >= {"h100_sxm", "h100_pcie", "h200_sxm", "h800", "a100_sxm", "b200"}
    assert hw["h100_sxm"]["calibrated"] == "fitted"
    assert hw["h200_sxm"]["calibrated"].startswith("from h100_sxm")
    assert hw["a100_sxm"]["fp8_tflops"] is None
