"""A hardware profile for the CPU a calibration run measured, derived from that run's own tables.

moesim's cost model prices every op on a :class:`moesim.spec.hardware.HardwareProfile` whose
numbers each carry a source. There is no datasheet for "this CI machine", so the CPU profile is
built from what ``python -m calibration run --device cpu`` measured, with every number naming the
file (and its sha256) and the rows it came from:

- peak compute rate (``peak_dense_tflops.<dtype>``): the fastest timed call of any ``gemm.csv``
  row (``samples/gemm.jsonl``), 2mnk / time;
- memory bandwidth (``hbm_peak_gb_per_s``): the fastest timed call of any ``stream.csv`` row,
  traffic / time (``copy_`` moves the buffer twice);
- per-op dispatch cost (``kernel_launch_host_us``, and the start value of every kernel family's
  ``t0_us``): the least-squares slope of ``launch.csv`` (``num_kernels`` back-to-back ``add_``);
- "SM" count: the torch intra-op threads of the run (``device.json``): one GEMM tile per thread;
- GEMM tile rows / columns: picked from {16, 32, 64, 128} by the best least-squares fit of the
  ``gemm_bf16`` family to ``gemm.csv`` (each candidate fitted with
  :func:`calibration.fit.fit_families`);
- memory capacity and L2 size: ``device.json`` (``/proc/meminfo``, sysfs cache sizes).

Kernel families start at efficiency 1 (= the measured peaks) and the measured dispatch cost;
``python -m calibration fit --base <this profile>`` then fits those the tables exercise, and the
others stay marked as start values. Interconnect and collectives do not exist on one CPU: they are
zero / stand-ins, marked so (nothing on a one-device scenario prices them).

The profile is written next to the run (``DIR/profile/cpu.yaml``), never into
``hardware_profiles/`` (a CPU is not a GPU product anyone deploys on). numpy / yaml only, no torch.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

# torch dtype labels of the calibration tables -> the profile's per-dtype peak field
DTYPE_FIELD = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TILE_CANDIDATES = (16, 32, 64, 128)
PROFILE_ID = "cpu"

KERNEL_FAMILIES = ("gemm_bf16", "moe_bf16", "moe_aux", "attention_prefill", "attention_decode",
                   "attention_mla_decode", "elementwise")


class ProfileError(ValueError):
    """The run folder lacks what the profile needs (message names the file)."""


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ProfileError(f"{path} is missing: run `python -m calibration run --device cpu` "
                           "with the launch, stream and gemm benchmarks")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ProfileError(f"{path} has no rows")
    return rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _q(value: float, kind: str, source: str) -> dict[str, Any]:
    return {"value": float(value), "kind": kind, "source": source}


def _fastest_calls(run_dir: Path, layout: str, rows: list[dict[str, str]],
                   keys: tuple[str, ...]) -> list[float]:
    """Per row of ``<layout>.csv``, its fastest timed call in µs (``samples/<layout>.jsonl``),
    or the row's median where the run kept no samples."""
    fastest: dict[tuple, float] = {}
    path = run_dir / "samples" / f"{layout}.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("samples_us"):
                fastest[tuple(str(rec[k]) for k in keys)] = min(rec["samples_us"])
    return [fastest.get(tuple(r[k] for k in keys), float(r["latency_us"])) for r in rows]


def peak_gemm_rate(run_dir: Path) -> tuple[str, float, str]:
    """(dtype label, peak GEMM rate in TFLOP/s, source): the fastest single call of any
    ``gemm.csv`` row, 2mnk / time. A peak bounds every op (fitted efficiencies are <= 1) and
    interference from other processes only ever slows a call down, so the fastest call, not a
    row's median, is the estimate of what this CPU can do."""
    path = run_dir / "gemm.csv"
    rows = _rows(path)
    times = _fastest_calls(run_dir, "gemm", rows, ("kernel", "dtype", "m", "n", "k"))

    def flops(r: dict[str, str]) -> float:
        return 2.0 * int(r["m"]) * int(r["n"]) * int(r["k"])

    i = max(range(len(rows)), key=lambda j: flops(rows[j]) / times[j])
    best, t = rows[i], times[i]
    tflops = flops(best) / t / 1e6
    src = (f"measured: fastest call of {path} (sha256 {_sha(path)}, samples/gemm.jsonl): "
           f"{best['kernel']} {best['dtype']} m={best['m']} n={best['n']} k={best['k']} in "
           f"{t:.1f} us (row median {float(best['latency_us']):.1f}) -> 2mnk/t = "
           f"{tflops * 1e3:.1f} GFLOP/s")
    return best["dtype"], tflops, src


def stream_bandwidth(run_dir: Path) -> tuple[float, str]:
    """(GB/s, source): the fastest single call of any ``stream.csv`` row, traffic / time
    (``copy_`` moves its buffer twice). As for the GEMM peak, the fastest call; and no buffer
    size is left out: the fitted memory efficiencies say how far below it each family streams."""
    path = run_dir / "stream.csv"
    rows = _rows(path)
    times = _fastest_calls(run_dir, "stream", rows, ("kernel", "bytes"))
    traffic = {"torch.Tensor.copy_": 2, "torch.Tensor.zero_": 1, "torch.sum": 1}

    def moved(r: dict[str, str]) -> float:
        return traffic.get(r["kernel"], 1) * int(r["bytes"])

    i = max(range(len(rows)), key=lambda j: moved(rows[j]) / times[j])
    best, t = rows[i], times[i]
    rate = moved(best) / t / 1e3
    src = (f"measured: fastest call of {path} (sha256 {_sha(path)}, samples/stream.jsonl): "
           f"{best['kernel']} on {best['bytes']} B in {t:.2f} us (row median "
           f"{float(best['latency_us']):.2f}) -> {rate:.1f} GB/s (traffic = "
           f"{traffic.get(best['kernel'], 1)} x bytes)")
    return rate, src


def dispatch_cost(run_dir: Path) -> tuple[float, str]:
    """(µs per op, source): least-squares slope of eager ``launch.csv`` time over num_kernels."""
    path = run_dir / "launch.csv"
    rows = [r for r in _rows(path) if r["mode"] == "eager"]
    n = np.array([float(r["num_kernels"]) for r in rows])
    t = np.array([float(r["latency_us"]) for r in rows])
    if len(set(n)) < 2:
        raise ProfileError(f"{path}: needs eager rows with two or more num_kernels")
    slope, icpt = np.polyfit(n, t, 1)
    slope = round(float(max(slope, 1e-3)), 4)
    src = (f"measured: least-squares slope of {path} (sha256 {_sha(path)}) eager rows "
           f"({len(rows)} rows, num_kernels {int(n.min())}-{int(n.max())}): "
           f"{slope:.2f} us per op {icpt:+.1f} us")
    return slope, src


def _device(run_dir: Path) -> dict:
    path = run_dir / "device.json"
    if not path.is_file():
        raise ProfileError(f"{path} is missing (not a calibration run folder?)")
    return json.loads(path.read_text())


def _profile_dict(dev: dict, dtype_label: str, peak_tflops: float, peak_src: str,
                  bw: float, bw_src: str, t0: float, t0_src: str, tile_m: int, tile_n: int,
                  tile_src: str, run_dir: Path) -> dict:
    cpu = dev.get("cpu") or {}
    threads = int(cpu.get("torch_num_threads") or cpu.get("logical_cores") or 1)
    mem = cpu.get("total_memory_bytes")
    caches = cpu.get("cache_bytes") or {}
    field = DTYPE_FIELD.get(dtype_label)
    if field is None:
        raise ProfileError(f"gemm.csv dtype {dtype_label!r} has no profile field "
                           f"({', '.join(DTYPE_FIELD)})")
    none = "one CPU, no accelerator interconnect: not applicable (0)"
    start = ("start value, derived from the run: {what}; replaced by `python -m calibration fit` "
             "where a table exercises this family")
    t0_q = _q(t0, "derived", start.format(what=f"per-op dispatch cost ({t0_src})"))
    eff_q = _q(1.0, "derived", start.format(what="efficiency 1 = the measured peak rates above"))
    kernels = {fam: {"t0_us": t0_q, "compute_efficiency": eff_q, "memory_efficiency": eff_q}
               for fam in KERNEL_FAMILIES}
    coll_src = ("one CPU runs no collectives: stand-in (per-op dispatch cost, full link use) "
                "that no one-device scenario prices")
    coll = {"latency_us": _q(t0, "derived", coll_src),
            "bus_efficiency": _q(1.0, "derived", coll_src)}
    return {
        "schema_version": 1,
        "id": PROFILE_ID,
        "display_name": f"CPU {cpu.get('name', '?')} ({threads} thread"
                        f"{'' if threads == 1 else 's'}), measured "
                        f"{str(dev.get('date', '?'))[:10]}",
        "device_names": [],
        "compute": {
            "sm_count": _q(threads, "derived",
                           f"{run_dir / 'device.json'} cpu.torch_num_threads = {threads}: the "
                           "GEMM's threads each work on one output tile at a time"),
            "peak_dense_tflops": {field: _q(round(peak_tflops, 6), "calibrated", peak_src)},
            "gemm_tile_m": _q(tile_m, "calibrated", tile_src),
            "gemm_tile_n": _q(tile_n, "calibrated", tile_src),
        },
        "memory": {
            "hbm_capacity_bytes": _q(mem or 0, "derived",
                                     f"{run_dir / 'device.json'} cpu.total_memory_bytes "
                                     "(/proc/meminfo MemTotal)" if mem else
                                     "not recorded by the run (0)"),
            "hbm_peak_gb_per_s": _q(round(bw, 4), "calibrated", bw_src),
            "l2_bytes": _q(caches.get("L2", 0), "derived",
                           f"{run_dir / 'device.json'} cpu.cache_bytes.L2 (sysfs, all "
                           "instances)" if caches.get("L2") else "not recorded by the run (0)"),
        },
        "interconnect": {
            "nvlink_gb_per_s_per_direction": _q(0, "derived", none),
            "nvlink_domain_size": _q(1, "derived", "one CPU: a domain of one device"),
            "scaleout_gb_per_s_per_direction": _q(0, "derived", none),
            "scaleout_latency_us": _q(0, "derived", none),
            "pcie_gb_per_s_per_direction": _q(0, "derived", none),
        },
        "collectives": {name: coll for name in ("all_reduce", "all_reduce_custom", "all_to_all",
                                                "all_gather")},
        "kernels": kernels,
        "overheads": {
            "kernel_launch_host_us": _q(t0, "calibrated", t0_src),
            "graph_kernel_us": _q(t0, "derived", "no CUDA graphs on a CPU: a replayed op costs "
                                  f"its eager dispatch ({t0_src})"),
            "runtime_reserved_bytes": _q(0, "derived", "a CPU run reserves no device context or "
                                         "library workspace (0)"),
        },
        "provenance": {
            "tool": "python -m calibration (calibration/cpu_profile.py)",
            "run": str(run_dir),
            "device": {"cpu": cpu, "date": dev.get("date"), "host": dev.get("host"),
                       "platform": dev.get("platform"), "versions": dev.get("versions"),
                       "command": dev.get("command"), "quick": dev.get("quick")},
        },
    }


def fit_gemm_tiles(run_dir: Path, data: dict) -> tuple[int, int, str]:
    """Pick ``(tile_m, tile_n)`` from :data:`TILE_CANDIDATES` by fitting ``gemm_bf16`` to
    ``gemm.csv`` under each candidate (the fit the ``fit`` command runs) and keeping the lowest
    median APE (then p90); returns the pair and its source line."""
    from moesim.costs.gemm import linear
    from moesim.spec.hardware import HardwareProfile

    from .fit import Ops, fit_families, profile_params

    path = run_dir / "gemm.csv"
    rows = _rows(path)
    field = next(iter(data["compute"]["peak_dense_tflops"]))
    measured = [float(r["latency_us"]) for r in rows]
    scores = []
    for tm in TILE_CANDIDATES:
        for tn in TILE_CANDIDATES:
            cand = {"gemm_tile_m": _q(tm, "estimate", "tile candidate"),
                    "gemm_tile_n": _q(tn, "estimate", "tile candidate")}
            d = {**data, "compute": {**data["compute"], **cand}}
            hw = HardwareProfile.model_validate(d)
            ops = Ops.from_lists([linear("gemm", int(r["m"]), int(r["n"]), int(r["k"]), hw,
                                         field, field) for r in rows], measured)
            _, st = fit_families(ops, profile_params(hw), ("gemm_bf16",))
            scores.append((st["median_ape_pct"], st["p90_ape_pct"], tm, tn))
    med, p90, tm, tn = min(scores)
    src = (f"fitted: of tile sizes {{{', '.join(map(str, TILE_CANDIDATES))}}}^2 the pair whose "
           f"gemm_bf16 least-squares fit to {path} (sha256 {_sha(path)}, {len(rows)} rows) has "
           f"the lowest median APE: {tm}x{tn}, {med}% (p90 {p90}%)")
    return tm, tn, src


def build_cpu_profile(run_dir: Path) -> dict:
    """The CPU profile (a mapping in the ``hardware_profiles/*.yaml`` schema) of a CPU run."""
    run_dir = Path(run_dir)
    dev = _device(run_dir)
    if dev.get("device") != "cpu":
        raise ProfileError(f"{run_dir} is a {dev.get('device')!r} run; the CPU profile needs a "
                           "--device cpu run")
    dtype_label, peak, peak_src = peak_gemm_rate(run_dir)
    bw, bw_src = stream_bandwidth(run_dir)
    t0, t0_src = dispatch_cost(run_dir)
    # tiles are fitted on a profile that is complete except for them (they only move the ideal
    # compute times of the candidates' ops)
    data = _profile_dict(dev, dtype_label, peak, peak_src, bw, bw_src, t0, t0_src, 16, 16,
                         "placeholder during the tile fit", run_dir)
    tm, tn, tile_src = fit_gemm_tiles(run_dir, data)
    return _profile_dict(dev, dtype_label, peak, peak_src, bw, bw_src, t0, t0_src, tm, tn,
                         tile_src, run_dir)


def write_cpu_profile(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Build the profile of ``run_dir`` and write it (default ``run_dir/profile/cpu.yaml``);
    validated against :class:`HardwareProfile` before writing."""
    from moesim.spec.hardware import HardwareProfile

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "profile" / f"{PROFILE_ID}.yaml"
    # a deep copy without shared sub-dicts: yaml would write those as &anchors / *aliases
    data = json.loads(json.dumps(build_cpu_profile(run_dir)))
    HardwareProfile.model_validate(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# CPU profile derived from the calibration run in {run_dir} by "
              "calibration/cpu_profile.py.\n# Every number names the table it was measured or "
              "fitted from; not a GPU profile, not for hardware_profiles/.\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100))
    return out
