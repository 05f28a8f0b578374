"""moesim: how fast, how costly and how memory-hungry a Mixture-of-Experts model will be at
inference on a given GPU deployment.

Public API::

    from moesim import load_scenario, predict
    p = predict(load_scenario("examples/mixtral-8x7b_2xh100_tp2.json"))
    p.ttft_ms, p.tpot_ms, p.memory.fits
"""

from .analytic import Prediction, predict
from .errors import InputError
from .spec.scenario import Scenario, load_scenario, parse_scenario

__all__ = ["InputError", "Prediction", "Scenario", "load_scenario", "parse_scenario", "predict"]
__version__ = "0.1.0"
