"""Discrete-event simulation of MoE serving (issue 6): one forward step on every rank
(:mod:`moesim.des.step_sim`) and requests served by a continuous-batching engine over a paged KV
cache (:mod:`moesim.des.serving`), priced by the same op costs as the closed form.

Public API::

    from moesim import load_scenario
    from moesim.des import simulate
    r = simulate(load_scenario("examples/mixtral-8x7b_2xh100_tp2.json"), requests=500, seed=1)
    r.metrics["tpot_ms_mean"], r.detail["gpu"]["busy_fraction"]

Names are imported lazily (simpy is only loaded when a simulation runs). The scenario's
``simulation`` block is :class:`moesim.spec.simulation.SimulationSpec`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "simulate": "serving", "SimResult": "serving", "RequestRecord": "serving",
    "SimulationSpec": "..spec.simulation", "ArrivalSpec": "..spec.simulation",
    "LengthSpec": "..spec.simulation", "OverlapSpec": "..spec.simulation",
    "parse_simulation": "..spec.simulation", "load_simulation": "..spec.simulation",
    "PlanBuilder": "step_sim", "StepCost": "step_sim", "closed_form": "step_sim",
    "simulate_step": "step_sim", "simulate_one_step": "step_sim",
    "add_cli": "cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'moesim.des' has no attribute {name!r}")
    value = getattr(import_module(mod if mod.startswith(".") else f".{mod}", __name__), name)
    globals()[name] = value
    return value
