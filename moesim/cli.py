"""``python -m moesim``: predict, simulate, validate, models, hardware, sweep,
recommend, study. Bad input prints
one line and exits 2; nothing else is caught."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import InputError

USAGE_EXIT = 2


def _cmd_predict(args: argparse.Namespace) -> int:
    from .analytic import predict
    from .report import to_dict, to_table
    from .spec.scenario import load_scenario

    pred = predict(load_scenario(args.scenario))
    if args.json:
        print(json.dumps(to_dict(pred), indent=2))
    else:
        print(to_table(pred))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import run

    res = run(args.table, hardware=args.hardware, out=args.out, as_json=args.json,
              time_unit=args.time_unit)
    print(res.text)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .spec.presets import list_presets, load_model

    rows = []
    for name in list_presets():
        m = load_model(name)
        moe = m.moe
        rows.append({"name": name, "hf_id": m.hf_id, "family": m.family,
                     "total_params": m.total_params, "active_params": m.active_params,
                     "layers": m.num_layers, "experts": moe.num_experts if moe else 0,
                     "top_k": moe.top_k if moe else 0,
                     "attention": "mla" if m.mla else ("hybrid-linear" if m.linear_attention
                                                       else "gqa" if m.num_kv_heads <
                                                       m.num_attention_heads else "mha")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':<22}{'total':>9}{'active':>9}{'layers':>8}{'experts':>9}{'top_k':>7}"
          f"  {'attention':<14}hf id")
    for r in rows:
        print(f"{r['name']:<22}{r['total_params'] / 1e9:>8.1f}B{r['active_params'] / 1e9:>8.1f}B"
              f"{r['layers']:>8}{r['experts']:>9}{r['top_k']:>7}  {r['attention']:<14}"
              f"{r['hf_id'] or ''}")
    return 0


def _calibration_label(provenance: dict) -> str:
    cal = provenance.get("calibration")
    if not cal:
        return "no"
    src = cal.get("transferred_from")
    return f"from {src} (est.)" if src else "fitted"


def _cmd_hardware(args: argparse.Namespace) -> int:
    from .spec.hardware import available_profiles, load_profile

    rows = []
    for pid in available_profiles():
        hw = load_profile(pid)
        pk = hw.compute.peak_dense_tflops
        rows.append({"id": pid, "name": hw.display_name,
                     "bf16_tflops": pk.bf16.value if pk.bf16 else None,
                     "fp8_tflops": pk.fp8.value if pk.fp8 else None,
                     "hbm_gb": hw.memory.hbm_capacity_bytes.value / 1e9,
                     "hbm_gb_per_s": hw.memory.hbm_peak_gb_per_s.value,
                     "nvlink_gb_per_s_per_direction":
                         hw.interconnect.nvlink_gb_per_s_per_direction.value,
                     "calibrated": _calibration_label(hw.provenance)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':<12}{'bf16 TF':>9}{'fp8 TF':>9}{'HBM GB':>8}{'HBM GB/s':>10}{'NVLink':>8}"
          f"  {'calibrated':<22}name")
    for r in rows:
        fp8 = f"{r['fp8_tflops']:.0f}" if r["fp8_tflops"] else "-"
        print(f"{r['id']:<12}{r['bf16_tflops']:>9.0f}{fp8:>9}{r['hbm_gb']:>8.0f}"
              f"{r['hbm_gb_per_s']:>10.0f}{r['nvlink_gb_per_s_per_direction']:>8.0f}"
              f"  {r['calibrated']:<22}{r['name']}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for any bad input
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m moesim", description="MoE inference cost model and simulator")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    pr = sub.add_parser("predict", help="predict TTFT, TPOT, throughput and memory of a scenario")
    pr.add_argument("scenario", help="scenario file (.json or .yaml), see examples/")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=_cmd_predict)
    pv = sub.add_parser("validate", help="predict every row of a measured table and report errors")
    pv.add_argument("table", help="CSV in one of the reference layouts (gemm, moe, collective, "
                    "allreduce_custom, attention_context, attention_generation, moe_a2a, "
                    "e2e_serving)")
    pv.add_argument("--hardware", help="profile id or path (default: each row's `system`)")
    pv.add_argument("--out", help="write every row with its prediction and error to this CSV")
    pv.add_argument("--json", action="store_true", help="summary as JSON")
    pv.add_argument("--time-unit", choices=("us", "ns", "ms"), default=None,
                    help="unit the table's latency_us column actually holds (default us, as "
                         "named); the report and --out CSV state the unit used. A moe_a2a "
                         "table whose values are implausible in the unit used is refused")
    pv.set_defaults(func=_cmd_validate)
    pm = sub.add_parser("models", help="list model presets with total / active parameters")
    pm.add_argument("--json", action="store_true")
    pm.set_defaults(func=_cmd_models)
    ph = sub.add_parser("hardware", help="list hardware profiles")
    ph.add_argument("--json", action="store_true")
    ph.set_defaults(func=_cmd_hardware)
    from .des.cli import add_cli as add_simulate_cli
    from .study import add_cli as add_study_cli
    from .sweep_cli import add_cli as add_sweep_cli

    add_simulate_cli(sub)
    add_sweep_cli(sub)
    add_study_cli(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return USAGE_EXIT
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return USAGE_EXIT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
