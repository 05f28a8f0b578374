"""``moesim validate``: layout detection, row accounting, error arithmetic, determinism, and one
check against a real measurement that a broken GEMM model would fail."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.validate import LAYOUTS, ape_pct, balanced_assignment_loads, detect_layout, run

ROOT = Path(__file__).resolve().parents[1]
MEAS = ROOT.parent / "shared" / "reference" / "measurements"
H100 = MEAS / "h100_sxm"

TABLES = {
    "gemm": H100 / "gemm.csv",
    "moe": H100 / "moe.csv",
    "collective": H100 / "collective.csv",
    "allreduce_custom": H100 / "allreduce_custom.csv",
    "attention_context": H100 / "attention_context.csv",
    "attention_generation": H100 / "attention_generation.csv",
    "moe_a2a": H100 / "moe_a2a.csv",
    "e2e_serving": MEAS / "e2e_serving.csv",
}
needs_reference = pytest.mark.skipif(not H100.exists(), reason="reference measurements absent")


def subset(src: Path, dst: Path, n: int, step: int = 1) -> Path:
    """Header and ``n`` rows of ``src`` (every ``step``-th row), written to ``dst``."""
    with src.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = []
        for i, r in enumerate(reader):
            if i % step == 0:
                rows.append(r)
            if len(rows) == n:
                break
    with dst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return dst


def write(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


# ---------------------------------------------------------------------------------------------
@needs_reference
@pytest.mark.parametrize("layout", sorted(TABLES))
def test_layout_detected_for_each_reference_table(layout, tmp_path):
    cols, rows = read_rows(subset(TABLES[layout], tmp_path / "t.csv", 200))
    assert detect_layout(cols, rows) == layout


@needs_reference
@pytest.mark.parametrize("layout", sorted(set(TABLES) - {"e2e_serving"}))
def test_every_row_predicted_or_listed(layout, tmp_path):
    # A spread of rows (every 7th) so that several shapes / dtypes / sizes are covered.
    table = subset(TABLES[layout], tmp_path / "t.csv", 200, step=7)
    out = tmp_path / "pred.csv"
    # The reference moe_a2a table holds ns in its latency_us column (README; test_deepep.py).
    res = run(str(table), out=str(out), time_unit="ns" if layout == "moe_a2a" else None)
    assert res.layout == layout
    s = res.summary
    assert s["rows"] == len(res.rows) == s["predicted"] + s["unpredicted"]
    listed = {u["row"] for u in s["unpredicted_rows"]}
    for i, row in enumerate(res.rows):
        if i in listed:
            assert row["unpredicted_reason"] and row["predicted_us"] == ""
        else:
            assert float(row["predicted_us"]) > 0 and float(row["ape_pct"]) >= 0
    # The output keeps every input column, in order, and adds the prediction columns.
    cols, out_rows = read_rows(out)
    in_cols, in_rows = read_rows(table)
    assert cols[:len(in_cols)] == in_cols
    assert {"predicted_us", "ape_pct", "unpredicted_reason"} <= set(cols)
    assert [r["latency_us"] for r in out_rows] == [r["latency_us"] for r in in_rows]
    assert "median APE" in res.text and "p90 APE" in res.text


@needs_reference
def test_e2e_rows_predicted_or_listed(tmp_path):
    table = subset(TABLES["e2e_serving"], tmp_path / "e2e.csv", 3, step=40)
    res = run(str(table))
    s = res.summary
    assert s["layout"] == "e2e_serving" and s["rows"] == 3
    assert s["predicted"] + s["unpredicted"] == 3
    for u in s["unpredicted_rows"]:
        assert u["reason"]
    for i, row in enumerate(res.rows):
        if i not in {u["row"] for u in s["unpredicted_rows"]}:
            assert float(row["predicted_ttft_ms"]) > 0 and float(row["predicted_tpot_ms"]) > 0
            assert float(row["ttft_ape_pct"]) >= 0 and float(row["tpot_ape_pct"]) >= 0
    assert set(s["metrics"]) == {"ttft", "tpot"}


# ---------------------------------------------------------------------------------------------
def test_unknown_columns_rejected(tmp_path):
    t = write(tmp_path / "x.csv", ["foo", "bar", "latency_us"], [[1, 2, 3.0]])
    with pytest.raises(InputError) as ei:
        run(str(t))
    assert ei.value.field == "table" and "expected the columns of one of" in ei.value.fix
    for name in ("gemm", "moe", "collective", "e2e_serving"):
        assert name in ei.value.fix


def test_missing_file_and_empty_file_rejected(tmp_path):
    with pytest.raises(InputError, match="not found"):
        run(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="no header"):
        run(str(tmp_path / "empty.csv"))


def test_unknown_hardware_override_rejected(tmp_path):
    t = write(tmp_path / "g.csv", ["m", "n", "k", "dtype", "latency_us"],
              [[8, 8, 8, "bfloat16", 5]])
    with pytest.raises(InputError):
        run(str(t), hardware="no_such_gpu")


GEMM_HEADER = ["system", "kernel", "dtype", "m", "n", "k", "latency_us"]


def test_ape_on_handmade_table(tmp_path):
    from moesim.costs.gemm import linear
    from moesim.costs.op import eager_time_us
    from moesim.spec.hardware import load_profile

    hw = load_profile("h100_sxm")
    # A measured row is one eager call: the quantisation kernel (fp8) plus the GEMM.
    p1 = eager_time_us(linear("gemm", 4096, 4096, 4096, hw, "bf16", "bf16"))
    p2 = eager_time_us(linear("gemm", 16, 8192, 8192, hw, "fp8", "fp8"))
    # measured = 2x and 0.5x the prediction: APE 50 % and 100 %
    t = write(tmp_path / "g.csv", GEMM_HEADER,
              [["h100_sxm", "torch.nn.functional.linear", "bfloat16", 4096, 4096, 4096, 2 * p1],
               ["h100_sxm", "CutlassFP8ScaledMMLinearKernel", "fp8", 16, 8192, 8192, 0.5 * p2]])
    res = run(str(t))
    assert res.layout == "gemm"
    assert float(res.rows[0]["predicted_us"]) == pytest.approx(p1, rel=1e-5)
    assert float(res.rows[1]["predicted_us"]) == pytest.approx(p2, rel=1e-5)
    assert float(res.rows[0]["ape_pct"]) == pytest.approx(50.0, rel=1e-4)
    assert float(res.rows[1]["ape_pct"]) == pytest.approx(100.0, rel=1e-4)
    st = res.summary["metrics"]["latency"]
    assert st["n"] == 2 and st["median_ape_pct"] == pytest.approx(75.0, rel=1e-4)
    assert st["median_pred_over_meas"] == pytest.approx((0.5 + 2.0) / 2, rel=1e-4)
    assert res.summary["groups"]["latency"]["dtype"]["fp8"]["n"] == 1
    assert ape_pct(110.0, 100.0) == pytest.approx(10.0)
    assert ape_pct(90.0, 100.0) == pytest.approx(10.0)
    # JSON output carries the same summary
    js = json.loads(run(str(t), as_json=True).text)
    assert js["metrics"]["latency"]["n"] == 2


def test_bad_rows_listed_with_reason_not_dropped(tmp_path):
    header = ["system", "kernel", "dtype", "num_tokens", "hidden_size", "inter_size",
              "num_experts", "topk", "moe_tp", "moe_ep", "distribution", "latency_us"]
    t = write(tmp_path / "moe.csv", header, [
        ["h100_sxm", "k", "bfloat16", 64, 2048, 768, 128, 8, 1, 1, "balanced", 50.0],
        ["h100_sxm", "k", "bfloat16", 64, 2048, 768, 128, 8, 1, 3, "balanced", 50.0],  # ep∤E
        ["h100_sxm", "k", "bfloat16", 64, 2048, 768, 128, 8, 1, 1, "zipf", 50.0],
        ["h100_sxm", "k", "int3", 64, 2048, 768, 128, 8, 1, 1, "balanced", 50.0],
        ["no_such_gpu", "k", "bfloat16", 64, 2048, 768, 128, 8, 1, 1, "balanced", 50.0],
        ["h100_sxm", "k", "bfloat16", 64, 2048, 768, 128, 8, 1, 1, "power_law_1.2", ""],
    ])
    res = run(str(t))
    s = res.summary
    assert s["rows"] == 6 and s["predicted"] == 1 and s["unpredicted"] == 5
    reasons = {u["row"]: u["reason"] for u in s["unpredicted_rows"]}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert "moe_ep=3" in reasons[1]
    assert "zipf" in reasons[2]
    assert "int3" in reasons[3]
    assert "no_such_gpu" in reasons[4]
    assert "latency_us" in reasons[5]
    assert res.rows[5]["predicted_us"]  # predicted, but no error without a measurement
    assert "unpredicted rows (5)" in res.text


def test_deterministic(tmp_path):
    from moesim import validate

    header = ["system", "kernel", "dtype", "num_tokens", "hidden_size", "inter_size",
              "num_experts", "topk", "moe_tp", "moe_ep", "distribution", "latency_us"]
    rows = [["h100_sxm", "k", d, t, 2048, 768, 128, 8, 1, ep, dist, 100.0]
            for d in ("bfloat16", "fp8_block") for t in (1, 64, 4096) for ep in (1, 8)
            for dist in ("balanced", "power_law_1.01", "power_law_1.2")]
    t = write(tmp_path / "moe.csv", header, rows)
    a = [r["predicted_us"] for r in run(str(t)).rows]
    validate._global_draws.cache_clear()
    validate._routing_draws_cached.cache_clear()
    b = [r["predicted_us"] for r in run(str(t)).rows]
    assert a == b and all(float(x) > 0 for x in a)


# ---------------------------------------------------------------------------------------------
def test_routing_recipes():
    from moesim import validate

    bal = balanced_assignment_loads(64, 128, 8)
    assert bal.sum() == 64 * 8 and bal.max() - bal.min() <= 1
    few = balanced_assignment_loads(1, 128, 8)  # one token: 8 distinct experts, one slot each
    assert few.sum() == 8 and few.max() == 1
    odd = balanced_assignment_loads(16, 128, 6)  # E not a multiple of k: the recipe wraps
    assert odd.sum() == 96 and odd.max() == 2
    for T, E, k, dist in ((1, 128, 8, "power_law_1.2"), (16, 8, 2, "power_law_1.01"),
                          (4096, 16, 1, "power_law_1.2"), (512, 256, 8, "power_law_1.2")):
        draws = validate._routing_draws(dist, T, E, k, 1)
        assert len(draws) == validate.POWER_LAW_DRAWS
        assert len({d.tobytes() for d in draws}) > 1  # distinct draws
        for d in draws:
            assert d.sum() == T * k and d.min() >= 0 and d.max() <= T
        # EP: the most loaded group of experts, one of E / ep local experts
        for g, d in zip(validate._routing_draws(dist, T, E, k, 4), draws):
            assert g.size == E // 4 and g.sum() == d.reshape(4, -1).sum(axis=1).max()


def test_moe_ep_measures_the_most_loaded_group(tmp_path):
    header = ["system", "kernel", "dtype", "num_tokens", "hidden_size", "inter_size",
              "num_experts", "topk", "moe_tp", "moe_ep", "distribution", "latency_us"]
    t = write(tmp_path / "moe.csv", header,
              [["h100_sxm", "k", "bfloat16", 2048, 2048, 768, 128, 8, 1, ep, "power_law_1.2", 100]
               for ep in (1, 8, 128)])
    p = [float(r["predicted_us"]) for r in run(str(t)).rows]
    # Fewer experts per GPU: less weight to stream and fewer token-slots, so less time.
    assert p[0] > p[1] > p[2] > 0


def test_moe_rows_price_the_named_engines_output_copies(tmp_path):
    """A moe row's framework column picks the engine's write-back copies of the combined output
    (moesim/frameworks): a vLLM row pays two [tokens, hidden] copies more than the same row
    from this repo's own torch benchmarks (which write in place) or from SGLang."""
    from moesim.costs.moe import expert_ops
    from moesim.costs.op import eager_time_us
    from moesim.spec.hardware import load_profile

    header = ["system", "framework", "kernel", "dtype", "num_tokens", "hidden_size",
              "inter_size", "num_experts", "topk", "moe_tp", "moe_ep", "distribution",
              "latency_us"]
    t = write(tmp_path / "moe.csv", header,
              [["h100_sxm", fw, "k", "bfloat16", 4096, 5120, 8192, 16, 1, 8, 1, "balanced", 100]
               for fw in ("VLLM", "torch", "SGLANG")])
    vllm, torch_, sglang = (float(r["predicted_us"]) for r in run(str(t)).rows)
    assert torch_ == sglang
    hw = load_profile("h100_sxm")
    loads = np.full(16, 256)
    ops = {c: expert_ops(loads, 4096, 1, 5120, 1024, hw, "bf16", "bf16", output_copies=c)
           for c in (0, 2)}
    copy = next(o for o in ops[2] if o.name == "output_copy")
    assert copy.kernels == 2 and copy.bytes == pytest.approx(2 * 4096 * 5120 * 4.0)
    assert not any(o.name == "output_copy" for o in ops[0])
    # predicted_us is written to 0.01 µs
    assert vllm - torch_ == pytest.approx(eager_time_us(ops[2]) - eager_time_us(ops[0]),
                                          abs=0.011)
    assert vllm > torch_


@needs_reference
def test_big_bf16_gemm_close_to_measurement(tmp_path):
    """The 8192^3 bf16 cuBLAS GEMM is compute bound at ~80 % of peak: a GEMM model that gets
    it wrong by more than 2x is broken (e.g. wrong peak, wrong FLOP count, wrong units)."""
    row = None
    with TABLES["gemm"].open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["dtype"] == "bfloat16" and r["m"] == r["n"] == r["k"] == "8192":
                row = r
                break
    assert row is not None
    t = write(tmp_path / "g.csv", list(row), [list(row.values())])
    res = run(str(t))
    ratio = float(res.rows[0]["predicted_us"]) / float(row["latency_us"])
    assert 0.5 < ratio < 2.0, ratio


def test_layouts_cover_the_documented_names():
    from moesim.validate import LAYOUT_NAMES

    assert set(LAYOUT_NAMES) == (set(LAYOUTS) - {"attention"}) | {"attention_context",
                                                                   "attention_generation"}


def test_e2e_scenario_mapping():
    from moesim.validate import e2e_scenario

    row = {"model_path": "openai/gpt-oss-120b", "backend": "vllm", "system": "h100_sxm",
           "precision": "fp4", "mode": "agg", "isl": "1024", "osl": "256",
           "gemm_quant_mode": "nvfp4", "moe_quant_mode": "nvfp4", "batch_size": "16",
           "tp_size": "4", "pp_size": "1", "attention_dp_size": "", "moe_tp_size": "2",
           "moe_ep_size": "2"}
    sc = e2e_scenario(row)
    assert sc["hardware"] == {"profile": "h100_sxm", "num_gpus": 4}
    d = sc["deployment"]
    assert (d["tp"], d["attention_dp"], d["pp"], d["ep"], d["moe_tp"]) == (4, 1, 1, 2, 2)
    assert d["framework"] == "vllm"
    # MXFP4 experts as in the checkpoint (no fp4 tensor cores on H100), bf16 elsewhere
    assert (d["weight_dtype"], d["expert_weight_dtype"], d["activation_dtype"]) == \
        ("bf16", "mxfp4", "bf16")
    # A benchmark run of 10 x concurrency requests (InferenceMAX's client protocol)
    assert sc["workload"] == {"batch_size": 16, "input_len": 1024, "output_len": 256,
                              "num_requests": 160}
    # Random-token traffic: zipf popularity with the exponent fit-framework shipped
    from moesim.validate import e2e_traffic_zipf_s
    assert sc["routing"] == {"distribution": "zipf", "s": e2e_traffic_zipf_s().value,
                             "samples": 4}
    assert e2e_traffic_zipf_s().kind == "calibrated"
    qwen = e2e_scenario({**row, "model_path": "Qwen/Qwen3-235B-A22B-FP8", "backend": "trtllm",
                         "gemm_quant_mode": "fp8_block", "moe_quant_mode": "fp8_block"})
    qd = qwen["deployment"]
    assert (qd["weight_dtype"], qd["expert_weight_dtype"], qd["activation_dtype"]) == \
        ("fp8_block", "fp8_block", "fp8")
