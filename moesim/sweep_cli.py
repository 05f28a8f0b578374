"""``sweep`` and ``recommend`` sub-commands; :func:`add_cli` registers them on the main parser.

Bad input raises :class:`~moesim.errors.InputError` (the CLI prints one line, exit 2)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .errors import InputError


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers needs an integer >= 1 or 'auto'; got "
                                         f"{text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers needs an integer >= 1 or 'auto'; got {n}")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs an integer >= 1; got {text!r}")
    return n


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a positive number; got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"needs a positive number; got {text!r}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs comma-separated integers; got {text!r}") \
            from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"needs comma-separated integers >= 1; got {text!r}")
    return out


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep, summary, write_table

    if args.ray and args.workers > 1:
        raise InputError("--ray", "give --ray or --workers, not both",
                         "Ray spreads the work over its cluster")
    out = args.out
    if out.endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError("--out", "writing parquet needs pyarrow",
                             "pip install pyarrow, or write .csv") from None
    spec = load_sweep(args.sweep)
    progress = False if args.no_progress else None
    result = run_sweep(spec, workers=args.workers, ray_address=args.ray, progress=progress,
                       verify=not args.no_verify, fast=not args.predict_only, limit=args.limit)
    write_table(result, out)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(result, out), file=sys.stderr)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from .recommend import DEFAULT_PRECISIONS, recommend, table, to_dict, write_frontier

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()] \
        if args.precisions else list(DEFAULT_PRECISIONS)
    kwargs: dict[str, Any] = {}
    if args.batch_sizes:
        kwargs["batch_sizes"] = args.batch_sizes
    rec = recommend(args.scenario, args.gpus, slo_ttft_ms=args.slo_ttft_ms,
                    slo_tpot_ms=args.slo_tpot_ms, precisions=precisions,
                    balanced=args.balanced, workers=args.workers, **kwargs)
    if args.out:
        write_frontier(rec, args.out)
    if args.json:
        print(json.dumps(to_dict(rec, args.top), indent=2))
    else:
        print(table(rec, args.top))
        if args.out:
            print(f"  frontier written to {args.out}")
    return 0 if rec.ranked else 1


def add_cli(subparsers: Any) -> None:
    """Register ``sweep`` and ``recommend`` on the main parser's sub-parsers."""
    ps = subparsers.add_parser(
        "sweep", help="evaluate a grid or random sample of scenarios, one row each",
        description="Evaluate the points of a sweep file (a base scenario plus axes; see "
                    "examples/sweeps/) and write one row per point: its inputs, feasibility "
                    "(with the reason) and the predict outputs.")
    ps.add_argument("sweep", help="sweep file (.yaml or .json)")
    ps.add_argument("--out", default="-",
                    help="output table: .csv, or .parquet when pyarrow is installed "
                         "(default: CSV on stdout)")
    ps.add_argument("--workers", type=_workers, default=1, metavar="N",
                    help="local processes (an integer or 'auto'; default 1)")
    ps.add_argument("--ray", metavar="ADDRESS", default=None,
                    help="run on a Ray cluster: its address, 'auto', or 'local' (needs ray)")
    ps.add_argument("--limit", type=_count, default=None, metavar="N",
                    help="only the first N points")
    ps.add_argument("--no-progress", action="store_true", help="no progress bar")
    ps.add_argument("--no-verify", action="store_true",
                    help="skip checking each group's first point against predict")
    ps.add_argument("--predict-only", action="store_true",
                    help="call predict for every point (slow; for checking the fast path)")
    ps.set_defaults(func=_cmd_sweep)

    pr = subparsers.add_parser(
        "recommend", help="best throughput per GPU on N GPUs under TTFT / TPOT SLOs",
        description="Search TP, EP, attention-DP, batch size and precision for the scenario's "
                    "model and workload on N GPUs; print the configurations with the best "
                    "output throughput per GPU that fit in memory and meet the SLOs. Exit 1 "
                    "when none does.")
    pr.add_argument("scenario", help="scenario file (.json or .yaml)")
    pr.add_argument("--gpus", type=_count, required=True, metavar="N", help="GPUs to use")
    pr.add_argument("--slo-ttft-ms", type=_positive, default=None, metavar="X",
                    help="mean TTFT limit in ms")
    pr.add_argument("--slo-tpot-ms", type=_positive, default=None, metavar="Y",
                    help="mean TPOT limit in ms")
    pr.add_argument("--precisions", default=None, metavar="LIST",
                    help="comma-separated among scenario, bf16, fp8-w8a16, fp8, fp8-kv8 "
                         "(default: scenario,bf16,fp8,fp8-kv8)")
    pr.add_argument("--batch-sizes", type=_int_list, default=None, metavar="LIST",
                    help="comma-separated batch sizes (default: 1,2,4,...,2048, plus the "
                         "largest that fits)")
    pr.add_argument("--balanced", action="store_true",
                    help="search with balanced routing (fast) whatever the scenario's routing")
    pr.add_argument("--top", type=_count, default=10, metavar="K",
                    help="configurations to print")
    pr.add_argument("--out", default=None, metavar="CSV", help="write the Pareto frontier here")
    pr.add_argument("--workers", type=_workers, default=1, metavar="N",
                    help="local processes (default 1)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=_cmd_recommend)
