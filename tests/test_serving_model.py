"""The closed loop's steady state (analytic.steady_state / serving_times), mixed prefill-decode
steps, speculative decoding and benchmark-run means: each checked against the arithmetic it
claims, and against the direction a serving engineer expects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moesim import parse_scenario, predict
from moesim.analytic import steady_state
from moesim.spec.workload import Speculative
from moesim.step import Batch, build_step

from .conftest import EXAMPLES

MIXTRAL = next(p for p in EXAMPLES if p.stem.startswith("mixtral"))


def _sc(framework: str = "vllm", **workload):
    d = json.loads(MIXTRAL.read_text())
    d["workload"] = {"batch_size": 16, "input_len": 512, "output_len": 128, **workload}
    d["deployment"]["framework"] = framework
    return parse_scenario(d, base_dir=MIXTRAL.parent)


def _framework(sc, **values):
    fw = sc.framework
    upd = {k: getattr(fw, k).model_copy(update={"value": v}) for k, v in values.items()}
    return sc.model_copy(update={"framework": fw.model_copy(update=upd)})


def test_steady_state_arithmetic():
    """Little's law in iterations: 16 requests living 1 prefill + 127 decode iterations admit
    16 / 128 prompts per iteration; each rides in one decode step (one chunk fits the budget)."""
    ss = steady_state(_sc())
    assert ss.decode == Batch("decode", 16, 1, 512 + 128 / 2.0)
    assert ss.prompts_per_iteration == pytest.approx(16 / 128)
    assert len(ss.mixes) == 1
    chunk, share = ss.mixes[0]
    assert chunk == Batch("prefill", 1, 512, 0.0) and share == pytest.approx(16 / 128)
    assert ss.ttft_mixes == [chunk] and ss.queued_requests == 0


def test_long_prompt_is_chunked_by_the_budget_left_by_decodes():
    sc = _sc(batch_size=8, input_len=20_000, output_len=64)
    ss = steady_state(sc)
    room = sc.max_num_batched_tokens - 8
    assert [b.new_tokens for b in ss.ttft_mixes] == \
        [room] * (20_000 // room) + [20_000 % room]
    assert [b.context for b in ss.ttft_mixes][:2] == [0.0, float(room)]


def test_tpot_is_the_weighted_mean_of_decode_and_mixed_steps():
    """With overheads fixed, TPOT = (1 - f) T_decode + f T_mixed, recomputed by hand."""
    sc = _sc()
    p = predict(sc)
    ss = steady_state(sc)
    t_dec = build_step(sc, ss.decode).time_us
    from dataclasses import replace
    (chunk, f), = ss.mixes
    t_mix = build_step(sc, replace(ss.decode, prefill=chunk)).time_us
    assert p.tpot_ms * 1e3 == pytest.approx((1 - f) * t_dec + f * t_mix, rel=1e-12)
    # TTFT: request overhead + one iteration of scheduling ahead + its own mixed step.
    fw = sc.framework
    mean = (1 - f) * t_dec + f * t_mix
    expect = fw.request_overhead_us.value + fw.overlap_scheduler.value * mean + t_mix
    assert p.ttft_ms * 1e3 == pytest.approx(expect, rel=1e-12)


def test_mixed_step_shares_the_weights_a_separate_prefill_step_reloads():
    """A prefill chunk riding in a decode step costs less than the same chunk in a step of its
    own next to the decode step (engines without mixed batching stall the decodes)."""
    mixed = _framework(_sc(), mixed_batching=1.0)
    alone = _framework(_sc(), mixed_batching=0.0)
    assert predict(mixed).tpot_ms < predict(alone).tpot_ms


def test_longer_prompts_slow_the_decodes_they_interrupt():
    """The measured effect (e2e_serving.csv, TRT-LLM Qwen3 batch 128: TPOT 33 -> 70 ms from
    isl 128 to 1024): prefill work rides in decode steps."""
    t = [predict(_sc(batch_size=64, input_len=isl)).tpot_ms for isl in (128, 1024, 4096)]
    assert t[0] < t[1] < t[2]
    assert t[2] > 1.5 * t[0]


def test_prefill_limited_loop_queues_and_warns():
    """Many long prompts and short outputs: more prompts finish per step than the token budget
    can admit; the closed loop's surplus waits and TTFT shows it."""
    sc = _sc(batch_size=256, input_len=4096, output_len=8)
    ss = steady_state(sc)
    assert ss.queued_requests > 0
    p = predict(sc)
    assert p.queued_requests > 0
    assert any("prefill-limited" in w for w in p.warnings)
    few = predict(_sc(batch_size=32, input_len=4096, output_len=8))
    assert p.ttft_ms > 3 * few.ttft_ms


def test_benchmark_run_means_sit_between_first_wave_and_steady_state():
    steady = predict(_sc())
    run = predict(_sc(num_requests=160))
    one_wave = predict(_sc(num_requests=16))
    assert one_wave.ttft_ms == pytest.approx(one_wave.ttft_ms_first_wave, rel=1e-12)
    assert steady.ttft_ms < run.ttft_ms < one_wave.ttft_ms
    first = 16 / 160
    assert run.ttft_ms == pytest.approx(first * run.ttft_ms_first_wave
                                        + (1 - first) * steady.ttft_ms, rel=1e-12)


def test_num_requests_below_batch_is_rejected():
    from moesim.errors import InputError

    with pytest.raises(InputError, match="num_requests"):
        _sc(num_requests=4)


def test_speculative_tokens_per_step_formula():
    s = Speculative(num_draft_tokens=3, acceptance_rate=0.7)
    assert s.tokens_per_step == pytest.approx(1 + 0.7 + 0.49 + 0.343)


def test_speculative_decoding_at_batch_one_is_faster_and_priced_as_verify_plus_draft():
    """Batch 1 decode of a dense model is weight-bound: verifying 4 tokens costs about one step
    and ~2.5 tokens come out of it; ngram drafting is free, MTP pays one layer + head per
    drafted token. (An MoE model can lose: 4 tokens read up to 4x the experts of one.)"""
    def sc(**wl):
        d = json.loads(MIXTRAL.read_text())
        d["model"] = "Qwen/Qwen3-32B"
        d["workload"] = {"batch_size": 1, "input_len": 512, "output_len": 256, **wl}
        return parse_scenario(d, base_dir=MIXTRAL.parent)

    base = predict(sc())
    spec = {"num_draft_tokens": 3, "acceptance_rate": 0.7}
    ngram = predict(sc(speculative={**spec, "method": "ngram"}))
    mtp = predict(sc(speculative={**spec, "method": "mtp"}))
    assert ngram.tpot_ms < mtp.tpot_ms < base.tpot_ms
    assert ngram.tpot_ms < 0.6 * base.tpot_ms
    assert ngram.decode_step.batch.new_tokens == 4
    g = Speculative(**spec).tokens_per_step
    # TPOT * g is the mean iteration time; the verify step alone bounds it from below.
    assert ngram.tpot_ms * g * 1e3 >= ngram.decode_step.time_us * (1 - 1e-12)


def test_uniform_routing_touches_fewer_experts_than_balanced_at_small_batch():
    """At 16 tokens x top-2 over 8 experts a balanced split touches all 8; uniform random
    routing leaves some idle (expected distinct 8 (1 - (1 - 2/8)^16) = 7.92) — and for
    fine-grained experts much more so."""
    d = json.loads(MIXTRAL.read_text())
    d["model"] = "Qwen/Qwen3-30B-A3B"
    d["hardware"] = {"profile": "h100_sxm", "num_gpus": 1}
    d["deployment"] = {"tp": 1}
    d["workload"] = {"batch_size": 8, "input_len": 512, "output_len": 128}
    bal = predict(parse_scenario(d, base_dir=MIXTRAL.parent))
    d["routing"] = {"distribution": "uniform", "samples": 4}
    uni = predict(parse_scenario(d, base_dir=MIXTRAL.parent))
    e, k, t = 128, 8, 8
    expect = e * (1 - (1 - k / e) ** t)
    assert uni.decode_step.moe_stats["moe"].distinct_experts == pytest.approx(expect, rel=0.05)
    assert bal.decode_step.moe_stats["moe"].distinct_experts == t * k
    assert uni.decode_step.time_us < bal.decode_step.time_us


def test_framework_fit_recovers_known_overheads():
    """calibration.fit_framework's least squares on synthetic rows made from known overheads
    (plus one wild row the robust loss must shrug off) gives them back, also when the start
    sits on the zero bound."""
    from calibration.fit_framework import Linearised, fit_lines

    rng = np.random.default_rng(0)
    s_true, o_true = 900.0, 40_000.0
    rows = []
    for _ in range(40):
        t0, dt, p0, dp = rng.uniform(20, 200), rng.uniform(1e-3, 5e-3), rng.uniform(3, 30), 1e-3
        rows.append(Linearised((t0, dt, 1e-3), (p0, dp), t0 + dt * s_true + o_true / 1e3,
                               p0 + dp * s_true))
    rows.append(Linearised((50.0, 1e-3, 1e-3), (5.0, 1e-3), 5e4, 60.0))  # queue-limited row
    for start in (0.0, 2000.0):
        x = fit_lines(rows, start)
        assert x[0] == pytest.approx(s_true, rel=0.02)
        assert x[1] == pytest.approx(o_true, rel=0.02)


def test_framework_fit_picks_the_traffic_skew_with_the_lowest_loss(tmp_path, monkeypatch):
    """fit-framework's grid over the traffic's zipf exponent keeps the value whose rows the
    overheads explain best, and writes it (with the losses) to the traffic file only."""
    from calibration import fit_framework as ff
    from moesim import validate

    rng = np.random.default_rng(1)
    s_true, o_true, skew_true = 500.0, 30_000.0, 0.5

    def lines(rows, start_us, zipf_s, w4=None):
        # TPOT's intercept moves with the skew: only skew_true makes the rows consistent.
        out = []
        for _ in rows:
            t0, p0 = rng.uniform(20, 200), rng.uniform(3, 30)
            bias = 1.0 + 0.4 * abs(zipf_s - skew_true)
            out.append(ff.Linearised((t0, 2e-3, 1e-3), (p0 * bias, 1e-3),
                                     t0 + 2e-3 * s_true + o_true / 1e3, p0 + 1e-3 * s_true))
        return out

    table = tmp_path / "e2e.csv"
    table.write_text("backend,isl\nvllm,1\n" + "vllm,1\n" * 29)
    traffic = tmp_path / "e2e_traffic.yaml"
    traffic.write_text("# header kept\nrouting_zipf_s: {value: 0.0, kind: estimate, source: x}\n")
    written = {}
    monkeypatch.setattr(ff, "linearise_all", lines)
    monkeypatch.setattr(ff, "write_framework", lambda path, fit, t, b: written.update({b: fit}))
    monkeypatch.setattr(validate, "E2E_TRAFFIC_FILE", traffic)
    report = ff.run(table, zipf_grid=(0.0, 0.5, 1.0))
    assert report["traffic"]["zipf_s"] == 0.5
    assert written["vllm"]["step_overhead_us"] == pytest.approx(s_true, rel=0.05)
    text = traffic.read_text()
    assert text.startswith("# header kept\n") and "value: 0.5" in text and "s=1: " in text
    validate.e2e_traffic_zipf_s.cache_clear()
