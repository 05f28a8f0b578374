"""``Deployment``: how the model is laid out on the GPUs and which engine runs it."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .dtypes import canonical

Framework = Literal["vllm", "sglang", "trtllm", "generic"]
MoeStrategy = Literal["fused", "grouped", "naive"]
EpCommBackend = Literal["nccl", "deepep", "deepep_ht", "deepep_ll", "deepep_v2"]


class Deployment(BaseModel):
    """Parallelism follows the serving engines' convention (and ``e2e_serving.csv``'s): the GPUs of
    one instance number ``tp * attention_dp * pp`` for attention and ``moe_tp * ep * pp`` for the
    MoE layers; with ``attention_dp == 1`` every MoE rank sees every token (TP-style MoE) and
    with ``attention_dp > 1`` tokens reach the expert ranks through dispatch/combine all-to-all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, description="tensor parallel size of attention / dense layers")
    ep: int = Field(1, ge=1, description="expert parallel size of MoE layers")
    moe_tp: int = Field(1, ge=1, description="tensor parallel split of each expert; default: "
                        "tp * attention_dp / ep (the engines' default)")
    attention_dp: int = Field(1, ge=1, description="data-parallel attention groups")
    pp: int = Field(1, ge=1, description="pipeline stages")
    weight_dtype: str = Field("bf16", description="attention / dense / shared-expert weights")
    expert_weight_dtype: Optional[str] = Field(
        None, description="routed expert weights; defaults to weight_dtype")
    activation_dtype: str = "bf16"
    kv_cache_dtype: str = "bf16"
    cuda_graphs: Optional[bool] = Field(None, description="default: the framework's")
    moe_strategy: MoeStrategy = Field(
        "fused", description="fused grouped kernel, explicit permute + per-expert GEMMs, or naive")
    fused_moe: Optional[bool] = Field(
        None, description="shorthand: true = moe_strategy 'fused', false = 'grouped'")
    max_num_batched_tokens: Optional[int] = Field(
        None, ge=1, description="prefill chunk size; default: the framework's")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="fraction of HBM the engine may use; default: framework's")
    framework: Framework = "generic"
    ep_comm_backend: EpCommBackend = Field(
        "nccl", description="dispatch / combine of attention-DP + EP: nccl (alpha-beta "
        "all-to-all), deepep (normal kernels for steps with prefill tokens, low-latency ones for "
        "decode-only steps: SGLang --deepep-mode auto), deepep_ht / deepep_ll (one kind for all "
        "steps: vLLM --all2all-backend deepep_high_throughput / deepep_low_latency), deepep_v2 "
        "(V2 context / generation kernels, chosen like deepep); DeepEP is intra-node only and "
        "needs the hardware profile's deepep fits")

    @model_validator(mode="before")
    @classmethod
    def _default_moe_tp(cls, data):
        # Engines run the MoE layers over all GPUs of the instance: without expert parallelism
        # the experts are tensor-parallel over tp * attention_dp GPUs (vLLM, SGLang defaults).
        if isinstance(data, dict) and "moe_tp" not in data:
            try:
                group = int(data.get("tp", 1)) * int(data.get("attention_dp", 1))
                ep = int(data.get("ep", 1))
            except (TypeError, ValueError):
                return data
            if ep >= 1 and group % ep == 0:
                data = {**data, "moe_tp": group // ep}
        return data

    @field_validator("weight_dtype", "expert_weight_dtype", "activation_dtype", "kv_cache_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else canonical(v)

    @model_validator(mode="after")
    def _check(self) -> "Deployment":
        if self.fused_moe is not None:
            implied = "fused" if self.fused_moe else "grouped"
            if "moe_strategy" in self.model_fields_set and self.moe_strategy != implied:
                raise ValueError(f"fused_moe={self.fused_moe} contradicts "
                                 f"moe_strategy={self.moe_strategy!r}; give one of them")
        if self.activation_dtype in ("int4", "mxfp4", "fp8_block"):
            raise ValueError(f"activation_dtype {self.activation_dtype!r} is a weight format; "
                             "use bf16, fp16 or fp8")
        return self

    @property
    def strategy(self) -> MoeStrategy:
        if self.fused_moe is not None and "moe_strategy" not in self.model_fields_set:
            return "fused" if self.fused_moe else "grouped"
        return self.moe_strategy

    @property
    def experts_dtype(self) -> str:
        return self.expert_weight_dtype or self.weight_dtype

    @property
    def gpus(self) -> int:
        return self.tp * self.attention_dp * self.pp
