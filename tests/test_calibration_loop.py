"""The CPU end-to-end calibration loop (issue 4): calibrate on this CPU with ``--quick``, derive
and fit a CPU profile, then predict torch MoE layers of two shapes the calibration never timed
and compare with their measured times: median absolute percentage error <= 20 %.

One ``python -m calibration loop --device cpu --quick`` in a subprocess (about 20 s on a shared
2-core machine), then checks on what it left behind. Needs torch (CPU wheel); skipped without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _calibration(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cpu_loop")
    proc = _calibration("loop", "--device", "cpu", "--quick", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout)


def test_unseen_moe_layers_are_predicted_within_20_percent(loop):
    out, rep = loop
    seen = {(s["hidden"], s["inter"], s["num_experts"], s["topk"])
            for s in rep["calibration_shapes"]}
    shapes = {(r["shape"]["hidden"], r["shape"]["inter"], r["shape"]["num_experts"],
               r["shape"]["topk"]) for r in rep["layers"]}
    assert len(shapes) == 2 and not shapes & seen, (shapes, seen)
    for r in rep["layers"]:
        # big enough that scheduler noise is small next to one call; several calls per median
        assert r["measured_us"] >= 2000 and r["samples"] >= 5, r
        assert r["predicted_us"] > 0
    table = "\n".join(f"{r['shape']} T={r['num_tokens']}: measured {r['measured_us']:.0f} us, "
                      f"predicted {r['predicted_us']:.0f} us ({r['ape_pct']:.1f} %)"
                      for r in rep["layers"])
    assert rep["median_ape_pct"] <= 20.0, f"median APE {rep['median_ape_pct']} %\n{table}"
    assert len(rep["per_shape_ape_pct"]) == 2
    assert (out / "loop.json").is_file()


def test_cpu_profile_numbers_come_from_the_run_and_the_fit(loop):
    out, rep = loop
    from moesim.spec.hardware import load_profile

    base = yaml.safe_load(Path(rep["profile"]).read_text())
    peak = next(iter(base["compute"]["peak_dense_tflops"].values()))
    assert peak["kind"] == "calibrated" and "gemm.csv" in peak["source"]
    assert "stream.csv" in base["memory"]["hbm_peak_gb_per_s"]["source"]
    assert "launch.csv" in base["overheads"]["kernel_launch_host_us"]["source"]
    assert "gemm.csv" in base["compute"]["gemm_tile_m"]["source"]
    overlay = yaml.safe_load(Path(rep["overlay"]).read_text())
    for fam in ("moe_bf16", "moe_aux", "gemm_bf16"):
        fields = overlay["kernels"][fam]
        assert fields and all(q["kind"] == "calibrated" for q in fields.values()), fam
    hw = load_profile(rep["profile"])  # base + overlay validate as one HardwareProfile
    assert hw.kernels.moe_bf16.memory_efficiency.kind == "calibrated"
    assert not str(Path(rep["profile"]).resolve()).startswith(str(ROOT / "hardware_profiles"))


def test_the_documented_commands_reproduce_the_loops_profile(loop, tmp_path, capsys):
    # in-process (calibration.cli.main is what `python -m calibration` runs): no second start-up
    from calibration.cli import main

    out, rep = loop
    prof = tmp_path / "cpu.yaml"
    assert main(["cpu-profile", "--from", rep["run_dir"], "--out", str(prof)]) == 0
    assert main(["fit", "--from", str(out / "fit_tables"), "--base", str(prof), "--out",
                 str(tmp_path / "cpu.calibrated.yaml"), "--multistart"]) == 0

    def values(path: Path) -> dict:
        data = yaml.safe_load(path.read_text())
        return {(f, n): q["value"] for f, fs in data["kernels"].items() for n, q in fs.items()}

    assert values(tmp_path / "cpu.calibrated.yaml") == values(Path(rep["overlay"]))


def test_a_calibrated_shape_is_refused_as_unseen(loop, capsys):
    from calibration.cli import main

    out, rep = loop
    s = rep["calibration_shapes"][0]
    rc = main(["loop", "--from-run", rep["run_dir"], "--out", str(out / "again"),
               "--shape", f"{s['hidden']},{s['inter']},{s['num_experts']},{s['topk']}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and "timed by the calibration run" in err
    assert len(err.strip().splitlines()) == 1
