"""The discrete-event simulator (issue 6): the step simulation reproduces the closed form's step
when nothing overlaps, the serving simulation reproduces the closed form's TPOT in its closed
loop, Little's law holds on the simulated queue, runs are reproducible, and bad input is one
line."""

from __future__ import annotations

import json
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import InputError, load_scenario, parse_scenario, predict
from moesim.des import OverlapSpec, PlanBuilder, closed_form, simulate, simulate_step
from moesim.spec.simulation import SimulationSpec, parse_simulation
from moesim.des.step_sim import Fabric, step_plans
from moesim.routing import sample_loads
from moesim.step import Batch, build_step

from .conftest import ROOT

MIXTRAL = ROOT / "examples" / "mixtral-8x7b_2xh100_tp2.json"
DEEPSEEK = ROOT / "examples" / "deepseek-v3_8xh200_ep8_fp8.json"
QWEN = ROOT / "examples" / "qwen3-30b-a3b_1xh100.json"


@pytest.fixture(scope="module")
def mixtral():
    return load_scenario(MIXTRAL)


def _mixtral(**changes) -> object:
    d = json.loads(MIXTRAL.read_text())
    for k, v in changes.items():
        d[k] = v
    return parse_scenario(d, base_dir=MIXTRAL.parent)


def _small_moe(ep: int = 2, dp: int = 2, pp: int = 1, routing: dict | None = None):
    """Qwen3-30B-A3B on 2-4 GPUs with attention-DP + EP (dispatch/combine) — small enough for a
    quick simpy run, with straggling EP ranks under skewed routing."""
    d = json.loads(QWEN.read_text())
    d["hardware"] = {"profile": "h100_sxm", "num_gpus": dp * pp}
    d["deployment"] = {"tp": 1, "attention_dp": dp, "ep": ep, "moe_tp": 1, "pp": pp,
                       "framework": "sglang"}
    d["routing"] = routing or {"distribution": "balanced"}
    return parse_scenario(d, base_dir=QWEN.parent)


_EP_SCENARIO = _small_moe(routing={"distribution": "zipf", "s": 1.0, "seed": 0})
_EP_BUILDER = PlanBuilder(_EP_SCENARIO)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1.0)


# ---------------------------------------------------------------------------------------------
# step level
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [MIXTRAL, QWEN, DEEPSEEK], ids=lambda p: p.stem)
@pytest.mark.parametrize("batch", [Batch("decode", 16, 1, 900.0), Batch("prefill", 2, 700, 64.0)],
                         ids=["decode", "prefill"])
def test_step_equals_build_step_without_overlap(path, batch):
    """Overlap off, balanced routing: the simpy step and the closed form both equal the step
    model's serial sum."""
    sc = load_scenario(path)
    ref = build_step(sc, batch).time_us
    plan = PlanBuilder(sc).plan(batch)
    cf = closed_form(plan)
    sim = simulate_step([plan])
    assert _close(cf.time_us, ref) and _close(sim.time_us, ref)
    np.testing.assert_allclose(sim.compute_us, cf.compute_us, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(sim.comm_us, cf.comm_us, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(sim.wait_us, cf.wait_us, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("profile,seqs", [("b200", 1), ("h100_sxm", 256)])
def test_eager_steps_hide_launch_stalls_as_build_step_does(profile, seqs):
    """Without CUDA graphs the host dispatches every kernel: at batch 1 on a B200 the step is
    host-bound (host time > GPU time), at batch 256 the host runs ahead and hides its stalls.
    Both ways the simpy step and the closed form equal build_step, whose time is max(G, H)."""
    d = json.loads(QWEN.read_text())
    d["hardware"] = profile
    d["deployment"] = dict(d.get("deployment", {}), cuda_graphs=False)
    sc = parse_scenario(d, base_dir=QWEN.parent)
    b = Batch("decode", seqs, 1, 600.0)
    alone = build_step(sc, b, host_overlap=False)
    step = build_step(sc, b)
    host = sum(o.count * o.host_us for o in alone.ops)
    gpu = sum(o.count * (o.time_us if o.host_us else o.total_us) for o in alone.ops
              if o.category != "overhead")
    engine = sum(o.total_us for o in alone.ops if o.category == "overhead")
    assert _close(step.time_us, max(gpu, host) + engine)
    assert step.time_us < alone.time_us  # some stall is always hidden by a longer kernel
    assert (host > gpu) == (seqs == 1)
    plan = PlanBuilder(sc).plan(b)
    assert _close(closed_form(plan).time_us, step.time_us)
    assert _close(simulate_step([plan]).time_us, step.time_us)


def test_straggler_rank_sets_the_pace():
    """Skewed routing over EP ranks: the step still equals build_step (the slowest rank), and
    the other ranks' waiting at the combine barrier is their shortfall."""
    sc = _small_moe(routing={"distribution": "zipf", "s": 1.2, "seed": 3})
    m = sc.model
    b = Batch("decode", 32, 1, 500.0)
    loads = sample_loads(sc.routing, b.tokens * 2, m.moe.num_experts, m.moe.top_k,
                         m.num_moe_layers, np.random.default_rng(5))
    ref = build_step(sc, b, loads).time_us
    plan = PlanBuilder(sc).plan(b, loads)
    sim = simulate_step([plan])
    cf = closed_form(plan)
    assert _close(sim.time_us, ref) and _close(cf.time_us, ref)
    np.testing.assert_allclose(sim.wait_us, cf.wait_us, rtol=1e-9, atol=1e-6)
    assert sim.wait_us.max() > 0 and sim.wait_us.min() >= 0
    # a rank's busy + waiting never exceeds the step
    assert np.all(sim.compute_us + sim.comm_us + sim.wait_us <= sim.time_us * (1 + 1e-9))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phase=st.sampled_from(["decode", "prefill"]), seqs=st.integers(1, 24),
       tokens=st.integers(1, 300), ctx=st.integers(0, 2000), s=st.floats(0.0, 2.0),
       seed=st.integers(0, 2**16))
def test_any_routing_draw_equals_build_step(phase, seqs, tokens, ctx, s, seed):
    """Property: for any batch and any routing draw, simpy step == closed form == build_step,
    per-rank numbers included."""
    sc = _EP_SCENARIO
    m = sc.model
    b = Batch(phase, seqs, 1 if phase == "decode" else tokens, float(ctx))
    loads = sample_loads(sc.routing.model_copy(update={"s": s}), b.tokens * 2,
                         m.moe.num_experts, m.moe.top_k, m.num_moe_layers,
                         np.random.default_rng(seed))
    ref = build_step(sc, b, loads).time_us
    plan = _EP_BUILDER.plan(b, loads)
    sim, cf = simulate_step([plan]), closed_form(plan)
    assert _close(sim.time_us, ref) and _close(cf.time_us, ref)
    np.testing.assert_allclose(sim.wait_us, cf.wait_us, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(sim.compute_us, cf.compute_us, rtol=1e-9, atol=1e-6)


def test_tp_inside_attention_dp_groups():
    """tp=2 x attention_dp=4 with EP4 (moe_tp=2): TP all-reduces inside each group, dispatch /
    combine over all 8 GPUs; ranks of one EP rank share its straggling."""
    d = json.loads(MIXTRAL.read_text())
    d["hardware"] = {"profile": "h100_sxm", "num_gpus": 8}
    d["deployment"] = {"tp": 2, "attention_dp": 4, "ep": 4, "moe_tp": 2, "framework": "sglang"}
    d["routing"] = {"distribution": "zipf", "s": 1.0}
    sc = parse_scenario(d, base_dir=MIXTRAL.parent)
    m = sc.model
    b = Batch("decode", 16, 1, 500.0)
    loads = sample_loads(sc.routing, 16 * 4, m.moe.num_experts, m.moe.top_k, m.num_moe_layers,
                         np.random.default_rng(0))
    plan = PlanBuilder(sc).plan(b, loads)
    sim, cf = simulate_step([plan]), closed_form(plan)
    assert _close(sim.time_us, build_step(sc, b, loads).time_us)
    np.testing.assert_allclose(sim.wait_us, cf.wait_us, rtol=1e-9, atol=1e-6)
    assert sim.wait_us[0] == sim.wait_us[1] and sim.wait_us.max() > 0


def test_pipeline_stages_match_build_step():
    sc = _small_moe(ep=2, dp=2, pp=2)
    b = Batch("decode", 8, 1, 300.0)
    ref = build_step(sc, b).time_us
    plan = PlanBuilder(sc).plan(b)
    assert _close(simulate_step([plan]).time_us, ref) and _close(closed_form(plan).time_us, ref)


def test_overlap_only_hides_time():
    sc = _small_moe()
    pb = PlanBuilder(sc)
    b = Batch("prefill", 4, 512, 0.0)
    serial = closed_form(pb.plan(b)).time_us
    for ov in (OverlapSpec(shared_expert_dispatch=True), OverlapSpec(attention_combine=True)):
        t = simulate_step(step_plans(pb, b, ov), ov).time_us
        assert t <= serial * (1 + 1e-12)
    # two micro-batches: never slower than running them one after the other, never faster than
    # the longer one alone
    ov = OverlapSpec(two_batch=True)
    plans = step_plans(pb, b, ov)
    assert len(plans) == 2
    engine = plans[0].engine_us
    one_by_one = sum(closed_form(p).time_us - engine for p in plans) + engine
    longest = max(closed_form(p).time_us for p in plans)
    tbo = simulate_step(plans, ov).time_us
    assert longest * (1 - 1e-12) <= tbo < one_by_one


def test_fabric_shares_bandwidth():
    import simpy

    env = simpy.Environment()
    fab = Fabric(env)
    ends = {}

    def go(name, work, ports, delay=0.0):
        if delay:
            yield env.timeout(delay)
        yield fab.transfer(work, ports)
        ends[name] = env.now

    env.process(go("a", 10.0, ((0, "nvlink"), (1, "nvlink"))))
    env.process(go("b", 10.0, ((1, "nvlink"), (2, "nvlink"))))   # shares rank 1's port
    env.process(go("c", 10.0, ((3, "nvlink"),)))                  # alone
    env.run()
    assert ends["a"] == pytest.approx(20.0) and ends["b"] == pytest.approx(20.0)
    assert ends["c"] == pytest.approx(10.0)


# ---------------------------------------------------------------------------------------------
# serving level
# ---------------------------------------------------------------------------------------------

def test_single_request_is_the_sum_of_its_steps(mixtral):
    """One request, exact context pricing: its latency is the prefill step plus one decode step
    per further token, each exactly build_step's time."""
    r = simulate(mixtral, requests=1, sim={"arrival": {"concurrency": 1}, "input_len": 300,
                                           "output_len": 5, "context_bucket": 1})
    expect = build_step(mixtral, Batch("prefill", 1, 300, 0.0)).time_us
    expect += sum(build_step(mixtral, Batch("decode", 1, 1, 300.0 + j)).time_us
                  for j in range(4))
    assert r.metrics["e2e_ms_mean"] * 1e3 == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("batch,isl,osl", [(16, 512, 256), (32, 256, 128), (8, 1024, 64)])
def test_closed_loop_matches_closed_form(batch, isl, osl):
    """A benchmark of 10 x batch requests: the simulated run (all arriving at once, output
    lengths jittered +-25 % so the loop leaves lockstep, as real runs do) against the closed
    form's run means (first wave + steady state). The simulator schedules prefill-first without
    overlap or request overhead, so the framework is set to match."""
    sc = _mixtral(workload={"batch_size": batch, "input_len": isl, "output_len": osl,
                            "num_requests": 10 * batch})
    fw = sc.framework
    same = {k: getattr(fw, k).model_copy(update={"value": 0.0})
            for k in ("mixed_batching", "overlap_scheduler", "request_overhead_us")}
    sc = sc.model_copy(update={"framework": fw.model_copy(update=same)})
    p = predict(sc)
    r = simulate(sc, requests=10 * batch,
                 sim={"output_len": {"distribution": "uniform", "low": int(osl * 0.75),
                                     "high": int(osl * 1.25)}})
    assert r.metrics["requests_completed"] == 10 * batch
    assert r.metrics["tpot_ms_mean"] == pytest.approx(p.tpot_ms, rel=0.08)
    assert r.metrics["ttft_ms_mean"] == pytest.approx(p.ttft_ms, rel=0.08)
    # The steady state alone is far from the all-at-once first wave: the test can tell them apart.
    assert p.ttft_ms_first_wave > 3 * p.ttft_ms


def test_littles_law_on_the_simulated_queue(mixtral):
    """Poisson arrivals, a KV cache small enough to preempt: the time-average number waiting
    (and in the system), integrated by the simulator, equals arrival rate x mean time spent
    waiting (in the system) taken from the per-request records."""
    r = simulate(mixtral, requests=120, seed=4,
                 sim={"arrival": {"process": "poisson", "rate": 12.0},
                      "input_len": {"distribution": "uniform", "low": 64, "high": 1024},
                      "output_len": {"distribution": "lognormal", "mean": 80, "sigma": 0.8},
                      "num_gpu_blocks": 250, "max_num_seqs": 64, "context_bucket": 256})
    d = r.detail
    q = d["queue"]
    span_s = d["makespan_ms"] / 1e3
    lam = r.metrics["requests_completed"] / span_s
    recs = r.requests
    w_queue = np.mean([x.queue_ms for x in recs]) / 1e3
    w_system = np.mean([x.e2e_ms for x in recs]) / 1e3
    assert d["preemptions"] > 0
    assert q["waiting"]["mean"] == pytest.approx(lam * w_queue, rel=1e-6)
    assert q["in_system_mean"] == pytest.approx(lam * w_system, rel=1e-6)
    assert 0 < d["kv_cache"]["max_usage"] <= 1.0


def _key(res) -> str:
    d = res.to_dict()
    d.pop("wall_s")
    d["detail"].pop("wall_s")
    return json.dumps(d, sort_keys=True, default=str)


def test_same_seed_same_output_and_seed_matters():
    sc = _mixtral(routing={"distribution": "zipf", "s": 1.0, "seed": 0})
    sim = {"arrival": {"process": "poisson", "rate": 10.0}, "input_len": 256,
           "output_len": 8}
    a = simulate(sc, requests=12, seed=7, sim=sim)
    b = simulate(sc, requests=12, seed=7, sim=sim)
    c = simulate(sc, requests=12, seed=8, sim=sim)
    assert _key(a) == _key(b)
    assert _key(a) != _key(c)
    assert [x.arrival_ms for x in a.requests] != [x.arrival_ms for x in c.requests]
    # with identical (closed-loop) arrivals, only the routing draws differ between seeds
    closed = {"arrival": {"concurrency": 4}, "input_len": 256, "output_len": 8}
    d1 = simulate(sc, requests=4, seed=1, sim=closed)
    d2 = simulate(sc, requests=4, seed=2, sim=closed)
    assert d1.metrics["tpot_ms_mean"] != d2.metrics["tpot_ms_mean"]


def test_routing_pool_and_capacity_drops():
    sc = _mixtral(routing={"distribution": "zipf", "s": 1.5, "seed": 0, "capacity_factor": 1.0,
                           "overflow": "drop"})
    r = simulate(sc, requests=16, sim={"arrival": {"concurrency": 8}, "input_len": 128,
                                       "output_len": 16, "routing_pool": 4})
    rt = r.detail["routing"]
    assert rt["routing_pool"] == 4 and not rt["fresh_draw_per_step"]
    assert 0 < rt["dropped_fraction"] < 1


def test_chrome_trace(tmp_path, mixtral):
    out = tmp_path / "t.json"
    simulate(mixtral, requests=4, trace_path=out,
             sim={"arrival": {"concurrency": 2}, "input_len": 64, "output_len": 4,
                  "trace_steps": 2})
    doc = json.loads(out.read_text())
    ev = doc["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in ev if e["ph"] == "M"
             and e["name"] in ("process_name", "thread_name")}
    assert (1, "rank 0") in names and (2, "rank 1") in names and (1, "comm") in names
    ops = {e["name"] for e in ev if e["ph"] == "X" and e["pid"] == 1}
    assert {"experts", "attn_all_reduce", "moe_all_reduce"} <= ops
    assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")
    assert any(e["ph"] == "C" for e in ev) and any(e["ph"] == "b" for e in ev)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block,field", [
    ({"arrival": {"process": "poisson", "rate": 0}}, "simulation.arrival.rate"),
    ({"arrival": {"process": "poisson", "rate": -2.5}}, "simulation.arrival.rate"),
    ({"arrival": {"process": "poisson"}}, "simulation.arrival"),
    ({"input_len": -5}, "simulation.input_len"),
    ({"output_len": {"distribution": "uniform", "low": 10, "high": 5}}, "simulation.output_len"),
    ({"block_size": 0}, "simulation.block_size"),
    ({"bogus": 1}, "simulation.bogus"),
])
def test_bad_simulation_block_is_one_line(block, field):
    with pytest.raises(InputError) as exc:
        parse_simulation(block)
    msg = exc.value.one_line()
    assert "\n" not in msg and msg.startswith(field)


def test_bad_trace_files_are_one_line(tmp_path, mixtral):
    neg = tmp_path / "neg.csv"
    neg.write_text("arrival_s,input_len,output_len\n0.0,100,10\n0.5,-3,10\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,input_len,output_len\n0.0,abc,10\n")
    for path, words in ((tmp_path / "missing.csv", "cannot read"), (neg, "negative"),
                        (bad, "not a number")):
        with pytest.raises(InputError) as exc:
            simulate(mixtral, sim={"arrival": {"process": "trace", "trace_file": str(path)}})
        msg = exc.value.one_line()
        assert words in msg and "\n" not in msg


def test_trace_arrivals_drive_the_run(tmp_path, mixtral):
    tr = tmp_path / "arr.jsonl"
    tr.write_text("\n".join(json.dumps({"timestamp": 0.1 * i, "input_tokens": 100 + i,
                                        "output_tokens": 3}) for i in range(6)))
    r = simulate(mixtral, sim={"arrival": {"process": "trace", "trace_file": str(tr)}})
    assert r.metrics["requests_completed"] == 6
    assert [x.input_len for x in r.requests] == [100 + i for i in range(6)]
    assert r.requests[3].arrival_ms == pytest.approx(300.0)


def test_cli_bad_input_exits_2_with_one_line(capsys):
    from moesim.cli import main

    for argv in (["--rate", "-1"], ["--arrivals", "/nonexistent/trace.csv"],
                 ["--input-len", "-5"], ["--rate", "2", "--concurrency", "3"]):
        assert main(["simulate", str(MIXTRAL), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_cli_json_keys(tmp_path):
    from moesim.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["simulate", str(MIXTRAL), "--json", "--requests", "8", "--concurrency", "4",
                   "--input-len", "128", "--output-len", "8", "--seed", "3"])
    assert rc == 0
    out = json.loads(buf.getvalue())
    for q in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for s in ("mean", "p50", "p90", "p99"):
            assert f"{q}_{s}" in out
    assert out["requests_completed"] == 8 and out["throughput_output_tok_per_s"] > 0
    det = out["detail"]
    assert {"gpu", "queue", "kv_cache", "routing"} <= det.keys()
    assert len(det["gpu"]["busy_fraction"]) == 2 and len(det["gpu"]["waiting_ms"]) == 2


def test_simulation_spec_defaults_follow_the_scenario(mixtral):
    spec = SimulationSpec()
    assert spec.arrival.process == "closed_loop" and spec.overlap.any is False
    r = simulate(mixtral, requests=32)
    assert r.detail["settings"]["concurrency"] == mixtral.workload.batch_size
    assert {x.input_len for x in r.requests} == {mixtral.workload.input_len}
