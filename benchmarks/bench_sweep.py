"""Scenario evaluations per second of a sweep, whole process included.

Runs ``python -m moesim sweep examples/sweeps/mixtral-grid.yaml --out <tmp>.csv`` as a user
would (interpreter start, imports, sweep file, every point, the CSV) and divides the points by
the wall time. Also reports the child's CPU seconds (the machine may be shared) and the cost of
just starting Python and importing moesim, so the evaluation rate itself can be read off.

    python benchmarks/bench_sweep.py                   # workers 1 and 2, best of 2
    python benchmarks/bench_sweep.py --workers 2 --repeat 3 --json
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(GRID))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting; the best counts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from moesim.sweep import load_sweep

    points = len(load_sweep(args.sweep))
    base = _command()
    startup = min(_timed([sys.executable, "-c", "import moesim.sweep, moesim.cli"])[0]
                  for _ in range(args.repeat))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grid.csv")
        for w in args.workers:
            runs = [_timed(base + [args.sweep, "--out", out, "--workers", str(w),
                                   "--no-progress"]) for _ in range(args.repeat)]
            wall, cpu, summary = min(runs)
            results.append({"workers": w, "points": points, "wall_s": round(wall, 3),
                            "cpu_s": round(cpu, 3),
                            "evaluations_per_s": round(points / wall, 1),
                            "evaluations_per_cpu_s": round(points / cpu, 1),
                            "startup_s": round(startup, 3),
                            "evaluations_per_s_after_startup": round(points / (wall - startup),
                                                                     1),
                            "summary": summary.splitlines()[-1]})
    if args.json:
        print(json.dumps({"sweep": args.sweep, "cpus": os.cpu_count(),
                          "load_average": os.getloadavg(), "results": results}, indent=2))
        return 0
    print(f"{Path(args.sweep).name}: {points:,} points; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; python + import moesim: {startup:.2f} s")
    print(f"  {'workers':>7} {'wall s':>8} {'evals/s':>9} {'CPU s':>7} {'evals/CPU s':>12} "
          f"{'evals/s excl. startup':>22}")
    for r in results:
        print(f"  {r['workers']:>7} {r['wall_s']:>8.2f} {r['evaluations_per_s']:>9,.0f} "
              f"{r['cpu_s']:>7.2f} {r['evaluations_per_cpu_s']:>12,.0f} "
              f"{r['evaluations_per_s_after_startup']:>22,.0f}")
    for r in results:
        print(f"  workers={r['workers']}: {r['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
