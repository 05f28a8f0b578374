"""Fit the serving-engine parameters of ``moesim/frameworks/<backend>.yaml`` to an
``e2e_serving`` table: ``python -m calibration fit-framework --table e2e_serving.csv``.

Two parameters per backend, once for the whole table (never per row):

- ``step_overhead_us``: host time per engine step the GPU waits for; every step of the
  prediction carries it, so TPOT is ``tpot_0 + s * dtpot/ds`` and TTFT moves with it too.
- ``request_overhead_us``: time to first token outside the GPU steps (API server,
  tokenisation, streaming the first token); TTFT is ``ttft_0 + o``.

Every step carries ``s`` and TTFT carries ``o`` once, so the predictions are linear in both: each
row is predicted at two values of ``s`` (``o`` = 0) and the fit runs on those lines. The loss is scipy's robust ``soft_l1`` on relative TTFT and TPOT errors, so
the few rows no engine model explains (queue-limited batch-512 runs) do not pull the fit.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

FITTED = ("step_overhead_us", "request_overhead_us")
#: Robust-loss scale: relative errors beyond ~15 % count roughly linearly, not squared.
F_SCALE = 0.15
#: Parameter bounds (us): a step's host time and a request's overhead cannot be negative.
BOUNDS = ((0.0, 0.0), (20_000.0, 2_000_000.0))


@dataclass(frozen=True)
class Linearised:
    """One row's TTFT and TPOT (ms) as ``a + b * step_overhead_us + c * request_overhead_us``."""

    ttft_ms: tuple[float, float, float]
    tpot_ms: tuple[float, float]
    measured_ttft_ms: float
    measured_tpot_ms: float


def _with(sc, **values: float):
    fw = sc.framework
    upd = {k: fw.__getattribute__(k).model_copy(update={"value": v}) for k, v in values.items()}
    return sc.model_copy(update={"framework": fw.model_copy(update=upd)})


def linearise(row: dict[str, str], step_us: float, delta_us: float = 1000.0
              ) -> Optional[Linearised]:
    """Predict ``row`` at ``step_us`` and ``step_us + delta_us`` (request overhead 0)."""
    from moesim import parse_scenario, predict
    from moesim.errors import InputError
    from moesim.validate import e2e_scenario

    try:
        sc = parse_scenario(e2e_scenario(row))
    except (InputError, ValueError):
        return None
    p0 = predict(_with(sc, step_overhead_us=step_us, request_overhead_us=0.0))
    p1 = predict(_with(sc, step_overhead_us=step_us + delta_us, request_overhead_us=0.0))
    dttft = (p1.ttft_ms - p0.ttft_ms) / delta_us
    dtpot = (p1.tpot_ms - p0.tpot_ms) / delta_us
    return Linearised((p0.ttft_ms - dttft * step_us, dttft, 1e-3),
                      (p0.tpot_ms - dtpot * step_us, dtpot),
                      float(row["silicon_ttft_ms"]), float(row["silicon_tpot_ms"]))


def _residuals(x: np.ndarray, rows: list[Linearised]) -> np.ndarray:
    s, o = x
    out = []
    for r in rows:
        ttft = r.ttft_ms[0] + r.ttft_ms[1] * s + r.ttft_ms[2] * o
        tpot = r.tpot_ms[0] + r.tpot_ms[1] * s
        out += [ttft / r.measured_ttft_ms - 1.0, tpot / r.measured_tpot_ms - 1.0]
    return np.asarray(out)


def fit_lines(lin: list[Linearised], start_us: float = 0.0) -> np.ndarray:
    """(step_overhead_us, request_overhead_us) minimising the robust loss over ``lin``."""
    from scipy.optimize import least_squares

    # Starts inside the bounds (a start on a bound can stall the trust region there), a few
    # orders of magnitude apart; the lowest robust loss wins.
    fits = [least_squares(_residuals, np.array(x0), args=(lin,), loss="soft_l1",
                          f_scale=F_SCALE, bounds=BOUNDS)
            for x0 in ((max(start_us, 100.0), 1e3), (max(start_us, 100.0), 1e5),
                       (1000.0, 1e4))]
    return min(fits, key=lambda r: r.cost).x


def fit_backend(rows: list[dict[str, str]], start_us: float = 0.0) -> dict[str, Any]:
    """Fit (step_overhead_us, request_overhead_us) for the rows of one backend."""
    with ProcessPoolExecutor() as pool:  # ~0.3 s a prediction; rows are independent
        lin = [l for l in pool.map(linearise, rows, [start_us] * len(rows)) if l is not None]
    if not lin:
        raise ValueError("no row of this backend could be predicted")
    x = fit_lines(lin, start_us)
    ape = np.abs(_residuals(x, lin)) * 100.0
    return {"step_overhead_us": float(x[0]), "request_overhead_us": float(x[1]), "rows": len(lin),
            "ttft_median_ape_pct": float(np.median(ape[0::2])),
            "tpot_median_ape_pct": float(np.median(ape[1::2]))}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_framework(path: Path, fit: dict[str, Any], table: Path, backend: str) -> None:
    """Replace the fitted parameters' lines in a framework YAML, keeping every other line."""
    when = _dt.date.today().isoformat()
    lines = path.read_text().splitlines(keepends=True)
    out = []
    for line in lines:
        key = line.split(":", 1)[0]
        if key in FITTED:
            source = (f"python -m calibration fit-framework on {table.name} (sha256 {_sha(table)}, "
                      f"{fit['rows']} {backend} rows, {when}): robust least squares on relative "
                      f"TTFT and TPOT errors; fit median APE TTFT {fit['ttft_median_ape_pct']:.1f}%, "
                      f"TPOT {fit['tpot_median_ape_pct']:.1f}%")
            q = {"value": round(fit[key], 1), "kind": "calibrated", "source": source}
            line = f"{key}: " + yaml.safe_dump(q, default_flow_style=True, width=10**6, sort_keys=False).strip() + "\n"
        out.append(line)
    path.write_text("".join(out))


def run(table: Path, backends: Optional[list[str]] = None, write: bool = True
        ) -> dict[str, dict[str, Any]]:
    from moesim.spec.framework import FRAMEWORKS_DIR, load_framework

    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_backend: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_backend.setdefault((r.get("backend") or "").strip().lower(), []).append(r)
    report = {}
    for backend, rs in sorted(by_backend.items()):
        if backends and backend not in backends:
            continue
        path = FRAMEWORKS_DIR / f"{backend}.yaml"
        if not path.exists():
            report[backend] = {"skipped": f"no framework profile {path.name}"}
            continue
        start = load_framework(backend).step_overhead_us.value
        fit = fit_backend(rs, start)
        report[backend] = fit
        if write:
            write_framework(path, fit, table, backend)
    load_framework.cache_clear()
    return report
