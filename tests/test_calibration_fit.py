"""The fitter identifies the cost model's structural terms: synthetic tables generated from known
parameters are fitted back to them (no GPU, no reference data needed)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.fit import Ops, fit_families, predict_rows, profile_params
from moesim.costs.comm import all_gather
from moesim.costs.gemm import linear
from moesim.spec.hardware import load_profile

BASE = load_profile("h100_sxm", calibrated=False)


def _ops_and_truth(rows, make, truth):
    """Ops of ``rows`` priced by ``make`` and 'measured' with the parameters ``truth``."""
    ops_list = [make(*r) for r in rows]
    ops = Ops.from_lists(ops_list, np.ones(len(rows)))
    params = profile_params(BASE)
    for fam, vals in truth.items():
        params[fam].update(vals)
    ops.measured = predict_rows(ops, params)
    return ops


def test_two_protocol_collective_is_recovered():
    truth = {"all_gather": {"t0_us": 20.0, "memory_efficiency": 0.66, "step_us": 0.8,
                            "ll_latency_us": 5.0, "ll_bus_efficiency": 0.27}}
    rows = [(s, n) for n in (2, 4, 8) for s in 2 ** np.arange(9, 30)]
    ops = _ops_and_truth(rows, lambda s, n: [all_gather("ag", float(s), n, BASE)], truth)
    fitted, stats = fit_families(ops, profile_params(BASE), ("all_gather",))
    assert stats["median_ape_pct"] < 0.5
    for name, v in truth["all_gather"].items():
        assert fitted["all_gather"][name] == pytest.approx(v, rel=0.05), name


def test_fp8_quant_atomics_are_recovered():
    truth = {"quant_fp8": {"t0_us": 1.2, "memory_efficiency": 0.7, "step_us": 0.006}}
    rows = [(m, k) for m in (1, 64, 512, 4096, 16384, 32768) for k in (32, 1024, 16384)]
    ops = _ops_and_truth(rows, lambda m, k: linear("x", m, 4096, k, BASE, "fp8", "fp8")[:1],
                         truth)
    fitted, stats = fit_families(ops, profile_params(BASE), ("quant_fp8",))
    for name, v in truth["quant_fp8"].items():
        assert fitted["quant_fp8"][name] == pytest.approx(v, rel=0.05), name


def test_attention_decode_wave_and_key_chain_terms_are_recovered():
    from moesim.costs.attention import decode

    truth = {"attention_decode": {"t0_us": 9.0, "compute_efficiency": 0.3,
                                  "memory_efficiency": 0.85, "host_floor_us": 11.0,
                                  "step_us": 2.0, "k_latency_us": 1.5}}
    rows = [(b, kv, kvh) for b in 2 ** np.arange(0, 12) for kv in 2 ** np.arange(0, 18, 2)
            for kvh in (1, 8) if b * kv <= 1 << 22]
    ops = _ops_and_truth(rows, lambda b, kv, kvh: [decode(int(b), int(kv), 32, kvh, 128, 128,
                                                          BASE)], truth)
    fitted, stats = fit_families(ops, profile_params(BASE), ("attention_decode",))
    assert stats["median_ape_pct"] < 0.5
    for name in ("step_us", "k_latency_us", "memory_efficiency"):
        assert fitted["attention_decode"][name] == pytest.approx(
            truth["attention_decode"][name], rel=0.05), name


def test_fit_ops_do_not_depend_on_the_overlay_being_refitted(tmp_path, monkeypatch):
    """``calibration fit`` builds its ops on the base profile: an overlay next to it (the
    previous fit) changes neither the ops nor, for moe rows, which routing draw is the median
    one. Before, a refit moved with the overlay it replaced (3rd-4th digit)."""
    import shutil
    from pathlib import Path

    import yaml

    from calibration.fit import load_ops
    from moesim.validate import table_ops

    root = Path(__file__).resolve().parents[1] / "hardware_profiles"
    plain, overlaid = tmp_path / "plain", tmp_path / "overlaid"
    for d in (plain, overlaid):
        d.mkdir()
        shutil.copy(root / "h100_sxm.yaml", d / "h100_sxm.yaml")
    src = {"source": "test", "kind": "calibrated"}
    (overlaid / "h100_sxm.calibrated.yaml").write_text(yaml.safe_dump({"kernels": {
        "moe_bf16": {"t0_us": dict(src, value=40.0), "memory_efficiency": dict(src, value=0.2),
                     "compute_efficiency": dict(src, value=0.1)}}}))
    table = tmp_path / "moe.csv"
    head = ("system,gpu,framework,framework_version,kernel,dtype,num_tokens,hidden_size,"
            "inter_size,num_experts,topk,moe_tp,moe_ep,distribution,latency_us\n")
    rows = [f"h100_sxm,H100,VLLM,0.24.0,vllm_moe_triton,bfloat16,{t},2048,768,64,6,1,1,{d},50.0\n"
            for t in (1, 16, 256, 4096) for d in ("balanced", "power_law_1.2")]
    table.write_text(head + "".join(rows))

    def fields(ops_list):
        return [[(o.name, o.bytes, o.flops, o.steps, o.k_loop, o.time_us) for o in ops]
                for ops in ops_list]

    ref = fields(table_ops(str(table), str(plain / "h100_sxm.yaml"))[2])
    seen = fields(table_ops(str(table), str(overlaid / "h100_sxm.yaml"))[2])
    assert seen != ref  # the overlay is there and validate uses it
    got = load_ops(table, str(overlaid / "h100_sxm.yaml"))
    again = load_ops(table, str(plain / "h100_sxm.yaml"))
    assert got[0] == "moe" and len(got[1]) == len(rows)
    for name in ("row", "ideal_c", "ideal_m", "steps", "k_loop", "measured"):
        np.testing.assert_array_equal(getattr(got[2], name), getattr(again[2], name), name)
    # which draw is a moe row's median one depends on the prices: load_ops must ask for the base
    import calibration.fit as fit_mod

    asked = []
    monkeypatch.setattr(fit_mod, "table_ops",
                        lambda *a, **k: asked.append(k) or table_ops(*a, **k))
    load_ops(table, str(overlaid / "h100_sxm.yaml"))
    assert asked == [{"calibrated": False}]
    assert fields(table_ops(str(table), str(overlaid / "h100_sxm.yaml"), calibrated=False)[2]) \
        == ref
