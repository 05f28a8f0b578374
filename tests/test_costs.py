"""Op costs: the vectorised MoE pricing is the per-op pricing, and costs move the right way."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.costs.gemm import gemm, linear
from moesim.costs.moe import expert_ops, fused_expert_us
from moesim.costs.op import kernel_time_us
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


def test_cutlass_fp8_does_not_split_k():
    # vLLM's CUTLASS fp8 GEMM has a data-parallel tile scheduler: a thin GEMM walks all of K on
    # one SM (the reference table: m=1, n=32, k=65536 takes ~50 µs against cuBLAS bf16's ~7).
    bf = gemm("x", 1, 32, 65536, HW)
    f8 = gemm("x", 1, 32, 65536, HW, "fp8", "fp8")
    assert f8.ideal_compute_us > 5 * bf.ideal_compute_us
    # Its tile doubles from 64 to 128 rows past m = 64, so one tile's K loop costs twice as much.
    assert gemm("x", 65, 32, 65536, HW, "fp8", "fp8").ideal_compute_us == \
        pytest.approx(2 * gemm("x", 64, 32, 65536, HW, "fp8", "fp8").ideal_compute_us)


def test_per_tensor_fp8_quant_serialises_one_atomic_per_row():
    # The dynamic per-tensor scale ends every row's block in an atomicMax on one float: the
    # quantisation op carries m serialised steps, block-scaled quantisation none.
    fit = HW.kernels.quant_fp8
    assert fit is not None and fit.step_us is not None and fit.step_us.value > 0
    q = lambda m, w: linear("x", m, 32, 64, HW, w, "fp8")[0]
    assert q(16384, "fp8").steps == 16384 and q(16384, "fp8_block").steps == 0
    # At k = 64 the bytes are negligible: doubling the rows adds m atomics' time and m more
    # latency-bound row passes (one pass per row below chunk_elems).
    extra = q(16384, "fp8").time_us - q(8192, "fp8").time_us
    assert extra == pytest.approx(8192 * (fit.step_us.value + fit.k_latency_us.value / 1024),
                                  rel=0.05)


def test_per_tensor_fp8_quant_walks_rows_in_passes():
    # One block per row walks it in passes of chunk_elems (the reference table's time steps at
    # k = 2048 -> 2560): the passes are latency-bound steps that overlap the HBM streaming.
    fit = HW.kernels.quant_fp8
    chunk = int(fit.chunk_elems.value)
    q = lambda m, k: linear("x", m, 128, k, HW, "fp8", "fp8")[0]
    assert q(4096, chunk).k_loop == 4096 and q(4096, chunk + 1).k_loop == 2 * 4096
    assert linear("x", 4096, 128, chunk + 1, HW, "fp8_block", "fp8")[0].k_loop == 0
    m, k = 32768, chunk + 512  # two passes per row: latency bound, not bandwidth bound
    t_k = fit.k_latency_us.value * m * 2 / 1024
    t_m = q(m, k).bytes / (HW.hbm_peak_bytes_per_us * fit.memory_efficiency.value)
    assert t_k > t_m
    assert q(m, k).time_us == pytest.approx(2 * fit.t0_us.value + m * fit.step_us.value + t_k)


def test_kernel_time_combines_terms():
    from moesim.costs.op import kernel_time_us

    # No exponent: the roofline's max; an exponent p: the p-norm, between max and sum.
    assert kernel_time_us(1.0, 0.5, 0.5, 2.0, 1.0) == pytest.approx(1.0 + 4.0)
    t = kernel_time_us(1.0, 0.5, 0.5, 2.0, 1.0, overlap_exponent=2.0)
    assert t == pytest.approx(1.0 + (16.0 + 4.0) ** 0.5)
    # The K-loop latency grows with K only until the library splits K.
    k = lambda kk: kernel_time_us(0.0, 1.0, 1.0, 0.0, 0.0, k_loop=kk, k_latency_us=1.0,
                                  k_split_above=2048.0)
    assert k(1024) == pytest.approx(1.0) and k(2048) == k(65536) == pytest.approx(2.0)
    # Works element-wise on arrays (calibration evaluates whole tables at once).
    arr = kernel_time_us(0.0, 1.0, 1.0, np.array([1.0, 3.0]), np.array([2.0, 1.0]),
                         overlap_exponent=1.0)
    assert arr == pytest.approx([3.0, 4.0])


def test_thin_bf16_gemm_is_k_loop_latency_bound():
    # cuBLAS bf16, one output tile: time grows with K until split-K (reference table: m=1, n=32
    # goes 2.6 -> 5.0 µs from k=32 to k=2048, then stays ~5.6 µs up to k=16384).
    fit = HW.kernels.gemm_bf16
    assert fit.k_latency_us is not None and fit.k_split_above is not None
    t = {k: gemm("x", 1, 32, k, HW).time_us for k in (32, 2048, 16384)}
    assert t[2048] > 1.5 * t[32]
    assert t[16384] < 1.3 * t[2048]


def test_collective_takes_the_faster_protocol():
    from moesim.costs.comm import all_gather

    fit = HW.collectives.all_gather
    assert fit.ll_latency_us is not None and fit.ll_bus_efficiency is not None
    # Small messages: the low-latency protocol's shorter latency; large: Simple's bandwidth.
    assert fit.ll_latency_us.value < fit.latency_us.value
    assert fit.ll_bus_efficiency.value < fit.bus_efficiency.value
    bw = HW.interconnect.nvlink_gb_per_s_per_direction.value * 1e3
    for size in (512, 1 << 20, 1 << 29):
        moved = 7 / 8 * size
        steps = 7 * (fit.latency_per_step_us.value if fit.latency_per_step_us else 0.0)
        simple = fit.latency_us.value + steps + moved / (bw * fit.bus_efficiency.value)
        ll = fit.ll_latency_us.value + steps + moved / (bw * fit.ll_bus_efficiency.value)
        assert all_gather("ag", size, 8, HW).time_us == pytest.approx(min(simple, ll))
    assert all_gather("ag", 512, 8, HW).time_us < fit.latency_us.value


def test_fp8_kv_cache_attention_has_its_own_family():
    from moesim.costs.attention import decode, prefill

    assert prefill(1, 4096, 0, 32, 8, 128, 128, HW, "fp8").family == "attention_prefill_fp8"
    assert decode(8, 4096, 32, 8, 128, 128, HW, "fp8").family == "attention_decode_fp8"
    assert decode(8, 4096, 32, 8, 128, 128, HW, "bf16").family == "attention_decode"
    # A GPU without fp8 kernels prices an fp8 cache with the bf16 family.
    a100 = load_profile("a100_sxm")
    assert decode(8, 4096, 32, 8, 128, 128, a100, "fp8").family == "attention_decode"


def test_fa3_split_kv_heuristic():
    from moesim.costs.attention import fa3_splits

    # 8 tiles (one sequence, 8 KV heads) over 512 key blocks: the fewest splits within 85 % of
    # the best wave efficiency on 132 SMs is 15 (120 CTAs); tiles filling 80 % of the SMs, or
    # tiles of at most 4 key blocks, are never split.
    assert fa3_splits(8, 512, 132) == 15
    assert fa3_splits(128, 512, 132) == 1
    assert fa3_splits(8, 4, 132) == 1
    assert list(fa3_splits([8, 128], [512, 512], 132)) == [15, 1]


def test_attention_cta_waves_and_key_chain():
    from moesim.costs.attention import decode, prefill

    sms = int(HW.compute.sm_count.value)
    # Decode of many short sequences: one CTA per (sequence, KV head), each wave a step.
    many = decode(2048, 2, 32, 8, 128, 128, HW)
    assert many.steps == -(-2048 * 8 // sms)
    assert decode(1024, 2, 32, 8, 128, 128, HW).steps == -(-1024 * 8 // sms)
    # One long sequence is split over the SMs: each CTA walks 1/15 of the 512 key blocks, each
    # key 128 + 128 K and V values.
    long = decode(1, 65536, 32, 8, 128, 128, HW)
    assert long.steps == 1 and long.k_loop == 128 * 35 * 256
    # A sliding window that does not start on a block boundary straddles two blocks.
    assert decode(1, 1000, 32, 8, 128, 128, HW, window=128).k_loop == 2 * 128 * 256
    assert decode(1, 1024, 32, 8, 128, 128, HW, window=128).k_loop == 1 * 128 * 256
    # Prefill of single-token sequences with 64 KV heads (no GQA packing): a tile per
    # (sequence, head), so waves of near-empty tiles, and their 128-row padding in the
    # matmuls and in the softmax's exponentials (special-function peak); 8192 tiles on 132
    # SMs take 63 whole waves, each one tile's time on one SM.
    pre = prefill(128, 1, 0, 64, 64, 128, 128, HW)
    waves = -(-128 * 64 // sms)
    assert pre.steps == waves and pre.k_loop == 128 * 256 * waves
    exp_rate = HW.compute.peak_exp_tops.value * 1e6  # per µs
    tile_us = 2.0 * 128 * 128 * 256 / HW.peak_flops_per_us("bf16") + 128 * 128 / exp_rate
    assert pre.ideal_compute_us == pytest.approx(waves * sms * tile_us)
    # One head, one long sequence: 128 causal tiles, one wave; the last tile walks all 128
    # key blocks on one SM, far longer than the whole work spread over 132 SMs.
    one = prefill(1, 16384, 0, 1, 1, 128, 128, HW)
    assert one.ideal_compute_us == pytest.approx(128 * sms * tile_us)
    # The calibrated H100 profile prices both terms (fitted, with provenance).
    for fam in ("attention_decode", "attention_prefill", "attention_decode_fp8"):
        fit = HW.kernel(fam)
        assert fit.step_us is not None and "calibration fit" in fit.step_us.source
        assert fit.k_latency_us is not None
    assert many.time_us > 2 * decode(256, 2, 32, 8, 128, 128, HW).time_us


def test_ep_remote_slots_still_cost():
    """EP: slots routed to experts held elsewhere still pass through the pipeline (activation
    over the whole cache, top-k sum), so a rank whose own experts get the same tokens is slower
    when more tokens enter its kernel."""
    from moesim.costs.moe import fused_terms

    local = np.array([[4, 4, 4, 4]])
    few, many = (fused_terms(local, t, 8, 2048, 768, HW, "bf16", "bf16") for t in (2, 2000))
    act = lambda terms: next(float(b[0]) for n, _, _, b, _ in terms if n == "activation")
    assert act(many) == pytest.approx(act(few) * 2000 * 8 / 16)
    t_few, t_many = (fused_expert_us(local, t, 8, 2048, 768, HW, "bf16", "bf16")[0]
                     for t in (2, 2000))
    assert t_many > 2 * t_few


@pytest.mark.parametrize("inter,unaligned", [(768, False), (24, True), (232, True), (48, False)])
def test_unaligned_expert_gemms_pay_steps(inter, unaligned):
    """A 16-bit expert GEMM whose K or N is not a multiple of 16 elements moves its rows with
    narrow accesses: serialised steps at the fitted ``moe_bf16.step_us`` (fp8 never: its
    128-element scale blocks keep K aligned)."""
    from moesim.costs.moe import fused_terms_steps

    loads = np.full((1, 16), 64)
    steps = {t[0]: float(t[5][0]) for t in fused_terms_steps(loads, 128, 8, 2048, inter, HW,
                                                              "bf16", "bf16")}
    assert (steps["experts_down"] > 0) == unaligned
    assert steps["experts_up"] == 0.0  # N = 2 * inter and K = hidden are multiples of 16 here
    ops = expert_ops(loads[0], 128, 8, 2048, inter, HW, "bf16", "bf16")
    down = next(o for o in ops if o.name == "experts_down")
    assert (down.steps > 0) == unaligned
    assert HW.kernels.moe_bf16.step_us is not None and HW.kernels.moe_bf16.step_us.value > 0
    fp8 = fused_terms_steps(loads, 128, 8, 2048, inter, HW, "fp8_block", "fp8")
    assert all(float(t[5][0]) == 0.0 for t in fp8)


def test_unaligned_steps_are_tile_waves_and_k_loop_is_waves_times_k():
    """An unaligned 16-bit expert GEMM pays one step per wave of tiles of vLLM's default config
    (16 x 32 tiles while tokens <= local experts), not per element moved: 1 -> 2 tokens per
    expert keeps the tile count, so the steps stay. Every expert GEMM walks waves * K elements
    of K per SM (the K-loop latency term)."""
    from moesim.costs.moe import block_shape, fused_terms_steps, tile_waves

    sms = int(HW.compute.sm_count.value)
    one, two = np.ones((1, 128), dtype=np.int64), np.full((1, 128), 2, dtype=np.int64)
    terms = {t: {x[0]: x for x in fused_terms_steps(l, t, 8, 2048, 24, HW, "bf16", "bf16")}
             for t, l in ((16, one), (32, two))}
    # down GEMM: N = 2048 -> 64 column blocks of 32, 128 row blocks: ceil(8192 / 132) waves
    assert float(terms[16]["experts_down"][5][0]) == np.ceil(128 * 64 / sms) == 63
    assert float(terms[32]["experts_down"][5][0]) == 63
    assert float(terms[16]["experts_up"][5][0]) == 0.0  # N = 48, K = 2048: aligned
    bm, bn = block_shape(16)
    up_waves = float(tile_waves(one, 48, np.array([bm]), np.array([bn]), sms)[0])
    assert float(terms[16]["experts_up"][7][0]) == up_waves * 2048
    ops = expert_ops(one[0], 16, 8, 2048, 24, HW, "bf16", "bf16")
    assert next(o for o in ops if o.name == "experts_up").k_loop == up_waves * 2048
    assert all(o.k_loop == 0.0 for o in ops if o.family == "moe_aux")
    # the fitted profile prices the K loop
    assert HW.kernels.moe_bf16.k_latency_us is not None
    assert HW.kernels.moe_bf16.k_latency_us.value > 0


def test_cublas_pads_m_to_its_granularity_not_a_whole_tile():
    # cuBLAS picks a tile that fits M (hardware.kernels.gemm_bf16.m_granularity): one row past
    # 128 or 1024 pads only to the granularity, not to another 128-row tile.
    gran = int(HW.kernels.gemm_bf16.m_granularity.value)
    assert gran < int(HW.compute.gemm_tile_m.value)
    for m in (128, 1024):
        a, b = gemm("x", m, 4096, 4096, HW), gemm("x", m + 1, 4096, 4096, HW)
        assert b.ideal_compute_us / a.ideal_compute_us == pytest.approx((m + gran) / m)


def test_deepgemm_unaligned_m_pays_the_scale_copy_on_the_host():
    # M x 4-byte column-major scales must be a multiple of 16 bytes for TMA; otherwise DeepGEMM
    # copies them first: the eager floor grows by hardware.kernels.gemm_fp8_block.
    # unaligned_m_floor_us, the GPU time does not.
    extra = HW.kernels.gemm_fp8_block.unaligned_m_floor_us.value
    assert extra > 0
    a, b = gemm("x", 64, 4096, 4096, HW, "fp8_block", "fp8"), \
        gemm("x", 65, 4096, 4096, HW, "fp8_block", "fp8")
    assert not a.unaligned_m and b.unaligned_m
    assert b.host_floor_us == pytest.approx(a.host_floor_us + extra)
    assert gemm("x", 68, 4096, 4096, HW, "fp8_block", "fp8").host_floor_us == a.host_floor_us
    # Only block-scaled fp8 has per-row column-major scales.
    assert not gemm("x", 65, 4096, 4096, HW, "fp8", "fp8").unaligned_m


def test_partial_wave_runs_its_busy_sms_faster():
    # CUTLASS fp8 at m=256, n=4096: 2 x 32 = 64 tiles of 128 x 128 in one wave of 132 SMs. The
    # idle SMs leave power and bandwidth to the busy ones: compute time / (1 + gain x idle).
    op = gemm("x", 256, 4096, 16384, HW, "fp8", "fp8")
    assert op.wave_fill == pytest.approx(64 / 132)
    full = gemm("x", 33 * 128, 4096, 16384, HW, "fp8", "fp8")  # 33 x 32 tiles: 8 whole waves
    assert full.wave_fill == pytest.approx(1.0)
    fit = HW.kernels.gemm_fp8
    gain = fit.partial_wave_gain.value
    assert gain > 0
    t = lambda o, g: kernel_time_us(0.0, fit.compute_efficiency.value, 1.0, o.ideal_compute_us,
                                    0.0, wave_fill=o.wave_fill, partial_wave_gain=g)
    eff = fit.compute_efficiency.value
    assert t(op, gain) == pytest.approx(t(op, 0.0) * eff / min(1.0, eff * (1 + gain * (1 - 64 / 132))))
    assert t(op, 100.0) == pytest.approx(op.ideal_compute_us)  # never beyond the peak
    assert t(full, gain) == pytest.approx(t(full, 0.0))
    # cuBLAS balances its last wave (stream-K): nothing idles, nothing to gain.
    assert gemm("x", 256, 4096, 16384, HW).wave_fill == 1.0


def test_block_fp8_quantisation_is_its_own_family():
    # vLLM's per-token-group quantisation (DeepGEMM's input) and its per-tensor quantisation
    # (CUTLASS's input) are different kernels, priced by their own fits.
    block = linear("x", 4096, 4096, 4096, HW, "fp8_block", "fp8")
    tensor = linear("x", 4096, 4096, 4096, HW, "fp8", "fp8")
    assert block[0].family == "quant_fp8_group" and tensor[0].family == "quant_fp8"
    q = HW.kernels.quant_fp8_group
    assert block[0].time_us == pytest.approx(q.t0_us.value + block[0].bytes / (
        HW.hbm_peak_bytes_per_us * q.memory_efficiency.value))


def test_block_fp8_experts_use_vllm_default_tiles():
    """Block-fp8 expert GEMMs run vLLM's default block-fp8 config: 64-row tiles at every token
    count with BLOCK_N = the 128-wide quantisation block, not the 16-bit table's 16-row tiles
    for few tokens. With 1 token on each of 128 experts the padded rows (and so the tile-wave
    compute) are 4x those of 16-row tiles, and the N = 1536 up GEMM has 12 column blocks."""
    from moesim.costs.moe import (FP8_BLOCK_DEFAULT_BLOCK, block_shape, fused_terms_steps,
                                  grouped_gemm_ideal_us, tile_waves)

    sms = int(HW.compute.sm_count.value)
    one = np.ones((1, 128), dtype=np.int64)
    assert FP8_BLOCK_DEFAULT_BLOCK == (64, 128)
    assert block_shape(16) == (16, 64)  # what a 16-bit GEMM gets at the same token count
    fp8 = {t[0]: t for t in fused_terms_steps(one, 16, 8, 2048, 768, HW, "fp8_block", "fp8")}
    bf16 = {t[0]: t for t in fused_terms_steps(one, 16, 8, 2048, 768, HW, "bf16", "bf16")}
    up_waves = np.ceil(128 * 12 / sms)
    assert float(fp8["experts_up"][7][0]) == up_waves * 2048
    assert float(tile_waves(one, 1536, np.array([64]), np.array([128]), sms)[0]) == up_waves
    ideal = grouped_gemm_ideal_us(one, 1536, 2048, np.array([64]), np.array([128]), HW, "fp8")
    assert float(fp8["experts_up"][4][0]) == pytest.approx(float(ideal[0]))
    # the 16-bit path keeps the token-count table (16 x 64 tiles at 16 tokens)
    assert float(bf16["experts_up"][7][0]) == np.ceil(128 * 24 / sms) * 2048


def test_w4_weight_only_experts_run_at_the_engines_rate():
    """4-bit weight-only experts (mxfp4 on Hopper) compute at the framework's
    w4a16_moe_efficiency share of the 16-bit kernel's rate; other formats are untouched."""
    from moesim.costs.moe import fused_terms_steps

    loads = np.full((1, 32), 256, dtype=np.int64)

    def ideal(wd, w4):
        t = {x[0]: x for x in fused_terms_steps(loads, 2048, 4, 2880, 360, HW, wd, "bf16",
                                                True, w4)}
        return float(t["experts_up"][4][0]), float(t["experts_down"][4][0])

    full, half = ideal("mxfp4", 1.0), ideal("mxfp4", 0.5)
    assert half == pytest.approx((2 * full[0], 2 * full[1]))
    assert ideal("bf16", 0.5) == ideal("bf16", 1.0)
    from moesim.spec.framework import load_framework
    assert 0 < load_framework("vllm").w4a16_moe_efficiency.value <= 1


def test_w4_weight_only_experts_use_marlin_tiles():
    """4-bit weight-only experts run a Marlin-style kernel: its M block is the first of 8, 16,
    32, 48, 64 that the mean rows per expert fill less than 0.9 times (else 64), its N tile 128
    columns for blocks of <= 16 rows and 256 above; the GEMMs' tile waves use those, while
    16-bit experts keep the Triton kernel's table (16 x 64 tiles at 64 tokens)."""
    from moesim.costs.moe import block_shape, fused_terms_steps, tile_waves, w4_block_shape

    sms = int(HW.compute.sm_count.value)
    # mean rows per expert (tokens x top-4 / 128): 2, 8, 32, 128, 1024
    assert [tuple(int(v) for v in w4_block_shape(t, 4, 128))
            for t in (64, 256, 1024, 4096, 32768)] == [
        (8, 128), (16, 128), (48, 256), (64, 256), (64, 256)]
    assert tuple(int(v) for v in w4_block_shape(230, 4, 128)) == (8, 128)  # 7.2 < 0.9 x 8

    def up_k_loop(loads, tokens, wd):
        t = {x[0]: x for x in fused_terms_steps(loads, tokens, 4, 2880, 1440, HW, wd, "bf16")}
        return float(t["experts_up"][7][0])

    for tokens in (64, 4096):
        loads = np.full((1, 128), tokens * 4 // 128, dtype=np.int64)
        bm, bn = (np.array([v]) for v in w4_block_shape(tokens, 4, 128))
        waves = float(tile_waves(loads, 2880, bm, bn, sms)[0])
        assert up_k_loop(loads, tokens, "mxfp4") == up_k_loop(loads, tokens, "int4") \
            == waves * 2880
        bm16, bn16 = (np.array([v]) for v in block_shape(tokens))
        assert up_k_loop(loads, tokens, "bf16") == float(
            tile_waves(loads, 2880, bm16, bn16, sms)[0]) * 2880
    # at decode the wide tiles walk K in far fewer waves than the 16-bit kernel's
    decode = np.full((1, 128), 2, dtype=np.int64)
    assert up_k_loop(decode, 64, "bf16") > 1.8 * up_k_loop(decode, 64, "mxfp4")


def test_prefill_uses_fa3_sm90_tiles_per_head_dim_and_kv_dtype():
    from moesim.costs.attention import fa3_prefill_tile, prefill

    # hopper/tile_size.h tile_size_fwd_sm90 with vLLM's paged KV (no TMA, causal).
    assert fa3_prefill_tile(64, 64, "bf16", False) == (192, 128, True)
    assert fa3_prefill_tile(128, 128, "bf16", False) == (128, 128, True)
    assert fa3_prefill_tile(256, 256, "bf16", False) == (128, 80, True)
    assert fa3_prefill_tile(256, 256, "bf16", True) == (128, 64, True)
    assert fa3_prefill_tile(128, 128, "fp8", False) == (128, 160, True)
    assert fa3_prefill_tile(256, 256, "fp8", False) == (128, 128, False)
    assert fa3_prefill_tile(256, 256, "fp8", True) == (128, 64, False)
    # One 256-token head at head dim 64: two 192-row tiles; the second (queries 192..255)
    # walks both 128-key blocks, and that chain of 2 blocks sets the K loop.
    pre = prefill(1, 256, 0, 1, 1, 64, 64, HW)
    assert pre.steps == 1 and pre.k_loop == 2 * 128 * 128
    # Head dim 256 with a 1024 window walks 64-key blocks: a 4096-token sequence's tiles
    # each visit 1024 / 64 + 2 blocks of the window.
    win = prefill(1, 4096, 0, 1, 1, 256, 256, HW, window=1024)
    assert win.k_loop == 18 * 64 * 512


def test_prefill_prices_paged_kv_bytes_at_their_own_cost():
    from moesim.costs.attention import prefill

    # One query head per KV head: K/V are half the bf16 traffic; 64 per KV head: 1/65.
    mha = prefill(1, 4096, 0, 64, 64, 128, 128, HW)
    gqa = prefill(1, 4096, 0, 64, 1, 128, 128, HW)
    assert mha.kv_fraction == pytest.approx(0.5)
    assert gqa.kv_fraction == pytest.approx(1 / 65)
    # The kernel time formula weighs those bytes by the family's fitted K/V read cost.
    base = kernel_time_us(0.0, 1.0, 1.0, 0.0, 10.0, kv_fraction=0.5)
    assert kernel_time_us(0.0, 1.0, 1.0, 0.0, 10.0, kv_fraction=0.5, kv_read_cost=3.0) == \
        pytest.approx(2.0 * base)
    fit = HW.kernel("attention_prefill")
    assert fit.kv_read_cost is not None and "calibration fit" in fit.kv_read_cost.source
    assert fit.kv_read_cost.value > 1.0


def test_bf16_gemm_reads_l2_warm_activations_faster_while_they_fit():
    # cuBLAS, n = 32: the activations dominate the bytes. The reference table runs 1.3-1.8x
    # faster than HBM streaming allows while the working set fits in L2 (m=8192, k=2048: 34 MB),
    # and falls back to the HBM rate beyond it (k=4096: 67 MB).
    fit = HW.kernels.gemm_bf16
    assert fit.l2_capacity_fraction is not None and fit.l2_speedup.value > 1.0
    fits, spills = gemm("x", 8192, 32, 2048, HW), gemm("x", 8192, 32, 4096, HW)
    assert fits.working_set_l2 < fit.l2_capacity_fraction.value < spills.working_set_l2
    assert fits.warm_fraction > 0.9
    per_byte = lambda o: (o.time_us - o.fixed_us) / o.bytes
    assert per_byte(fits) < 0.8 * per_byte(spills)
    # The saving itself: hit rate 1 inside the capacity, ~0 far beyond it.
    from moesim.costs.op import l2_saving
    assert l2_saving(1.0, 0.1, 0.7, 20.0, 2.0, min) == pytest.approx(0.5)
    assert l2_saving(1.0, 2.0, 0.7, 20.0, 2.0, min) < 1e-6
    assert l2_saving(1.0, 0.1, 0.0, 20.0, 2.0, min) == 0.0  # no L2 term: unchanged


def test_thin_n_bf16_gemm_pads_n_to_a_thin_tile():
    from moesim.costs.gemm import gemm_ideal_compute_us
    # n = 32 runs on a 32-column tile (swapped operands), not the profile's 128-column one.
    at32 = gemm_ideal_compute_us(4096, 32, 4096, HW, "bf16")
    at128 = gemm_ideal_compute_us(4096, 128, 4096, HW, "bf16")
    assert at32 == pytest.approx(at128 / 4)


def test_overlap_improves_with_waves():
    # p = overlap_exponent x waves^g: balanced compute and memory add up at p = 1 for one wave
    # and approach their maximum with many waves.
    t = lambda w: kernel_time_us(0.0, 1.0, 1.0, 10.0, 10.0, overlap_exponent=1.0, waves=w,
                                 overlap_wave_exponent=1.0)
    assert t(1.0) == pytest.approx(20.0)
    assert 10.0 < t(64.0) < 10.2
    # Large p stays finite (the p-norm is evaluated scaled).
    assert np.isfinite(kernel_time_us(0.0, 1.0, 1.0, 1e4, 1e4, overlap_exponent=2.0,
                                      waves=1e4, overlap_wave_exponent=1.0))


def test_split_k_slices_add_reduction_steps():
    # Past the split point every further K slice adds one serial partial-sum step: the thin
    # cuBLAS GEMMs of the reference table still grow past k=16384 (m=1, n=32: 5.8 -> 7.1 µs
    # at k=65536).
    t = lambda kk: kernel_time_us(0.0, 1.0, 1.0, 0.0, 0.0, k_loop=kk, k_latency_us=1.0,
                                  k_split_above=2048.0, split_slice_us=0.5)
    assert t(2048) == pytest.approx(2.0)
    assert t(8192) == pytest.approx(2.0 + 0.5 * 3)
    assert HW.kernels.gemm_bf16.split_slice_us is not None
    assert gemm("x", 1, 32, 65536, HW).time_us > gemm("x", 1, 32, 16384, HW).time_us


def test_ep_programs_on_other_ranks_experts_cost_waves():
    """Under EP the GEMM grid also covers the padded M-blocks of experts held elsewhere (their
    programs store a zero tile): waves priced as steps of the first kernel at
    ``moe_aux.step_us``; none without EP, more when more other experts receive tokens, and the
    scalar ops and the vectorised pricer agree."""
    from moesim.costs.moe import fused_terms_steps

    local = np.array([[1]])  # EP 256 of 256 experts: one local expert with one token
    steps = {}
    for tokens in (16, 32):
        no_ep = fused_terms_steps(local, tokens, 8, 6144, 2048, HW, "bf16", "bf16")
        ep = fused_terms_steps(local, tokens, 8, 6144, 2048, HW, "bf16", "bf16",
                               num_experts=256)
        assert float(no_ep[0][5][0]) == 0.0 and ep[0][0] == "moe_align"
        steps[tokens] = float(ep[0][5][0])
    assert 0 < steps[16] < steps[32]  # 127 -> 255 other experts busy, one block each
    assert HW.kernels.moe_aux.step_us is not None and HW.kernels.moe_aux.step_us.value > 0
    ops = expert_ops(local[0], 32, 8, 6144, 2048, HW, "bf16", "bf16", num_experts=256)
    vec = fused_expert_us(local, 32, 8, 6144, 2048, HW, "bf16", "bf16", num_experts=256)
    assert sum(o.time_us for o in ops) == pytest.approx(float(vec[0]), rel=1e-9)
    assert ops[0].steps == steps[32]


def test_non_gated_relu2_activation_moves_two_passes():
    """vLLM's squared ReLU without gate runs as two torch passes over the cache (relu in place,
    then square): twice the bytes of one read-and-write pass."""
    from moesim.costs.moe import fused_terms_steps

    loads = np.full((1, 16), 8)
    act = {g: next(t for t in fused_terms_steps(loads, 64, 2, 1024, 512, HW, "bf16", "bf16",
                                                gated=g) if t[0] == "activation")
           for g in (True, False)}
    slots = 64 * 2
    assert float(act[False][3][0]) == pytest.approx(slots * 512 * 2.0 * 4)
    assert float(act[True][3][0]) == pytest.approx(slots * (2 * 512 + 512) * 2.0)


@pytest.mark.parametrize("framework,copies", [("vllm", 2), ("sglang", 0), ("trtllm", 0)])
def test_engines_that_copy_the_moe_output_back(framework, copies):
    """vLLM's modular fused MoE copies the combined output from its workspace into the caller's
    buffer (framework.moe_output_copies): a per-token cost in every MoE layer of its steps,
    which the step model and the sweep's vectorised pricer both carry; engines whose top-k sum
    writes the output in place have none."""
    from moesim import parse_scenario
    from moesim.step import Batch, build_step
    from moesim.vstep import StepPricer

    sc = parse_scenario({"model": "qwen3-30b-a3b",
                         "hardware": {"profile": "h100_sxm", "num_gpus": 2},
                         "deployment": {"tp": 2, "framework": framework},
                         "workload": {"batch_size": 8, "input_len": 100, "output_len": 10}})
    assert int(sc.framework.moe_output_copies.value) == copies
    b = Batch("prefill", 1, 2048, 0.0)
    step = build_step(sc, b)
    copy_ops = [o for o in step.ops if o.name == "output_copy"]
    assert len(copy_ops) == (1 if copies else 0)
    if copies:
        assert copy_ops[0].kernels == copies
        assert copy_ops[0].bytes == pytest.approx(copies * 2048 * sc.model.hidden_size * 4.0)
    flip = sc.framework.model_copy(update={"moe_output_copies":
                                           sc.framework.moe_output_copies.model_copy(
                                               update={"value": float(2 - copies)})})
    other = sc.model_copy(update={"framework": flip})
    assert (step.time_us > build_step(other, b).time_us) is bool(copies)
    assert float(StepPricer(sc).vectors([b])[0][0]) == pytest.approx(step.time_us, rel=1e-9)


def test_output_copies_must_be_a_whole_number():
    """A framework file's copy count is a count: 1.5 or -1 is refused with the field named,
    not rounded."""
    import yaml
    from pydantic import ValidationError

    from moesim.spec.framework import FRAMEWORKS_DIR, FrameworkProfile

    raw = yaml.safe_load((FRAMEWORKS_DIR / "vllm.yaml").read_text())
    for bad in (1.5, -1):
        raw["moe_output_copies"]["value"] = bad
        with pytest.raises(ValidationError, match="whole number of copies"):
            FrameworkProfile.model_validate(raw)


@pytest.mark.parametrize("framework,spans", [("vllm", True), ("sglang", True), ("trtllm", False)])
def test_engines_whose_moe_grid_spans_other_ranks_experts(framework, spans):
    """The remote-expert programs belong to vLLM's / SGLang's Triton kernel: an engine whose
    framework says its grid spans every expert pays them under EP, TensorRT-LLM's local-only
    grouped GEMM does not; the step model and the sweep's vectorised pricer agree."""
    from moesim import parse_scenario
    from moesim.step import Batch, build_step
    from moesim.vstep import StepPricer

    sc = parse_scenario({"model": "qwen3-30b-a3b",
                         "hardware": {"profile": "h100_sxm", "num_gpus": 4},
                         "deployment": {"tp": 4, "ep": 4, "framework": framework},
                         "workload": {"batch_size": 8, "input_len": 100, "output_len": 10}})
    assert bool(sc.framework.moe_grid_spans_all_experts.value) is spans
    b = Batch("decode", 8, 1, 500.0)
    align = [o for o in build_step(sc, b).ops if o.name == "moe_align"]
    assert len(align) == 1 and (align[0].steps > 0) is spans
    flip = sc.framework.model_copy(update={"moe_grid_spans_all_experts":
                                           sc.framework.moe_grid_spans_all_experts.model_copy(
                                               update={"value": float(not spans)})})
    other = sc.model_copy(update={"framework": flip})
    t, t_other = build_step(sc, b).time_us, build_step(other, b).time_us
    assert (t > t_other) is spans and t != t_other
    assert float(StepPricer(sc).vectors([b])[0][0]) == pytest.approx(t, rel=1e-9)
