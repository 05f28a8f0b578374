"""Command line of the calibration package: ``python -m calibration <command> ...``.

Sub-commands live in the ``SUBCOMMANDS`` registry (name -> :class:`Subcommand`); ``build_parser``
makes one argparse sub-parser per entry, ``main`` dispatches to its handler. Handlers import their
heavy modules (torch) lazily, so ``--help`` and torch-free commands work without torch.

Errors the user can fix raise :class:`CalibrationError`: one line on stderr, exit code 2, no
traceback (argparse usage errors exit 2 too).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable


class CalibrationError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]   # adds the sub-command's arguments
    handler: Callable[[argparse.Namespace], int]           # runs it; returns the exit code


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(sub: Subcommand) -> Subcommand:
    if sub.name in SUBCOMMANDS:
        raise ValueError(f"sub-command {sub.name!r} registered twice")
    SUBCOMMANDS[sub.name] = sub
    return sub


# --- run ---------------------------------------------------------------------------------------
def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, choices=("cpu", "cuda"),
                   help="where to run the kernels (cuda = GPU 0)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: one CSV per layout, device.json, samples/")
    p.add_argument("--quick", action="store_true",
                   help="small sweeps (CPU: about a minute on 2 cores; GPU: a few minutes)")
    p.add_argument("--system", metavar="ID", default=None,
                   help="value of the `system` column (default: cpu, or the hardware profile id "
                        "matching the GPU name, e.g. h100_sxm; else the lowercased name)")
    p.add_argument("--only", metavar="LIST", default=None,
                   help="comma-separated benchmarks to run (default: all): "
                        "launch,stream,gemm,router,elementwise,moe,collective")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's own choice). On a shared "
                        "CPU, 1 avoids multi-ms stalls of multi-threaded ops whose other "
                        "threads were descheduled")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="CPU timer clock: wall (default) or thread = the calling thread's CPU "
                        "time, which leaves out time-slicing by other processes; needs "
                        "--threads 1 (every op then runs in the calling thread)")
    p.add_argument("--cpu-flush", action="store_true",
                   help="CPU: evict the caches before every timed call by writing twice their "
                        "size (weights cold, as a GPU run flushes L2); default: caches warm")


def _run(args: argparse.Namespace) -> int:
    from .runner import run
    return run(args)


register(Subcommand("run", "run the calibration microbenchmarks and write raw CSVs",
                    _configure_run, _run))

# --- fit ---------------------------------------------------------------------------------------
def _configure_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True,
                   help="a folder of measured CSVs (reference layouts) or one CSV")
    p.add_argument("--base", required=True, help="base profile YAML, e.g. hardware_profiles/h100_sxm.yaml")
    p.add_argument("--out", required=True, help="overlay to write, e.g. hardware_profiles/h100_sxm.calibrated.yaml")
    p.add_argument("--transfer", nargs="*", default=[], metavar="ID",
                   help="also write overlays for these profile ids with the fitted values marked "
                        "as estimates (same-architecture GPUs without measurements)")
    p.add_argument("--time-unit", action="append", default=[], metavar="TABLE=UNIT",
                   help="unit a table's latency_us column actually holds, e.g. moe_a2a.csv=ns "
                        "(us, ns or ms; repeatable; as `moesim validate --time-unit`). A moe_a2a "
                        "table implausible in µs is skipped unless named here")
    p.add_argument("--multistart", action="store_true",
                   help="fit from each start of a grid of efficiencies and keep the lowest-loss "
                        "fit (calibration/fit_starts.py; the CPU loop uses it)")


def _fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fit import run_fit

    source, base = Path(args.source), Path(args.base)
    if not source.exists():
        raise CalibrationError(f"--from: {source} does not exist")
    if not base.exists():
        raise CalibrationError(f"--base: {base} does not exist (give a hardware_profiles/*.yaml)")
    # The tables' rows are priced on the base file itself (not on the profile id their `system`
    # column names): the same profile for the shipped ids, and the only way to reach a profile
    # that lives outside hardware_profiles/ (e.g. the CPU profile of a calibration run).
    time_units = _time_units(args.time_unit)
    if args.multistart:
        if time_units:
            raise CalibrationError("--multistart does not take --time-unit; fit without "
                                   "--multistart for those tables")
        if args.transfer:
            raise CalibrationError("--multistart does not write --transfer overlays; fit "
                                   "without --multistart for those")
        from .fit_starts import run_fit_multistart
        report = run_fit_multistart(source, base, Path(args.out), hardware=str(base.resolve()))
    else:
        report = run_fit(source, base, Path(args.out), args.transfer,
                         hardware=str(base.resolve()), time_units=time_units)
    for name, st in report.items():
        if "skipped" in st:
            print(f"{name:<28} skipped: {st['skipped']}")
        else:
            print(f"{name:<28} {st['all_rows']:>6} rows  median APE {st['all_rows_median_ape_pct']:5.1f}%"
                  f"  p90 {st['all_rows_p90_ape_pct']:5.1f}%  ({len(st['parameters'])} parameters)")
    print(f"wrote {args.out}")
    return 0


register(Subcommand("fit", "fit a profile's kernel and collective parameters to measured CSVs",
                    _configure_fit, _fit))


def _configure_accuracy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tables", default="../shared/reference/measurements",
                   help="folder with e2e_serving.csv and <system>/*.csv")
    p.add_argument("--out", default="docs/accuracy.md")
    p.add_argument("--time-unit", action="append", default=[], metavar="TABLE=UNIT",
                   help="unit a table's latency_us column holds, e.g. moe_a2a.csv=ns")


def _time_units(items: list[str]) -> dict[str, str]:
    """``TABLE=UNIT`` options as {file name: unit}; a malformed one is a CalibrationError."""
    from pathlib import Path

    out = {}
    for item in items:
        name, _, unit = item.partition("=")
        if not name or unit not in ("us", "ns", "ms"):
            raise CalibrationError(f"--time-unit: {item!r} is not TABLE=UNIT with UNIT us, ns "
                                   "or ms (e.g. moe_a2a.csv=ns)")
        out[Path(name).name] = unit
    return out


def _accuracy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .accuracy import write_report

    tables = Path(args.tables)
    if not tables.is_dir():
        raise CalibrationError(f"--tables: {tables} is not a folder")
    write_report(tables, Path(args.out), time_units=_time_units(args.time_unit))
    print(f"wrote {args.out}")
    return 0


register(Subcommand("accuracy", "write docs/accuracy.md: validate every table, leave-one-shape-"
                    "out MoE accuracy", _configure_accuracy, _accuracy))


def _configure_fit_framework(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", default="../shared/reference/measurements/e2e_serving.csv",
                   help="an e2e_serving CSV (reference layout)")
    p.add_argument("--backend", action="append", default=None, metavar="ID",
                   help="fit only this backend (repeatable; default: every backend in the table "
                        "that has a moesim/frameworks/<id>.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")


def _fit_framework(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fit_framework import run as run_fit_framework

    table = Path(args.table)
    if not table.is_file():
        raise CalibrationError(f"--table: {table} is not a file (give an e2e_serving CSV)")
    report = run_fit_framework(table, args.backend, write=not args.dry_run)
    traffic = report.pop("traffic")
    for backend, fit in report.items():
        if "skipped" in fit:
            print(f"{backend:<8} skipped: {fit['skipped']}")
            continue
        print(f"{backend:<8} {fit['rows']:>4} rows  step_overhead_us {fit['step_overhead_us']:8.1f}"
              f"  request_overhead_us {fit['request_overhead_us']:10.1f}  median APE TTFT "
              f"{fit['ttft_median_ape_pct']:5.1f}%  TPOT {fit['tpot_median_ape_pct']:5.1f}%")
        if "w4_loss" in fit:
            losses = "  ".join(f"{w:g}: {loss:.2f}" for w, loss in fit["w4_loss"].items())
            print(f"{'':<8} w4a16_moe_efficiency {fit['w4a16_moe_efficiency']:g}  "
                  f"({fit['w4_rows']} rows with 4-bit experts; robust loss {losses})")
    losses = "  ".join(f"s={s:g}: {loss:.2f}" for s, loss in traffic["loss_by_s"].items())
    print(f"traffic routing zipf s = {traffic['zipf_s']:g}  (robust loss {losses})")
    return 0


register(Subcommand("fit-framework", "fit the serving engines' step and request overheads "
                    "(moesim/frameworks/*.yaml) and the traffic's routing skew "
                    "(moesim/e2e_traffic.yaml) to an e2e_serving table",
                    _configure_fit_framework, _fit_framework))


# --- cpu-profile -------------------------------------------------------------------------------
def _configure_cpu_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="a `calibration run --device cpu` folder (device.json, launch.csv, "
                        "stream.csv, gemm.csv)")
    p.add_argument("--out", default=None, metavar="YAML",
                   help="profile to write (default DIR/profile/cpu.yaml); fit it with "
                        "`calibration fit --base YAML`")


def _cpu_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cpu_profile import ProfileError, write_cpu_profile

    source = Path(args.source)
    if not (source / "device.json").is_file():
        raise CalibrationError(f"--from: {source} is not a calibration run folder (no device.json)")
    try:
        path = write_cpu_profile(source, Path(args.out) if args.out else None)
    except ProfileError as e:
        raise CalibrationError(str(e)) from None
    print(f"wrote {path}")
    return 0


register(Subcommand("cpu-profile", "derive a hardware profile of this CPU from a CPU "
                    "calibration run (every number measured or fitted from it)",
                    _configure_cpu_profile, _cpu_profile))


# --- loop --------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        h, i, e, k = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give HIDDEN,INTER,EXPERTS,TOPK, e.g. 768,384,16,4") from None
    if min(h, i, e, k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be >= 1")
    return h, i, e, k


def _tokens(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give token counts like 32,128") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be >= 1")
    return vals


def _configure_loop(p: argparse.ArgumentParser) -> None:
    from .loop import DEFAULT_SHAPES, DEFAULT_TOKENS

    p.add_argument("--device", default="cpu", choices=("cpu",),
                   help="the loop runs on the CPU (a GPU calibrates with `run` + `fit`)")
    p.add_argument("--quick", action="store_true", help="the calibration run's small sweeps")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="working folder (default: a new temporary folder, printed)")
    p.add_argument("--from-run", default=None, metavar="DIR",
                   help="reuse this CPU calibration run instead of running one")
    p.add_argument("--impl", default="torch_loop",
                   help="torch expert path to fit and predict (torch_loop, torch_bmm_padded, "
                        "torch_grouped_mm; default torch_loop)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads for the run and the layers (default 1)")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread",
                   help="CPU clock (default thread: the calling thread's CPU time, needs "
                        "--threads 1)")
    p.add_argument("--warm-caches", dest="cpu_flush", action="store_false",
                   help="do not evict the CPU caches before each timed call (default: evict, "
                        "for the run and the layers alike)")
    p.add_argument("--shape", dest="shapes", type=_shape, action="append", default=None,
                   metavar="H,I,E,K",
                   help="an unseen MoE shape to predict (repeatable; default "
                        + " and ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES) + ")")
    p.add_argument("--tokens", type=_tokens, default=DEFAULT_TOKENS, metavar="LIST",
                   help="token counts per shape (default "
                        + ",".join(map(str, DEFAULT_TOKENS)) + ")")
    p.add_argument("--json", action="store_true", help="print the JSON report instead")


def _loop(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .loop import DEFAULT_SHAPES, format_report, run_loop
    from .runner import _import_torch

    _import_torch()  # one-line error without torch
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moesim-cpu-loop-"))
    rep = run_loop(out, quick=args.quick, impl=args.impl, threads=args.threads,
                   clock=args.clock, cpu_flush=args.cpu_flush,
                   shapes=args.shapes or DEFAULT_SHAPES, tokens=args.tokens,
                   from_run=Path(args.from_run) if args.from_run else None)
    print(rep.model_dump_json(indent=2) if args.json else format_report(rep))
    return 0


register(Subcommand("loop", "CPU end to end: calibrate, derive and fit a CPU profile, then "
                    "predict and time torch MoE layers of unseen shapes", _configure_loop, _loop))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibration",
        description="moesim calibration: microbenchmarks on real kernels and fitting.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_handler=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._handler(args) or 0)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # moesim.errors.InputError and friends: one line, no traceback
        if type(e).__name__ != "InputError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
