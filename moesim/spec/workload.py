"""``Workload``: what the deployment is asked to serve."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Speculative(BaseModel):
    """Speculative decoding: each decode step verifies ``num_draft_tokens`` drafted tokens per
    sequence with one target forward pass of ``num_draft_tokens + 1`` tokens.

    ``acceptance_rate`` is the chance that a drafted token is accepted given that the ones before
    it were (i.i.d. acceptance, Leviathan et al. 2023, "Fast Inference from Transformers via
    Speculative Decoding", eq. 1): a step then yields ``(1 - a^(n+1)) / (1 - a)`` tokens.
    ``method``: ``mtp`` (DeepSeek-V3 multi-token prediction / EAGLE-style heads: each drafted
    token costs one decoder layer of the target plus the LM head) or ``ngram`` (prompt lookup,
    drafted on the host at no GPU cost)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mtp", "ngram"] = "mtp"
    num_draft_tokens: int = Field(..., ge=1, le=16, description="tokens drafted per step")
    acceptance_rate: float = Field(..., gt=0.0, lt=1.0,
                                   description="per-token acceptance probability")

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a sequence gains per verification step."""
        a, n = self.acceptance_rate, self.num_draft_tokens
        return (1.0 - a ** (n + 1)) / (1.0 - a)


class Workload(BaseModel):
    """A closed loop: ``batch_size`` requests always in flight, each ``input_len`` prompt tokens
    and ``output_len`` generated tokens (the measured serving benchmarks' definition)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(..., ge=1, description="concurrent sequences")
    input_len: int = Field(..., ge=1, description="prompt tokens per request")
    output_len: int = Field(..., ge=1, description="generated tokens per request")
    speculative: Optional[Speculative] = Field(
        None, description="speculative decoding (none by default)")
    num_requests: Optional[int] = Field(
        None, ge=1, description="requests in the whole benchmark run (e.g. vllm bench serve "
                                "--num-prompts): TTFT and TPOT become the run's means, which "
                                "include the first wave of batch_size prompts arriving at once; "
                                "none = the closed loop's steady state")

    @model_validator(mode="after")
    def _enough_requests(self) -> "Workload":
        if self.num_requests is not None and self.num_requests < self.batch_size:
            raise ValueError(f"num_requests ({self.num_requests}) is smaller than batch_size "
                             f"({self.batch_size}); give at least batch_size requests or leave "
                             "num_requests out")
        return self
