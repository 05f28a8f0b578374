"""Model presets and the one function that turns any model reference into a :class:`ModelSpec`.

A preset is a verbatim copy of a published Hugging Face ``config.json`` (plus
``hf_quant_config.json`` where the repository has one) under ``moesim/presets/<org>--<repo>/``,
read through :func:`moesim.spec.hf_import.model_from_hf_config`. Nothing is fetched from the
network; parsed presets are cached, and :class:`ModelSpec` is frozen, so sharing them is safe.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Union

import yaml
from pydantic import ValidationError

from ..errors import InputError, from_pydantic
from .hf_import import model_from_hf_config
from .model import ModelSpec

__all__ = ["PRESETS", "PRESETS_DIR", "list_presets", "load_model", "preset_hf_id", "resolve_preset"]

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"

# Short name -> Hugging Face id; the folder is the id with "/" replaced by "--".
PRESETS: dict[str, str] = {
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "qwen3-235b-a22b-fp8": "Qwen/Qwen3-235B-A22B-FP8",
    "qwen3.5-397b-a17b": "Qwen/Qwen3.5-397B-A17B",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "deepseek-r1": "deepseek-ai/DeepSeek-R1",
    "kimi-k2.5": "moonshotai/Kimi-K2.5",
    "glm-5": "zai-org/GLM-5",
    "minimax-m2.5": "MiniMaxAI/MiniMax-M2.5",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "llama-4-scout": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "llama-4-maverick": "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "llama-3.1-8b": "meta-llama/Meta-Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Meta-Llama-3.1-70B",
    "qwen3-32b": "Qwen/Qwen3-32B",
}

# Every accepted spelling (short name, HF id, folder name), lower-cased -> short name.
_ALIASES: dict[str, str] = {}
for _short, _hf in PRESETS.items():
    for _alias in (_short, _hf, _hf.replace("/", "--")):
        _ALIASES[_alias.lower()] = _short

ModelRef = Union[str, Path, Mapping[str, Any], ModelSpec]


def list_presets() -> list[str]:
    """Short preset names, in registry order (grouped by family)."""
    return list(PRESETS)


def preset_hf_id(name: str) -> str:
    return PRESETS[resolve_preset(name)]


def resolve_preset(ref: str) -> str:
    """Short name for a preset name / HF id / folder name (case-insensitive); KeyError if none."""
    return _ALIASES[ref.strip().lower()]


def load_model(ref: ModelRef, field: str = "model") -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, an HF id of a preset, a folder holding
    ``config.json``, a ``.json`` / ``.yaml`` file, or an inline object: an HF-style config (it has
    ``model_type``) or a ModelSpec-shaped one (validated strictly). Errors are
    :class:`InputError` with ``field`` as the path prefix."""
    if isinstance(ref, ModelSpec):
        return ref
    if isinstance(ref, Mapping):
        return _from_mapping(ref, field, name=None)
    if isinstance(ref, (str, Path)):
        text = str(ref)
        short = _ALIASES.get(text.strip().lower())
        if short is not None:
            return _load_preset(short)
        path = Path(text).expanduser()
        if path.exists():
            return _from_path(path, field)
        raise _unknown(text, field)
    raise InputError(field, f"expected a preset name, a path or an object; got "
                     f"{type(ref).__name__}")


@lru_cache(maxsize=None)
def _load_preset(short: str) -> ModelSpec:
    hf_id = PRESETS[short]
    config = _read_folder(PRESETS_DIR / hf_id.replace("/", "--"), field=f"preset {short}")
    return model_from_hf_config(config, name=short, hf_id=hf_id)


def _unknown(ref: str, field: str) -> InputError:
    names = list_presets()
    listing = f"presets: {', '.join(names[:8])}, ... ({len(names)} in all; see " \
              "`python -m moesim models`)"
    if ref.endswith((".json", ".yaml", ".yml")) or ref.startswith((".", "/", "~")):
        return InputError(field, f"no such file: {ref}", "give a path to a config.json, its "
                          "folder, or a preset name")
    if ref.count("/") == 1:
        # Looks like an HF id: configs are never fetched, so say how to get one.
        return InputError(field, f"{ref!r} is not a preset and moesim does not download configs",
                          f"run `huggingface-cli download {ref} config.json` and pass its path; "
                          + listing)
    close = difflib.get_close_matches(ref.lower(), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return InputError(field, f"unknown model {ref!r}: not a preset and no such file",
                      f"{hint}{listing}; or give a path to a config.json or its folder")


def _from_path(path: Path, field: str) -> ModelSpec:
    if path.is_dir():
        config = _read_folder(path, field)
        return model_from_hf_config(config, name=path.name, hf_id=_hf_id_from_folder(path.name),
                                    field=field)
    data = _read_file(path, field)
    # ".../<org>--<repo>/config.json" is named after its folder, anything else after its stem.
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return _from_mapping(data, field, name=name)


def _from_mapping(data: Mapping[str, Any], field: str, name: str | None) -> ModelSpec:
    if "model_type" in data:
        label = name or str(data.get("name") or data.get("_name_or_path") or data["model_type"])
        config = {k: v for k, v in data.items() if k != "name"}
        return model_from_hf_config(config, name=label, hf_id=None, field=field)
    body = dict(data)
    if name is not None:
        body.setdefault("name", name)
    try:
        return ModelSpec.model_validate(body)
    except ValidationError as exc:
        raise from_pydantic(exc, prefix=field) from None


def _read_folder(folder: Path, field: str) -> dict[str, Any]:
    """``config.json``, with a ModelOpt ``hf_quant_config.json`` folded in as its
    ``quantization_config`` when the config itself has none (older NVIDIA checkpoints)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(field, f"{folder} has no config.json",
                         "point at a Hugging Face model folder or a config .json file")
    config = _read_file(cfg_path, field)
    quant_path = folder / "hf_quant_config.json"
    if quant_path.is_file() and "quantization_config" not in config:
        quant = _read_file(quant_path, field).get("quantization") or {}
        config = {**config, "quantization_config": {"quant_method": "modelopt", **quant}}
    return config


def _read_file(path: Path, field: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(field, f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(field, f"{path} must hold a JSON/YAML object")
    return data


def _hf_id_from_folder(name: str) -> str | None:
    """``org--repo`` (the layout of ``moesim/presets``) -> ``org/repo``."""
    return name.replace("--", "/", 1) if "--" in name else None
