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
# PLACE FOR THE `fit` SUB-COMMAND (written by the fitting code). Register it here, e.g.:
#
#     def _configure_fit(p): p.add_argument("--in", dest="inp", required=True); ...
#     def _fit(args): from .fit import fit; return fit(args)
#     register(Subcommand("fit", "fit profile parameters to a run's CSVs", _configure_fit, _fit))
#
# It can read the CSVs with ``calibration.layouts.LAYOUTS`` (no torch needed).
# -----------------------------------------------------------------------------------------------


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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
