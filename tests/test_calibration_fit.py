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
