"""``SimulationSpec``: the ``simulation`` block of a scenario (or a separate ``--sim`` file) —
what the discrete-event simulator needs beyond the closed form's workload.

Everything is optional; the defaults reproduce the scenario's closed loop (``workload.batch_size``
requests in flight, fixed ``input_len`` / ``output_len``). Unknown keys and parameters that the
chosen arrival process or length distribution does not use are errors, as everywhere in moesim.

Example (JSON or YAML)::

    {"arrival": {"process": "poisson", "rate": 4.0},
     "input_len": {"distribution": "lognormal", "mean": 512, "sigma": 0.6},
     "output_len": 256,
     "num_requests": 2000, "max_num_seqs": 128, "block_size": 16,
     "overlap": {"two_batch": true}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError, from_pydantic

ArrivalProcess = Literal["closed_loop", "poisson", "trace"]
LengthDistribution = Literal["fixed", "uniform", "lognormal", "file"]

_ARRIVAL_PARAMS: dict[str, tuple[str, ...]] = {
    "closed_loop": (),            # concurrency is optional (default: workload.batch_size)
    "poisson": ("rate",),
    "trace": ("trace_file",),
}
_LENGTH_PARAMS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("mean", "sigma"),
    "file": ("file",),
}
_LENGTH_OPTIONAL = ("min", "max")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArrivalSpec(_Strict):
    """How requests arrive: a closed loop of ``concurrency`` clients (each sends its next request
    the moment the previous one finishes), a Poisson process at ``rate`` requests per second, or
    a trace file (CSV with a header, JSON list or JSON lines; columns ``arrival_s``,
    ``input_len``, ``output_len``; ``timestamp`` / ``arrival_time`` and ``input_tokens`` /
    ``output_tokens`` are accepted too)."""

    process: ArrivalProcess = "closed_loop"
    concurrency: Optional[int] = Field(None, ge=1, description="closed_loop: clients in flight; "
                                       "default workload.batch_size")
    rate: Optional[float] = Field(None, gt=0, description="poisson: requests per second (> 0)")
    trace_file: Optional[str] = Field(None, description="trace: path of the arrival trace")

    @model_validator(mode="after")
    def _check(self) -> "ArrivalSpec":
        need = _ARRIVAL_PARAMS[self.process]
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"arrival process '{self.process}' needs {name}")
        for name in ("concurrency", "rate", "trace_file"):
            users = [p for p, ps in _ARRIVAL_PARAMS.items() if name in ps] or ["closed_loop"]
            if getattr(self, name) is not None and self.process not in users:
                raise ValueError(f"{name} is not used by arrival process '{self.process}' (only "
                                 f"by {', '.join(users)}); remove it")
        if self.rate is not None and not self.rate < float("inf"):
            raise ValueError("rate must be a finite number of requests per second")
        if self.trace_file is not None and not self.trace_file.strip():
            raise ValueError("trace_file must be a file path, not empty")
        return self


class LengthSpec(_Strict):
    """A token-length distribution: ``fixed`` (``value``), ``uniform`` integers in
    [``low``, ``high``], ``lognormal`` with arithmetic ``mean`` and log-space ``sigma``, or
    ``file`` (one length per line, or a CSV whose column named like the field is used; sampled
    with replacement). ``min`` / ``max`` clip the draws (default min 1). A bare integer means
    ``fixed``."""

    distribution: LengthDistribution = "fixed"
    value: Optional[int] = Field(None, ge=1)
    low: Optional[int] = Field(None, ge=1)
    high: Optional[int] = Field(None, ge=1)
    mean: Optional[float] = Field(None, gt=0)
    sigma: Optional[float] = Field(None, ge=0)
    file: Optional[str] = None
    min: int = Field(1, ge=1)
    max: Optional[int] = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return data  # let the type check reject it
        if isinstance(data, int):
            return {"distribution": "fixed", "value": data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "LengthSpec":
        dist = self.distribution
        need = _LENGTH_PARAMS[dist]
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"length distribution '{dist}' needs {name}")
        for d, names in _LENGTH_PARAMS.items():
            for name in names:
                if d != dist and name not in need and getattr(self, name) is not None:
                    raise ValueError(f"{name} is not used by length distribution '{dist}' "
                                     f"(only by {d}); remove it")
        if dist == "uniform" and self.low > self.high:
            raise ValueError(f"low={self.low} exceeds high={self.high}")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max={self.max} is below min={self.min}")
        if dist == "file" and not self.file.strip():
            raise ValueError("file must be a path, not empty")
        return self


class OverlapSpec(_Strict):
    """Overlap of communication with compute inside a step (all off: the closed form's serial
    step, which the DES reproduces exactly).

    - ``shared_expert_dispatch``: the shared experts run on the compute stream while the
      dispatch all-to-all is in flight (needs attention_dp > 1 and shared experts to matter).
    - ``two_batch``: the batch is split into two micro-batches whose ops interleave on the compute
      stream, so one's collectives hide behind the other's compute (DeepSeek / SGLang TBO); each
      micro-batch is priced at its own size.
    - ``attention_combine``: the next layer's attention projections start while this layer's
      combine (or MoE all-reduce) is in flight; its norm / residual add waits for it. Within one
      micro-batch this is only legal for architectures that decouple the MoE output from the
      next attention input (shortcut-connected MoE); treat it as an upper bound otherwise.
    """

    shared_expert_dispatch: bool = False
    two_batch: bool = False
    attention_combine: bool = False

    @property
    def any(self) -> bool:
        return self.shared_expert_dispatch or self.two_batch or self.attention_combine


class SimulationSpec(_Strict):
    """Serving-level simulation settings (see module docstring)."""

    arrival: ArrivalSpec = Field(default_factory=ArrivalSpec)
    input_len: Optional[LengthSpec] = Field(None, description="default: workload.input_len")
    output_len: Optional[LengthSpec] = Field(None, description="default: workload.output_len")
    num_requests: Optional[int] = Field(
        None, ge=1, description="requests to simulate; default 200 (trace: all of its rows)")
    warmup_requests: int = Field(0, ge=0, description="first requests left out of the statistics")
    seed: Optional[int] = Field(None, ge=0, description="default: routing.seed")
    scheduler: Literal["prefill_first"] = Field(
        "prefill_first", description="prefill steps (chunked) run before decode steps")
    max_num_seqs: int = Field(256, ge=1, description="sequences in flight at most (all "
                                                       "attention-DP groups together)")
    max_num_batched_tokens: Optional[int] = Field(
        None, ge=1, description="tokens per prefill step and attention-DP group; default the "
                                "scenario's")
    chunked_prefill: bool = Field(True, description="split prompts longer than the step budget")
    block_size: int = Field(16, ge=1, description="KV-cache block size in tokens")
    num_gpu_blocks: Optional[int] = Field(
        None, ge=1, description="KV blocks per attention-DP group; default from the memory model")
    context_bucket: int = Field(
        64, ge=1, description="step costs are priced at multiples of this context length and "
                              "interpolated linearly in between (1 = exact)")
    routing_pool: Optional[int] = Field(
        None, ge=1, description="stochastic routing: None = a fresh draw every step (exact, "
                                "slow: every step's MoE layers are priced anew); N = N draws "
                                "per step shape, priced once and picked at random per step")
    overlap: OverlapSpec = Field(default_factory=OverlapSpec)
    trace_steps: int = Field(12, ge=0, description="steps drawn op by op in a --trace file (the "
                                                   "others as one block per rank)")

    @model_validator(mode="after")
    def _check(self) -> "SimulationSpec":
        if self.arrival.process == "trace":
            for name in ("input_len", "output_len"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} comes from the arrival trace; remove it")
        if self.num_requests is not None and self.warmup_requests >= self.num_requests:
            raise ValueError(f"warmup_requests={self.warmup_requests} leaves none of the "
                             f"{self.num_requests} requests to measure")
        return self


def parse_simulation(data: Any, field: str = "simulation") -> SimulationSpec:
    if data is None:
        return SimulationSpec()
    if isinstance(data, SimulationSpec):
        return data
    if not isinstance(data, dict):
        raise InputError(field, "the simulation block must be an object",
                         "see moesim/spec/simulation.py")
    try:
        return SimulationSpec.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, prefix=field) from None


def read_data_file(path: Union[str, Path], field: str) -> Any:
    """A JSON / YAML file's content, or a one-line :class:`InputError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(field, f"cannot read {p}: {exc.strerror or exc}",
                         "give the path of a readable file") from None
    try:
        return yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix not in (".yaml", ".yml") else "YAML"
        raise InputError(field, f"{p} is not valid {kind}: {str(exc).splitlines()[0]}",
                         "fix the syntax") from None


def load_simulation(path: Union[str, Path]) -> SimulationSpec:
    """Read a ``--sim`` file: a SimulationSpec object, or any object with a ``simulation`` key
    (e.g. a scenario file carrying the block)."""
    data = read_data_file(path, "sim")
    if isinstance(data, dict) and "simulation" in data:
        data = data["simulation"]
    return parse_simulation(data)
