"""``RoutingSpec``: the ``routing`` block of a scenario file — how tokens pick experts.

Only the choice and its parameters live here; the samplers, closed forms, placement and
capacity policies are in :mod:`moesim.routing`. Every parameter a distribution does not use is
rejected (nothing a user writes is silently ignored). Checks that need the model (expert ids in
range, file shapes) run in :func:`moesim.routing.check_routing_files`, once the expert count is
known.

Distributions (``T`` tokens, ``E`` experts, ``k`` experts per token; each token always picks ``k``
*distinct* experts, so no expert gets more than ``T`` token-slots and every layer sums to
``T*k``):

- ``balanced``: every expert gets ``T*k // E``; the remainder goes to experts spread evenly over
  the expert ids. Deterministic.
- ``uniform``: every token picks ``k`` distinct experts uniformly at random.
- ``power_law`` (``alpha``): the bounded-Pareto recipe the measured ``moe.csv`` rows use
  (reference README, "What moe.csv measures, exactly"); fresh per draw.
- ``zipf`` (``s``): expert popularity ``p ∝ rank^-s``; which expert holds which rank is a seeded
  permutation per layer (fixed by ``seed``, the same in every draw: popularity is stable).
- ``dirichlet`` (``alpha``): popularity ``p ~ Dirichlet(alpha·1)``, redrawn per layer and per draw
  (batch-to-batch variation).
- ``hot_experts`` (``hot_experts``, ``hot_fraction``): the listed experts share ``hot_fraction``
  of the token-slots equally (in expectation); the rest is uniform over the others.
- ``histogram`` (``histogram_file``): measured per-layer expert shares (see
  :func:`moesim.routing.load_histogram` for the file format).
- ``trace`` (``trace_file``): recorded expert ids ``[layers, tokens, k]``, replayed.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Distribution = Literal["balanced", "uniform", "power_law", "zipf", "dirichlet", "hot_experts",
                       "histogram", "trace"]
Overflow = Literal["drop", "reroute", "second_pass", "dropless"]
Placement = Literal["contiguous", "round_robin", "eplb"]

#: Parameters each distribution needs; any other distribution parameter given is an error.
REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "balanced": (),
    "uniform": (),
    "power_law": ("alpha",),
    "zipf": ("s",),
    "dirichlet": ("alpha",),
    "hot_experts": ("hot_experts", "hot_fraction"),
    "histogram": ("histogram_file",),
    "trace": ("trace_file",),
}
DISTRIBUTION_PARAMS = ("alpha", "s", "hot_experts", "hot_fraction", "histogram_file",
                       "trace_file")


class RoutingSpec(BaseModel):
    """Routing distribution, capacity / overflow policy and expert placement of a scenario."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: Distribution = "balanced"
    alpha: Optional[float] = Field(
        None, description="power_law: Pareto exponent (> 0, != 1); dirichlet: concentration (> 0)")
    s: Optional[float] = Field(None, description="zipf exponent (>= 0; 0 = uniform)")
    hot_experts: Optional[list[int]] = Field(None, description="hot_experts: expert ids")
    hot_fraction: Optional[float] = Field(
        None, description="hot_experts: share of token-slots the hot experts receive, in [0, 1]")
    histogram_file: Optional[str] = Field(None, description="histogram: CSV / .npy / .npz path")
    trace_file: Optional[str] = Field(None, description="trace: .npy / .npz of expert ids")
    seed: int = Field(0, ge=0, description="seed of every routing draw (and of zipf's ranks)")
    samples: int = Field(32, ge=1, description="routing draws per prediction (for percentiles)")
    capacity_factor: Optional[float] = Field(
        None, description="per-expert cap = ceil(capacity_factor*T*k/E); None = no cap")
    overflow: Overflow = Field("dropless", description="what happens to slots above the cap")
    placement: Placement = Field("contiguous", description="which EP rank holds which expert")
    redundant_experts: int = Field(0, ge=0, description="extra replica slots (eplb only)")

    @field_validator("alpha", "s", "hot_fraction", "capacity_factor")
    @classmethod
    def _finite(cls, v: Optional[float], info) -> Optional[float]:
        if v is not None and not (v == v and abs(v) != float("inf")):
            raise ValueError(f"{info.field_name} must be a finite number")
        return v

    @field_validator("histogram_file", "trace_file")
    @classmethod
    def _non_empty(cls, v: Optional[str], info) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError(f"{info.field_name} must be a file path, not empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> "RoutingSpec":
        dist = self.distribution
        need = REQUIRED_PARAMS[dist]
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"distribution '{dist}' needs {name}")
        for name in DISTRIBUTION_PARAMS:
            if name not in need and getattr(self, name) is not None:
                users = [d for d, p in REQUIRED_PARAMS.items() if name in p]
                raise ValueError(f"{name} is not used by distribution '{dist}' (only by "
                                 f"{', '.join(users)}); remove it")
        if dist in ("power_law", "dirichlet") and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0 for {dist}; got {self.alpha}")
        if dist == "power_law" and self.alpha == 1.0:
            # The bounded-Pareto inverse CDF x = ((xmax^(1-a) - xmin^(1-a)) u + xmin^(1-a))^(1/(1-a))
            # divides by 1 - alpha; the measured tables use 1.01 and 1.2.
            raise ValueError("alpha must not be 1 for power_law (the recipe's inverse CDF "
                             "divides by 1 - alpha); use e.g. 1.01")
        if dist == "zipf" and self.s < 0:
            raise ValueError(f"s must be >= 0 for zipf; got {self.s}")
        if dist == "hot_experts":
            if not self.hot_experts:
                raise ValueError("hot_experts must list at least one expert id")
            if min(self.hot_experts) < 0:
                raise ValueError(f"hot_experts ids must be >= 0; got {min(self.hot_experts)}")
            if len(set(self.hot_experts)) != len(self.hot_experts):
                raise ValueError("hot_experts lists an expert id twice")
            if not 0.0 <= self.hot_fraction <= 1.0:
                raise ValueError(f"hot_fraction must be in [0, 1]; got {self.hot_fraction}")
        if self.capacity_factor is not None:
            if self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor must be > 0; got {self.capacity_factor}")
            if self.overflow == "dropless":
                raise ValueError("capacity_factor has no effect with overflow 'dropless'; set "
                                 "overflow to drop, reroute or second_pass, or remove "
                                 "capacity_factor")
        elif self.overflow != "dropless":
            raise ValueError(f"overflow '{self.overflow}' needs capacity_factor (the per-expert "
                             "cap is capacity_factor*T*k/E)")
        if self.redundant_experts and self.placement != "eplb":
            raise ValueError(f"redundant_experts={self.redundant_experts} needs placement "
                             f"'eplb' (placement is '{self.placement}')")
        return self
