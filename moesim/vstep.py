"""Step times of many batches at once: a vectorised twin of :func:`moesim.step.build_step`.

The sweep's fast path (:mod:`moesim.sweep`) prices a few thousand distinct steps for every
resolved scenario (each workload brings its own decode context, batch and prefill chunks).
``build_step`` builds an :class:`~moesim.costs.op.OpCost` per op and step, milliseconds a step;
:class:`StepPricer` computes the same numbers for a whole list of steps with numpy: every op is an
array over the steps (:class:`VOp`), launched (CUDA graph or eager, :func:`launched`) and summed
into ``[time, compute, memory, network, launch]`` µs per step, the vector the sweep reports
(:func:`finish`: the eager launch stalls of ``step.overlap_host`` need the step's sums).

Twins. Each ``v_*`` function mirrors one scalar cost function, formula for formula, in the same
order of operations (results agree to rounding): ``v_roofline`` = ``costs.op.roofline``,
``v_gemm`` / ``v_linear`` = ``costs.gemm.gemm`` / ``linear``, ``v_memory_op`` =
``costs.elementwise.memory_op``, ``v_collective`` / ``v_all_reduce`` / ``v_all_to_all`` =
``costs.comm``, ``v_attention_decode`` / ``v_mla_decode`` = ``costs.attention.decode`` /
``mla_decode``, :func:`launched` = ``step.with_launch`` (with ``step.graphs_cover``),
:func:`finish` = ``step.overlap_host``.
:class:`StepPricer` mirrors ``step.build_step`` (``_attention_ops``, ``_norm_ops``,
``_tp_all_reduce``, ``_dense_mlp_ops``, the MoE layers of ``step._moe_priced``, ``_head_ops``,
the pipeline send and the engine's step overhead); the fused expert kernels come from
``costs.moe.fused_expert_kernels``, which ``step`` uses too. :meth:`StepPricer.vectors` prices
balanced routing; :meth:`StepPricer.moe_draws` the MoE layers of routing draws (each layer its
own loads, averaged per layer kind as ``build_step`` reports them). Ops with few distinct
arguments in a sweep (prefill attention, MLA prefill, linear attention, expert kernels of the
grouped / naive strategies, capacity-capped routing) are priced by the scalar functions
themselves, once per distinct argument, and merged. A change to a scalar cost function must be
mirrored here: ``tests/test_sweep.py`` compares every twin with its original, and the sweep's
per-group self-check against ``predict`` falls back (with a warning) when they disagree.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np

from .costs import attention, comm, moe
from .costs.gemm import gemm_family, quant_family
from .costs.op import OpCost, roofline_terms
from .spec.dtypes import ELEMENT_BYTES, WEIGHT_BYTES, gemm_compute_dtype

#: Index of each bound in a step vector ``[time, compute, memory, network, launch]``.
COMPUTE, MEMORY, NETWORK, LAUNCH = 1, 2, 3, 4
BOUND_CODE = {"compute": COMPUTE, "memory": MEMORY, "network": NETWORK, "launch": LAUNCH}


class VOp:
    """One op over many steps (arrays, or scalars that broadcast): GPU time µs, the fixed part
    a CUDA graph replaces, kernels, bound code, ideal compute / memory µs, and whether its
    family is an attention kernel (those run eagerly between piecewise graphs)."""

    __slots__ = ("time", "fixed", "kernels", "bound", "ideal_c", "ideal_m", "attention")

    def __init__(self, time: Any, fixed: Any, kernels: Any, bound: Any, ideal_c: Any,
                 ideal_m: Any, attention: bool) -> None:
        self.time, self.fixed, self.kernels, self.bound = time, fixed, kernels, bound
        self.ideal_c, self.ideal_m, self.attention = ideal_c, ideal_m, attention

    def take(self, idx: np.ndarray) -> "VOp":
        """The op at positions ``idx`` (arrays indexed, scalars kept)."""
        def t(x: Any) -> Any:
            return x[idx] if isinstance(x, np.ndarray) and x.ndim else x
        return VOp(t(self.time), t(self.fixed), t(self.kernels), t(self.bound), t(self.ideal_c),
                   t(self.ideal_m), self.attention)

    @staticmethod
    def where(cond: np.ndarray, a: "VOp", b: "VOp") -> "VOp":
        w = np.where
        return VOp(w(cond, a.time, b.time), w(cond, a.fixed, b.fixed),
                   w(cond, a.kernels, b.kernels), w(cond, a.bound, b.bound),
                   w(cond, a.ideal_c, b.ideal_c), w(cond, a.ideal_m, b.ideal_m), a.attention)

    @staticmethod
    def stack(ops: Sequence[OpCost]) -> "VOp":
        """Scalar ops (one per position) as one VOp; their ``launch_us`` must still be 0."""
        assert all(o.launch_us == 0.0 for o in ops)
        return VOp(np.array([o.time_us for o in ops]), np.array([o.fixed_us for o in ops]),
                   np.array([o.kernels for o in ops]),
                   np.array([BOUND_CODE[o.bound] for o in ops]),
                   np.array([o.ideal_compute_us for o in ops]),
                   np.array([o.ideal_memory_us for o in ops]),
                   ops[0].family.startswith("attention"))


# ---------------------------------------------------------------------------------------------
# twins of the scalar cost functions
# ---------------------------------------------------------------------------------------------

def v_roofline(family: str, bytes_: Any, ideal_compute_us: Any, hw: Any, kernels: int = 1,
               steps: Any = 0, k_loop: Any = 0.0, wave_fill: Any = 1.0,
               write_fraction: Any = 0.0, waves: Any = 0.0, warm_fraction: Any = 0.0,
               working_set_l2: Any = 0.0) -> VOp:
    """``costs.op.roofline`` over arrays."""
    time, fixed, ideal_memory_us, t_c, t_m, t_k = roofline_terms(
        hw.kernel(family), hw, bytes_, ideal_compute_us, kernels, steps, k_loop, np.maximum,
        np.minimum, wave_fill, write_fraction, waves, warm_fraction, working_set_l2)
    bound = np.where(fixed > time - fixed, LAUNCH,
                     np.where(t_c >= np.maximum(t_m, t_k), COMPUTE, MEMORY))
    return VOp(time, fixed, kernels, bound, ideal_compute_us, ideal_memory_us,
               family.startswith("attention"))


def v_memory_op(bytes_: Any, hw: Any, kernels: int = 1) -> VOp:
    """``costs.elementwise.memory_op``."""
    return v_roofline("elementwise", bytes_, 0.0, hw, kernels)


def v_gemm_tiling(m: np.ndarray, n: int, k: int, hw: Any, compute_dtype: str,
                  family: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``costs.gemm._tiling`` (with ``_tile_m`` and ``_cutlass_fp8_tile``): ideal compute µs and
    the fraction of the waves' SM slots the tiles fill, and the waves of tiles."""
    sms = int(hw.compute.sm_count.value)
    peak = hw.peak_flops_per_us(compute_dtype)
    if family == "gemm_fp8":
        tm = np.where(m <= 64, 64, np.where(m <= 128, 64, 128))
        tn = np.where(m <= 64, 64, 128)
        tiles = np.ceil(m / tm) * np.ceil(n / tn)
        waves = np.ceil(tiles / sms)
        return waves * 2.0 * tm * tn * k / (peak / sms), tiles / (waves * sms), waves
    tile_m = int(hw.compute.gemm_tile_m.value)
    tm = np.maximum(16, np.minimum(tile_m, 2.0 ** np.maximum(
        0, np.ceil(np.log2(np.maximum(m, 1))))))
    tn = int(hw.compute.gemm_tile_n.value)
    gran = hw.kernel(family).m_granularity
    if gran is not None:
        tm = np.minimum(tm, gran.value)
        tn = int(max(16, min(tn, 2 ** max(0, int(np.ceil(np.log2(max(n, 1))))))))
    tiles = np.ceil(m / tm) * np.ceil(n / tn)
    tile_flops = 2.0 * tm * tn * k
    full_waves = np.maximum(1.0, m * n / (tile_m * hw.compute.gemm_tile_n.value) / sms)
    if family == "gemm_bf16":
        return tiles * tile_flops / peak, np.ones_like(tiles), full_waves
    waves = np.ceil(tiles / sms)
    split = tiles < sms
    return (np.where(split, tiles * tile_flops / peak, waves * tile_flops / (peak / sms)),
            np.where(split, 1.0, tiles / (waves * sms)), np.where(split, full_waves, waves))


def v_gemm_ideal_compute_us(m: np.ndarray, n: int, k: int, hw: Any, compute_dtype: str,
                            family: str) -> np.ndarray:
    """``costs.gemm.gemm_ideal_compute_us``."""
    return v_gemm_tiling(m, n, k, hw, compute_dtype, family)[0]


def v_gemm(m: Any, n: int, k: int, hw: Any, weight_dtype: str = "bf16",
           act_dtype: str = "bf16", out_dtype: str = "bf16", kernels: int = 1) -> VOp:
    """``costs.gemm.gemm`` over an array of ``m``."""
    m = np.asarray(m, dtype=np.float64)
    cd = gemm_compute_dtype(weight_dtype, act_dtype)
    bytes_ = (m * k * ELEMENT_BYTES[act_dtype] + k * n * WEIGHT_BYTES[weight_dtype]
              + m * n * ELEMENT_BYTES[out_dtype])
    family = gemm_family(weight_dtype, act_dtype)
    ideal_us, fill, waves = v_gemm_tiling(m, n, k, hw, cd, family)
    return v_roofline(family, bytes_, ideal_us, hw, kernels, k_loop=k, wave_fill=fill,
                      write_fraction=m * n * ELEMENT_BYTES[out_dtype] / bytes_, waves=waves,
                      warm_fraction=m * k * ELEMENT_BYTES[act_dtype] / bytes_,
                      working_set_l2=bytes_ / hw.memory.l2_bytes.value)


def v_linear(m: Any, n: int, k: int, hw: Any, weight_dtype: str = "bf16",
             act_dtype: str = "bf16", out_dtype: str = "bf16") -> list[VOp]:
    """``costs.gemm.linear``: the input quantisation (fp8) and the GEMM."""
    m = np.asarray(m, dtype=np.float64)
    g = v_gemm(m, n, k, hw, weight_dtype, act_dtype, out_dtype)
    if gemm_family(weight_dtype, act_dtype) == "gemm_bf16":
        return [g]
    per_tensor = weight_dtype != "fp8_block"
    bytes_ = m * k * (2.0 + ELEMENT_BYTES[act_dtype]) + m * k * 2.0 * per_tensor
    if hw.kernels.quant_fp8 is None:
        q = v_memory_op(bytes_, hw, kernels=2 if per_tensor else 1)
    else:
        chunk = hw.kernels.quant_fp8.chunk_elems
        passes = np.ceil(k / chunk.value) if chunk is not None else 0
        q = v_roofline(quant_family(weight_dtype, hw), bytes_, 0.0, hw,
                       kernels=2 if per_tensor else 1, steps=m if per_tensor else 0,
                       k_loop=m * passes if per_tensor else 0.0)
    return [q, g]


def v_collective(family: str, factor: float, message_bytes: Any, n: int, hw: Any,
                 gpus_per_node: int) -> Optional[VOp]:
    """``costs.comm._collective``; None for a group of one GPU (no kernel, no time)."""
    if n <= 1:
        return None
    t, _, ideal_us, _ = comm.collective_terms(getattr(hw.collectives, family), factor,
                                              message_bytes, n, gpus_per_node, hw, np.minimum)
    return VOp(t, 0.0, 1, NETWORK, 0.0, ideal_us, False)


def v_all_reduce(message_bytes: Any, n: int, hw: Any, gpus_per_node: int = 8,
                 custom: bool = False) -> Optional[VOp]:
    """``costs.comm.all_reduce``: the engine's custom kernel where the message is small enough
    and the group is on one NVLink domain, else NCCL."""
    nccl = v_collective("all_reduce", 2.0, message_bytes, n, hw, gpus_per_node)
    if nccl is None or not custom:
        return nccl
    use = np.asarray(message_bytes) <= comm.CUSTOM_ALL_REDUCE_MAX_BYTES
    if not use.any() or not comm._link(n, gpus_per_node, hw, hw.collectives.all_reduce_custom)[2]:
        return nccl
    cust = v_collective("all_reduce_custom", 2.0, message_bytes, n, hw, gpus_per_node)
    assert cust is not None
    return VOp.where(use, _full(cust, use.shape), _full(nccl, use.shape))


def v_all_to_all(message_bytes: Any, n: int, hw: Any, gpus_per_node: int = 8) -> Optional[VOp]:
    """``costs.comm.all_to_all``."""
    return v_collective("all_to_all", 1.0, message_bytes, n, hw, gpus_per_node)


def _attend(family: str, pairs: Any, heads: Any, qk_dim: int, v_dim: int, io_bytes: Any,
            hw: Any, tiled_flops: Any = 0.0, k_loop: Any = 0.0, waves: Any = 0) -> VOp:
    """``costs.attention._attend`` (decode and MLA decode: no softmax or chain floor)."""
    flops = 2.0 * pairs * heads * (qk_dim + v_dim)
    return v_roofline(family, io_bytes, np.maximum(flops, tiled_flops)
                      / hw.peak_flops_per_us("bf16"), hw, steps=waves, k_loop=k_loop)


def v_attention_decode(num_seqs: Any, kv_len: Any, heads: Any, kv_heads: int, qk_dim: int,
                       v_dim: int, hw: Any, kv_dtype: str = "bf16", window: int = 0,
                       chunk: int = 0) -> VOp:
    """``costs.attention.decode`` over arrays of sequences, KV lengths and query heads."""
    keys = np.asarray(kv_len, dtype=np.float64)
    n_blocks = attention.decode_key_blocks(keys, window)
    if window:
        keys = np.minimum(keys, window)
    if chunk:
        keys = np.minimum(keys, chunk / 2.0)
        n_blocks = np.ceil(np.maximum(keys, 1.0) / attention.TILE_K)
    io = num_seqs * (keys * kv_heads * (qk_dim + v_dim) * ELEMENT_BYTES[kv_dtype]
                     + heads * (qk_dim + v_dim) * 2.0)
    pairs = num_seqs * keys
    group_tiles = kv_heads * np.ceil(heads / kv_heads / attention.DECODE_TILE_Q)
    tiled = 2.0 * num_seqs * group_tiles * attention.DECODE_TILE_Q * n_blocks * \
        attention.TILE_K * (qk_dim + v_dim)
    sms = int(hw.compute.sm_count.value)
    splits = attention.fa3_splits(num_seqs * group_tiles, n_blocks, sms)
    per_cta = np.ceil(n_blocks / splits)
    k_loop = attention.serial_blocks(num_seqs * group_tiles * splits, per_cta, per_cta, sms) * \
        attention.TILE_K * (qk_dim + v_dim)
    return _attend(attention._family(hw, "attention_decode", kv_dtype), pairs, heads, qk_dim,
                   v_dim, io, hw, tiled, k_loop,
                   attention.cta_waves(num_seqs * group_tiles * splits, sms))


def v_mla_decode(num_seqs: Any, kv_len: Any, heads: Any, latent_dim: int, rope_dim: int,
                 hw: Any, kv_dtype: str = "bf16") -> VOp:
    """``costs.attention.mla_decode``."""
    io = num_seqs * (kv_len * (latent_dim + rope_dim) * ELEMENT_BYTES[kv_dtype]
                     + heads * (latent_dim + rope_dim + latent_dim) * 2.0)
    pairs = num_seqs * kv_len
    return _attend("attention_mla_decode", pairs, heads, latent_dim + rope_dim, latent_dim, io,
                   hw)


def _full(op: VOp, shape: tuple[int, ...]) -> VOp:
    b = np.broadcast_to
    return VOp(b(op.time, shape), b(op.fixed, shape), b(op.kernels, shape),
               b(op.bound, shape), b(op.ideal_c, shape), b(op.ideal_m, shape), op.attention)


def launched(op: VOp, covered: Any, graph_kernel_us: float, launch_host_us: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``step.with_launch`` over arrays: (GPU time µs, the eager stall ``launch_us`` µs, host
    dispatch µs, bound code) of ``op`` in steps where a CUDA graph covers it (``covered``) or
    not; the time inside a graph includes the replay's gap, and ``stall`` and ``host`` are 0
    there."""
    t, fixed, kern, b = op.time, op.fixed, op.kernels, op.bound
    gf = kern * graph_kernel_us
    # Inside a graph: the eager fixed time shrinks to the graph's per-kernel gap ...
    shrink = fixed > gf
    t_shrunk = t - fixed + gf
    b_shrunk = np.where((b == LAUNCH) & (t_shrunk > 2 * gf),
                        np.where(op.ideal_c >= op.ideal_m, COMPUTE, MEMORY), b)
    # ... or, for kernels already faster than that, the gap is the launch cost.
    launch_g = gf - fixed
    tot_g = np.where(shrink, t_shrunk, t + launch_g)
    b_g = np.where(shrink, b_shrunk, np.where(launch_g > t, LAUNCH, b))
    # Eager: the fixed time shrinks the same way; the host dispatches a kernel in one launch,
    # or the fitted fixed time where that is longer, and the GPU would idle for the excess.
    host_s = np.maximum(kern * launch_host_us, fixed)
    host_u = kern * launch_host_us
    gpu_e = np.where(shrink, t_shrunk, t)
    host_e = np.where(shrink, host_s, host_u)
    stall_e = np.maximum(0.0, host_e - gpu_e)
    b_e = np.where(shrink, b_shrunk, b)
    gpu = np.where(covered, tot_g, gpu_e)
    stall = np.where(covered, 0.0, stall_e)
    host = np.where(covered, 0.0, host_e)
    bound = np.where(covered, b_g, b_e)
    if np.any(np.asarray(kern) == 0):  # no kernel: nothing to launch
        none = kern == 0
        gpu, bound = np.where(none, t, gpu), np.where(none, b, bound)
        stall, host = np.where(none, 0.0, stall), np.where(none, 0.0, host)
    return gpu, stall, host, bound


#: Columns of a raw step vector past the five reported ones: the eager stalls ``S``, the host
#: time ``H`` (dispatch of the eager kernels plus the engine's step overhead), and the GPU time
#: of the stalled ops by bound (``STALLED + code``). :func:`finish` turns a raw vector (sums of
#: raw vectors: a step's parts) into ``[time, compute, memory, network, launch]``.
STALL, HOST, STALLED = 5, 6, 6
RAW_WIDTH = 11


def finish(raw: np.ndarray) -> np.ndarray:
    """``[..., 5]`` step vectors of ``[..., RAW_WIDTH]`` raw ones: ``step.overlap_host`` on
    sums. The step lasts ``max(G, H)`` (G: its time without eager stalls); in a host-bound step
    the stalled ops and the excess count as launch-bound, otherwise the stalled ops keep their
    GPU time's bound."""
    raw = np.asarray(raw, dtype=np.float64)
    gpu = raw[..., 0] - raw[..., STALL]
    extra = np.maximum(0.0, raw[..., HOST] - gpu)
    stalled = raw[..., STALLED + 1:STALLED + 5]
    out = np.empty(raw.shape[:-1] + (5,))
    out[..., 0] = gpu + extra
    host_bound = (extra > 0.0)[..., None]
    out[..., 1:5] = raw[..., 1:5] + np.where(host_bound, 0.0, stalled)
    out[..., LAUNCH] += np.where(host_bound[..., 0], stalled.sum(axis=-1) + extra, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------

class _Acc:
    """Raw step vectors ``[RAW_WIDTH, N]`` being summed (see :func:`finish`), and which steps a
    graph covers (per op kind)."""

    def __init__(self, n: int, cov_other: np.ndarray, cov_attention: np.ndarray,
                 graph_kernel_us: float, launch_host_us: float) -> None:
        self.v = np.zeros((RAW_WIDTH, n))
        self.cols = np.arange(n)
        self.cov = (cov_other, cov_attention)
        self.gk, self.host = graph_kernel_us, launch_host_us

    def add(self, op: Optional[VOp], count: float, rows: Optional[np.ndarray] = None,
            unique: bool = True) -> None:
        """Add ``count`` x the launched ``op`` to the steps ``rows`` (all when None; the op's
        arrays are then over all steps, else over ``rows``; ``unique``: no step twice)."""
        if op is None or count == 0:
            return
        cov = self.cov[1 if op.attention else 0]
        cols = self.cols
        if rows is not None:
            cov, cols = cov[rows], rows
        gpu, stall, host, bound = launched(op, cov, self.gk, self.host)
        shape = cols.shape
        gpu = np.broadcast_to(count * gpu, shape)
        stall = np.broadcast_to(count * stall, shape)
        host = np.broadcast_to(count * host, shape)
        bound = np.broadcast_to(bound, shape)
        # a stalled op's GPU time is kept apart: its bound depends on the whole step (finish)
        where = np.where(stall > 0.0, STALLED + bound, bound)
        if unique:
            v = self.v
            v[0, cols] += gpu + stall
            v[where, cols] += gpu
            v[STALL, cols] += stall
            v[HOST, cols] += host
        else:
            np.add.at(self.v[0], cols, gpu + stall)
            np.add.at(self.v, (where, cols), gpu)
            np.add.at(self.v[STALL], cols, stall)
            np.add.at(self.v[HOST], cols, host)


class _Parts:
    """The parts of N steps (each step, and the prefill chunk riding in it) as arrays: the step
    (row) each belongs to, decode or prefill, sequences, new tokens per sequence, context."""

    def __init__(self, batches: Sequence[Any]) -> None:
        parts = []  # one tuple per part, split into columns after (one append, not five)
        for i, b in enumerate(batches):
            while b is not None:
                parts.append((i, b.phase == "decode", b.num_seqs, b.new_tokens, b.context))
                b = b.prefill
        rows, dec, seqs, new, ctx = zip(*parts) if parts else ((),) * 5
        self.row = np.array(rows, dtype=np.int64)
        self.decode = np.array(dec, dtype=bool)
        self.seqs = np.array(seqs, dtype=np.float64)
        self.new = np.array(new, dtype=np.float64)
        self.ctx = np.array(ctx, dtype=np.float64)

    def select(self, mask: np.ndarray) -> "_Parts":
        out = object.__new__(_Parts)
        for k in ("row", "decode", "seqs", "new", "ctx"):
            setattr(out, k, getattr(self, k)[mask])
        return out

    def __len__(self) -> int:
        return len(self.row)


class StepPricer:
    """``build_step(sc, b)`` for many batches ``b`` of one resolved scenario, as step vectors
    ``[time, compute, memory, network, launch]`` µs (``Step.time_us`` and the
    ``count * total_us`` of its ops summed by bound): :meth:`vectors` with balanced routing.

    ``vectors(..., moe=False)`` leaves out the MoE layers' ops (router, dispatch, experts,
    shared experts, combine / all-reduce), which routing draws change; :meth:`moe_draws` adds
    them for drawn loads (``build_step(sc, b, loads)``), :meth:`moe_ops` prices one layer's."""

    def __init__(self, sc: Any) -> None:
        m, d, hw = sc.model, sc.deployment, sc.hardware
        self.sc, self.m, self.d, self.hw = sc, m, d, hw
        fw = sc.framework
        self.graphs = bool(sc.cuda_graphs)
        self.graph_max = fw.cuda_graph_max_batch.value
        self.piecewise = bool(fw.piecewise_cuda_graphs.value)
        self.grid_spans = bool(fw.moe_grid_spans_all_experts.value)  # costs.moe, EP grids
        self.output_copies = int(fw.moe_output_copies.value)  # costs.moe, write-back
        ov = hw.overheads
        self.gk, self.host = ov.graph_kernel_us.value, ov.kernel_launch_host_us.value
        self.step_us = fw.step_overhead_us.value
        att: dict[str, int] = {}
        for a in m.layer_attention:
            att[a] = att.get(a, 0) + 1
        self.att_counts = list(att.items())
        self.n_layers = len(m.layer_mlp)
        self.n_dense = sum(1 for x in m.layer_mlp if x == "dense")
        self.n_moe = sum(1 for x in m.layer_mlp if x == "moe")
        self.custom_ar = bool(fw.custom_all_reduce.value)
        self._scalar_memo: dict[Hashable, list[OpCost]] = {}
        self._balanced: dict[int, np.ndarray] = {}

    # -- public ----------------------------------------------------------------------------
    def coverage(self, T: np.ndarray, alone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``step.graphs_cover`` of steps of ``T`` tokens, decode-only (``alone``) or not:
        (other ops covered, attention kernels covered)."""
        g = (T <= self.graph_max) if self.graphs else np.zeros(len(T), dtype=bool)
        cov_att = g & alone
        return cov_att | (g & self.piecewise), cov_att

    def vectors(self, batches: Sequence[Any], moe: bool = True) -> np.ndarray:
        """``[N, 5]`` step vectors of ``batches``; without the MoE layers (``moe=False``) the raw
        ``[N, RAW_WIDTH]`` ones, to add :meth:`moe_draws` to before :func:`finish`."""
        n = len(batches)
        parts = _Parts(batches)
        T = np.bincount(parts.row, parts.seqs * parts.new, minlength=n)
        first = np.zeros(len(parts), dtype=bool)  # a step's own part comes before its chunk
        first[np.unique(parts.row, return_index=True)[1]] = True
        own = parts.select(first)  # one per step, in step order
        alone = own.decode & (np.bincount(parts.row, minlength=n) == 1)
        acc = _Acc(n, *self.coverage(T, alone), self.gk, self.host)
        self._layers(acc, T, parts)
        if moe and self.n_moe:
            self._moe_balanced(acc, T)
        # step._head_ops: the LM head sees each sequence's last position (every drafted one
        # in a speculative verification step)
        seqs = np.bincount(parts.row, parts.seqs, minlength=n)
        self._head(acc, T, seqs + own.seqs * (own.new - 1) * own.decode)
        if self.d.pp > 1:
            acc.add(v_all_to_all(T * self.m.hidden_size * 2.0 * 2, 2, self.hw,
                                 self.sc.gpus_per_node), self.d.pp - 1)
        if self.step_us:  # host time between steps: on both sides of finish's max
            acc.v[0] += self.step_us
            acc.v[LAUNCH] += self.step_us
            acc.v[HOST] += self.step_us
        return finish(acc.v.T) if moe else acc.v.T.copy()

    # -- the layers --------------------------------------------------------------------------
    def _layers(self, acc: _Acc, T: np.ndarray, parts: _Parts) -> None:
        sc, m, d, hw = self.sc, self.m, self.d, self.hw
        H, tp = m.hidden_size, d.tp
        for kind, count in self.att_counts:
            self._attention(acc, T, parts, kind, count)
        # step._norm_ops and the attention block's all-reduce, in every layer
        acc.add(v_memory_op(3 * 2 * T * H * 2.0, hw, kernels=3), self.n_layers)
        if tp > 1:
            acc.add(v_all_reduce(T * H * 2.0, tp, hw, sc.gpus_per_node, self.custom_ar),
                    self.n_layers)
        if self.n_dense:
            for op in self._dense_mlp(T, m.dense_intermediate_size):
                acc.add(op, self.n_dense)
            if tp > 1:
                acc.add(v_all_reduce(T * H * 2.0, tp, hw, sc.gpus_per_node, self.custom_ar),
                        self.n_dense)

    def _dense_mlp(self, T: np.ndarray, inter: int) -> list[VOp]:
        """``step._dense_mlp_ops``."""
        m, d, hw = self.m, self.d, self.hw
        inter_r = inter // d.tp
        up = (2 if m.gated_mlp else 1) * inter_r
        return [*v_linear(T, up, m.hidden_size, hw, d.weight_dtype, d.activation_dtype),
                v_memory_op(T * (up + inter_r) * 2.0, hw),
                *v_linear(T, m.hidden_size, inter_r, hw, d.weight_dtype, d.activation_dtype)]

    def _attention(self, acc: _Acc, T: np.ndarray, parts: _Parts, kind: str,
                   count: int) -> None:
        """``step._attention_ops`` of one attention kind, ``count`` layers."""
        sc, m, d, hw = self.sc, self.m, self.d, self.hw
        tp, H = d.tp, m.hidden_size
        wd, ad, kvd = d.weight_dtype, d.activation_dtype, d.kv_cache_dtype
        if kind == "linear":
            la = m.linear_attention
            assert la is not None
            qk, v = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
            for op in v_linear(T, (2 * qk + 2 * v + 2 * la.num_value_heads) // tp, H, hw, wd,
                               ad):
                acc.add(op, count)
            self._scalar_parts(acc, parts, count, "linear", (parts.seqs, parts.new),
                               lambda seqs, new: [attention.linear_attention(
                                   seqs, new, max(1, la.num_value_heads // tp),
                                   la.key_head_dim, la.value_head_dim, hw)])
            for op in v_linear(T, H, v // tp, hw, wd, ad):
                acc.add(op, count)
            return
        heads = m.num_attention_heads // tp
        dec, pre = parts.select(parts.decode), parts.select(~parts.decode)
        pre_args = (pre.seqs, pre.new, pre.ctx)
        kv_len = dec.ctx + dec.new
        if m.mla is not None:
            from .step import Batch, _mla_kernels

            a = m.mla
            qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
            if a.q_lora_rank:
                proj = [*v_linear(T, a.q_lora_rank, H, hw, wd, ad),
                        *v_linear(T, heads * qk_head, a.q_lora_rank, hw, wd, ad)]
            else:
                proj = v_linear(T, heads * qk_head, H, hw, wd, ad)
            proj += v_linear(T, a.kv_lora_rank + a.qk_rope_head_dim, H, hw, wd, ad)
            proj += v_linear(T, H, heads * a.v_head_dim, hw, wd, ad)
            for op in proj:
                acc.add(op, count)
            if len(dec):
                t = dec.seqs * dec.new
                acc.add(v_gemm(t, heads * a.kv_lora_rank, a.qk_nope_head_dim, hw, wd, ad),
                        count, dec.row)
                acc.add(v_mla_decode(dec.seqs, kv_len, heads * dec.new, a.kv_lora_rank,
                                     a.qk_rope_head_dim, hw, kvd), count, dec.row)
                acc.add(v_gemm(t, heads * a.v_head_dim, a.kv_lora_rank, hw, wd, ad), count,
                        dec.row)
            self._scalar_parts(acc, pre, count, "mla", pre_args,
                               lambda seqs, new, ctx: _mla_kernels(
                                   sc, Batch("prefill", seqs, new, ctx), heads))
            return
        kv_heads = max(1, m.num_kv_heads // tp)
        hd = m.head_dim
        q_width = heads * hd * (2 if m.attention_output_gate else 1)
        for op in v_linear(T, q_width + 2 * kv_heads * hd, H, hw, wd, ad):
            acc.add(op, count)
        window = m.sliding_window if kind == "sliding" else 0
        chunk = m.attention_chunk_size if kind == "chunked" else 0
        if len(dec):
            acc.add(v_attention_decode(dec.seqs, kv_len, heads * dec.new, kv_heads, hd, hd, hw,
                                       kvd, window, chunk), count, dec.row)
        self._scalar_parts(acc, pre, count, "prefill:" + kind, pre_args,
                           lambda seqs, new, ctx: [attention.prefill(
                               seqs, new, int(ctx), heads, kv_heads, hd, hd, hw, kvd, window,
                               chunk)])
        for op in v_linear(T, H, heads * hd, hw, wd, ad):
            acc.add(op, count)

    def _scalar_parts(self, acc: _Acc, parts: _Parts, count: int, label: str,
                      args: tuple[np.ndarray, ...], price: Callable[..., list[OpCost]]
                      ) -> None:
        """Ops of some parts priced by the scalar cost functions, once per distinct ``args``
        (arrays over the parts: integers, then a float context); ``label`` names the function
        in the memo."""
        if not len(parts):
            return
        uniq, where = np.unique(np.stack(args, axis=1), axis=0, return_inverse=True)
        keys = [(label,) + tuple(int(x) for x in u[:2]) + tuple(float(x) for x in u[2:])
                for u in uniq]
        lists = []
        for k in keys:
            ops = self._scalar_memo.get(k)
            if ops is None:
                ops = self._scalar_memo[k] = price(*k[1:])
            lists.append(ops)
        rows = parts.row
        self._merge(acc, lists, np.ravel(where), rows, count, len(np.unique(rows)) == len(rows))

    def _scalar(self, acc: _Acc, rows: np.ndarray, keys: list[Hashable],
                price: Callable[[Any], list[OpCost]], count: float) -> None:
        """Add ``count`` x ``price(key)`` (scalar ops, memoised by key) to each row."""
        index: dict[Hashable, int] = {}
        where = np.array([index.setdefault(k, len(index)) for k in keys])
        lists = []
        for k in index:
            ops = self._scalar_memo.get(k)
            if ops is None:
                ops = self._scalar_memo[k] = price(k)
            lists.append(ops)
        self._merge(acc, lists, where, rows, count, True)

    @staticmethod
    def _merge(acc: _Acc, lists: list[list[OpCost]], where: np.ndarray, rows: np.ndarray,
               count: float, unique: bool) -> None:
        """Add op list ``lists[where[i]]`` to step ``rows[i]``."""
        names = [o.name for o in lists[0]]
        if all([o.name for o in ops] == names for ops in lists):
            for j in range(len(names)):
                acc.add(VOp.stack([ops[j] for ops in lists]).take(where), count, rows, unique)
            return
        for u, ops in enumerate(lists):  # different op lists (e.g. overflow passes)
            sel = rows[where == u]
            for o in ops:
                acc.add(VOp.stack([o]).take(np.zeros(len(sel), dtype=np.int64)), count, sel,
                        unique)

    # -- MoE ---------------------------------------------------------------------------------
    def moe_fast(self) -> bool:
        """Whether balanced MoE layers are priced by the vectorised path (fused kernels, no
        capacity cap); else by ``step.moe_layers`` once per distinct token count."""
        rs = self.sc.routing
        return self.d.strategy == "fused" and (rs.capacity_factor is None
                                               or rs.overflow == "dropless")

    def _moe_balanced(self, acc: _Acc, T: np.ndarray) -> None:
        """``step.moe_layers`` of balanced loads: every MoE layer alike."""
        from .routing import balanced_loads

        m, d = self.m, self.d
        mo = m.moe
        assert mo is not None
        Tu, inv = np.unique(T, return_inverse=True)
        if not self.moe_fast():
            from .step import Batch, moe_layers

            self._scalar(acc, np.arange(len(T)),
                         [("moe", int(t)) for t in T],
                         lambda k: moe_layers(self.sc, Batch("prefill", 1, k[1], 0.0),
                                              balanced_loads(k[1] * d.attention_dp,
                                                             mo.num_experts,
                                                             mo.top_k)[None, :])[0].ops,
                         self.n_moe)
            return
        for op in self.moe_ops(Tu, self.balanced_loads(Tu * d.attention_dp)):
            acc.add(op.take(inv), self.n_moe)

    def balanced_loads(self, t_global: np.ndarray) -> np.ndarray:
        """``routing.balanced_loads`` of each token count ``[R]``: ``[R, E]``. The loads are
        ``T*k // E`` plus a 0/1 pattern that depends only on ``T*k mod E`` (taken from the
        scalar function, once per remainder)."""
        from .routing import balanced_loads

        mo = self.m.moe
        assert mo is not None
        E, k = mo.num_experts, mo.top_k
        slots = t_global.astype(np.int64) * k
        base, rem = np.divmod(slots, E)
        pattern = np.empty((len(slots), E), dtype=np.int64)
        for r in np.unique(rem).tolist():
            p = self._balanced.get(r)
            if p is None:  # the remainder's pattern: loads of r slots in all
                p = self._balanced[r] = balanced_loads(r, E, 1) if r else np.zeros(E, np.int64)
            pattern[rem == r] = p
        return base[:, None] + pattern

    def moe_draws(self, tokens: np.ndarray, loads: np.ndarray, covered: np.ndarray
                  ) -> np.ndarray:
        """The MoE layers' share of ``build_step(sc, b, loads[j, s])``'s raw step vector, ``[J,
        S, RAW_WIDTH]`` (see :func:`finish`), for steps ``j`` of ``tokens[j]`` group tokens
        whose non-attention ops a CUDA graph covers or not (``covered[j]``), and routing draws
        ``loads`` ``[J, S, L, E]``
        (``L`` MoE layers). As ``build_step`` does: per layer kind and op, the op averaged
        over the kind's layers (``step._kind_ops``: time, fixed time, FLOPs and bytes summed
        over the layers running it over their count; the bound with the most time; the rest of
        the first layer running it), then launched (``with_launch``), times the layers."""
        J, S, L, E = loads.shape
        R = J * S
        ops = self.moe_ops(np.repeat(np.asarray(tokens, dtype=np.float64), S * L),
                           loads.reshape(-1, E))
        cov = np.repeat(np.asarray(covered, dtype=bool), S)
        acc = _Acc(R, cov, cov, self.gk, self.host)
        for idx in self.moe_kinds():
            n = len(idx)
            for op in ops:
                def f(x: Any) -> np.ndarray:
                    return np.broadcast_to(x, (R * L,)).reshape(R, L)[:, idx]
                t, kern, b = f(op.time), f(op.kernels), f(op.bound)
                runs = kern > 0
                some = runs.any(axis=1)
                t = np.where(runs, t, 0.0)
                first = np.argmax(runs, axis=1)  # the first layer running the op
                pick = (np.arange(R), first)
                # the bound with the most time; a tie goes to the one the first layers had
                best = np.zeros(R)
                bound = np.zeros(R, dtype=np.int64)
                seen_at = np.full(R, L)
                for code in (COMPUTE, MEMORY, NETWORK, LAUNCH):
                    mask = runs & (b == code)
                    tot = np.where(mask, t, 0.0).sum(axis=1)
                    at = np.where(mask.any(axis=1), np.argmax(mask, axis=1), L)
                    better = mask.any(axis=1) & ((tot > best) | ((tot == best) & (at < seen_at)))
                    best = np.where(better, tot, best)
                    seen_at = np.where(better, at, seen_at)
                    bound = np.where(better, code, bound)
                avg = VOp(t.sum(axis=1) / n, np.where(runs, f(op.fixed), 0.0).sum(axis=1) / n,
                          kern[pick], bound, f(op.ideal_c)[pick], f(op.ideal_m)[pick], False)
                if some.all():
                    acc.add(avg, n)
                else:
                    acc.add(avg.take(np.flatnonzero(some)), n, np.flatnonzero(some))
        return acc.v.T.reshape(J, S, RAW_WIDTH)

    def moe_kinds(self) -> list[list[int]]:
        """Per layer kind with MoE layers, their indices among the MoE layers (layer order)."""
        kinds: dict[str, list[int]] = {}
        j = 0
        for att, mlp in zip(self.m.layer_attention, self.m.layer_mlp):
            if mlp == "moe":
                kinds.setdefault(att, []).append(j)
                j += 1
        return list(kinds.values())

    def moe_ops(self, T: np.ndarray, loads: np.ndarray) -> list[VOp]:
        """The ops of one MoE layer (``step.moe_layers``, fused strategy, no capacity cap) for
        group token counts ``T`` ``[R]`` and global per-expert loads ``[R, E]``, over ``R``."""
        from .routing import rank_expert_loads
        from .step import _placed, received_tokens

        sc, m, d, hw, rs = self.sc, self.m, self.d, self.hw, self.sc.routing
        mo = m.moe
        assert mo is not None
        H, dp = m.hidden_size, d.attention_dp
        ad = d.activation_dtype
        inter_r = mo.expert_intermediate_size // d.moe_tp
        t_global = T * dp
        per_rank = _placed(loads, d.ep, rs) if rs.placement == "eplb" else \
            rank_expert_loads(loads, d.ep, rs)  # [R, ep, slots]
        if dp == 1:
            tokens_in = np.broadcast_to(t_global[:, None], per_rank.shape[:2]).astype(float)
        else:
            tokens_in = np.maximum(np.ceil(received_tokens(per_rank, t_global[:, None])), 1)
        # Every rank's kernels at once: their sum is moe.fused_expert_us (the same terms added
        # in the same order), the slowest rank's are the layer's expert ops.
        R, ep, slots = per_rank.shape
        rows, tok = per_rank.reshape(R * ep, slots), tokens_in.reshape(R * ep)
        uniq = None
        if slots == 1 and np.array_equal(tok, np.floor(tok)) and tok.min() >= 0 and \
                rows.min() >= 0:
            # One expert a rank (EP = experts): a rank's kernels depend on two integers, its
            # tokens in and its expert's load, which repeat a lot (most loads are small): each
            # pair is priced once. Element-wise formulas, so the same numbers.
            key = tok.astype(np.int64) * (int(rows.max()) + 1) + rows[:, 0]
            _, first, uniq = np.unique(key, return_index=True, return_inverse=True)
            rows, tok = rows[first], tok[first]
        kernels = moe.fused_expert_kernels(rows, tok, mo.top_k, H, inter_r, hw,
                                           d.experts_dtype, ad, m.gated_mlp,
                                           sc.framework.w4a16_moe_efficiency.value,
                                           slots * ep if self.grid_spans and ep > 1 else None,
                                           self.output_copies)
        rank_us = 0.0
        for k in kernels:
            rank_us = rank_us + k["time_us"]
        n_rows = np.shape(rank_us)
        r = np.arange(len(T))
        where = np.arange(R * ep) if uniq is None else np.ravel(uniq)
        where = where.reshape(R, ep)
        slowest = np.argmax(np.asarray(rank_us)[where], axis=1)
        ops = [v_gemm(T, mo.num_experts, H, hw, "bf16", ad, "fp32"),
               v_roofline("moe_aux", T * mo.num_experts * 4.0 + T * mo.top_k * 8.0, 0.0, hw,
                          kernels=1 if mo.scoring == "softmax" else 4)]
        a2a = None
        if dp > 1:
            a2a = received_tokens(per_rank, t_global[:, None]).max(axis=1)
            ops.append(v_all_to_all(a2a * H * ELEMENT_BYTES[ad], d.ep, hw, sc.gpus_per_node))
        pick = where[r, slowest]  # the slowest rank's row among those priced

        def at(x: np.ndarray) -> np.ndarray:
            return np.broadcast_to(x, n_rows)[pick]

        for k in kernels:
            kr = at(k["kernels"])
            runs = kr > 0  # a rank that does not run the kernel adds nothing
            ops.append(VOp(np.where(runs, at(k["time_us"]), 0.0), at(k["fixed_us"]), kr,
                           at(k["bound"]), at(k["ideal_compute_us"]),
                           at(k["ideal_memory_us"]), False))
        if mo.num_shared_experts:
            ops += self._dense_mlp(T, mo.num_shared_experts * mo.shared_expert_intermediate_size)
        if dp > 1:
            ops.append(v_all_to_all(a2a * H * 2.0, d.ep, hw, sc.gpus_per_node))
        elif d.tp > 1:
            ops.append(v_all_reduce(T * H * 2.0, d.tp, hw, sc.gpus_per_node, self.custom_ar))
        return [o for o in ops if o is not None]

    # -- the head ------------------------------------------------------------------------------
    def _head(self, acc: _Acc, T: np.ndarray, n: np.ndarray) -> None:
        """``step._head_ops``: ``n`` sequences' last positions reach the LM head."""
        m, d, hw = self.m, self.d, self.hw
        H, V = m.hidden_size, m.vocab_size
        acc.add(v_memory_op(T * H * 2.0 * 2, hw), 1)
        acc.add(v_memory_op(n * H * 2.0 * 2, hw), 1)
        acc.add(v_gemm(n, V // d.tp, H, hw, "bf16", "bf16", "fp32"), 1)
        if d.tp > 1:
            acc.add(v_all_to_all(n * V * 4.0, d.tp, hw, self.sc.gpus_per_node), 1)
        acc.add(v_memory_op(n * V * 4.0 * 3, hw, kernels=4), 1)
