"""Number formats: storage bytes per element and the tensor-core rate each one computes at.

Block-scale overheads follow the formats' definitions: fp8_block stores one fp32 scale per 128x128
weight block (DeepSeek-V3 report, vLLM ``block_shape=[128,128]``); mxfp4 stores one 8-bit scale per
32 values (OCP Microscaling spec v1.0); int4 (GPTQ/AWQ, group 128) one fp16 scale per 128 values.
"""

from __future__ import annotations

from typing import Literal

DType = Literal["fp32", "bf16", "fp16", "fp8", "fp8_block", "int8", "int4", "mxfp4", "nvfp4"]
ComputeDType = Literal["fp32", "bf16", "fp16", "fp8", "int8", "fp4"]

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8", "fp8_block", "int8", "int4", "mxfp4", "nvfp4")

# Bytes per stored weight element, scales included.
WEIGHT_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "fp8_block": 1.0 + 4.0 / (128 * 128),
    "int8": 1.0,
    "int4": 0.5 + 2.0 / 128,
    "mxfp4": 0.5 + 1.0 / 32,
    "nvfp4": 0.5 + 1.0 / 16,  # one fp8 scale per 16 values (NVFP4 definition)
}

# Bytes per activation / KV-cache element (activation scales are per token-group and negligible).
ELEMENT_BYTES: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp8_block": 1.0, "int8": 1.0,
    "int4": 0.5, "mxfp4": 0.5, "nvfp4": 0.5,
}

# Aliases users type (and HF / serving-engine labels) -> canonical name.
ALIASES: dict[str, str] = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
    "float8": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8", "fp8_per_tensor": "fp8",
    "fp4": "mxfp4", "w4a16": "int4", "w8a8": "fp8",
}


def canonical(name: str) -> str:
    """Canonical dtype name for ``name`` (aliases resolved); raises ValueError if unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in WEIGHT_BYTES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return key


def gemm_compute_dtype(weight: str, activation: str) -> str:
    """Tensor-core format a GEMM runs in for these weight / activation formats.

    Weight-only formats (int4, mxfp4 on Hopper) are dequantised to the activation format in the
    kernel (Marlin / Triton w4a16), so they compute at the activation's rate; fp8 x fp8 runs on
    fp8 tensor cores; nvfp4 x nvfp4 on fp4 tensor cores (Blackwell).
    """
    a = canonical(activation)
    w = canonical(weight)
    if a in ("fp8", "fp8_block") and w in ("fp8", "fp8_block"):
        return "fp8"
    if a == "nvfp4" and w == "nvfp4":
        return "fp4"
    if a == "int8" and w == "int8":
        return "int8"
    if a in ("fp8", "fp8_block"):
        return "fp8"
    return {"fp32": "fp32", "fp16": "fp16"}.get(a, "bf16")
