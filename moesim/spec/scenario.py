"""``Scenario``: one question to moesim, read from JSON/YAML and checked as a whole.

``ScenarioFile`` is what the user writes (strict: unknown keys are errors); ``Scenario`` is the
same with every reference resolved (model preset or config, hardware profile, framework profile)
and every cross-field rule checked, so that the layers below never see an inconsistent input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError, from_pydantic
from .deployment import Deployment
from .framework import FrameworkProfile, load_framework
from .hardware import HardwareProfile, load_profile
from .model import ModelSpec
from .presets import load_model
from .routing import RoutingSpec
from .simulation import SimulationSpec
from .workload import Workload


class HardwareRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = Field(..., description="profile id (h100_sxm) or path to a YAML profile")
    num_gpus: Optional[int] = Field(None, ge=1, description="default: tp * attention_dp * pp")
    gpus_per_node: int = Field(8, ge=1)
    calibrated: bool = Field(True, description="apply <id>.calibrated.yaml when it exists")


class ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[str] = None
    description: Optional[str] = None
    model: Union[str, dict[str, Any]]
    hardware: Union[str, HardwareRef]
    deployment: Deployment = Field(default_factory=Deployment)
    workload: Workload
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    simulation: Optional[SimulationSpec] = Field(
        None, description="discrete-event simulation settings (python -m moesim simulate)")


class Scenario(BaseModel):
    """A resolved, consistent scenario. Build it with :func:`resolve` or :func:`load_scenario`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    model: ModelSpec
    hardware: HardwareProfile
    num_gpus: int
    gpus_per_node: int
    deployment: Deployment
    workload: Workload
    routing: RoutingSpec
    framework: FrameworkProfile
    source: ScenarioFile

    @property
    def cuda_graphs(self) -> bool:
        d = self.deployment.cuda_graphs
        return bool(self.framework.cuda_graphs.value) if d is None else d

    @property
    def max_num_batched_tokens(self) -> int:
        d = self.deployment.max_num_batched_tokens
        return int(self.framework.max_num_batched_tokens.value) if d is None else d

    @property
    def gpu_memory_utilization(self) -> float:
        d = self.deployment.gpu_memory_utilization
        return self.framework.gpu_memory_utilization.value if d is None else d


def _check_consistency(model: ModelSpec, hw: HardwareProfile, num_gpus: int, gpus_per_node: int,
                       dep: Deployment, wl: Workload, routing: RoutingSpec) -> None:
    heads = model.num_attention_heads
    if heads % dep.tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise InputError("deployment.tp", f"tp={dep.tp} does not divide the model's {heads} "
                         "attention heads", f"use one of {divisors}")
    if dep.gpus != num_gpus:
        raise InputError("hardware.num_gpus",
                         f"num_gpus={num_gpus} but tp*attention_dp*pp = {dep.tp}*"
                         f"{dep.attention_dp}*{dep.pp} = {dep.gpus}",
                         "make them equal (each GPU serves one attention shard)")
    if dep.pp > model.num_layers:
        raise InputError("deployment.pp", f"pp={dep.pp} exceeds the {model.num_layers} layers",
                         f"use pp <= {model.num_layers}")
    if model.moe is None:
        # moe_tp defaults to tp * attention_dp; only a value the user chose is an error here.
        if dep.ep != 1 or dep.moe_tp not in (1, dep.tp * dep.attention_dp):
            raise InputError("deployment.ep", f"{model.name} is a dense model; ep and moe_tp "
                             "apply to MoE layers only", "set ep=1 and moe_tp=1")
    else:
        e = model.moe.num_experts
        slots = e + routing.redundant_experts
        if slots % dep.ep:
            divisors = [d for d in range(1, slots + 1) if slots % d == 0 and d <= 64]
            what = f"{e} experts" + (f" + {routing.redundant_experts} redundant slots"
                                     if routing.redundant_experts else "")
            raise InputError("deployment.ep", f"ep={dep.ep} does not divide the model's {what}",
                             f"use one of {divisors}")
        inter = model.moe.expert_intermediate_size
        if inter % dep.moe_tp:
            raise InputError("deployment.moe_tp", f"moe_tp={dep.moe_tp} does not divide the "
                             f"expert intermediate size {inter}", "use a divisor of it")
        moe_group = dep.moe_tp * dep.ep
        attn_group = dep.tp * dep.attention_dp
        if moe_group != attn_group:
            raise InputError("deployment.ep",
                             f"moe_tp*ep = {moe_group} GPUs but tp*attention_dp = {attn_group}",
                             "the MoE layers run on the same GPUs as attention: make "
                             "moe_tp*ep equal tp*attention_dp")
    for fld in ("weight_dtype", "experts_dtype", "activation_dtype", "kv_cache_dtype"):
        name = getattr(dep, fld)
        if name in ("fp8", "fp8_block") and fld == "activation_dtype" \
                and hw.compute.peak_dense_tflops.fp8 is None:
            raise InputError(f"deployment.{fld}", f"{hw.id} has no fp8 tensor cores",
                             "use bf16 activations on this GPU")
    if wl.batch_size < dep.attention_dp:
        raise InputError("workload.batch_size", f"batch_size={wl.batch_size} leaves some of the "
                         f"{dep.attention_dp} attention-DP groups idle",
                         f"use batch_size >= {dep.attention_dp}")


def resolve(raw: ScenarioFile, *, base_dir: Optional[Path] = None) -> Scenario:
    """Resolve every reference of ``raw`` and check the scenario as a whole."""
    model_ref = raw.model
    if isinstance(model_ref, str) and base_dir is not None and (base_dir / model_ref).exists():
        model_ref = str(base_dir / model_ref)
    model = load_model(model_ref, field="model")
    hw_ref = raw.hardware if isinstance(raw.hardware, HardwareRef) \
        else HardwareRef(profile=raw.hardware)
    profile = hw_ref.profile
    if base_dir is not None and (base_dir / profile).exists():
        profile = str(base_dir / profile)
    hw = load_profile(profile, calibrated=hw_ref.calibrated, field="hardware.profile")
    dep = raw.deployment
    num_gpus = hw_ref.num_gpus if hw_ref.num_gpus is not None else dep.gpus
    _check_consistency(model, hw, num_gpus, hw_ref.gpus_per_node, dep, raw.workload, raw.routing)
    routing = raw.routing
    if base_dir is not None:  # files named in a scenario are relative to the scenario's folder
        update = {f: str(base_dir / getattr(routing, f)) for f in ("histogram_file", "trace_file")
                  if getattr(routing, f) and (base_dir / getattr(routing, f)).exists()}
        routing = routing.model_copy(update=update) if update else routing
    if model.moe is not None:
        from ..routing import check_routing_files  # the routing layer validates its own files

        try:
            check_routing_files(routing, model.moe.num_experts, model.num_moe_layers,
                                top_k=model.moe.top_k)
        except InputError:
            raise
        except ValueError as exc:
            raise InputError("routing", str(exc).splitlines()[0]) from None
    return Scenario(
        name=raw.name or f"{model.name} on {num_gpus}x{hw.id}",
        model=model, hardware=hw, num_gpus=num_gpus, gpus_per_node=hw_ref.gpus_per_node,
        deployment=dep, workload=raw.workload, routing=routing,
        framework=load_framework(dep.framework), source=raw)


def parse_scenario(data: Any, *, base_dir: Optional[Path] = None) -> Scenario:
    if not isinstance(data, dict):
        raise InputError("scenario", "the scenario must be a JSON/YAML object",
                         "see examples/*.json")
    try:
        raw = ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc) from None
    return resolve(raw, base_dir=base_dir)


def load_scenario(path: Union[str, Path]) -> Scenario:
    """Read a scenario file (``.json``, ``.yaml`` or ``.yml``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError("scenario", f"cannot read {p}: {exc.strerror}",
                         "give the path of a scenario file") from None
    try:
        data = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError("scenario", f"{p} is not valid {'YAML' if p.suffix != '.json' else 'JSON'}"
                         f": {str(exc).splitlines()[0]}", "fix the syntax") from None
    return parse_scenario(data, base_dir=p.parent)
