"""``calibration fit --multistart``: the same least-squares fit from several starting points.

:func:`calibration.fit.fit_families` starts its robust least-squares fit from the base profile's
values. The roofline's ``max(compute, memory)`` makes the loss piecewise smooth, and where a kernel
family's measurements sit near its ridge point (as the CPU's MoE expert path does) there is more
than one local minimum: the compute-bound and the memory-bound reading of the same rows. Which one
a single start finds depends on the start and on the noise of the run; the loss tells them apart.
So this wrapper runs :func:`calibration.fit.fit_tables` (the fit the ``fit`` command runs) once per
start in :data:`START_EFFICIENCIES` (every kernel family's compute and memory efficiency set to
the start value, all other numbers as the base has them) and keeps the fit with the lowest total
loss, the loss ``fit_families`` minimises. Nothing here changes the model or the data; only the
optimiser's starting point varies. numpy / scipy only.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moesim.spec.hardware import HardwareProfile, Quantity, load_profile

from .fit import (Params, find_tables, fit_tables, load_ops, overlay, predict_rows,
                  write_overlay)

#: Starting efficiencies (compute, memory) tried: a log grid over the fit's range (0.005 to 1).
START_EFFICIENCIES = (1.0, 0.3, 0.1)
#: soft-L1 scale of ``fit_families``'s ``least_squares`` call (residuals are log(pred / meas)).
F_SCALE = 0.1


def soft_l1_loss(log_ratio: np.ndarray, f_scale: float = F_SCALE) -> float:
    """scipy ``least_squares``'s cost for ``loss="soft_l1"`` (dimensionless, residuals are log
    ratios): 0.5 f^2 sum 2(sqrt(1 + (r/f)^2) - 1)."""
    z = (np.asarray(log_ratio) / f_scale) ** 2
    return float(0.5 * f_scale ** 2 * np.sum(2.0 * (np.sqrt(1.0 + z) - 1.0)))


def with_start(base: HardwareProfile, compute: float, memory: float) -> HardwareProfile:
    """``base`` with every kernel family's efficiencies set to ``compute`` / ``memory``."""
    def q(value: float) -> Quantity:
        return Quantity(value=value, kind="estimate",
                        source="least-squares start value (calibration fit --multistart)")

    kernels = {}
    for fam, fit in base.kernels:
        if fit is None:
            kernels[fam] = None
            continue
        upd = {"memory_efficiency": q(memory)}
        if fit.compute_efficiency is not None:
            upd["compute_efficiency"] = q(compute)
        kernels[fam] = fit.model_copy(update=upd)
    return base.model_copy(update={"kernels": base.kernels.model_copy(update=kernels)})


def tables_loss(tables: Sequence[Path], params: Params, hardware: Optional[str]) -> float:
    """Total fit loss of ``params`` over the tables a fit can read (others are skipped, as
    :func:`calibration.fit.fit_tables` skips them)."""
    total = 0.0
    for t in tables:
        try:
            _, _, ops = load_ops(t, hardware)
        except Exception:  # noqa: BLE001 - same rule as fit_tables: unusable tables are skipped
            continue
        total += soft_l1_loss(np.log(predict_rows(ops, params) / ops.measured))
    return total


def fit_tables_multistart(tables: Sequence[Path], base: HardwareProfile,
                          hardware: Optional[str] = None,
                          starts: Sequence[float] = START_EFFICIENCIES
                          ) -> tuple[Params, dict, list[dict]]:
    """Best of :func:`calibration.fit.fit_tables` over the (compute, memory) start grid
    ``starts`` x ``starts``: (params, per-table report with the chosen start, every start's
    loss)."""
    ref = hardware or base.id
    tried = []
    best = None
    for c, m in itertools.product(starts, starts):
        params, report = fit_tables(tables, with_start(base, c, m), ref)
        loss = tables_loss(tables, params, ref)
        tried.append({"compute_efficiency": c, "memory_efficiency": m, "loss": round(loss, 6)})
        if best is None or loss < best[0] - 1e-12:
            best = (loss, params, report, c, m)
    loss, params, report, c, m = best
    chosen = {"compute_efficiency": c, "memory_efficiency": m, "loss": round(loss, 6),
              "of_starts": len(tried)}
    for st in report.values():
        if "skipped" not in st:
            st["start"] = chosen
    return params, report, tried


def run_fit_multistart(source: Path, base_path: Path, out: Path,
                       hardware: Optional[str] = None,
                       starts: Sequence[float] = START_EFFICIENCIES) -> dict:
    """:func:`calibration.fit.run_fit` with :func:`fit_tables_multistart`; writes the overlay
    (same format and provenance, plus the start grid's losses) and returns the report."""
    tables = find_tables(source)
    base = load_profile(str(base_path), calibrated=False)
    params, report, tried = fit_tables_multistart(tables, base, hardware, starts)
    data = overlay(base, params, report, tables)
    data["provenance"]["multistart"] = {"starts": list(starts), "losses": tried}
    header = (f"# Calibrated overlay for {base.id}, written by `python -m calibration fit "
              f"--from {source} --base {base_path} --multistart`.\n# Fields here replace the "
              "base profile's one by one; every value says which table and fit produced it.\n")
    write_overlay(data, out, header)
    return report
