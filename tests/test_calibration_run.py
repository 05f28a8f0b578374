"""The calibration microbenchmark runner on CPU: ``python -m calibration run --device cpu --quick``
writes CSVs in exactly the reference layouts, plausible latencies, and a device.json that says what
was skipped; ``--device cuda`` without a GPU is a one-line error with exit code 2.

Needs torch (CPU wheel: ``pip install torch==2.13.0``); skipped without it."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibration.layouts import LAYOUTS, REFERENCE_LAYOUTS, reference_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT.parent / "shared" / "reference" / "measurements" / "h100_sxm"
LATENCY_LAYOUTS = {"launch", "stream", "gemm", "router", "elementwise", "moe"}


def _calibration(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibration_cpu_quick")
    proc = _calibration("run", "--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_csv_has_exactly_its_reference_header(quick_run):
    written = {p.stem: p for p in quick_run.glob("*.csv")}
    assert LATENCY_LAYOUTS <= set(written), sorted(written)
    for layout, path in written.items():
        assert layout in LAYOUTS, f"unexpected file {path.name}"
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f)))
        assert header == LAYOUTS[layout], layout
        ref = reference_header(layout, REF_DIR)  # None where ../shared is absent
        if ref is not None:
            assert header == ref, f"{layout}.csv differs from the reference layout"


def test_embedded_reference_headers_match_the_reference_files():
    if not REF_DIR.is_dir():
        pytest.skip("../shared/reference not present")
    for layout in REFERENCE_LAYOUTS:
        assert reference_header(layout, REF_DIR) == LAYOUTS[layout], layout


def test_latencies_are_positive_and_finite(quick_run):
    for layout in sorted(LATENCY_LAYOUTS):
        rows = _rows(quick_run / f"{layout}.csv")
        assert rows, layout
        for r in rows:
            lat = float(r["latency_us"])
            assert math.isfinite(lat) and lat > 0, (layout, r)
            assert r["system"] == "cpu" and r["gpu"]
            assert r["framework"] == "torch" and r["framework_version"] == torch.__version__
    samples = quick_run / "samples" / "moe.jsonl"
    assert samples.is_file()
    first = json.loads(samples.read_text().splitlines()[0])
    assert first["samples_us"] and all(s > 0 for s in first["samples_us"])


def test_moe_rows_cover_both_distributions_and_torch_paths(quick_run):
    rows = _rows(quick_run / "moe.csv")
    assert {r["distribution"] for r in rows} >= {"balanced", "power_law_1.2"}
    assert {r["kernel"] for r in rows} == {"torch_loop", "torch_bmm_padded", "torch_grouped_mm"}
    assert all(r["moe_tp"] == "1" for r in rows)
    assert {r["moe_ep"] for r in rows} >= {"1"}
    assert {r["dtype"] for r in rows} <= {"bfloat16", "float32"}
    for dist in ("balanced", "power_law_1.2"):
        assert {r["kernel"] for r in rows if r["distribution"] == dist} == {
            "torch_loop", "torch_bmm_padded", "torch_grouped_mm"}


def test_device_json_records_device_and_skips(quick_run):
    info = json.loads((quick_run / "device.json").read_text())
    assert info["device"] == "cpu" and info["system"] == "cpu"
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["python"]
    assert info["date"] and info["host"] and info["cpu"]["logical_cores"] >= 1
    assert info["dtype"] in ("bfloat16", "float32") and info["cpu_dtype_probe"]["chosen"]
    reason = info["skipped"]["triton_fused_moe"]
    assert "GPU" in reason or "CUDA" in reason
    assert "collective" in info["skipped"]
    assert not (quick_run / "collective.csv").exists()
    assert set(info["benchmarks"]) >= LATENCY_LAYOUTS
    assert info["errors"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_is_a_one_line_error(tmp_path):
    proc = _calibration("run", "--device", "cuda", "--out", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "cuda" in lines[0].lower()
    assert "Traceback" not in proc.stderr


def test_unknown_benchmark_is_a_one_line_error(tmp_path):
    proc = _calibration("run", "--device", "cpu", "--only", "gemm,nope", "--out",
                        str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_registry_has_run():
    from calibration.cli import SUBCOMMANDS, build_parser
    assert "run" in SUBCOMMANDS
    args = build_parser().parse_args(["run", "--device", "cpu", "--out", "d", "--quick"])
    assert args.device == "cpu" and args.quick and args.system is None


# --- building blocks (in-process, fast) ------------------------------------------------------
@pytest.mark.parametrize("dist", ["balanced", "power_law_1.2", "power_law_1.01"])
@pytest.mark.parametrize("t,e,k,ep", [(1, 128, 8, 1), (7, 8, 2, 1), (256, 128, 8, 8),
                                       (4096, 8, 2, 1), (3, 64, 6, 4)])
def test_routing_matches_counts_with_distinct_experts(dist, t, e, k, ep):
    from calibration.routing import make_routing
    ids, w, counts = make_routing(t, e, k, dist, moe_ep=ep, seed=5)
    assert ids.shape == (t, k) and w.shape == (t, k)
    assert all(len(set(row)) == k for row in ids.tolist())
    assert np.array_equal(np.bincount(ids.ravel(), minlength=e), counts)
    assert counts.sum() == t * k and counts.max() <= t
    groups = counts.reshape(ep, -1).sum(axis=1)
    assert groups[0] == groups.max()  # the measured (local) group is the busiest
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    if dist == "balanced":
        assert counts.max() - counts.min() <= 1


def test_power_law_is_skewed():
    from calibration.routing import expert_counts
    c = expert_counts(4096, 64, 8, "power_law_1.2", rng=np.random.default_rng(0))
    assert c.max() > 3 * c.mean()


@pytest.mark.parametrize("ep", [1, 2])
def test_torch_expert_paths_agree_with_the_reference(ep):
    from calibration.moe_layer import IMPLS, moe_experts, moe_reference
    from calibration.routing import make_routing
    t, h, inter, e, k = 11, 32, 24, 8, 3
    ids, w, _ = make_routing(t, e, k, "power_law_1.2", moe_ep=ep, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g)
    w1 = torch.randn(e // ep, 2 * inter, h, generator=g) * 0.1
    w2 = torch.randn(e // ep, h, inter, generator=g) * 0.1
    ids, w = torch.from_numpy(ids), torch.from_numpy(w)
    ref = moe_reference(x, ids, w, w1, w2)
    for impl in IMPLS:
        kw = {"all_local": ep == 1} if impl == "torch_grouped_mm" else {}
        out = moe_experts(x, ids, w, w1, w2, impl, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=impl)


def test_time_moe_layer_on_an_uncalibrated_shape():
    from calibration.moe_layer import time_moe_layer
    for impl in ("torch_loop", "torch_grouped_mm"):
        us = time_moe_layer(3, 96, 64, 4, 2, impl=impl, budget_s=0.01)
        assert math.isfinite(us) and us > 0


_TRITON_CHECK = """
import os, torch
from calibration.moe_layer import moe_reference
from calibration.routing import make_routing
from calibration.triton_moe import fused_moe
for t, h, inter, e, k, ep in [(9, 32, 24, 8, 2, 1), (5, 32, 16, 8, 3, 2)]:
    ids, w, _ = make_routing(t, e, k, "power_law_1.2", moe_ep=ep, seed=2)
    x = torch.randn(t, h); w1 = torch.randn(e // ep, 2 * inter, h) * 0.1
    w2 = torch.randn(e // ep, h, inter) * 0.1
    ids, w = torch.from_numpy(ids), torch.from_numpy(w)
    out = fused_moe(x, ids, w, w1, w2, all_local=ep == 1)
    torch.testing.assert_close(out, moe_reference(x, ids, w, w1, w2), rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.skipif(tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4),
                    reason="Triton 3.6's interpreter needs numpy < 2.4 (triton issue #9171)")
def test_triton_fused_moe_in_the_interpreter():
    """fp32 only: the interpreter's bf16 tl.dot is wrong (triton issue #11584)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
