"""NCCL all-reduce / all-to-all on the visible GPUs of one node (only when more than one GPU is
visible; never run on CPU). Rows use the reference ``collective.csv`` layout: ``library`` nccl,
``op`` all_reduce / alltoall, ``dtype`` half (fp16, as the reference), ``message_bytes`` = the
per-rank buffer (nccl-tests' size column). Time per op = mean over ``iters`` back-to-back ops
between two CUDA events (nccl-tests style), the largest over the ranks.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import torch

KiB, MiB = 1024, 1024 ** 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: list[int], iters: int, out: str) -> None:
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = []
    for nbytes in sizes:
        n = max(world, nbytes // 2 // world * world)  # fp16 elements, divisible by world
        buf = torch.ones(n, dtype=torch.float16, device="cuda")
        out_buf = torch.empty_like(buf)
        ops = {"all_reduce": lambda: dist.all_reduce(buf),
               "alltoall": lambda: dist.all_to_all_single(out_buf, buf)}
        for op, fn in ops.items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            dist.barrier()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            t = torch.tensor([s.elapsed_time(e) * 1e3 / iters], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results.append({"op": op, "message_bytes": n * 2, "latency_us": float(t.item())})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_collectives(ctx, n_visible: int) -> None:
    import torch.multiprocessing as mp
    sizes = ([KiB, MiB, 64 * MiB] if ctx.quick
             else [KiB * 4 ** i for i in range(0, 10)] + [512 * MiB])  # 1 KiB .. 256 MiB, 512 MiB
    iters = 10 if ctx.quick else 20
    try:
        version = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001
        version = "unknown"
    world = 2
    while world <= n_visible:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "res.json")
            try:
                mp.spawn(_worker, args=(world, _free_port(), sizes, iters, out), nprocs=world,
                         join=True)
                for r in json.loads(Path(out).read_text()):
                    ctx.row("collective", [r["latency_us"]], {"iters": iters}, library="nccl",
                            library_version=version, op=r["op"], dtype="half", num_gpus=world,
                            message_bytes=r["message_bytes"])
            except Exception as e:  # noqa: BLE001
                ctx.error(f"collective world={world}", e)
        world *= 2
