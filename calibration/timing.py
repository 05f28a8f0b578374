"""Timers: CUDA events on the GPU, ``time.perf_counter_ns`` on the CPU.

Both return a list of per-call samples in µs; rows record the median.

GPU (notes §6.1): warm-up calls first (Triton JIT, cuBLAS heuristics), then one event pair per
call; with ``flush=True`` a 256 MB buffer is zeroed before each call, *outside* the event pair, so
weights and inputs are cold in L2 (50 MB on H100/H200, 126.5 MB on B200). No host sync between
calls; one sync at the end. The number of samples follows a time budget within
``[min_samples, max_samples]``.

CPU: warm-up, then the median of single calls; calls shorter than ~100 µs are timed in batches
(``inner`` back-to-back calls per sample, sample = batch time / inner). CPU caches are flushed
only by a timer made with ``flush_bytes`` > 0 (and ``flush=True``): a buffer of that size is written
before each sample, outside the timed region (a batch's later calls then run warm).
``torch.set_num_threads`` is left at its default. The clock is the wall clock
(``time.perf_counter_ns``) unless the timer is made with ``clock="thread"``: the calling thread's
CPU time (``time.thread_time_ns``), which leaves out the time the thread was descheduled. That is
the op's own cost only when every op runs in the calling thread, i.e. with one torch thread
(``torch.set_num_threads(1)``): on a shared machine it removes the time-slicing noise of
neighbouring processes (not their cache or memory-bandwidth interference).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

FLUSH_BYTES = 256 * 1024 * 1024


def _n_samples(est_us: float, budget_s: float, min_samples: int, max_samples: int) -> int:
    return max(min_samples, min(max_samples, int(budget_s * 1e6 / max(est_us, 1e-3))))


CPU_CLOCKS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


class CpuTimer:
    kind = "cpu"

    def __init__(self, clock: str = "wall", flush_bytes: int = 0):
        if clock not in CPU_CLOCKS:
            raise ValueError(f"unknown CPU clock {clock!r}; known: {', '.join(CPU_CLOCKS)}")
        self.clock = clock
        self._now = CPU_CLOCKS[clock]
        self.flush_bytes = int(flush_bytes)
        self._buf = None
        if self.flush_bytes > 0:
            import numpy as np
            self._buf = np.zeros(self.flush_bytes, dtype=np.uint8)

    def flush(self) -> None:
        """Evict the CPU caches: write a buffer larger than them (``flush_bytes``)."""
        if self._buf is not None:
            self._buf.fill(1)

    def sync(self) -> None:
        pass

    @staticmethod
    def median(samples: list[float]) -> float:
        return float(statistics.median(samples))

    def measure(self, fn: Callable[[], object], *, flush: bool = False, budget_s: float = 0.2,
                min_samples: int = 3, max_samples: int = 50, warmup: int = 1) -> list[float]:
        now = self._now
        cold = flush and self._buf is not None
        for _ in range(max(warmup, 0)):
            fn()
        if cold:
            self.flush()
        t0 = now()
        fn()
        est = (now() - t0) / 1e3
        inner = 1 if est >= 100 else min(1000, max(1, int(200 / max(est, 0.05))))
        n = _n_samples(est * inner, budget_s, min_samples, max_samples)
        samples = [est] if inner == 1 else []  # a slow call's estimate is a valid sample
        for _ in range(n - len(samples)):
            if cold:
                self.flush()  # outside the timed region; a batch's later calls run warm
            t0 = now()
            for _ in range(inner):
                fn()
            samples.append((now() - t0) / 1e3 / inner)
        return samples


class CudaTimer:
    kind = "cuda"

    def __init__(self, flush_bytes: int = FLUSH_BYTES):
        import torch
        self.torch = torch
        self.cache = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
        self.flush_us = 0.0
        self.flush_us = self.median(self.measure(self.cache.zero_, flush=False, budget_s=0.02,
                                                 min_samples=5, max_samples=20))

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    @staticmethod
    def median(samples: list[float]) -> float:
        return float(statistics.median(samples))

    def _event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def measure(self, fn: Callable[[], object], *, flush: bool = True, budget_s: float = 0.2,
                min_samples: int = 10, max_samples: int = 100, warmup: int = 2) -> list[float]:
        cuda = self.torch.cuda
        for _ in range(max(warmup, 1)):
            fn()
        cuda.synchronize()
        s, e = self._event(), self._event()
        if flush:
            self.cache.zero_()
        s.record()
        fn()
        e.record()
        cuda.synchronize()
        est = s.elapsed_time(e) * 1e3 + (self.flush_us if flush else 0.0) + 5.0
        n = _n_samples(est, budget_s, min_samples, max_samples)
        starts = [self._event() for _ in range(n)]
        ends = [self._event() for _ in range(n)]
        for i in range(n):
            if flush:
                self.cache.zero_()  # before the start event: not timed
            starts[i].record()
            fn()
            ends[i].record()
        cuda.synchronize()
        return [a.elapsed_time(b) * 1e3 for a, b in zip(starts, ends)]


def make_timer(kind: str, clock: str = "wall", cpu_flush_bytes: int = 0):
    """``kind`` "cuda" -> :class:`CudaTimer`; else :class:`CpuTimer` on ``clock`` ("wall" or
    "thread", see the module docstring), evicting the caches with a ``cpu_flush_bytes`` write
    before each timed call where the caller asks for a flush (0: never)."""
    return CudaTimer() if kind == "cuda" else CpuTimer(clock, cpu_flush_bytes)
