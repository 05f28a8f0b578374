"""Sweeps and recommendations: the sweep file, the fast path (it must equal ``predict``),
infeasible points, workers, output files, the CLI and ``recommend``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from moesim.analytic import predict
from moesim.errors import InputError
from moesim.spec.scenario import parse_scenario
from moesim.sweep import (
    OUTPUT_COLUMNS, Progress, WorkloadMemo, evaluate, evaluator_for, load_sweep, outputs_agree,
    parse_sweep, prediction_outputs, run_sweep, set_path, write_table)

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "examples" / "sweeps" / "mixtral-grid.yaml"
MIXTRAL = ROOT / "examples" / "mixtral-8x7b_2xh100_tp2.json"


def _base() -> dict:
    return json.loads(MIXTRAL.read_text())


def _fast_vs_predict(doc: dict, base_dir: Path = ROOT / "examples") -> None:
    """The fast evaluator's outputs for ``doc`` equal predict's (relative 1e-9)."""
    sc = parse_scenario(doc, base_dir=base_dir)
    fast = evaluator_for(sc).outputs(sc.workload)
    ref = prediction_outputs(predict(sc))
    diff = outputs_agree(fast, ref, rtol=1e-9)
    assert diff is None, f"{doc['model']} {doc['deployment']} {doc['workload']}: {diff}"


# ---------------------------------------------------------------------------------------------
# the fast path equals predict
# ---------------------------------------------------------------------------------------------

def test_fast_path_equals_predict_on_a_sample_of_the_mixtral_grid():
    spec = load_sweep(GRID)
    assert len(spec) >= 50_000
    rng = np.random.default_rng(7)
    points = list(spec.points())
    checked = 0
    for i in rng.choice(len(points), size=30, replace=False):
        doc = spec.scenario(points[i])
        try:
            parse_scenario(doc, base_dir=spec.base_dir)
        except InputError:
            continue
        _fast_vs_predict(doc, spec.base_dir)
        checked += 1
    assert checked >= 25


@pytest.mark.parametrize("model,deployment,workload", [
    # MLA + shared experts, attention-DP with EP, chunked prefill of a long prompt
    ("deepseek-v2-lite", {"tp": 1, "attention_dp": 2, "ep": 2},
     {"batch_size": 5, "input_len": 9000, "output_len": 33}),
    # sliding-window attention, mxfp4 experts, eager decode above the CUDA-graph limit
    ("gpt-oss-20b", {"tp": 1, "framework": "vllm"},
     {"batch_size": 600, "input_len": 700, "output_len": 100}),
    # hybrid linear attention (Gated DeltaNet) + full attention
    ("qwen3.5-397b-a17b", {"tp": 8, "ep": 8, "weight_dtype": "fp8", "activation_dtype": "fp8"},
     {"batch_size": 64, "input_len": 2048, "output_len": 512}),
    # a dense model, pipeline parallel, fp8 KV cache, no CUDA graphs
    ("llama-3.1-8b", {"tp": 2, "pp": 2, "kv_cache_dtype": "fp8", "cuda_graphs": False},
     {"batch_size": 3, "input_len": 100, "output_len": 7}),
    # TP across nodes (warning text), grouped MoE kernels
    ("mixtral-8x7b", {"tp": 16, "moe_strategy": "grouped"},
     {"batch_size": 40, "input_len": 3000, "output_len": 1}),
    # chunked attention layers (Llama-4), sglang defaults
    ("llama-4-scout", {"tp": 4, "ep": 4, "framework": "sglang"},
     {"batch_size": 17, "input_len": 10000, "output_len": 300}),
])
def test_fast_path_equals_predict_across_models(model, deployment, workload):
    dep = dict(deployment)
    gpus = dep.get("tp", 1) * dep.get("attention_dp", 1) * dep.get("pp", 1)
    doc = {"model": model, "hardware": {"profile": "h100_sxm", "num_gpus": gpus},
           "deployment": dep, "workload": workload}
    _fast_vs_predict(doc)


@pytest.mark.parametrize("framework", ["vllm", "sglang", "trtllm", "generic"])
@pytest.mark.parametrize("deployment,workload", [
    # long prompts: chunks of the budget left by the decodes ride in decode steps (mixed
    # batching: vLLM with piecewise CUDA graphs, TensorRT-LLM) or run alone (SGLang defaults)
    ({"tp": 2}, {"batch_size": 64, "input_len": 20000, "output_len": 200}),
    ({"tp": 1, "attention_dp": 2, "ep": 2}, {"batch_size": 40, "input_len": 12000,
                                             "output_len": 64}),
    # short prompts, many per iteration; prefill-limited (queueing) at a large batch
    ({"tp": 2, "ep": 2}, {"batch_size": 256, "input_len": 300, "output_len": 20}),
    ({"tp": 2}, {"batch_size": 2048, "input_len": 4096, "output_len": 32}),
    # speculative decoding (verification steps, MTP drafts) and a benchmark's first wave
    ({"tp": 2}, {"batch_size": 24, "input_len": 3000, "output_len": 300, "num_requests": 100,
                 "speculative": {"num_draft_tokens": 3, "acceptance_rate": 0.7}}),
])
def test_fast_path_equals_predict_on_mixed_steps(framework, deployment, workload):
    dep = dict(deployment, framework=framework)
    gpus = dep.get("tp", 1) * dep.get("attention_dp", 1)
    doc = {"model": "mixtral-8x7b", "hardware": {"profile": "h100_sxm", "num_gpus": gpus},
           "deployment": dep, "workload": workload}
    sc = parse_scenario(doc)
    p = predict(sc)
    if framework == "sglang":
        assert p.mixed_step is None  # mixed_batching = 0: prefill steps of their own
    elif workload["input_len"] > 10000:
        assert p.mixed_step is not None and p.mixed_step.batch.prefill is not None
    _fast_vs_predict(doc)


def test_sweep_rows_equal_predict_rows():
    """Whole path (groups, workload checks, memos): every row equals predict's."""
    spec = parse_sweep({"base": _base(), "axes": {
        "layout": [{"deployment.tp": 2}, {"deployment.tp": 1, "deployment.attention_dp": 2,
                                          "deployment.ep": 2}],
        "workload.batch_size": [1, 3, 64],
        "workload.input_len": [100, 8192, 9000],
        "workload.output_len": [1, 300]}}, base_dir=ROOT / "examples")
    res = run_sweep(spec, progress=False)
    assert len(res.rows) == len(spec) == 36
    assert res.warnings == []
    for point, row in zip(spec.points(), res.dicts()):
        doc = spec.scenario(point)
        try:
            sc = parse_scenario(doc, base_dir=spec.base_dir)
        except InputError as exc:
            assert row["feasible"] is False and row["error"] == exc.one_line()
            continue
        assert row["evaluator"] == "fast"
        out = tuple(row[c] for c in OUTPUT_COLUMNS)
        assert outputs_agree(out, prediction_outputs(predict(sc)), rtol=1e-9) is None


def _rows_equal_predict(spec, res) -> set:
    """Every row of ``res`` equals predict's for its point; returns the evaluators used."""
    used = set()
    for point, row in zip(spec.points(), res.dicts()):
        try:
            sc = parse_scenario(spec.scenario(point), base_dir=spec.base_dir)
        except InputError as exc:
            assert row["feasible"] is False and row["error"] == exc.one_line()
            continue
        used.add(row["evaluator"])
        out = tuple(row[c] for c in OUTPUT_COLUMNS)
        diff = outputs_agree(out, prediction_outputs(predict(sc)), rtol=1e-9)
        assert diff is None, f"{point}: {diff}"
    return used


def test_drawn_routing_fast_path_equals_predict():
    """Zipf / power-law / uniform routing: the sweep replays predict's draws (one generator per
    point, a draw per distinct step in predict's order) and shares them between points."""
    spec = parse_sweep({"base": _base(), "axes": {
        "layout": [{"deployment.tp": 2},
                   {"deployment.tp": 1, "deployment.attention_dp": 2, "deployment.ep": 2},
                   {"deployment.tp": 2, "deployment.framework": "sglang"}],
        "routing": [{"distribution": "zipf", "s": 1.0, "samples": 2},
                    {"distribution": "power_law", "alpha": 1.2, "samples": 2, "seed": 3},
                    {"distribution": "uniform", "samples": 3}],
        "workload.batch_size": [1, 64, 700],
        "workload.input_len": [100, 9000],
        "workload.output_len": [1, 300]}}, base_dir=ROOT / "examples")
    res = run_sweep(spec, progress=False)
    assert res.warnings == []
    assert _rows_equal_predict(spec, res) == {"fast"}
    assert {r["routing_samples"] for r in res.dicts() if r["feasible"]} == {2, 3}


def test_routing_the_fast_path_does_not_cover_goes_through_predict():
    base = _base()
    base["routing"] = {"distribution": "zipf", "s": 1.0, "samples": 2}
    spec = parse_sweep({"base": base, "axes": {
        "cap": [{"routing.capacity_factor": 1.0, "routing.overflow": "second_pass"},
                {"deployment.moe_strategy": "grouped"}],
        "workload.batch_size": [1, 2, 4, 8, 16], "workload.input_len": [64]}},
        base_dir=ROOT / "examples")
    res = run_sweep(spec, progress=False)
    assert _rows_equal_predict(spec, res) == {"predict"}
    assert all(r["routing_samples"] == 2 for r in res.dicts())


def test_workload_memo_keys_on_what_was_read():
    sc = parse_scenario(_base(), base_dir=ROOT / "examples")
    calls = []

    def fn(s):  # reads output_len only on one branch
        calls.append(1)
        wl = s.workload
        return wl.batch_size * 10 + (wl.output_len if wl.batch_size > 4 else 0)

    memo = WorkloadMemo(sc, fn)
    from moesim.spec.workload import Workload
    W = lambda b, o: Workload(batch_size=b, input_len=10, output_len=o)  # noqa: E731
    assert memo(W(2, 1)) == 20 and memo(W(2, 99)) == 20 and len(calls) == 1
    assert memo(W(8, 1)) == 81 and memo(W(8, 2)) == 82 and len(calls) == 3
    assert memo(W(8, 1)) == 81 and len(calls) == 3


# ---------------------------------------------------------------------------------------------
# infeasible points
# ---------------------------------------------------------------------------------------------

def test_infeasible_points_keep_the_reason_parse_would_give():
    base = _base()
    spec = parse_sweep({"base": base, "axes": {
        "deployment.tp": [2, 3],
        "deployment.attention_dp": [1, 4],
        "workload.batch_size": [0, 2, 8],
        "workload.input_len": [16]}}, base_dir=ROOT / "examples")
    res = run_sweep(spec, progress=False)
    bad = 0
    for point, row in zip(spec.points(), res.dicts()):
        doc = spec.scenario(point)
        try:
            parse_scenario(doc, base_dir=spec.base_dir)
            assert row["feasible"] is True
        except InputError as exc:
            bad += 1
            assert row["feasible"] is False
            assert row["error"] == exc.one_line()
            assert row["ttft_ms"] == ""
    assert bad >= 8


def test_routing_file_error_order_matches_parse(tmp_path):
    base = _base()
    base["routing"] = {"distribution": "histogram", "histogram_file": str(tmp_path / "no.csv")}
    spec = parse_sweep({"base": base, "axes": {"deployment.attention_dp": [2],
                                               "deployment.ep": [2],
                                               "workload.batch_size": [1, 4, 8, 16]}},
                       base_dir=ROOT / "examples")
    for point, row in zip(spec.points(), run_sweep(spec, progress=False).dicts()):
        with pytest.raises(InputError) as exc:
            parse_scenario(spec.scenario(point), base_dir=spec.base_dir)
        assert row["error"] == exc.value.one_line()


# ---------------------------------------------------------------------------------------------
# the sweep file
# ---------------------------------------------------------------------------------------------

def test_ranges_and_linked_axes():
    spec = parse_sweep({"base": _base(), "axes": {
        "workload.batch_size": {"start": 1, "stop": 64, "factor": 4},
        "workload.input_len": {"start": 128, "stop": 4096, "num": 6, "scale": "log"},
        "workload.output_len": {"start": 10, "stop": 30, "step": 10},
        "routing.capacity_factor": {"start": 1.0, "stop": 2.0, "num": 3},
        "prec": [{"deployment.weight_dtype": "fp8"}, {"deployment.kv_cache_dtype": "fp8"}]}})
    ax = {a.name: a for a in spec.axes}
    assert ax["workload.batch_size"].values == (1, 4, 16, 64)
    assert ax["workload.input_len"].values == (128, 256, 512, 1024, 2048, 4096)
    assert ax["workload.output_len"].values == (10, 20, 30)
    assert ax["routing.capacity_factor"].values == (1.0, 1.5, 2.0)
    assert ax["prec"].linked and ax["prec"].paths == ("deployment.weight_dtype",
                                                      "deployment.kv_cache_dtype")
    assert len(spec) == 4 * 6 * 3 * 3 * 2
    first = next(iter(spec.points()))
    doc = spec.scenario(first)
    assert doc["workload"] == {"batch_size": 1, "input_len": 128, "output_len": 10}
    assert doc["deployment"]["weight_dtype"] == "fp8"
    assert spec.input_columns()[-3:] == ["prec", "deployment.weight_dtype",
                                         "deployment.kv_cache_dtype"]


def test_random_sampling_is_seeded_and_in_range():
    data = {"base": _base(), "sampling": "random", "samples": 50, "seed": 3, "axes": {
        "workload.batch_size": {"low": 1, "high": 512, "scale": "log"},
        "workload.input_len": [128, 1024],
        "layout": [{"deployment.tp": 1, "hardware.num_gpus": 1},
                   {"deployment.tp": 2, "hardware.num_gpus": 2}]}}
    a, b = parse_sweep(data), parse_sweep(data)
    pa, pb = list(a.points()), list(b.points())
    assert pa == pb and len(pa) == 50
    assert all(isinstance(p[0], int) and 1 <= p[0] <= 512 for p in pa)
    assert {p[1] for p in pa} == {128, 1024}
    assert {p[2] for p in pa} == {0, 1}
    data["seed"] = 4
    assert list(parse_sweep(data).points()) != pa
    res = run_sweep(a, progress=False)
    assert len(res.rows) == 50 and res.feasible == 50


@pytest.mark.parametrize("data,field", [
    ({"axes": {}}, "base"),
    ({"base": {}, "axes": {"deployment.tpp": [1]}}, "axes.deployment.tpp"),
    ({"base": {}, "axes": {"hardwar.num_gpus": [1]}}, "axes.hardwar.num_gpus"),
    ({"base": {}, "axes": {"workload.batch_size": []}}, "axes.workload.batch_size"),
    ({"base": {}, "axes": {"workload.batch_size": {"start": 1, "stop": 8}}},
     "axes.workload.batch_size"),
    ({"base": {}, "axes": {"workload.batch_size": {"low": 1, "high": 8}}},
     "axes.workload.batch_size"),
    ({"base": {}, "axes": {"layout": [1, 2]}}, "axes.layout[0]"),
    ({"base": {}, "samples": 3, "axes": {}}, "samples"),
    ({"base": {}, "sampling": "sobol", "axes": {}}, "sampling"),
    ({"base": {}, "axes": {}, "colour": 1}, "colour"),
    ({"base": "does/not/exist.json", "axes": {}}, "base"),
])
def test_bad_sweep_files_name_the_field(data, field):
    with pytest.raises(InputError) as exc:
        parse_sweep(data, base_dir=ROOT)
    assert exc.value.field == field


def test_set_path_promotes_hardware_and_model_presets():
    doc = {"model": "mixtral-8x7b", "hardware": "h100_sxm"}
    set_path(doc, "hardware.num_gpus", 4)
    assert doc["hardware"] == {"profile": "h100_sxm", "num_gpus": 4}
    set_path(doc, "model.num_local_experts", 4)
    assert doc["model"]["model_type"] == "mixtral" and doc["model"]["num_local_experts"] == 4
    with pytest.raises(InputError):
        set_path({"model": "./nope.json"}, "model.num_local_experts", 4)


# ---------------------------------------------------------------------------------------------
# running and writing
# ---------------------------------------------------------------------------------------------

def _small_spec():
    return parse_sweep({"base": _base(), "axes": {
        "layout": [{"deployment.tp": 1, "hardware.num_gpus": 1},
                   {"deployment.tp": 2, "hardware.num_gpus": 2}],
        "workload.batch_size": [1, 2, 4, 8], "workload.input_len": [128, 512]}},
        base_dir=ROOT / "examples")


def test_workers_give_the_same_rows(tmp_path):
    spec = _small_spec()
    one = run_sweep(spec, progress=False)
    two = run_sweep(spec, workers=2, progress=False)
    assert one.columns == two.columns and one.rows == two.rows
    # the workers format the output cells of the CSV themselves: the same file
    write_table(one, tmp_path / "one.csv")
    write_table(two, tmp_path / "two.csv")
    assert two._cells is not None
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()


def test_ray_local_cluster_gives_the_same_rows():
    ray = pytest.importorskip("ray")  # an optional extra: CI without it skips
    spec = _small_spec()
    try:
        assert run_sweep(spec, ray_address="local", progress=False).rows == \
            run_sweep(spec, progress=False).rows
    finally:
        ray.shutdown()


def test_evaluate_explicit_points_matches_the_sweep():
    spec = _small_spec()
    rows = run_sweep(spec, progress=False).dicts()
    outs = evaluate(spec.base, [spec.assignments(p) for p in spec.points()],
                    base_dir=spec.base_dir)
    assert [o["tpot_ms"] for o in outs] == [r["tpot_ms"] for r in rows]


def test_csv_output(tmp_path):
    res = run_sweep(_small_spec(), progress=False)
    out = tmp_path / "r.csv"
    write_table(res, out)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16
    assert list(rows[0])[:5] == ["layout", "deployment.tp", "hardware.num_gpus",
                                 "workload.batch_size", "workload.input_len"]
    assert set(OUTPUT_COLUMNS) <= set(rows[0])
    r = res.dicts()[5]
    assert float(rows[5]["ttft_ms"]) == pytest.approx(r["ttft_ms"], rel=1e-8)
    assert rows[5]["fits"] in ("True", "False")


def test_parquet_needs_pyarrow(tmp_path):
    res = run_sweep(_small_spec(), progress=False, limit=4)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(InputError) as exc:
            write_table(res, tmp_path / "r.parquet")
        assert "pyarrow" in exc.value.one_line()
        return
    write_table(res, tmp_path / "r.parquet")
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 4


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    bar = Progress(10, stream=s)
    bar.update(10)
    bar.close()
    assert "\r" in s.getvalue() and "10/10" in s.getvalue()
    plain = io.StringIO()
    bar = Progress(10, stream=plain)
    bar.update(10)
    bar.close()
    assert plain.getvalue() == ""


# ---------------------------------------------------------------------------------------------
# CLI (in-process: the sub-commands as cli.py will register them)
# ---------------------------------------------------------------------------------------------

def _cli(*argv, capsys):
    from moesim.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sweep_writes_csv(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(f"base: {MIXTRAL}\naxes:\n  workload.batch_size: [1, 2, 4, 8]\n")
    code, out, err = _cli("sweep", str(f), "--out", str(tmp_path / "o.csv"), capsys=capsys)
    assert code == 0, err
    assert "4 points (4 feasible" in err
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 5


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(f"base: {MIXTRAL}\naxes:\n  deployment.tpp: [1]\n")
    code, _, err = _cli("sweep", str(f), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "deployment.tpp" in err
    g = tmp_path / "g.yaml"
    g.write_text(f"base: {MIXTRAL}\naxes:\n  workload.batch_size: [1]\n")
    try:
        import ray  # noqa: F401
    except ImportError:
        code, _, err = _cli("sweep", str(g), "--ray", "auto", capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "ray" in err.lower()
    code, _, err = _cli("recommend", str(MIXTRAL), "--gpus", "2", "--precisions", "fp9",
                        capsys=capsys)
    assert code == 2 and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# recommend
# ---------------------------------------------------------------------------------------------

def test_recommend_meets_slos_and_frontier_is_pareto(tmp_path):
    from moesim.recommend import recommend

    rec = recommend(MIXTRAL, 2, slo_tpot_ms=40.0, slo_ttft_ms=3000.0,
                    precisions=["bf16", "fp8"], batch_sizes=[1, 8, 64, 256])
    layouts = {(c["tp"], c["attention_dp"], c["ep"], c["moe_tp"]) for c in rec.candidates}
    assert layouts == {(1, 2, 1, 2), (1, 2, 2, 1), (2, 1, 1, 2), (2, 1, 2, 1)}
    assert rec.ranked, "some configuration must meet these SLOs"
    tputs = [c["throughput_output_tok_per_s_per_gpu"] for c in rec.ranked]
    assert tputs == sorted(tputs, reverse=True)
    for c in rec.ranked:
        assert c["fits"] and c["tpot_ms"] <= 40.0 and c["ttft_ms"] <= 3000.0
    # the best one, re-predicted on its own
    best = rec.ranked[0]
    doc = _base()
    doc["hardware"]["num_gpus"] = 2
    doc["deployment"] = {"tp": best["tp"], "attention_dp": best["attention_dp"],
                         "ep": best["ep"], "moe_tp": best["moe_tp"], "framework": "vllm",
                         **({"weight_dtype": "fp8", "activation_dtype": "fp8"}
                            if best["precision"] == "fp8" else {})}
    doc["workload"]["batch_size"] = best["batch_size"]
    p = predict(parse_scenario(doc, base_dir=ROOT / "examples"))
    assert p.throughput_output_tok_per_s_per_gpu == pytest.approx(
        best["throughput_output_tok_per_s_per_gpu"], rel=1e-9)
    # frontier: nobody in ranked is better on both axes than a frontier member
    for f in rec.frontier:
        assert not any(c["tpot_ms"] < f["tpot_ms"] and c["throughput_output_tok_per_s_per_gpu"]
                       > f["throughput_output_tok_per_s_per_gpu"] for c in rec.ranked)
    # the largest batch that fits was tried for each layout and precision
    assert any(c["batch_size"] not in (1, 8, 64, 256) for c in rec.candidates)


def test_cli_recommend_prints_and_writes_frontier(tmp_path, capsys):
    out = tmp_path / "front.csv"
    code, text, err = _cli("recommend", str(MIXTRAL), "--gpus", "2", "--slo-tpot-ms", "40",
                           "--precisions", "fp8", "--batch-sizes", "8,64", "--out", str(out),
                           capsys=capsys)
    assert code == 0, err
    assert "tok/s/GPU" in text and "Pareto frontier" in text
    rows = list(csv.DictReader(out.open()))
    assert rows and {"tp", "ep", "attention_dp", "precision", "batch_size",
                     "throughput_output_tok_per_s_per_gpu"} <= set(rows[0])
    code, text, _ = _cli("recommend", str(MIXTRAL), "--gpus", "2", "--slo-tpot-ms", "0.01",
                         "--precisions", "fp8", "--batch-sizes", "8", capsys=capsys)
    assert code == 1 and "no configuration" in text


# ---------------------------------------------------------------------------------------------
# the vectorised twins (moesim/vstep.py) and the MoE layers priced together (moesim/step.py)
# ---------------------------------------------------------------------------------------------

def _close(a, b, what):
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12), what


@pytest.mark.parametrize("profile", ["h100_sxm", "a100_sxm", "b200", "h100_pcie"])
def test_vector_twins_match_scalar_costs(profile):
    """Each v_* function of moesim/vstep.py gives its scalar original's numbers (a change to a
    cost function in moesim/costs/ must be mirrored there)."""
    from moesim.costs import attention, comm
    from moesim.costs.elementwise import memory_op
    from moesim.costs.gemm import gemm, linear
    from moesim.spec.hardware import load_profile
    from moesim import vstep
    from moesim.vstep import BOUND_CODE

    hw = load_profile(profile)
    rng = np.random.default_rng(3)
    m = np.unique(np.concatenate([rng.integers(1, 20000, 40), [1, 16, 63, 64, 65, 128, 129,
                                                              512, 8192]]))
    fp8 = hw.compute.peak_dense_tflops.fp8 is not None

    def same(v, ops):
        for i, o in enumerate(ops):
            got = v.take(np.array([i]))
            _close(float(np.ravel(got.time)[0]), o.time_us, (o.name, "time"))
            _close(float(np.ravel(np.broadcast_to(got.fixed, (1,)))[0]), o.fixed_us,
                   (o.name, "fixed"))
            _close(float(np.ravel(np.broadcast_to(got.ideal_c, (1,)))[0]), o.ideal_compute_us,
                   (o.name, "ideal compute"))
            _close(float(np.ravel(np.broadcast_to(got.ideal_m, (1,)))[0]), o.ideal_memory_us,
                   (o.name, "ideal memory"))
            assert int(np.ravel(np.broadcast_to(got.bound, (1,)))[0]) == BOUND_CODE[o.bound]

    dtypes = [("bf16", "bf16"), ("int4", "bf16"), ("mxfp4", "bf16")]
    if fp8:
        dtypes += [("fp8", "fp8"), ("fp8_block", "fp8"), ("fp8", "bf16")]
    for wd, ad in dtypes:
        for n, k in [(4096, 4096), (96, 7168), (32000, 2048), (8, 640)]:
            same(vstep.v_gemm(m, n, k, hw, wd, ad), [gemm("g", int(x), n, k, hw, wd, ad)
                                                       for x in m])
            twin = vstep.v_linear(m, n, k, hw, wd, ad)
            ref = [linear("l", int(x), n, k, hw, wd, ad) for x in m]
            assert len(twin) == len(ref[0])
            for j, v in enumerate(twin):
                same(v, [r[j] for r in ref])
    b = m * 4096 * 2.0
    same(vstep.v_memory_op(b, hw, 3), [memory_op("e", x, hw, 3) for x in b])
    msg = np.concatenate([b, [8 * 1024 * 1024, 8 * 1024 * 1024 + 2]])
    for n, gpn in [(2, 8), (4, 8), (8, 8), (16, 8), (4, 2)]:
        for custom in (False, True):
            same(vstep.v_all_reduce(msg, n, hw, gpn, custom),
                 [comm.all_reduce("ar", x, n, hw, gpn, custom) for x in msg])
        same(vstep.v_all_to_all(msg, n, hw, gpn), [comm.all_to_all("a", x, n, hw, gpn)
                                                   for x in msg])
    assert vstep.v_all_reduce(msg, 1, hw) is None
    seqs, ctx = rng.integers(1, 600, 30).astype(float), rng.uniform(1, 40000, 30)
    for kvd in ("bf16", "fp8") if fp8 else ("bf16",):
        for window, chunk in [(0, 0), (4096, 0), (0, 8192)]:
            for heads, kv_heads in [(32, 8), (64, 64), (8, 1)]:
                same(vstep.v_attention_decode(seqs, ctx, heads * 2.0, kv_heads, 128, 128, hw,
                                              kvd, window, chunk),
                     [attention.decode(int(s), c, heads * 2, kv_heads, 128, 128, hw, kvd,
                                       window, chunk) for s, c in zip(seqs, ctx)])
        same(vstep.v_mla_decode(seqs, ctx, 16.0, 512, 64, hw, kvd),
             [attention.mla_decode(int(s), c, 16, 512, 64, hw, kvd) for s, c in zip(seqs, ctx)])


def test_launch_twin_matches_with_launch():
    from moesim.costs.elementwise import memory_op
    from moesim.costs.gemm import gemm
    from moesim.step import Batch, with_launch
    from moesim.vstep import BOUND_CODE, VOp, launched

    sc = parse_scenario(_base(), base_dir=ROOT / "examples")
    ov = sc.hardware.overheads
    hw = sc.hardware
    ops = [gemm("g", m, 4096, 4096, hw) for m in (1, 7, 64, 300, 5000)] + \
        [memory_op("e", x, hw, k) for x in (10.0, 1e5, 1e8) for k in (1, 3)]
    for b, cov in [(Batch("decode", 8, 1, 100.0), True), (Batch("prefill", 2, 9000, 0.0), False)]:
        gpu, stall, host, bound = launched(VOp.stack(ops), cov, ov.graph_kernel_us.value,
                                           ov.kernel_launch_host_us.value)
        for o, t, st, h, bd in zip(ops, gpu, stall, host, bound):
            ref = with_launch(sc, b, o)
            _close(float(t), ref.time_us + (0.0 if ref.host_us else ref.launch_us), (o.name, cov))
            _close(float(st), ref.launch_us if ref.host_us else 0.0, (o.name, cov))
            _close(float(h), ref.host_us, (o.name, cov))
            assert int(bd) == BOUND_CODE[ref.bound]
        assert cov or (stall > 0).any()  # the eager case has stalls to hide


@pytest.mark.parametrize("gpu_us", [0.0, 50.0, 5000.0])
def test_finish_twin_matches_overlap_host(gpu_us):
    """vstep.finish on summed raw vectors = step.overlap_host on the ops: host-bound (H > G),
    GPU-bound, and the boundary between."""
    from moesim.costs.elementwise import memory_op
    from moesim.costs.gemm import gemm
    from moesim.step import Batch, overlap_host, with_launch
    from moesim.sweep import _bound_vector
    from moesim.vstep import RAW_WIDTH, VOp, _Acc, finish

    sc = parse_scenario(_base(), base_dir=ROOT / "examples")
    ov, hw = sc.hardware.overheads, sc.hardware
    b = Batch("prefill", 2, 9000, 0.0)
    ops = [gemm("g", m, 4096, 4096, hw) for m in (1, 7, 64)] + \
        [memory_op("e", x, hw, k) for x in (10.0, 1e5) for k in (1, 3)]
    if gpu_us:  # one long kernel the host can run ahead of
        ops.append(memory_op("big", gpu_us * hw.memory.hbm_peak_gb_per_s.value * 1e3, hw))
    launched_ops = [with_launch(sc, b, o) for o in ops]
    ref = _bound_vector(overlap_host(launched_ops))
    acc = _Acc(1, np.array([False]), np.array([False]), ov.graph_kernel_us.value,
               ov.kernel_launch_host_us.value)
    for o in ops:
        acc.add(VOp.stack([o]), 1.0)
    got = finish(acc.v.T)[0]
    assert acc.v.shape == (RAW_WIDTH, 1)
    for x, y in zip(got, ref):
        _close(float(x), y, gpu_us)
    serial = sum(o.total_us for o in launched_ops)
    host = sum(o.host_us for o in launched_ops)
    gpu = sum(o.time_us for o in launched_ops)
    _close(float(got[0]), max(gpu, host), gpu_us)  # the host runs ahead: max, not the sum
    assert got[0] < serial or host <= gpu


@pytest.mark.parametrize("model,deployment", [
    ("mixtral-8x7b", {"tp": 2}),
    ("deepseek-v2-lite", {"tp": 1, "attention_dp": 2, "ep": 2}),   # a dense first layer, MLA
    ("llama-4-scout", {"tp": 4, "ep": 4}),                        # two attention kinds
    ("gpt-oss-20b", {"tp": 2, "ep": 2}),                          # sliding + full
    ("mixtral-8x7b", {"tp": 2, "moe_strategy": "grouped"}),
])
def test_moe_layers_with_drawn_loads_average_as_per_layer_ops(model, deployment):
    """build_step prices MoE layers with different loads together (no op list per layer); its
    per-kind entries are still _average_layers of the per-layer ops, launched."""
    from moesim.routing import sample_loads
    from moesim.step import Batch, _average_layers, _layer_kind, build_step, moe_layers, \
        with_launch

    gpus = deployment.get("tp", 1) * deployment.get("attention_dp", 1)
    sc = parse_scenario({"model": model, "hardware": {"profile": "h100_sxm", "num_gpus": gpus},
                         "deployment": deployment,
                         "workload": {"batch_size": 8, "input_len": 100, "output_len": 10},
                         "routing": {"distribution": "zipf", "s": 1.2}})
    m = sc.model
    rng = np.random.default_rng(11)
    for b in (Batch("decode", 3, 1, 500.0), Batch("decode", 40, 1, 900.0,
                                                  Batch("prefill", 1, 700, 0.0))):
        loads = sample_loads(sc.routing, b.tokens * sc.deployment.attention_dp,
                             m.moe.num_experts, m.moe.top_k, m.num_moe_layers, rng)
        loads[1] = loads[0]  # two layers alike, the rest drawn
        step = build_step(sc, b, loads, host_overlap=False)
        layers = moe_layers(sc, b, loads)
        kinds: dict = {}
        j = 0
        for att, mlp in zip(m.layer_attention, m.layer_mlp):
            if mlp == "moe":
                kinds.setdefault(_layer_kind(att, mlp), []).append(layers[j].ops)
                j += 1
        names = {o.name for layer in layers for o in layer.ops}
        for kind, lists in kinds.items():
            ref = [with_launch(sc, b, o) for o in _average_layers(lists, kind)]
            got = [o for o in step.ops if o.layer_kind == kind and o.name in names]
            assert [o.name for o in got] == [o.name for o in ref]
            for g, r in zip(got, ref):
                assert (g.count, g.bound, g.kernels, g.family) == \
                    (r.count, r.bound, r.kernels, r.family), g.name
                for f in ("time_us", "launch_us", "flops", "bytes", "fixed_us"):
                    _close(getattr(g, f), getattr(r, f), (kind, g.name, f))


def test_csv_lines_match_the_csv_module():
    from moesim.sweep import csv_lines

    rows = [(1.5, 2, True, "plain", "", None, 1e-300, 123456789.123456789),
            (float("nan"), -3, False, 'a "quoted", text', "x\ny", "tail\r", 0.0, 2.0),
            ("", "", "", "", "", "", "", ""),
            (np.float64(0.1), np.int64(4), "a,b", "{\"k\": 1}", " lead", "z", 1.0, 7)]
    ref = io.StringIO()
    w = csv.writer(ref, lineterminator="\n")
    for r in rows:
        w.writerow(["%.12g" % v if type(v) is float else v if type(v) is str else str(v)
                    for v in r])
    assert "".join(csv_lines(rows)) == ref.getvalue()


def test_draws_replay_predicts_generator():
    """A Draws tree gives each step the loads predict's generator draws for it after the same
    earlier steps, whichever tree (a cleared cache draws them again identically)."""
    from moesim.routing import sample_loads
    from moesim.spec.routing import RoutingSpec
    from moesim.sweep import Draws

    rs = RoutingSpec(distribution="zipf", s=1.0, samples=3, seed=4)
    a, b = Draws(rs, 8, 2, 32), Draws(rs, 8, 2, 32)
    rng = np.random.default_rng(4)
    node = a.root
    for tokens in (512, 64, 64, 4097):
        node = a.child(node, tokens)
        ref = sample_loads(rs, tokens, 8, 2, 32, rng, num_samples=3)
        assert np.array_equal(node.loads, ref)
    assert a.child(a.root, 512) is a.child(a.root, 512)
    assert np.array_equal(b.child(b.child(b.root, 512), 64).loads,
                          a.child(a.child(a.root, 512), 64).loads)


@pytest.mark.parametrize("framework", ["vllm", "sglang"])
@pytest.mark.parametrize("samples", [1, 2, 3, 9])
def test_serving_times_rows_equal_serving_times_bit_for_bit(framework, samples):
    """The drawn-routing fast path's ``serving_times_rows`` / ``benchmark_means_rows`` (all
    points of a group at once) give exactly what ``serving_times`` / ``benchmark_means`` give
    point by point (mixed batching or not, chunked prompts, queueing, first waves)."""
    from moesim.analytic import (benchmark_means, benchmark_means_rows, serving_times,
                                 serving_times_rows, steady_state)
    from moesim.sweep import _step_key

    rng = np.random.default_rng(samples)
    times: dict = {}

    def time_of(b):
        k = _step_key(b)
        if k not in times:
            times[k] = rng.uniform(10.0, 5e4, samples)
        return times[k]

    workloads = [{"batch_size": bs, "input_len": isl, "output_len": osl, **extra}
                 for bs in (1, 7, 256, 2048) for isl in (64, 3000, 16384) for osl in (1, 33, 4096)
                 for extra in ({}, {"num_requests": 4096})]
    scs = [parse_scenario({"model": "mixtral-8x7b", "hardware": {"profile": "h100_sxm",
                                                                "num_gpus": 2},
                           "deployment": {"tp": 2, "framework": framework}, "workload": wl})
           for wl in workloads]
    mixed = bool(scs[0].framework.mixed_batching.value)
    states = [steady_state(sc) for sc in scs]
    fw_ttft = rng.uniform(1.0, 1e3, (len(scs), samples))
    fw_prefill = rng.uniform(1.0, 1e3, (len(scs), samples))
    ref = []
    for i, (sc, ss) in enumerate(zip(scs, states)):
        served = serving_times(sc, ss, time_of, 0.0)
        ref.append((served,) + benchmark_means(sc, served, fw_ttft[i], fw_prefill[i]))
    P, M = len(scs), max(len(ss.mixes) for ss in states)
    C = max(len(ss.ttft_mixes) for ss in states)
    t_dec = np.stack([time_of(ss.decode) for ss in states])
    carry, own = np.zeros((P, M, samples)), np.zeros((P, C, samples))
    w = np.zeros((P, M))

    def carrying(d, p):
        from moesim.step import Batch
        return time_of(Batch(d.phase, d.num_seqs, d.new_tokens, d.context, p)) if mixed \
            else time_of(p)

    for i, ss in enumerate(states):
        for j, (p, wj) in enumerate(ss.mixes):
            carry[i, j] = carrying(ss.decode, p) + (0.0 if mixed else t_dec[i])
            w[i, j] = wj
        for j, p in enumerate(ss.ttft_mixes):
            own[i, j] = carrying(ss.decode, p)
    share = np.array([sum(wj for _, wj in ss.mixes) for ss in states])
    fw = scs[0].framework
    wait = np.array([fw.overlap_scheduler.value + ss.queue_iterations for ss in states])
    num = np.array([sc.deployment.attention_dp * ss.prompts_per_iteration
                    * sc.workload.output_len for sc, ss in zip(scs, states)])
    ttft, tpot, thr = serving_times_rows(t_dec, carry, w, own, share, wait, num, 1.0,
                                         fw.request_overhead_us.value)
    first = np.array([sc.workload.batch_size / sc.workload.num_requests
                      if sc.workload.num_requests else np.nan for sc in scs])
    osl = np.array([sc.workload.output_len for sc in scs])
    bt, bp = benchmark_means_rows(ttft, tpot, fw_ttft, fw_prefill, first, osl)
    for i, (served, rt, rp) in enumerate(ref):
        assert np.array_equal(ttft[i], served.ttft_ms) and np.array_equal(tpot[i], served.tpot_ms)
        assert thr[i] == served.throughput_output_tok_per_s
        assert share[i] == served.mixed_fraction
        assert np.array_equal(bt[i], rt) and np.array_equal(bp[i], rp)
        assert (np.add.reduce(bt, axis=1)[i] / samples) == float(np.add.reduce(rt)) / samples
