"""``python -m calibration loop``: the whole calibration method, end to end, on this CPU.

1. **calibrate**: ``python -m calibration run --device cpu [--quick] --threads 1 --clock thread
   --cpu-flush --out DIR/run`` (launch, stream, GEMM, router, elementwise and MoE-expert
   microbenchmarks);
2. **profile**: :mod:`calibration.cpu_profile` turns that run into ``DIR/profile/cpu.yaml`` (peak
   rates, dispatch cost, tiles: every number measured or fitted from the run, with its source);
3. **fit**: ``python -m calibration fit --from DIR/fit_tables --base DIR/profile/cpu.yaml --out
   DIR/profile/cpu.calibrated.yaml --multistart`` on the run's ``gemm.csv`` and the ``moe.csv``
   rows of the torch expert path being predicted (``--impl``; the run times three, each its own
   kernel) with at least one token per expert, the regime of the predicted layers
   (:func:`prefill_regime`); best of several starts (:mod:`calibration.fit_starts`);
4. **predict and measure** MoE layers of shapes the run never timed (hidden, inter, experts and
   top-k all checked against ``moe.csv``): one forward of :class:`calibration.moe_layer.MoELayer`
   (router GEMM, softmax, top-k, expert path, combine) is timed, and moesim prices the same call
   on the calibrated profile with the functions ``predict`` uses for a MoE layer
   (:func:`moesim.costs.moe.router` + :func:`moesim.costs.moe.expert_ops`, fused strategy, the
   path ``validate`` fits and checks ``moe.csv`` with) for the routing the layer actually produced;
5. **report** measured vs predicted per layer, the absolute percentage error per shape (median
   over its token counts) and the median APE over all layers; ``DIR/loop.json`` keeps it all.

Why one thread and the thread clock by default: on a shared machine a multi-threaded torch op
waits whenever one of its threads is descheduled (whole scheduler ticks, 4-16 ms), and the wall
clock counts every other process's time slices. With one thread every op runs in the calling
thread, so its CPU time (``time.thread_time_ns``) is the op's own cost on one core: the same clock
times the calibration tables and the layers, so the method is tested, not the neighbours. Cache
and memory-bandwidth interference by other processes still shows; layer sizes are chosen so each
call takes several ms and the median of repeated calls (after warm-up) is used. Caches are
evicted before every timed call (``--cpu-flush``), in the run and for the layers: a layer streams
its experts' weights from memory, and a GEMM timed on weights left in the cache by its previous
call would calibrate another regime.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .cli import CalibrationError

#: MoE shapes of the loop (hidden, per-expert inter, experts, top-k): none is in the CPU sweep
#: of ``benchmarks._moe_sweep`` (the loop checks that against the run's ``moe.csv``), both lie
#: within its ranges (hidden 256-1024, inter 256-512, 8-32 experts, top-2 to top-4), and the
#: token counts give 8-32 tokens per expert at 5-30 ms per forward on one core.
DEFAULT_SHAPES = ((768, 384, 16, 4), (384, 512, 8, 2))
DEFAULT_TOKENS = (32, 64, 128)
MAX_MEDIAN_APE_PCT = 20.0  # issue 4: "median error <= 20 %" for the CPU loop

MOESIM_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerShape(_Model):
    hidden: int = Field(..., ge=1)
    inter: int = Field(..., ge=1, description="per-expert intermediate size")
    num_experts: int = Field(..., ge=1)
    topk: int = Field(..., ge=1)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return self.hidden, self.inter, self.num_experts, self.topk

    @property
    def label(self) -> str:
        return f"H{self.hidden}/I{self.inter}/E{self.num_experts}/k{self.topk}"


class LayerResult(_Model):
    shape: LayerShape
    num_tokens: int
    measured_us: float = Field(..., description="median of the timed forwards, µs")
    samples: int
    measured_spread_pct: float = Field(..., description="(p75 - p25) / median of the samples, %")
    predicted_us: float = Field(..., description="moesim, calibrated CPU profile, µs")
    ape_pct: float = Field(..., description="|predicted / measured - 1| x 100")
    expert_loads: list[int] = Field(..., description="tokens routed to each expert")
    predicted_ops_us: dict[str, float] = Field(..., description="per-op predicted µs")


class LoopReport(_Model):
    out: str
    run_dir: str
    profile: str
    overlay: str
    commands: list[str] = Field(..., description="the steps as stand-alone commands")
    impl: str
    dtype: str
    threads: int
    clock: str
    calibration_shapes: list[LayerShape]
    fit: dict = Field(..., description="what `calibration fit` reported per table")
    layers: list[LayerResult]
    per_shape_ape_pct: dict[str, float] = Field(..., description="median over token counts")
    median_ape_pct: float
    max_median_ape_pct: float = MAX_MEDIAN_APE_PCT
    seconds: dict[str, float]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def calibration_shapes(run_dir: Path) -> list[LayerShape]:
    """The (hidden, inter, experts, top-k) shapes the run's ``moe.csv`` timed."""
    keys = {(int(r["hidden_size"]), int(r["inter_size"]), int(r["num_experts"]), int(r["topk"]))
            for r in _read_rows(run_dir / "moe.csv")}
    return [LayerShape(hidden=h, inter=i, num_experts=e, topk=k) for h, i, e, k in sorted(keys)]


def prefill_regime(row: dict[str, str]) -> bool:
    """A ``moe.csv`` row with at least one routed token slot per expert on average
    (``num_tokens * topk >= num_experts``): most experts run, as in every layer the loop
    predicts. Rows below it (decode-sized: a handful of experts, each on one token) are another
    regime on a CPU, where the expert path's fixed costs (host sync, per-expert dispatch) are
    most of the time; the fused-MoE cost model has one fixed time per kernel, so fitting both
    regimes at once trades one against the other."""
    return int(row["num_tokens"]) * int(row["topk"]) >= int(row["num_experts"])


def write_fit_tables(run_dir: Path, dest: Path, impl: str) -> list[Path]:
    """The fit's input folder: the run's ``gemm.csv`` as is, and the ``moe.csv`` rows of
    ``impl`` (the run times several expert paths in one table; each is a kernel of its own) in
    the regime the loop predicts (:func:`prefill_regime`)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    gemm = run_dir / "gemm.csv"
    if gemm.is_file():
        (dest / "gemm.csv").write_bytes(gemm.read_bytes())
        out.append(dest / "gemm.csv")
    with (run_dir / "moe.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r["kernel"] == impl and prefill_regime(r)]
    if not rows:
        raise CalibrationError(f"{run_dir / 'moe.csv'} has no {impl} rows with num_tokens * "
                               "topk >= num_experts to fit (the run skips a path that fails "
                               "validation: see device.json)")
    with (dest / "moe.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    out.append(dest / "moe.csv")
    return out


def predict_layer(hw, shape: LayerShape, num_tokens: int, loads, dtype: str
                  ) -> tuple[float, dict[str, float]]:
    """moesim's time in µs of one MoE layer forward (router + top-k + fused expert path) for the
    per-expert ``loads``, and the per-op times. ``dtype``: moesim dtype (``fp32`` on CPU)."""
    import numpy as np

    from moesim.costs import moe
    from moesim.costs.op import eager_time_us

    ops = moe.router(num_tokens, shape.hidden, shape.num_experts, shape.topk, hw, "softmax",
                     dtype)
    ops += moe.expert_ops(np.asarray(loads, dtype=np.int64), num_tokens, shape.topk,
                          shape.hidden, shape.inter, hw, dtype, dtype, True, "fused")
    per_op: dict[str, float] = {}
    for o in ops:
        per_op[o.name] = round(per_op.get(o.name, 0.0) + o.total_us, 2)
    return float(eager_time_us(ops)), per_op


def _spread_pct(samples) -> float:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    med = statistics.median(samples)
    return round((q[2] - q[0]) / med * 100.0, 2) if med > 0 else 0.0


def run_loop(out: Path, *, quick: bool = True, impl: str = "torch_loop", threads: int = 1,
             clock: str = "thread", cpu_flush: bool = True, shapes=DEFAULT_SHAPES,
             tokens=DEFAULT_TOKENS,
             from_run: Optional[Path] = None, budget_s: float = 0.3, min_samples: int = 7,
             max_samples: int = 25) -> LoopReport:
    """Run the loop (module docstring) into ``out``; returns the report (also ``out/loop.json``).
    ``from_run``: reuse a calibration run folder instead of running one (it must have been timed
    with the same threads, clock and cache flushing, or the comparison means nothing: checked).
    torch's thread count is restored on return."""
    import torch

    from .moe_layer import IMPLS

    if impl not in IMPLS:
        raise CalibrationError(f"--impl {impl}: known torch paths are {', '.join(IMPLS)}")
    if clock == "thread" and threads != 1:
        raise CalibrationError("--clock thread needs --threads 1 (the thread clock sees only the "
                               "calling thread's work)")
    held_out = [LayerShape(hidden=h, inter=i, num_experts=e, topk=k) for h, i, e, k in shapes]
    for s in held_out:
        if s.topk > s.num_experts:
            raise CalibrationError(f"--shape {s.label}: top-k exceeds the expert count")
    threads_before = torch.get_num_threads()
    try:
        return _run_loop(Path(out), quick, impl, threads, clock, cpu_flush, held_out, tokens,
                         from_run, budget_s, min_samples, max_samples)
    finally:
        torch.set_num_threads(threads_before)  # the run and the layers set it


def _run_loop(out: Path, quick: bool, impl: str, threads: int, clock: str, cpu_flush: bool,
              held_out: list[LayerShape], tokens, from_run: Optional[Path], budget_s: float,
              min_samples: int, max_samples: int) -> LoopReport:
    import torch

    from moesim.spec.hardware import load_profile

    from .cpu_profile import ProfileError, write_cpu_profile
    from .fit_starts import run_fit_multistart
    from .moe_layer import measure_moe_layer
    from .runner import run as run_calibration

    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    run_dir = Path(from_run) if from_run else out / "run"
    run_cmd = (f"python -m calibration run --device cpu{' --quick' if quick else ''} "
               f"--threads {threads} --clock {clock}{' --cpu-flush' if cpu_flush else ''} "
               f"--out {run_dir}")
    if from_run is None:
        _log(f"[1/4] calibrate: {run_cmd}")
        rc = run_calibration(Namespace(device="cpu", out=str(run_dir), quick=quick, system=None,
                                       only=None, threads=threads, clock=clock,
                                       cpu_flush=cpu_flush))
        if rc:
            raise CalibrationError(f"the calibration run failed (exit code {rc})")
    elif not (run_dir / "moe.csv").is_file():
        raise CalibrationError(f"--from-run {run_dir}: no moe.csv (not a calibration run folder)")
    dev = json.loads((run_dir / "device.json").read_text())
    if dev.get("device") != "cpu":
        raise CalibrationError(f"{run_dir} is not a CPU run")
    run_threads = int((dev.get("cpu") or {}).get("torch_num_threads") or 0)
    timing = dev.get("timing") or {}
    run_clock = timing.get("clock", "wall")
    flush_bytes = int(timing.get("cpu_flush_bytes") or 0)
    if (run_threads, run_clock, flush_bytes > 0) != (threads, clock, cpu_flush):
        raise CalibrationError(
            f"{run_dir} was timed with {run_threads} thread(s) on the {run_clock} clock, caches "
            f"{'evicted' if flush_bytes else 'warm'}; the loop times layers with {threads} on "
            f"the {clock} clock, caches {'evicted' if cpu_flush else 'warm'}: give the same "
            "--threads / --clock / --cpu-flush")
    seconds["calibrate"] = round(time.perf_counter() - t, 2)

    # A held-out shape must be one the fit never saw.
    seen = calibration_shapes(run_dir)
    clash = [s.label for s in held_out if s.key in {c.key for c in seen}]
    if clash:
        raise CalibrationError(f"shape(s) {', '.join(clash)} were timed by the calibration run; "
                               "the loop predicts shapes the fit has not seen")

    t = time.perf_counter()
    profile = out / "profile" / "cpu.yaml"
    overlay_path = profile.with_name("cpu.calibrated.yaml")
    fit_dir = out / "fit_tables"
    commands = [run_cmd,
                f"python -m calibration cpu-profile --from {run_dir} --out {profile}",
                f"python -m calibration fit --from {fit_dir} --base {profile} --out {overlay_path}"
                " --multistart"]
    _log(f"[2/4] CPU profile: {commands[1]}")
    try:
        write_cpu_profile(run_dir, profile)
    except ProfileError as e:
        raise CalibrationError(str(e)) from None
    write_fit_tables(run_dir, fit_dir, impl)
    _log(f"[3/4] fit ({impl} rows of moe.csv, gemm.csv): {commands[2]}")
    fit_report = run_fit_multistart(fit_dir, profile, overlay_path,
                                    hardware=str(profile.resolve()))
    hw = load_profile(str(profile))  # the overlay next to it is applied
    seconds["profile_and_fit"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    dtype_label = dev.get("dtype", "float32")
    dtype = MOESIM_DTYPE.get(dtype_label)
    if dtype is None:
        raise CalibrationError(f"{run_dir}: dtype {dtype_label!r} has no moesim mapping")
    _log(f"[4/4] time and predict {len(held_out) * len(tokens)} MoE layers ({impl}, "
         f"{dtype_label}, {threads} thread(s), {clock} clock)")
    torch.set_num_threads(threads)
    layers = []
    for s in held_out:
        for n in tokens:
            m = measure_moe_layer(n, s.hidden, s.inter, s.num_experts, s.topk, impl,
                                  getattr(torch, dtype_label), "cpu", budget_s=budget_s,
                                  min_samples=min_samples, max_samples=max_samples, warmup=2,
                                  clock=clock, cpu_flush_bytes=flush_bytes)
            pred, per_op = predict_layer(hw, s, n, m.expert_loads, dtype)
            layers.append(LayerResult(
                shape=s, num_tokens=n, measured_us=round(m.median_us, 2),
                samples=len(m.samples_us), measured_spread_pct=_spread_pct(m.samples_us),
                predicted_us=round(pred, 2),
                ape_pct=round(abs(pred / m.median_us - 1.0) * 100.0, 2),
                expert_loads=list(m.expert_loads), predicted_ops_us=per_op))
    seconds["layers"] = round(time.perf_counter() - t, 2)

    per_shape = {s.label: round(statistics.median(r.ape_pct for r in layers if r.shape == s), 2)
                 for s in held_out}
    report = LoopReport(
        out=str(out), run_dir=str(run_dir), profile=str(profile), overlay=str(overlay_path),
        commands=commands, impl=impl, dtype=dtype_label, threads=threads, clock=clock,
        calibration_shapes=seen, fit=fit_report, layers=layers, per_shape_ape_pct=per_shape,
        median_ape_pct=round(statistics.median(r.ape_pct for r in layers), 2), seconds=seconds)
    (out / "loop.json").write_text(report.model_dump_json(indent=2) + "\n")
    return report


def format_report(rep: LoopReport) -> str:
    """The table ``python -m calibration loop`` prints."""
    lines = [f"CPU calibration loop: {rep.impl}, {rep.dtype}, {rep.threads} thread(s), "
             f"{rep.clock} clock; calibrated on {len(rep.calibration_shapes)} other shapes "
             f"({', '.join(s.label for s in rep.calibration_shapes)})",
             f"  {'shape (unseen)':<22} {'tokens':>6} {'measured':>11} {'predicted':>11} "
             f"{'error':>7} {'spread':>7}"]
    for r in rep.layers:
        err = (r.predicted_us / r.measured_us - 1.0) * 100.0
        lines.append(f"  {r.shape.label:<22} {r.num_tokens:>6} {r.measured_us / 1e3:>8.2f} ms "
                     f"{r.predicted_us / 1e3:>8.2f} ms {err:>+6.1f}% "
                     f"{r.measured_spread_pct:>6.1f}%")
    for label, ape in rep.per_shape_ape_pct.items():
        lines.append(f"  {label:<22} APE {ape:.1f}% (median over its token counts)")
    verdict = "ok" if rep.median_ape_pct <= rep.max_median_ape_pct else "ABOVE the target"
    lines.append(f"median APE {rep.median_ape_pct:.1f}% over {len(rep.layers)} layers "
                 f"(target <= {rep.max_median_ape_pct:.0f}%: {verdict})")
    lines.append(f"report: {Path(rep.out) / 'loop.json'}; steps: " + " && ".join(rep.commands))
    return "\n".join(lines)
