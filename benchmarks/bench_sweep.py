"""Scenario evaluations per second of a sweep, whole process included.

Runs ``python -m moesim sweep examples/sweeps/mixtral-grid.yaml --out <tmp>.csv`` as a user
would (interpreter start, imports, sweep file, every point, the CSV) and divides the points by
the wall time. Also reports the child's CPU seconds (the machine may be shared: evaluations per
CPU second do not depend on what else runs) and the cost of just starting Python and importing
moesim. With ``--split routing`` (the default when the sweep has a ``routing`` axis) it also runs
the sweep once per routing value (the other axes unchanged), so balanced and drawn routing get
figures of their own.

    python benchmarks/bench_sweep.py                   # workers 1 and 2, best of 2
    python benchmarks/bench_sweep.py --workers 2 --repeat 3 --json

Figures, 2026-11-23, this 2-core VM (shared with other jobs: load average 1.0-1.4 during the
runs; best of 3; ``--json`` gives the same table with the load average):

    =============================  =======  =======  ======  =======  ===========
    sweep                          workers  points   wall s  evals/s  evals/CPU s
    =============================  =======  =======  ======  =======  ===========
    mixtral-grid.yaml              1        110,592  33.07    3,345    3,380
    (balanced + zipf routing)      2        110,592  19.26    5,743    3,085
    routing=balanced               1         55,296   8.87    6,234    6,207
                                   2         55,296   4.90   11,288    6,678
    routing=zipf (2 draws a step)  1         55,296  24.41    2,265    2,265
                                   2         55,296  14.15    3,908    2,069
    before: the old predict (one   1         55,296  13.40    4,127    4,111
    decode step + first-wave       2         55,296   8.68    6,370    3,851
    prefill), old grid, balanced
    =============================  =======  =======  ======  =======  ===========

Python start and ``import moesim`` take 0.4-0.5 s of each run.

Figures, 2026-12-02, after the drawn-routing work (issue 8): the machine was shared with four
other jobs (load average 5-8 on 2 CPUs), so wall figures are not comparable with the table
above and CPU seconds are inflated too (they moved by up to 30 % between identical runs). Each
pair below ran back to back, before (9091dd8) and after, same load; CSV byte-identical:

    =================================  =======  ===========  =========  =================
    sweep                              workers  CPU s        µs/eval    wall s (load)
    =================================  =======  ===========  =========  =================
    mixtral-grid.yaml (110,592)        2        31.3 → 20.8  283 → 188  66.5 → 41.3 (5-7)
    routing=zipf half (55,296)         1        18.6 → 13.6  336 → 246  35.9 → 32.0 (5)
    routing=balanced half (55,296)     1        6.8 → 6.1    122 → 111  12.4 → 11.5 (5)
    4 layouts x 4 dtypes x 2 routings  1        7.2 → 5.7    259 → 204  best of 3
    =================================  =======  ===========  =========  =================

At 188 µs of CPU an evaluation (measured under that load, which inflates it: the same "before"
run took 23.9 CPU s at load 0.3), two otherwise idle cores need about 10.4 s each plus about
1 s in the parent alone (start, gathering, CSV): roughly 10,000 evaluations/s or more, not yet
measured on an idle machine. Drawn routing now costs
about 2.2 times as much per point as balanced routing: each point lists the order in which
predict draws (``StochasticEvaluator._replay``) and runs ``serving_times`` once on the draws'
per-sample times (numpy arrays); every group prices the MoE layers of all its draws
(``StepPricer.moe_draws``, ranks holding one expert priced once per distinct (tokens, load)),
and the zipf draws reuse their pick probabilities (``routing._cps_tables``). Per group, the
self-check against ``predict`` costs 8 ms (balanced) to 20 ms (zipf).

Figures, 2026-12-02 (later), after vectorising drawn routing's serving times (issue 8): the
machine was shared again (load average 7.5-7.8 on 2 CPUs, so wall is dominated by the other
jobs and CPU seconds are inflated); ``--workers 2 --repeat 2``, before (7cde490) and after run
back to back; full-grid CSV byte-identical:

    =============================  =======  ============  ===========  ===============
    sweep (workers 2)              points   CPU s         µs/eval      wall s (load)
    =============================  =======  ============  ===========  ===============
    mixtral-grid.yaml              110,592  25.97 → 21.32  235 → 193   43.1 → 37.3 (7.5)
    routing=balanced               55,296    7.88 → 6.79   143 → 123   14.6 → 10.5 (7.5)
    routing=zipf                   55,296   19.73 → 15.38  357 → 278   38.6 → 28.4 (7.8)
    =============================  =======  ============  ===========  ===============

At load ~1.7 the "before" full grid took 25.5 CPU s and 13.5 s wall (8,180 evaluations/s);
scaled by the CPU saved (-18 %) that is about 21 CPU s, 10.5-11 s wall: about 10,000
evaluations/s on two quiet cores, to be confirmed there. What changed: drawn routing computes
``serving_times`` / ``benchmark_means`` for all points of a group at once
(``analytic.serving_times_rows`` / ``benchmark_means_rows``: the same arithmetic on
``[points, draws]`` arrays, bit for bit); steady states (and, for drawn routing, the replayed
steps with their draws) are shared by the groups with the same attention DP, token budget and
mixed batching; and workers get the groups of one drawn routing and attention DP together, so
only one process draws them. Left: each group's MoE draws priced (``StepPricer.moe_draws``,
the largest part of a zipf group), the check against ``predict`` per group, the per-point
Python (memory, warnings, workload checks: ~40 µs), CSV formatting (~13 µs a row).

Figures, 2026-12-02, final (all of the day's changes merged; the machine otherwise idle, load
average 1.6-1.9 with the benchmark itself; ``--workers 2 --repeat 3 --json``, best of 3):

    =============================  =======  ======  =======  ======  ===========  ============
    sweep                          points   wall s  evals/s  CPU s   evals/CPU s  excl. start
    =============================  =======  ======  =======  ======  ===========  ============
    mixtral-grid.yaml              110,592   10.89   10,153   19.85        5,570        10,620
    routing=balanced                55,296    3.71   14,919    6.65        8,321        17,131
    routing=zipf                    55,296    7.50    7,377   13.68        4,041         7,880
    =============================  =======  ======  =======  ======  ===========  ============

Another best-of-2 run of the full grid gave 10.99 s (10,059 evaluations/s): the whole-process
target of 10,000 evaluations/s is met, with a margin of 1-2 %. After the eager steps' host
overlap (``vstep.finish``, raw step vectors of 11 columns; session 5, same command, load 1.4):
full grid 10.63 s, 10,404 evaluations/s; balanced 3.63 s (15,228); zipf 7.93 s (6,973). With the
EP remote-block term of the fused MoE as well (session 5's last commit): full grid 10.26 s,
10,776 evaluations/s; balanced 3.45 s (16,043); zipf 7.74 s (7,141). With vLLM's write-back
copies of the MoE output (session 7, load 1.5): full grid 10.17 s, 10,870 evaluations/s; balanced
3.39 s (16,323); zipf 7.60 s (7,280). The full grid's wall time is the
slower worker's ~10 CPU s plus ~1 s in the parent (0.48 s of it interpreter start and imports).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "examples" / "sweeps" / "mixtral-grid.yaml"


def _command() -> list[str]:
    return [sys.executable, "-m", "moesim", "sweep"]


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stderr.strip()


def _variants(path: str, split: str, tmp: str) -> list[tuple[str, str]]:
    """(label, sweep file): the sweep itself, and with ``split`` one copy per value of that
    axis (its base made absolute so that the copy resolves from the temporary folder)."""
    out = [("all", path)]
    if not split:
        return out
    doc = yaml.safe_load(Path(path).read_text())
    values = (doc.get("axes") or {}).get(split)
    if not isinstance(values, list):
        return out
    if isinstance(doc.get("base"), str):
        doc["base"] = str((Path(path).parent / doc["base"]).resolve())
    for i, v in enumerate(values):
        one = dict(doc, axes=dict(doc["axes"], **{split: [v]}))
        label = v.get("distribution", str(i)) if isinstance(v, dict) else str(v)
        f = os.path.join(tmp, f"{split}-{i}.yaml")
        Path(f).write_text(yaml.safe_dump(one, sort_keys=False))
        out.append((f"{split}={label}", f))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(GRID))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting; the best counts")
    ap.add_argument("--split", default="routing",
                    help="also run one sweep per value of this axis ('' : no)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from moesim.sweep import load_sweep

    base = _command()
    startup = min(_timed([sys.executable, "-c", "import moesim.sweep, moesim.cli"])[0]
                  for _ in range(args.repeat))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grid.csv")
        for label, sweep in _variants(args.sweep, args.split, tmp):
            points = len(load_sweep(sweep))
            for w in args.workers:
                runs = [_timed(base + [sweep, "--out", out, "--workers", str(w),
                                       "--no-progress"]) for _ in range(args.repeat)]
                wall, cpu, summary = min(runs)
                results.append({"sweep": label, "workers": w, "points": points,
                                "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                                "evaluations_per_s": round(points / wall, 1),
                                "evaluations_per_cpu_s": round(points / cpu, 1),
                                "startup_s": round(startup, 3),
                                "evaluations_per_s_after_startup":
                                    round(points / (wall - startup), 1),
                                "summary": summary.splitlines()[-1]})
    if args.json:
        print(json.dumps({"sweep": args.sweep, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg(), "results": results}, indent=2))
        return 0
    print(f"{Path(args.sweep).name}: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; python + import moesim: {startup:.2f} s")
    print(f"  {'sweep':<26} {'workers':>7} {'points':>7} {'wall s':>8} {'evals/s':>9} "
          f"{'CPU s':>7} {'evals/CPU s':>12} {'evals/s excl. startup':>22}")
    for r in results:
        print(f"  {r['sweep']:<26} {r['workers']:>7} {r['points']:>7,} {r['wall_s']:>8.2f} "
              f"{r['evaluations_per_s']:>9,.0f} {r['cpu_s']:>7.2f} "
              f"{r['evaluations_per_cpu_s']:>12,.0f} "
              f"{r['evaluations_per_s_after_startup']:>22,.0f}")
    for r in results:
        print(f"  {r['sweep']}, workers={r['workers']}: {r['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
