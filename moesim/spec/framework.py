"""``FrameworkProfile``: the few documented engine parameters a serving framework sets.

One YAML file per engine in ``moesim/frameworks/``; every number is a sourced
:class:`~moesim.spec.hardware.Quantity`. A framework never carries per-case correction factors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InputError, from_pydantic
from .hardware import Quantity

FRAMEWORKS_DIR = Path(__file__).resolve().parents[1] / "frameworks"


class FrameworkProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    display_name: str
    cuda_graphs: Quantity = Field(..., description="1 = decode steps replay CUDA graphs")
    cuda_graph_max_batch: Quantity = Field(..., description="largest captured decode batch")
    max_num_batched_tokens: Quantity = Field(..., description="default prefill chunk, tokens")
    gpu_memory_utilization: Quantity = Field(..., description="default fraction of HBM used")
    custom_all_reduce: Quantity = Field(
        ..., description="1 = TP all-reduces of small messages use the engine's own kernel")
    piecewise_cuda_graphs: Quantity = Field(
        ..., description="1 = steps that carry prefill tokens replay graphs for everything but "
                         "attention (up to cuda_graph_max_batch tokens)")
    mixed_batching: Quantity = Field(
        ..., description="1 = prefill chunks share a step with the running decodes (chunked "
                         "prefill / in-flight batching); 0 = prefill steps run alone and the "
                         "decodes wait")
    overlap_scheduler: Quantity = Field(
        ..., description="1 = the host schedules step i+1 while the GPU runs step i, so a new "
                         "request joins one step later")
    w4a16_moe_efficiency: Quantity = Field(
        ..., description="share of the 16-bit fused-MoE kernel's tensor-core rate that the "
                         "engine's 4-bit weight-only expert GEMMs reach (mxfp4 / int4 experts "
                         "with 16-bit activations, weights dequantised in the kernel's main loop)")
    moe_grid_spans_all_experts: Quantity = Field(
        ..., description="1 = under expert parallelism the fused-MoE GEMM grid also covers the "
                         "padded blocks of experts held on other ranks, whose programs store a "
                         "zero tile (vLLM / SGLang Triton fused_moe with an expert map); 0 = "
                         "the expert GEMMs see the local experts' tokens only")
    moe_output_copies: Quantity = Field(
        ..., description="element-wise copies of the fused MoE's combined [tokens, hidden] "
                         "output the engine makes after the top-k sum (from its workspace into "
                         "the caller's buffer); 0 = the sum writes the output in place")
    step_overhead_us: Quantity = Field(
        ..., description="host time per engine step not hidden behind the GPU (scheduling, "
                         "input preparation, sampling bookkeeping)")
    request_overhead_us: Quantity = Field(
        ..., description="time to first token outside the GPU steps: API server, tokenisation, "
                         "admission into the running batch, streaming the first token back")
    provenance: dict = Field(default_factory=dict)

    @field_validator("moe_output_copies")
    @classmethod
    def _whole_copies(cls, q: Quantity) -> Quantity:
        if q.value < 0 or q.value != int(q.value):
            raise ValueError(f"must be a whole number of copies >= 0, got {q.value}")
        return q


@lru_cache(maxsize=None)
def load_framework(name: str) -> FrameworkProfile:
    path = FRAMEWORKS_DIR / f"{name}.yaml"
    if not path.exists():
        valid = ", ".join(sorted(p.stem for p in FRAMEWORKS_DIR.glob("*.yaml")))
        raise InputError("deployment.framework", f"unknown framework {name!r}", f"valid: {valid}")
    try:
        return FrameworkProfile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise from_pydantic(exc, prefix=f"framework[{path.name}]") from None
