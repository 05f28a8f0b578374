"""A prediction as a JSON-ready dict or as a table a person reads at a glance."""

from __future__ import annotations

from typing import Any

from .analytic import Prediction
from .step import Step


def _ops(step: Step) -> list[dict[str, Any]]:
    return [{"name": o.name, "layer_kind": o.layer_kind, "count": o.count,
             "time_us": round(o.total_us, 4), "kernel_us": round(o.time_us, 4),
             "launch_us": round(o.launch_us, 4), "flops": o.flops, "bytes": o.bytes,
             "bound": o.bound, "category": o.category} for o in step.ops]


def _layers(step: Step) -> list[dict[str, Any]]:
    """Per layer kind: how many layers, time of one such layer and of all of them."""
    rows: dict[str, dict[str, Any]] = {}
    for o in step.ops:
        r = rows.setdefault(o.layer_kind, {"layer_kind": o.layer_kind, "count": o.count,
                                           "time_us_per_layer": 0.0, "time_us_total": 0.0})
        r["time_us_per_layer"] += o.total_us
        r["time_us_total"] += o.count * o.total_us
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            for r in rows.values()]


def _bounds(step: Step) -> dict[str, float]:
    out: dict[str, float] = {}
    for o in step.ops:
        out[o.bound] = out.get(o.bound, 0.0) + o.count * o.total_us
    total = sum(out.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def to_dict(p: Prediction) -> dict[str, Any]:
    sc = p.scenario
    d = sc.deployment
    out: dict[str, Any] = {
        "scenario": sc.name,
        "model": sc.model.name,
        "hardware": sc.hardware.id,
        "num_gpus": sc.num_gpus,
        "parallelism": {"tp": d.tp, "ep": d.ep, "moe_tp": d.moe_tp,
                        "attention_dp": d.attention_dp, "pp": d.pp},
        "framework": sc.framework.id,
        "ttft_ms": p.ttft_ms,
        "ttft_ms_first_wave": p.ttft_ms_first_wave,
        "tpot_ms": p.tpot_ms,
        "decode_steps_with_prefill_fraction": p.mixed_fraction,
        "queued_requests": p.queued_requests,
        "throughput_output_tok_per_s": p.throughput_output_tok_per_s,
        "throughput_output_tok_per_s_per_gpu": p.throughput_output_tok_per_s_per_gpu,
        "memory_per_gpu_bytes": {k: v for k, v in p.memory.as_dict().items()},
        "fits": p.memory.fits,
        "max_batch_size": p.memory.max_batch_size,
        "routing": {"distribution": sc.routing.distribution, "samples": p.samples,
                    "seed": sc.routing.seed,
                    "ttft_ms_p50": p.ttft_ms_p50, "ttft_ms_p95": p.ttft_ms_p95,
                    "tpot_ms_p50": p.tpot_ms_p50, "tpot_ms_p95": p.tpot_ms_p95,
                    "moe_prefill": {k: vars(v) for k, v in p.prefill_step.moe_stats.items()},
                    "moe_decode": {k: vars(v) for k, v in p.decode_step.moe_stats.items()}},
        "prefill_step": {"tokens": p.prefill_step.batch.tokens,
                         "time_us": p.prefill_step.time_us, "bound_share": _bounds(p.prefill_step),
                         "layers": _layers(p.prefill_step)},
        "decode_step": {"batch": p.decode_step.batch.num_seqs,
                        "time_us": p.decode_step.time_us, "bound_share": _bounds(p.decode_step),
                        "layers": _layers(p.decode_step)},
        "prefill_ops": _ops(p.prefill_step),
        "decode_ops": _ops(p.decode_step),
        "warnings": list(p.warnings),
    }
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _fmt_us(us: float) -> str:
    return f"{us / 1e3:.3f} ms" if us >= 1000 else f"{us:.1f} us"


def _op_table(step: Step, title: str) -> list[str]:
    total = step.time_us or 1.0
    lines = [title, f"  {'op':<22}{'layers':<24}{'x':>4}{'each':>12}{'total':>12}{'share':>8}"
                    f"  bound"]
    for o in sorted(step.ops, key=lambda o: -o.count * o.total_us):
        t = o.count * o.total_us
        if t / total < 0.002:
            continue
        lines.append(f"  {o.name:<22}{o.layer_kind[:23]:<24}{o.count:>4}{_fmt_us(o.total_us):>12}"
                     f"{_fmt_us(t):>12}{100 * t / total:>7.1f}%  {o.bound}")
    return lines


def to_table(p: Prediction) -> str:
    sc, d, m = p.scenario, p.scenario.deployment, p.memory
    wl = sc.workload
    lines = [
        f"{sc.name}",
        f"  {sc.model.name} on {sc.num_gpus}x {sc.hardware.display_name} | tp={d.tp} ep={d.ep} "
        f"moe_tp={d.moe_tp} attention_dp={d.attention_dp} pp={d.pp} | {sc.framework.id} | "
        f"weights {d.weight_dtype}/{d.experts_dtype} kv {d.kv_cache_dtype}",
        f"  batch {wl.batch_size} x ({wl.input_len} in, {wl.output_len} out)"
        + (f", means over a run of {wl.num_requests} requests" if wl.num_requests else
           ", steady state")
        + (f" | speculative {wl.speculative.method} x{wl.speculative.num_draft_tokens} "
           f"(accept {wl.speculative.acceptance_rate:g})" if wl.speculative else "")
        + " | routing "
        f"{sc.routing.distribution} (seed {sc.routing.seed}, {p.samples} draw"
        f"{'s' if p.samples > 1 else ''})",
        "",
        f"  TTFT        {p.ttft_ms:10.2f} ms   (p50 {p.ttft_ms_p50:.2f}, p95 {p.ttft_ms_p95:.2f}; "
        f"{p.ttft_ms_first_wave:.2f} if all {wl.batch_size} arrive at once)",
        f"  TPOT        {p.tpot_ms:10.3f} ms   (p50 {p.tpot_ms_p50:.3f}, p95 {p.tpot_ms_p95:.3f}; "
        f"{p.mixed_fraction:.1%} of decode steps carry prefill)",
        f"  throughput  {p.throughput_output_tok_per_s:10.1f} output tok/s   "
        f"({p.throughput_output_tok_per_s_per_gpu:.1f} per GPU)",
        f"  memory/GPU  {_gb(m.total):>10}   of {_gb(m.capacity)}: weights {_gb(m.weights)}, "
        f"KV {_gb(m.kv_cache)}, activations {_gb(m.activations)}, reserved {_gb(m.reserved)}",
        f"  fits        {'yes' if m.fits else 'NO'}   (largest batch that fits: {m.max_batch_size})",
    ]
    for label, step in (("prefill", p.prefill_step), ("decode", p.decode_step)):
        for kind, st in step.moe_stats.items():
            lines.append(f"  {label} {kind}: tokens/expert mean {st.tokens_per_expert_mean:.1f} "
                         f"max {st.tokens_per_expert_max:.1f}, rank load max/mean "
                         f"{st.rank_load_max_over_mean:.2f}, distinct experts "
                         f"{st.distinct_experts:.1f}, dropped {100 * st.dropped_fraction:.2f}%, "
                         f"rerouted {100 * st.rerouted_fraction:.2f}%"
                         + (f", rank tokens max/mean {st.rank_tokens_max_over_mean:.2f} with EPLB "
                            f"vs {st.rank_tokens_max_over_mean_before_eplb:.2f} without"
                            if st.rank_tokens_max_over_mean_before_eplb is not None else ""))
    lines.append("")
    lines += _op_table(p.prefill_step, f"prefill step: {p.prefill_step.batch.tokens} tokens, "
                                       f"{_fmt_us(p.prefill_step.time_us)}")
    lines.append("")
    lines += _op_table(p.decode_step, f"decode step: {p.decode_step.batch.num_seqs} sequences, "
                                      f"{_fmt_us(p.decode_step.time_us)}")
    lines.append("")
    lines.append("  per layer kind (decode):")
    for r in _layers(p.decode_step):
        lines.append(f"    {r['layer_kind']:<28} x{r['count']:<4} {_fmt_us(r['time_us_per_layer'])}"
                     f" each, {_fmt_us(r['time_us_total'])} total")
    for w in p.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
