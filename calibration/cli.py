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


def _fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fit import run_fit

    source, base = Path(args.source), Path(args.base)
    if not source.exists():
        raise CalibrationError(f"--from: {source} does not exist")
    if not base.exists():
        raise CalibrationError(f"--base: {base} does not exist (give a hardware_profiles/*.yaml)")
    report = run_fit(source, base, Path(args.out), args.transfer)
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


def _accuracy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .accuracy import write_report

    tables = Path(args.tables)
    if not tables.is_dir():
        raise CalibrationError(f"--tables: {tables} is not a folder")
    write_report(tables, Path(args.out))
    print(f"wrote {args.out}")
    return 0


register(Subcommand("accuracy", "write docs/accuracy.md: validate every table, leave-one-shape-"
                    "out MoE accuracy", _configure_accuracy, _accuracy))


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
