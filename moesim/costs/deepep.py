"""DeepEP dispatch / combine inside one NVLink domain: a fixed latency plus the bytes a rank sends
over NVLink at a fitted fraction of the link's per-direction bandwidth.

    t_us = latency_us + remote_bytes / (nvlink_gb_per_s_per_direction * 1e3 * bus_efficiency)

one ``(latency_us, bus_efficiency)`` pair per backend and phase (``hardware.deepep.<family>``,
fitted from ``moe_a2a.csv`` by ``python -m calibration fit``). The byte count follows the kernels
(github.com/deepseek-ai/DeepEP, ``csrc/kernels/intranode.cu`` and ``internode_ll.cu``):

- normal / high-throughput kernels (``ht``, and ``v2_context``, V2's prefill kernels): a token
  travels ONCE to every other rank that holds at least one of its top-k experts (the kernels
  de-duplicate per rank) and combine returns one bf16 partial sum per (token, rank). With
  uniform routing over ``E`` experts, ``E / ep`` per rank, the expected number of other ranks a
  token visits is the hypergeometric ``(ep - 1) * (1 - C(E - E/ep, k) / C(E, k))``.
- low-latency kernels (``ll``, and ``v2_generation``, V2's decode kernels): one message per
  (token, expert), no per-rank de-duplication; ``k * (ep - 1) / ep`` of a token's copies leave
  the rank on average.
- element bytes: combine sends bf16 (2 B / value); ``ll`` / ``v2_generation`` dispatch sends fp8
  with one fp32 scale per 128 values (DeepEP's ``use_fp8=True`` default of
  ``low_latency_dispatch``, as vLLM calls it), ``ht`` / ``v2_context`` dispatch bf16. The tables
  do not record the dispatch dtype; this convention is part of the fitted model (a different
  dtype is absorbed by the fitted bus efficiency, so use the same convention when pricing).

Copies to the rank itself stay in its HBM and are not counted. ``sms``: the kernels split the
transfer into channels of two SMs each (DeepEP ``Buffer.num_sms``), so the achieved bandwidth is
taken proportional to the SMs given to communication, relative to the SM count the fit was made
at, up to the link's peak. The reference table has one SM count per backend, so this scaling is
an assumption the data cannot test; at the fitted SM count (or ``sms = 0``, the backend default)
it does not apply.
"""

from __future__ import annotations

from math import comb
from typing import TYPE_CHECKING, Any, Optional

from ..errors import InputError
from .op import OpCost

if TYPE_CHECKING:
    from ..spec.hardware import DeepEPFit, HardwareProfile

#: Backends as the reference table's ``comm_backend`` names them (``deepep_<backend>``).
BACKENDS = ("ht", "ll", "v2_context", "v2_generation")
PHASES = ("dispatch", "combine")
#: Backends whose kernels send one message per (token, expert) rather than per (token, rank).
PER_EXPERT_BACKENDS = ("ll", "v2_generation")
#: Values per fp32 scale of the low-latency kernels' fp8 dispatch (DeepEP: 128-value groups).
FP8_GROUP = 128


def family(backend: str, phase: str) -> str:
    """``hardware.deepep`` field of one backend and phase, e.g. ``ll_dispatch``."""
    if backend not in BACKENDS:
        raise InputError("comm_backend", f"unknown DeepEP backend {backend!r}",
                         f"valid: {', '.join('deepep_' + b for b in BACKENDS)}")
    if phase not in PHASES:
        raise InputError("phase", f"unknown phase {phase!r}", "dispatch or combine")
    return f"{backend}_{phase}"


def remote_ranks_per_token(topk: int, num_experts: int, ep: int) -> float:
    """Expected number of OTHER ranks holding at least one of a token's ``topk`` distinct experts,
    experts drawn uniformly without replacement, ``num_experts / ep`` per rank (hypergeometric:
    a given rank is missed with probability C(E - E/ep, k) / C(E, k))."""
    per_rank = num_experts // ep
    miss = comb(num_experts - per_rank, topk) / comb(num_experts, topk)
    return (ep - 1) * (1.0 - miss)


def expected_remote_copies(backend: str, tokens_per_rank: float, topk: int, num_experts: int,
                           ep: int) -> float:
    """Token copies one rank sends over NVLink with uniform routing: per (token, rank) for the
    normal kernels, per (token, expert) for the low-latency ones (module docstring)."""
    if backend in PER_EXPERT_BACKENDS:
        return tokens_per_rank * topk * (ep - 1) / ep
    return tokens_per_rank * remote_ranks_per_token(topk, num_experts, ep)


def bytes_per_copy(backend: str, phase: str, hidden: int) -> float:
    """Bytes of one token copy: bf16 hidden, or fp8 plus fp32 scales for low-latency dispatch."""
    if phase == "dispatch" and backend in PER_EXPERT_BACKENDS:
        return hidden * 1.0 + -(-hidden // FP8_GROUP) * 4.0
    return hidden * 2.0


def _fit(hw: "HardwareProfile", fam: str) -> "DeepEPFit":
    fit = getattr(hw.deepep, fam, None) if hw.deepep is not None else None
    if fit is None:
        raise InputError(f"hardware.deepep.{fam}", f"{hw.id} has no DeepEP {fam} fit",
                         "calibrate it (python -m calibration fit with a moe_a2a table) or use "
                         "ep_comm_backend nccl")
    return fit


def deepep_terms(fit: "DeepEPFit", hw: "HardwareProfile", remote_bytes: Any, sms: int = 0,
                 minimum: Any = min) -> tuple[Any, Any]:
    """(time µs, ideal time at NVLink peak µs) of ``remote_bytes`` (float or numpy array; then
    ``minimum`` = ``np.minimum``)."""
    link_bytes_per_us = hw.interconnect.nvlink_gb_per_s_per_direction.value * 1e3
    eff = fit.bus_efficiency.value
    if sms > 0 and fit.sms is not None and fit.sms.value > 0 and sms != fit.sms.value:
        eff = minimum(1.0, eff * sms / fit.sms.value)  # channels of 2 SMs (module docstring)
    ideal_us = remote_bytes / link_bytes_per_us
    return fit.latency_us.value + ideal_us / eff, ideal_us


def deepep_op(phase: str, backend: str, remote_copies: float, hidden: int,
              hw: "HardwareProfile", sms: int = 0, name: Optional[str] = None,
              unfitted: bool = False) -> OpCost:
    """One DeepEP ``phase`` (dispatch / combine) of ``backend`` where the busiest rank sends
    ``remote_copies`` token copies to other ranks (:func:`expected_remote_copies` for uniform
    routing) of ``hidden`` values each. Intra-node only (one NVLink domain). ``unfitted``: for
    calibration, a profile without this fit gives the op with its ideal time and a NaN time
    instead of an error."""
    fam = family(backend, phase)
    moved = remote_copies * bytes_per_copy(backend, phase, hidden)
    if unfitted and (hw.deepep is None or getattr(hw.deepep, fam) is None):
        ideal_us = moved / (hw.interconnect.nvlink_gb_per_s_per_direction.value * 1e3)
        t = float("nan")
    else:
        t, ideal_us = deepep_terms(_fit(hw, fam), hw, moved, sms)
    return OpCost(name or phase, "comm", t, 0.0, moved, "network", kernels=1,
                  family="deepep_" + fam, ideal_memory_us=ideal_us,
                  fixed_us=0.0)
