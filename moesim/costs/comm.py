"""Collectives between GPUs: alpha-beta models over NVLink (in a node) or the NIC (across).

All-reduce: t = alpha + 2 (n-1)/n * S / busbw; all-to-all, all-gather, reduce-scatter:
t = alpha + (n-1)/n * S / busbw, with S the per-rank buffer (the bus-bandwidth definitions of
nccl-tests ``doc/PERFORMANCE.md``). ``busbw`` = link bandwidth per direction x the collective's
fitted bus efficiency (``hardware.collectives``); a group that spans nodes runs at the scale-out
NIC's bandwidth and adds its latency.
"""

from __future__ import annotations

from ..spec.hardware import CollectiveFit, HardwareProfile
from .op import OpCost

# vLLM's custom all-reduce handles messages up to 8 MiB inside one NVLink domain
# (vllm/distributed/device_communicators/custom_all_reduce.py, max_size default); SGLang's and
# TensorRT-LLM's custom all-reduce kernels cover the same range. Larger messages go to NCCL.
CUSTOM_ALL_REDUCE_MAX_BYTES = 8 * 1024 * 1024


def _link(n: int, gpus_per_node: int, hw: HardwareProfile, fit: CollectiveFit) -> tuple[float, float, bool]:
    """(alpha_us, busbw bytes/us, stays on NVLink) for a group of ``n`` GPUs."""
    ic = hw.interconnect
    alpha, eff = fit.latency_us.value, fit.bus_efficiency.value
    if n <= min(gpus_per_node, int(ic.nvlink_domain_size.value)) \
            and ic.nvlink_gb_per_s_per_direction.value > 0:
        return alpha, ic.nvlink_gb_per_s_per_direction.value * 1e3 * eff, True
    if n <= gpus_per_node:  # same node, no NVLink between these GPUs: PCIe
        return alpha, ic.pcie_gb_per_s_per_direction.value * 1e3 * eff, False
    return alpha + ic.scaleout_latency_us.value, \
        ic.scaleout_gb_per_s_per_direction.value * 1e3 * eff, False


def collective_terms(fit: CollectiveFit, factor: float, message_bytes, n: int, gpus_per_node: int,
                     hw: HardwareProfile, minimum):
    """(time us, bytes moved per GPU, ideal time at link bandwidth us, latency steps) of one
    collective of ``n`` GPUs. ``minimum``: ``min`` for a float message, ``np.minimum`` for an
    array of messages (the sweep's step pricer)."""
    alpha, busbw, _ = _link(n, gpus_per_node, hw, fit)
    moved = factor * (n - 1) / n * message_bytes
    eff = fit.bus_efficiency.value
    steps = int(factor) * (n - 1)
    step_us = fit.latency_per_step_us.value if fit.latency_per_step_us else 0.0
    t = alpha + steps * step_us + moved / busbw
    if fit.ll_latency_us is not None and fit.ll_bus_efficiency is not None:
        # The low-latency protocol on the same path (its own latency and bus efficiency); the
        # tuner takes whichever is faster for this size (hardware.CollectiveFit).
        t = minimum(t, alpha - fit.latency_us.value + fit.ll_latency_us.value + steps * step_us
                    + moved / (busbw / eff * fit.ll_bus_efficiency.value))
    return t, moved, moved / (busbw / eff), steps


def _collective(name: str, family: str, factor: float, message_bytes: float, n: int,
                hw: HardwareProfile, gpus_per_node: int) -> OpCost:
    """``family`` names the fit in ``hardware.collectives``; the op keeps ``moved / link
    bandwidth`` as its ideal time so calibration can refit latency and bus efficiency."""
    # ``factor``: 2 for all-reduce (reduce-scatter then all-gather), which is also its number
    # of step rounds: 2(n-1) steps against n-1 for the others.
    if n <= 1:
        return OpCost(name, "comm", 0.0, 0.0, 0.0, "network", kernels=0)
    fit = getattr(hw.collectives, family)
    t, moved, ideal_us, steps = collective_terms(fit, factor, message_bytes, n, gpus_per_node,
                                                 hw, min)
    return OpCost(name, "comm", t, 0.0, moved, "network",
                  family=family, ideal_memory_us=ideal_us,
                  host_floor_us=fit.host_floor_us.value if fit.host_floor_us else 0.0,
                  steps=steps)


def all_reduce(name: str, message_bytes: float, n: int, hw: HardwareProfile,
               gpus_per_node: int = 8, custom: bool = False) -> OpCost:
    """``custom``: the engine's own all-reduce kernel where it applies (small messages on one
    NVLink domain), else NCCL."""
    c = hw.collectives
    use_custom = custom and message_bytes <= CUSTOM_ALL_REDUCE_MAX_BYTES and \
        _link(n, gpus_per_node, hw, c.all_reduce_custom)[2]
    family = "all_reduce_custom" if use_custom else "all_reduce"
    return _collective(name, family, 2.0, message_bytes, n, hw, gpus_per_node)


def all_to_all(name: str, message_bytes: float, n: int, hw: HardwareProfile,
               gpus_per_node: int = 8) -> OpCost:
    """``message_bytes``: what one rank holds for all ranks (itself included)."""
    return _collective(name, "all_to_all", 1.0, message_bytes, n, hw, gpus_per_node)


def all_gather(name: str, message_bytes: float, n: int, hw: HardwareProfile,
               gpus_per_node: int = 8) -> OpCost:
    """``message_bytes``: the gathered buffer on each rank (reduce-scatter: the input buffer)."""
    return _collective(name, "all_gather", 1.0, message_bytes, n, hw, gpus_per_node)
