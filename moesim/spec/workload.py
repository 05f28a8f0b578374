"""``Workload``: what the deployment is asked to serve."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Workload(BaseModel):
    """A closed loop: ``batch_size`` requests always in flight, each ``input_len`` prompt tokens
    and ``output_len`` generated tokens (the measured serving benchmarks' definition)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(..., ge=1, description="concurrent sequences")
    input_len: int = Field(..., ge=1, description="prompt tokens per request")
    output_len: int = Field(..., ge=1, description="generated tokens per request")
