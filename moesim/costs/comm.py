"""Collectives between GPUs: alpha-beta models over NVLink (in a node) or the NIC (across).

All-reduce: t = alpha + 2 (n-1)/n * S / busbw (ring / NVLS bus-bandwidth definition of
nccl-tests ``doc/PERFORMANCE.md``). All-to-all: t = alpha + (n-1)/n * S / busbw with S the bytes
one rank holds for all peers (same document). ``busbw`` = link bandwidth per direction x the
profile's bus efficiency; a group that spans nodes runs at the scale-out NIC's bandwidth.
"""

from __future__ import annotations

from ..spec.hardware import HardwareProfile
from .op import OpCost


def _link(n: int, gpus_per_node: int, hw: HardwareProfile, efficiency: float) -> tuple[float, float]:
    """(alpha_us, busbw bytes/us) for a group of ``n`` GPUs."""
    ic = hw.interconnect
    in_domain = n <= min(gpus_per_node, int(ic.nvlink_domain_size.value))
    if in_domain and ic.nvlink_gb_per_s_per_direction.value > 0:
        return ic.collective_latency_us.value, ic.nvlink_gb_per_s_per_direction.value * 1e3 * efficiency
    if n <= gpus_per_node:  # same node, no NVLink between these GPUs: PCIe
        return ic.collective_latency_us.value, ic.pcie_gb_per_s_per_direction.value * 1e3 * efficiency
    return (ic.collective_latency_us.value + ic.scaleout_latency_us.value,
            ic.scaleout_gb_per_s_per_direction.value * 1e3 * efficiency)


def all_reduce(name: str, message_bytes: float, n: int, hw: HardwareProfile,
               gpus_per_node: int = 8) -> OpCost:
    alpha, busbw = _link(n, gpus_per_node, hw, hw.interconnect.allreduce_bus_efficiency.value)
    moved = 2.0 * (n - 1) / n * message_bytes
    return OpCost(name, "comm", alpha + moved / busbw if n > 1 else 0.0, 0.0, moved, "network",
                  kernels=1 if n > 1 else 0)


def all_to_all(name: str, message_bytes: float, n: int, hw: HardwareProfile,
               gpus_per_node: int = 8) -> OpCost:
    """``message_bytes``: what one rank holds for all ranks (itself included)."""
    alpha, busbw = _link(n, gpus_per_node, hw, hw.interconnect.alltoall_bus_efficiency.value)
    moved = (n - 1) / n * message_bytes
    return OpCost(name, "comm", alpha + moved / busbw if n > 1 else 0.0, 0.0, moved, "network",
                  kernels=1 if n > 1 else 0)
