"""Discrete-event simulation of MoE serving (issue 6): one forward step on every rank
(:mod:`moesim.des.step_sim`) and requests served by a continuous-batching engine over a paged KV
cache (:mod:`moesim.des.serving`), priced by the same op costs as the closed form.

Public API::

    from moesim import load_scenario
    from moesim.des import simulate
    r = simulate(load_scenario("examples/mixtral-8x7b_2xh100_tp2.json"), requests=500, seed=1)
    r.metrics["tpot_ms_mean"], r.detail["gpu"]["busy_fraction"]
"""

from .serving import RequestRecord, SimResult, simulate
from .spec import (ArrivalSpec, LengthSpec, OverlapSpec, SimulationSpec, load_simulation,
                   parse_simulation)
from .step_sim import PlanBuilder, StepCost, closed_form, simulate_one_step, simulate_step

__all__ = ["ArrivalSpec", "LengthSpec", "OverlapSpec", "PlanBuilder", "RequestRecord",
           "SimResult", "SimulationSpec", "StepCost", "closed_form", "load_simulation",
           "parse_simulation", "simulate", "simulate_one_step", "simulate_step"]
