"""``simulate`` sub-command: ``python -m moesim simulate SCENARIO [--json] [--requests N]
[--seed S] [--trace FILE] [--sim FILE] [...]``.

:func:`add_cli` registers it on the main CLI's sub-parsers (the command sets ``func``; bad input
raises :class:`~moesim.errors.InputError`, which the main CLI prints as one line with exit code 2).


Where the simulation settings come from, later ones winning: the scenario file's ``simulation``
block, a ``--sim`` file (a SimulationSpec object, or any object with a ``simulation`` key), then
the flags.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError

OVERLAPS = ("shared_expert_dispatch", "two_batch", "attention_combine")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on an ``argparse`` sub-parsers object; returns its parser."""
    ps = subparsers.add_parser(
        "simulate", help="discrete-event simulation of serving: per-request TTFT / TPOT / "
                         "latency percentiles, queueing, KV cache, per-rank timelines")
    ps.add_argument("scenario", help="scenario file (.json or .yaml), see examples/")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--requests", type=int, metavar="N", help="requests to simulate")
    ps.add_argument("--seed", type=int, metavar="S",
                    help="seed of arrivals, lengths and routing draws")
    ps.add_argument("--trace", metavar="FILE",
                    help="write a Chrome trace-event JSON (open it in ui.perfetto.dev)")
    ps.add_argument("--sim", metavar="FILE", help="simulation settings (JSON / YAML)")
    g = ps.add_argument_group("arrivals (one of)")
    g.add_argument("--concurrency", type=int, metavar="C", help="closed loop with C clients")
    g.add_argument("--rate", type=float, metavar="R", help="Poisson arrivals, R requests/s")
    g.add_argument("--arrivals", metavar="FILE",
                   help="arrival trace: CSV / JSON with arrival_s, input_len, output_len")
    e = ps.add_argument_group("workload and engine")
    e.add_argument("--input-len", type=int, metavar="N", help="fixed prompt length")
    e.add_argument("--output-len", type=int, metavar="N", help="fixed output length")
    e.add_argument("--max-num-seqs", type=int, metavar="N")
    e.add_argument("--max-num-batched-tokens", type=int, metavar="N")
    e.add_argument("--block-size", type=int, metavar="N", help="KV-cache block size, tokens")
    e.add_argument("--num-gpu-blocks", type=int, metavar="N",
                   help="KV blocks per attention-DP group (default: from memory)")
    e.add_argument("--context-bucket", type=int, metavar="N",
                   help="context grid of the step-cost cache (1 = exact)")
    e.add_argument("--overlap", action="append", choices=OVERLAPS, default=[],
                   help="overlap option (repeatable)")
    ps.set_defaults(func=cmd_simulate)
    return ps


def _load(path: str):
    """The scenario; its ``simulation`` block, if any, travels in ``sc.source.simulation``."""
    from ..spec.scenario import load_scenario

    return load_scenario(Path(path)), None


def build_sim_spec(args: argparse.Namespace, block: Any, sc=None):
    from ..spec.simulation import SimulationSpec, parse_simulation, read_data_file

    raw: dict[str, Any] = {}
    if sc is not None and getattr(sc.source, "simulation", None) is not None:
        src = sc.source.simulation
        raw = src.model_dump(exclude_unset=True) if isinstance(src, SimulationSpec) else dict(src)
    if block is not None:
        if not isinstance(block, dict):
            raise InputError("simulation", "the simulation block must be an object")
        raw = dict(block)
    if args.sim:
        data = read_data_file(args.sim, "sim")
        if isinstance(data, dict) and "simulation" in data:
            data = data["simulation"]
        if not isinstance(data, dict):
            raise InputError("sim", f"{args.sim} must hold a simulation object")
        raw = {**raw, **data}
    arrivals = [a for a in ("concurrency", "rate", "arrivals") if getattr(args, a) is not None]
    if len(arrivals) > 1:
        raise InputError("arrival", f"--{arrivals[0]} and --{arrivals[1]} exclude each other",
                         "give one arrival process")
    if args.concurrency is not None:
        raw["arrival"] = {"process": "closed_loop", "concurrency": args.concurrency}
    elif args.rate is not None:
        raw["arrival"] = {"process": "poisson", "rate": args.rate}
    elif args.arrivals is not None:
        raw["arrival"] = {"process": "trace", "trace_file": args.arrivals}
        raw.pop("input_len", None)
        raw.pop("output_len", None)
    for flag, key in (("input_len", "input_len"), ("output_len", "output_len"),
                      ("max_num_seqs", "max_num_seqs"),
                      ("max_num_batched_tokens", "max_num_batched_tokens"),
                      ("block_size", "block_size"), ("num_gpu_blocks", "num_gpu_blocks"),
                      ("context_bucket", "context_bucket")):
        v = getattr(args, flag)
        if v is not None:
            raw[key] = v
    if args.overlap:
        ov = dict(raw.get("overlap") or {})
        for name in args.overlap:
            ov[name] = True
        raw["overlap"] = ov
    return parse_simulation(raw)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .serving import simulate

    sc, block = _load(args.scenario)
    spec = build_sim_spec(args, block, sc)
    res = simulate(sc, requests=args.requests, seed=args.seed, trace_path=args.trace, sim=spec)
    if args.json:
        print(json.dumps(_json_safe(res.to_dict()), indent=2))
    else:
        print(to_table(res, args.trace))
    return 0


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def to_table(res, trace: Optional[str] = None) -> str:
    m, d = res.metrics, res.detail
    s = d["settings"]
    arr = s["arrival"] + (f" (concurrency {s['concurrency']})" if s["concurrency"] else "") + \
        (f" ({s['rate_per_s']:g} req/s)" if s["rate_per_s"] else "")
    lines = [f"{res.scenario} — simulated {m['requests_completed']} requests, {arr}, "
             f"seed {res.seed}", ""]
    lines.append(f"  {'':<12}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}")
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("e2e_ms", "E2E ms")):
        lines.append(f"  {label:<12}" + "".join(f"{m[f'{key}_{q}']:>11.2f}"
                                                for q in ("mean", "p50", "p90", "p99")))
    lines.append("")
    lines.append(f"  throughput        {m['throughput_output_tok_per_s']:.1f} output tok/s, "
                 f"{m['throughput_requests_per_s']:.2f} req/s")
    g = d["gpu"]
    busy = ", ".join(f"{x:.1%}" for x in g["busy_fraction"][:8]) + \
        (" ..." if len(g["busy_fraction"]) > 8 else "")
    lines.append(f"  GPU busy          {busy}")
    waits = ", ".join(f"{x:.1f}" for x in g["waiting_ms"][:8]) + \
        (" ..." if len(g["waiting_ms"]) > 8 else "")
    lines.append(f"  rank waiting ms   {waits}")
    q, kv = d["queue"], d["kv_cache"]
    lines.append(f"  queue             mean {q['waiting']['mean']:.2f}, max {q['waiting']['max']}"
                 f" waiting; {q['running']['mean']:.1f} running on average")
    lines.append(f"  KV cache          {kv['blocks']} blocks of {kv['block_size']} tokens; usage "
                 f"mean {kv['usage']['mean']:.1%}, max {kv['max_usage']:.1%}; "
                 f"{d['preemptions']} preemptions")
    st = d["steps"]
    lines.append(f"  steps             {st['prefill']} prefill, {st['decode']} decode "
                 f"(mean decode batch {d['mean_decode_batch']:.1f})")
    rt = d["routing"]
    if rt["routed_token_slots"] and (rt["dropped_token_slots"] or rt["rerouted_token_slots"]):
        lines.append(f"  routing           {rt['dropped_fraction']:.2%} of token-slots dropped, "
                     f"{rt['rerouted_fraction']:.2%} rerouted")
    lines.append(f"  simulated {d['makespan_ms'] / 1e3:.2f} s in {res.wall_s:.2f} s wall")
    if trace:
        lines.append(f"  trace written to {trace} (open in https://ui.perfetto.dev)")
    return "\n".join(lines)
