"""The microbenchmarks of ``python -m calibration run`` (notes §8) and their sweeps.

Every benchmark is a function ``bench_<name>(ctx)`` that writes rows through ``ctx.row(...)``;
``BENCHMARKS`` lists them in run order. Sweeps depend on the device (``cpu`` / ``cuda``) and
``--quick``; they are plain data at the top of each function so they are easy to read and change.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .layouts import CsvSink
from .moe_layer import IMPLS, moe_experts, silu_and_mul
from .routing import make_routing

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3

DTYPE_LABEL = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

#: model shapes (hidden, moe_inter, num_experts, topk) used for GEMM / router / MoE sweeps
MODELS = {
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "mixtral_8x7b": (4096, 14336, 8, 2),
    "deepseek_v2_lite": (2048, 1408, 64, 6),
    "olmoe_1b_7b": (2048, 1024, 64, 8),
    "deepseek_v3": (7168, 2048, 256, 8),
}


@dataclass
class Context:
    device: str                    # "cpu" | "cuda"
    quick: bool
    out: Path
    system: str
    gpu: str
    dtype: torch.dtype             # main dtype of GEMM / MoE / router rows
    timer: object                  # timing.CpuTimer | timing.CudaTimer
    triton_ok: bool = False        # triton importable and a GPU present
    skipped: dict = field(default_factory=dict)   # what -> reason
    errors: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)     # benchmark -> facts for device.json
    sinks: dict = field(default_factory=dict)
    _samples: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    # -- sampling budgets ------------------------------------------------------------------
    def budget(self, heavy: bool = False) -> dict:
        if self.cuda:
            return (dict(budget_s=0.03, min_samples=5, max_samples=30) if self.quick else
                    dict(budget_s=0.08, min_samples=10 if heavy else 20, max_samples=100))
        return (dict(budget_s=0.05, min_samples=3, max_samples=7) if self.quick else
                dict(budget_s=0.3, min_samples=5, max_samples=50))

    def measure(self, fn: Callable[[], object], *, flush: bool = True, heavy: bool = False,
                **kw) -> list[float]:
        opts = {**self.budget(heavy), **kw}
        return self.timer.measure(fn, flush=flush, **opts)

    # -- output ----------------------------------------------------------------------------
    def row(self, layout: str, samples: list[float], info: dict | None = None, **cols) -> float:
        lat = float(np.median(samples))
        if not (math.isfinite(lat) and lat > 0):
            raise RuntimeError(f"bad latency {lat!r} for {layout} {cols}")
        if layout == "collective":
            full = {"system": self.system, "gpu": self.gpu, **cols, "latency_us": lat}
        else:
            full = {"system": self.system, "gpu": self.gpu, "framework": "torch",
                    "framework_version": torch.__version__, **cols, "latency_us": lat}
        if layout not in self.sinks:
            self.sinks[layout] = CsvSink(self.out, layout)
        self.sinks[layout].write(full)
        self._write_samples(layout, cols, samples, info)
        return lat

    def _write_samples(self, layout, cols, samples, info):
        import json
        f = self._samples.get(layout)
        if f is None:
            d = self.out / "samples"
            d.mkdir(parents=True, exist_ok=True)
            f = self._samples[layout] = (d / f"{layout}.jsonl").open("w")
        rec = {**cols, "samples_us": [round(s, 4) for s in samples]}
        if info:
            rec["info"] = info
        f.write(json.dumps(rec) + "\n")
        f.flush()

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.errors.append({"what": what, "error": msg[:300]})
        if self.cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()

    def close(self) -> None:
        for s in self.sinks.values():
            s.close()
        for f in self._samples.values():
            f.close()

    # -- helpers ---------------------------------------------------------------------------
    def randn(self, *shape, dtype=None, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device=self.device, dtype=torch.float32 if dtype is None else dtype)
        return t.mul_(scale) if scale != 1.0 else t


def _pow2(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return out


# ---------------------------------------------------------------------------------------------
# 1. launch overhead
# ---------------------------------------------------------------------------------------------
def bench_launch(ctx: Context) -> None:
    """Time of ``num_kernels`` back-to-back tiny kernels (1-element in-place add).

    modes: ``eager`` (launched from Python without sync; GPU: events around the N launches, so a
    host-bound sequence shows the host cost per launch; CPU: wall clock), ``eager_sync`` (GPU: each
    launch followed by ``torch.cuda.synchronize()``, wall clock: the round trip), ``graph`` (GPU: N
    launches captured in one CUDA graph, one replay timed with events)."""
    counts = [1, 10, 100] if ctx.quick else [1, 10, 100, 1000]
    x = torch.zeros(1, device=ctx.device)
    kernels: dict[str, Callable[[], object]] = {"torch.add_": lambda: x.add_(1)}
    if ctx.cuda and ctx.triton_ok:
        from .triton_moe import tiny_kernel
        kernels["triton_tiny"] = lambda: tiny_kernel(x)
    elif ctx.cuda:
        ctx.skipped["launch:triton_tiny"] = "triton is not importable"
    from .timing import CpuTimer
    wall = CpuTimer()
    for name, launch in kernels.items():
        for n in counts:
            def body(n=n, launch=launch):
                for _ in range(n):
                    launch()
            ctx.row("launch", ctx.measure(body, flush=False), kernel=name, mode="eager",
                    num_kernels=n)
            if not ctx.cuda:
                continue

            def body_sync(n=n, launch=launch):
                for _ in range(n):
                    launch()
                    torch.cuda.synchronize()
            ctx.row("launch", wall.measure(body_sync, **ctx.budget()), kernel=name,
                    mode="eager_sync", num_kernels=n)
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        body()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    body()
                ctx.row("launch", ctx.measure(g.replay, flush=False), kernel=name, mode="graph",
                        num_kernels=n)
            except Exception as e:  # noqa: BLE001
                ctx.error(f"launch graph {name} n={n}", e)
    if not ctx.cuda:
        ctx.skipped["launch:graph"] = "CUDA graphs need a GPU"
        ctx.skipped["launch:eager_sync"] = "device synchronisation needs a GPU"


# ---------------------------------------------------------------------------------------------
# 2. memory streaming
# ---------------------------------------------------------------------------------------------
def bench_stream(ctx: Context) -> None:
    """``bytes`` = size of the buffer. ``torch.Tensor.copy_`` reads and writes ``bytes``;
    ``torch.Tensor.zero_`` writes ``bytes``; ``torch.sum`` reads ``bytes`` (fp32, one output).
    GPU: L2 flushed before each call."""
    if ctx.cuda:
        sizes = ([64 * KiB, MiB, 16 * MiB, 256 * MiB] if ctx.quick else _pow2(64 * KiB, GiB))
    else:
        sizes = ([64 * KiB, 512 * KiB, 4 * MiB, 32 * MiB] if ctx.quick
                 else _pow2(64 * KiB, 256 * MiB))
    for nbytes in sizes:
        n = nbytes // 4
        try:
            src = torch.ones(n, device=ctx.device)
            dst = torch.empty_like(src)
            ops = {"torch.Tensor.copy_": lambda: dst.copy_(src),
                   "torch.Tensor.zero_": lambda: dst.zero_(),
                   "torch.sum": lambda: torch.sum(src)}
            for name, fn in ops.items():
                ctx.row("stream", ctx.measure(fn), kernel=name, bytes=nbytes)
            del src, dst
        except Exception as e:  # noqa: BLE001
            ctx.error(f"stream {nbytes}", e)


# ---------------------------------------------------------------------------------------------
# 3. dense GEMM
# ---------------------------------------------------------------------------------------------
def _gemm_shapes(ctx: Context) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """(m values, (n, k) pairs for F.linear, square sizes for torch.matmul)."""
    if not ctx.cuda:
        if ctx.quick:
            return [1, 8, 64, 256], [(1024, 512), (512, 1024), (32, 512)], [256]
        return (_pow2(1, 1024), [(1024, 512), (512, 1024), (2048, 1024), (1024, 2048), (32, 1024)],
                [256, 512, 1024])
    if ctx.quick:
        h, i, e, _ = MODELS["qwen3_30b_a3b"]
        return [1, 16, 128, 1024, 8192], [(2 * i, h), (h, i), (e, h), (4096, 4096)], [2048, 4096]
    nk: list[tuple[int, int]] = []
    for h, i, e, _ in MODELS.values():
        for pair in ((2 * i, h), (h, i), (e, h)):
            if pair not in nk:
                nk.append(pair)
    return _pow2(1, 16384), nk, [1024, 2048, 4096, 8192]


def bench_gemm(ctx: Context) -> None:
    """``F.linear(x[m,k], W[n,k])`` (= x @ W.T, the reference's kernel name), ``torch.matmul`` on
    squares, and on CUDA SM >= 8.9 ``torch._scaled_mm`` fp8 e4m3 with per-tensor scales (bf16 out,
    dtype label ``fp8``). GPU: L2 flushed before each call."""
    ms, nks, squares = _gemm_shapes(ctx)
    dt, label = ctx.dtype, DTYPE_LABEL[ctx.dtype]
    fp8 = False
    if ctx.cuda:
        major, minor = torch.cuda.get_device_capability(0)
        fp8 = (major, minor) >= (8, 9) and hasattr(torch, "_scaled_mm")
        if not fp8:
            ctx.skipped["gemm:fp8"] = (f"torch._scaled_mm fp8 needs SM >= 8.9 "
                                       f"(this GPU: SM {major}.{minor})")
    else:
        ctx.skipped["gemm:fp8"] = "fp8 GEMM (torch._scaled_mm) needs a CUDA GPU with SM >= 8.9"
    one = torch.ones((), device=ctx.device, dtype=torch.float32)
    for n, k in nks:
        try:
            w = ctx.randn(n, k, dtype=dt, scale=0.02)
            w8 = w.to(torch.float8_e4m3fn) if fp8 and n % 16 == 0 and k % 16 == 0 else None
        except Exception as e:  # noqa: BLE001
            ctx.error(f"gemm weights n={n} k={k}", e)
            continue
        for m in ms:
            try:
                x = ctx.randn(m, k, dtype=dt)
                ctx.row("gemm", ctx.measure(lambda: F.linear(x, w)),
                        kernel="torch.nn.functional.linear", dtype=label, m=m, n=n, k=k)
                if w8 is not None:
                    x8 = x.to(torch.float8_e4m3fn)
                    ctx.row("gemm", ctx.measure(lambda: torch._scaled_mm(
                        x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
                        kernel="torch._scaled_mm", dtype="fp8", m=m, n=n, k=k)
            except Exception as e:  # noqa: BLE001
                ctx.error(f"gemm m={m} n={n} k={k}", e)
        del w, w8
    for s in squares:
        try:
            b = ctx.randn(s, s, dtype=dt, scale=0.02)
            for m in ms:
                if m > 4 * s:
                    continue
                a = ctx.randn(m, s, dtype=dt)
                ctx.row("gemm", ctx.measure(lambda: torch.matmul(a, b)), kernel="torch.matmul",
                        dtype=label, m=m, n=s, k=s)
        except Exception as e:  # noqa: BLE001
            ctx.error(f"matmul {s}", e)


# ---------------------------------------------------------------------------------------------
# 4. router + top-k
# ---------------------------------------------------------------------------------------------
def bench_router(ctx: Context) -> None:
    """``torch_router``: router GEMM ``F.linear(x[T,H], Wg[E,H])`` + softmax (fp32) + top-k +
    renormalisation. ``torch_softmax_topk``: the same without the GEMM (logits given)."""
    if ctx.cuda:
        ts = [1, 64, 1024, 8192] if ctx.quick else _pow2(1, 16384)
        shapes = [MODELS["qwen3_30b_a3b"], MODELS["mixtral_8x7b"]]
        if not ctx.quick:
            shapes += [MODELS["deepseek_v3"], MODELS["deepseek_v2_lite"]]
    else:
        ts = [1, 16, 256] if ctx.quick else _pow2(1, 1024)
        shapes = [(512, 0, 8, 2), (1024, 0, 32, 4)]
    dt, label = ctx.dtype, DTYPE_LABEL[ctx.dtype]
    for h, _, e, k in shapes:
        wg = ctx.randn(e, h, dtype=dt, scale=0.02)
        for t in ts:
            try:
                x = ctx.randn(t, h, dtype=dt)
                logits = F.linear(x, wg)

                def topk_of(lg):
                    p = torch.softmax(lg, dim=-1, dtype=torch.float32)
                    w, ids = torch.topk(p, k, dim=-1)
                    return ids, w / w.sum(dim=-1, keepdim=True)
                ctx.row("router", ctx.measure(lambda: topk_of(F.linear(x, wg))),
                        kernel="torch_router", dtype=label, num_tokens=t, hidden_size=h,
                        num_experts=e, topk=k)
                ctx.row("router", ctx.measure(lambda: topk_of(logits)),
                        kernel="torch_softmax_topk", dtype=label, num_tokens=t, hidden_size=h,
                        num_experts=e, topk=k)
            except Exception as e_:  # noqa: BLE001
                ctx.error(f"router T={t} H={h} E={e}", e_)


# ---------------------------------------------------------------------------------------------
# 6. activation + combine
# ---------------------------------------------------------------------------------------------
def bench_elementwise(ctx: Context) -> None:
    """``*_silu_and_mul``: ``[num_rows, 2*row_size] -> [num_rows, row_size]`` (topk = 1);
    ``torch_moe_sum``: weighted top-k sum ``[num_rows, topk, row_size] x [num_rows, topk] ->
    [num_rows, row_size]``. ``bytes_moved`` = bytes read + written (weights of moe_sum not
    counted). GPU: L2 flushed before each call."""
    if ctx.cuda:
        rows = [1, 256, 4096, 65536] if ctx.quick else _pow2(1, 65536)[::2] + [131072]
        act_sizes = [768, 2048] if ctx.quick else [768, 1408, 2048, 14336]
        sum_sizes = [(2048, 8), (4096, 2)] if ctx.quick else [(2048, 8), (4096, 2), (7168, 8),
                                                              (2048, 6)]
    else:
        rows = [1, 64, 1024] if ctx.quick else [1, 16, 256, 1024, 4096]
        act_sizes = [256, 1024]
        sum_sizes = [(256, 2), (1024, 4)]
    dt, label = ctx.dtype, DTYPE_LABEL[ctx.dtype]
    b = torch.tensor([], dtype=dt).element_size()
    act_impls: dict[str, Callable] = {"torch_silu_and_mul": silu_and_mul}
    if ctx.cuda and ctx.triton_ok:
        from .triton_moe import _silu_and_mul_kernel
        import triton

        def triton_silu(x):
            d = x.shape[1] // 2
            out = torch.empty(x.shape[0], d, dtype=x.dtype, device=x.device)
            blk = min(1024, triton.next_power_of_2(d))
            _silu_and_mul_kernel[(x.shape[0], triton.cdiv(d, blk))](x, out, d, x.stride(0),
                                                                     out.stride(0), BLOCK=blk)
            return out
        act_impls["triton_silu_and_mul"] = triton_silu
    for r in rows:
        for d in act_sizes:
            if r * d * 3 * b > (4 * GiB if ctx.cuda else 256 * MiB):
                continue
            try:
                x = ctx.randn(r, 2 * d, dtype=dt)
                for name, fn in act_impls.items():
                    ctx.row("elementwise", ctx.measure(lambda: fn(x)), kernel=name, dtype=label,
                            num_rows=r, row_size=d, topk=1, bytes_moved=3 * r * d * b)
            except Exception as e:  # noqa: BLE001
                ctx.error(f"silu_and_mul rows={r} d={d}", e)
        for h, k in sum_sizes:
            if r * h * (k + 1) * b > (4 * GiB if ctx.cuda else 256 * MiB):
                continue
            try:
                y = ctx.randn(r * k, h, dtype=dt)
                w = torch.rand(r, k, device=ctx.device)
                ctx.row("elementwise", ctx.measure(lambda: _moe_sum(y, w)),
                        kernel="torch_moe_sum", dtype=label, num_rows=r, row_size=h, topk=k,
                        bytes_moved=(k + 1) * r * h * b)
            except Exception as e:  # noqa: BLE001
                ctx.error(f"moe_sum rows={r} h={h} k={k}", e)


def _moe_sum(y, w):
    from .moe_layer import weighted_sum
    return weighted_sum(y, w)


# ---------------------------------------------------------------------------------------------
# 5. expert GEMMs / whole MoE expert path
# ---------------------------------------------------------------------------------------------
def _moe_sweep(ctx: Context):
    """[(hidden, inter, experts, topk, moe_ep, tokens list)], distributions."""
    if not ctx.cuda:
        ts = [1, 16, 128] if ctx.quick else [1, 4, 16, 64, 256]
        shapes = [(256, 256, 8, 2, 1, ts + ([256] if ctx.quick else [])),
                  (512, 512, 32, 4, 1, ts[:-1] if ctx.quick else ts),
                  (1024, 512, 16, 2, 1, [1, 64] if ctx.quick else ts),
                  (256, 256, 8, 2, 2, [16])]
        return shapes, ["balanced", "power_law_1.2"]
    if ctx.quick:
        ts = [1, 16, 128, 1024]
        h, i, e, k = MODELS["qwen3_30b_a3b"]
        h2, i2, e2, k2 = MODELS["mixtral_8x7b"]
        return ([(h, i, e, k, 1, ts), (h2, i2, e2, k2, 1, ts), (h, i, e, k, 8, [16, 1024])],
                ["balanced", "power_law_1.2"])
    ts = _pow2(1, 8192)
    shapes = [(*MODELS[m], 1, ts) for m in ("qwen3_30b_a3b", "mixtral_8x7b", "deepseek_v2_lite",
                                            "olmoe_1b_7b")]
    shapes += [(*MODELS["qwen3_30b_a3b"], 8, ts), (*MODELS["deepseek_v3"], 8, ts)]
    return shapes, ["balanced", "power_law_1.01", "power_law_1.2"]


def _validate_moe_impls(ctx: Context, impls: list[str]) -> list[str]:
    """Check every expert path against :func:`moe_reference` on a small shape (ep 1 and 2) before
    timing; a path that fails is dropped (reason in ``device.json`` ``skipped``) so that e.g. a
    broken Triton kernel cannot poison the GPU context for the rest of the run."""
    from .moe_layer import moe_reference
    t, h, inter, e, k = 37, 256, 128, 16, 4
    dt = ctx.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(t, h, generator=gen).to(ctx.device, dt)
    w1 = (torch.randn(e, 2 * inter, h, generator=gen) * 0.05).to(ctx.device, dt)
    w2 = (torch.randn(e, h, inter, generator=gen) * 0.05).to(ctx.device, dt)
    tol = 1e-4 if dt == torch.float32 else 3e-2
    ok, report = [], {}
    for impl in impls:
        try:
            worst = 0.0
            for ep in (1, 2):
                ids_np, w_np, _ = make_routing(t, e, k, "power_law_1.2", moe_ep=ep, seed=ep)
                ids = torch.from_numpy(ids_np).to(ctx.device)
                wts = torch.from_numpy(w_np).to(ctx.device)
                el = e // ep
                kw = {"all_local": ep == 1} if impl in ("torch_grouped_mm",
                                                         "triton_fused_moe") else {}
                out = moe_experts(x, ids, wts, w1[:el].contiguous(), w2[:el].contiguous(), impl,
                                  **kw).float()
                ref = moe_reference(x, ids, wts, w1[:el], w2[:el])
                worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)))
            report[impl] = round(worst, 6)
            if worst <= tol and math.isfinite(worst):
                ok.append(impl)
            else:
                ctx.skipped[f"moe:{impl}"] = f"wrong result in validation (max rel err {worst:.3g})"
        except Exception as exc:  # noqa: BLE001
            ctx.skipped[f"moe:{impl}"] = f"failed validation: {type(exc).__name__}: {exc}"[:300]
            if ctx.cuda:
                torch.cuda.synchronize()
    ctx.extra["moe_validation_max_rel_err"] = report
    return ok


def bench_moe(ctx: Context) -> None:
    """One row = the expert path from ``topk_ids``/``topk_weights`` to the combined ``[T, H]``
    output (align/sort, gate-up GEMM, SiLU-and-mul, down GEMM, top-k weighted sum), router not
    included, as the reference ``moe.csv``. ``moe_ep > 1``: the GPU holds ``E / moe_ep`` experts
    and gets all ``T`` tokens; slots routed elsewhere are skipped. GPU: L2 flushed before each
    call (weights cold)."""
    shapes, dists = _moe_sweep(ctx)
    impls = list(IMPLS)
    if ctx.triton_ok:
        impls.append("triton_fused_moe")
    impls = _validate_moe_impls(ctx, impls)
    dt, label = ctx.dtype, DTYPE_LABEL[ctx.dtype]
    b = torch.tensor([], dtype=dt).element_size()
    pad_limit = 8 * GiB if ctx.cuda else 256 * MiB
    for h, inter, e, k, ep, ts in shapes:
        e_local = e // ep
        try:
            w1 = ctx.randn(e_local, 2 * inter, h, dtype=dt, scale=0.02)
            w2 = ctx.randn(e_local, h, inter, dtype=dt, scale=0.02)
        except Exception as exc:  # noqa: BLE001
            ctx.error(f"moe weights H={h} I={inter} E={e} ep={ep}", exc)
            continue
        for t in ts:
            x = ctx.randn(t, h, dtype=dt)
            for dist in dists:
                seed = (t * 1_000_003 + h * 7919 + inter * 104_729 + e * 31 + k * 17 + ep) % 2**31
                ids_np, w_np, counts = make_routing(t, e, k, dist, moe_ep=ep, seed=seed)
                ids = torch.from_numpy(ids_np).to(ctx.device)
                wts = torch.from_numpy(w_np).to(ctx.device)
                local = counts[:e_local]
                info = {"local_slots": int(local.sum()), "max_expert_load": int(local.max()),
                        "active_local_experts": int((local > 0).sum())}
                for impl in impls:
                    if impl == "torch_bmm_padded" and \
                            e_local * int(local.max()) * max(h, 2 * inter) * b > pad_limit:
                        ctx.skipped.setdefault("moe:torch_bmm_padded", "padded activations over "
                                               f"{pad_limit // GiB} GiB for some rows")
                        continue
                    kw = {"all_local": ep == 1} if impl in ("torch_grouped_mm",
                                                             "triton_fused_moe") else {}
                    row_info = dict(info)
                    if impl == "triton_fused_moe":
                        from .triton_moe import get_config
                        row_info["config"] = get_config(t)
                    try:
                        samples = ctx.measure(
                            lambda: moe_experts(x, ids, wts, w1, w2, impl, **kw), heavy=True)
                        ctx.row("moe", samples, row_info, kernel=impl, dtype=label,
                                num_tokens=t, hidden_size=h, inter_size=inter, num_experts=e,
                                topk=k, moe_tp=1, moe_ep=ep, distribution=dist)
                    except Exception as exc:  # noqa: BLE001
                        ctx.error(f"moe {impl} T={t} H={h} I={inter} E={e} k={k} ep={ep} {dist}",
                                  exc)
        del w1, w2
        if ctx.cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 7. collectives
# ---------------------------------------------------------------------------------------------
def bench_collective(ctx: Context) -> None:
    n = torch.cuda.device_count() if ctx.cuda else 0
    if n < 2:
        ctx.skipped["collective"] = (f"needs more than one visible GPU (found {n}); "
                                     "collective.csv not written")
        return
    from .collective import run_collectives
    run_collectives(ctx, n)


BENCHMARKS: dict[str, Callable[[Context], None]] = {
    "launch": bench_launch,
    "stream": bench_stream,
    "gemm": bench_gemm,
    "router": bench_router,
    "elementwise": bench_elementwise,
    "moe": bench_moe,
    "collective": bench_collective,
}


def run_benchmark(ctx: Context, name: str, log) -> dict:
    t0 = time.perf_counter()
    before = {k: s.rows for k, s in ctx.sinks.items()}
    n_err = len(ctx.errors)
    try:
        with torch.inference_mode():
            BENCHMARKS[name](ctx)
    except Exception as e:  # noqa: BLE001 - one benchmark failing must not lose the others
        ctx.error(f"{name} (aborted)", e)
        ctx.extra.setdefault("tracebacks", {})[name] = traceback.format_exc()[-2000:]
    if ctx.cuda:
        torch.cuda.synchronize()
    rows = {k: s.rows - before.get(k, 0) for k, s in ctx.sinks.items()
            if s.rows - before.get(k, 0)}
    res = {"seconds": round(time.perf_counter() - t0, 2), "rows": rows,
           "errors": len(ctx.errors) - n_err}
    log(f"  {name:<12} {res['seconds']:7.1f} s  rows {rows or '{}'}"
        + (f"  errors {res['errors']}" if res["errors"] else ""))
    return res
