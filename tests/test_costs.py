"""Op costs: the vectorised MoE pricing is the per-op pricing, and costs move the right way."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costs.gemm import gemm, linear
from moesim.costs.moe import expert_ops, fused_expert_us
from moesim.spec.hardware import load_profile

HW = load_profile("h100_sxm")


@pytest.mark.parametrize("act,w", [("bf16", "bf16"), ("fp8", "fp8_block")])
@pytest.mark.parametrize("tokens", [1, 37, 512, 9000])
def test_rank_vector_equals_op_list(act, w, tokens):
    rng = np.random.default_rng(tokens)
    loads = rng.integers(0, max(2, tokens // 4), size=(8, 32))
    loads[0, :] = 0  # an idle rank
    tokens_in = np.array([tokens] * 4 + [max(1, tokens // 2)] * 4)
    vec = fused_expert_us(loads, tokens_in, 8, 2048, 768, HW, w, act)
    for r in range(8):
        ops = expert_ops(loads[r], int(tokens_in[r]), 8, 2048, 768, HW, w, act)
        assert vec[r] == pytest.approx(sum(o.total_us for o in ops), rel=1e-12)


def test_padding_and_untouched_experts():
    one = expert_ops(np.array([1, 0, 0, 0]), 1, 1, 4096, 14336, HW, "bf16", "bf16")
    four = expert_ops(np.array([1, 1, 1, 1]), 4, 1, 4096, 14336, HW, "bf16", "bf16")
    up = lambda ops: next(o for o in ops if o.name == "experts_up")
    # Decode: weight streaming grows with the experts touched, not with the tokens.
    assert up(four).bytes == pytest.approx(4 * up(one).bytes, rel=0.01)
    assert up(four).bound == "memory"


def test_fp8_linear_adds_quantisation_and_is_faster_when_large():
    bf = linear("x", 8192, 8192, 8192, HW, "bf16", "bf16")
    f8 = linear("x", 8192, 8192, 8192, HW, "fp8", "fp8")
    assert len(bf) == 1 and len(f8) == 2 and f8[0].name == "x_quant"
    assert sum(o.total_us for o in f8) < sum(o.total_us for o in bf)


def test_split_k_when_few_output_tiles():
    # 1 x 128 output tiles but a huge K: split-K keeps every SM busy, so compute time stays
    # at the whole GPU's rate rather than one SM's.
    op = gemm("x", 64, 128, 65536, HW)
    assert op.ideal_compute_us < 2.0 * 64 * 128 * 65536 / (HW.peak_flops_per_us("bf16") / 132) / 10
