"""``python -m calibration run``: checks the device, runs the benchmarks, writes ``device.json``."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from .cli import CalibrationError

CPU_TRITON_REASON = ("no GPU: the Triton fused-MoE kernel runs on CUDA only (the CPU torch wheel "
                     "has no Triton backend; TRITON_INTERPRET=1 is for correctness tests, not "
                     "timing)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise CalibrationError(
            f"torch is not installed ({e}); on CPU: pip install torch==2.13.0") from None
    return torch


def _check_device(torch, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        raise CalibrationError(f"--device cuda: no CUDA GPU is visible (torch {torch.__version__}, "
                               f"{build}); use --device cpu")


def cpu_dtype_probe(torch) -> dict:
    """bf16 vs fp32 ``F.linear`` (m=64, n=k=512, one thread) on this CPU: bf16 is used only if it
    is at most 2x slower than fp32 (on AVX2-only CPUs it is 5-70x slower)."""
    import torch.nn.functional as F
    from .timing import CpuTimer
    timer, res = CpuTimer(), {}
    threads = torch.get_num_threads()
    # one thread and the min of the samples: on a busy machine a multi-threaded GEMM waits for
    # descheduled threads, which says nothing about bf16 vs fp32 (the sweeps keep the default)
    torch.set_num_threads(1)
    try:
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            x = torch.randn(64, 512, dtype=dt)
            w = torch.randn(512, 512, dtype=dt)
            res[name] = min(timer.measure(lambda: F.linear(x, w), budget_s=0.03, warmup=2,
                                          min_samples=5, max_samples=10))
    finally:
        torch.set_num_threads(threads)
    ratio = res["bfloat16"] / res["float32"]
    chosen = "bfloat16" if ratio <= 2.0 else "float32"
    return {"linear_64x512x512_us": {k: round(v, 2) for k, v in res.items()},
            "bf16_over_fp32": round(ratio, 2), "chosen": chosen,
            "rule": "bfloat16 if at most 2x slower than float32 on this CPU, else float32"}


def cpu_flush_bytes(cache_bytes: dict) -> int:
    """Bytes to write to evict the CPU caches: twice the L2 and L3 together (``device.json``
    ``cpu.cache_bytes``); 64 MiB where sysfs gave no sizes."""
    total = int(cache_bytes.get("L2", 0)) + int(cache_bytes.get("L3", 0))
    return 2 * total if total else 64 * 1024 * 1024


def _triton_status(device: str) -> tuple[bool, str | None]:
    if device != "cuda":
        return False, CPU_TRITON_REASON
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        from . import triton_moe  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"importing the Triton kernels failed: {type(e).__name__}: {e}"
    return True, None


def run(args) -> int:
    torch = _import_torch()
    _check_device(torch, args.device)
    from . import benchmarks as B
    from .device import device_facts, device_name, gpu_clocks, system_id_for
    from .timing import FLUSH_BYTES, make_timer

    names = list(B.BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in names if n not in B.BENCHMARKS]
        if bad:
            raise CalibrationError(f"--only: unknown benchmark(s) {', '.join(bad)}; known: "
                                   f"{', '.join(B.BENCHMARKS)}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibrationError(f"--out {out}: cannot create the folder ({e.strerror})") from None

    t_start = time.perf_counter()
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise CalibrationError(f"--threads {threads}: give 1 or more")
        torch.set_num_threads(threads)  # before device_facts: it records the thread count
    clock = getattr(args, "clock", "wall") or "wall"
    if clock == "thread":
        if args.device != "cpu":
            raise CalibrationError("--clock thread is a CPU timer; a GPU run times with CUDA "
                                   "events")
        if torch.get_num_threads() != 1:
            raise CalibrationError("--clock thread needs --threads 1: the thread clock sees only "
                                   "the calling thread's work")
    facts = device_facts(args.device)
    cpu_flush = 0
    if getattr(args, "cpu_flush", False):
        if args.device != "cpu":
            raise CalibrationError("--cpu-flush is for CPU runs (a GPU run always flushes L2)")
        cpu_flush = cpu_flush_bytes(facts["cpu"].get("cache_bytes") or {})
    name = device_name(args.device)
    system = args.system or system_id_for(name, args.device)
    if args.device == "cuda":
        dtype, probe = torch.bfloat16, None
    else:
        probe = cpu_dtype_probe(torch)
        dtype = getattr(torch, probe["chosen"])
    triton_ok, triton_reason = _triton_status(args.device)

    ctx = B.Context(device=args.device, quick=args.quick, out=out, system=system, gpu=name,
                    dtype=dtype, timer=make_timer(args.device, clock, cpu_flush),
                    triton_ok=triton_ok)
    if triton_reason:
        ctx.skipped["triton_fused_moe"] = triton_reason
    _log(f"calibration run: device={args.device} ({name}), system={system}, "
         f"dtype={B.DTYPE_LABEL[dtype]}, quick={args.quick}, out={out}")

    report = {
        **facts,
        "system": system,
        "gpu_column": name,
        "command": " ".join(["python -m calibration"] + sys.argv[1:]),
        "quick": args.quick,
        "dtype": B.DTYPE_LABEL[dtype],
        "cpu_dtype_probe": probe,
        "timing": ({"method": "CUDA events, one pair per call, median", "l2_flush_bytes":
                    FLUSH_BYTES, "flush_us": round(getattr(ctx.timer, "flush_us", 0.0), 2)}
                   if args.device == "cuda" else
                   {"method": ("time.thread_time_ns (calling thread's CPU time, one torch "
                               "thread)" if clock == "thread" else "time.perf_counter_ns")
                    + ", median (calls < 100 us timed in batches)"
                    + (", caches evicted before each timed call" if cpu_flush else ""),
                    "clock": clock, "cpu_flush_bytes": cpu_flush, "l2_flush_bytes": 0}),
        "benchmarks": {},
    }
    _write_json(out / "device.json", report)  # early copy: a crash still leaves device facts
    try:
        for n in names:
            report["benchmarks"][n] = B.run_benchmark(ctx, n, _log)
    finally:
        ctx.close()
        if args.device == "cuda":
            report["clocks_after"] = gpu_clocks()
        report["files"] = sorted(f"{layout}.csv" for layout in ctx.sinks)
        report["skipped"] = ctx.skipped
        report["errors"] = ctx.errors
        report.update({k: v for k, v in ctx.extra.items()})
        report["total_seconds"] = round(time.perf_counter() - t_start, 2)
        _write_json(out / "device.json", report)
    _log(f"done in {report['total_seconds']:.1f} s: {', '.join(report['files'])}"
         + (f"; {len(ctx.errors)} error(s), see device.json" if ctx.errors else ""))
    return 0


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
