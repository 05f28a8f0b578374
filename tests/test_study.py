"""Studies: a small one end to end (CSV, HTML, PNG), the shipped study files, the comparisons and
their verdicts, the fallbacks without vl-convert / altair, and the CLI's errors."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml

from moesim import study as st
from moesim.cli import main
from moesim.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
HAVE_VL = importlib.util.find_spec("vl_convert") is not None
HAVE_ALTAIR = importlib.util.find_spec("altair") is not None

# OLMoE on one H100, BF16 vs FP8 at a memory-bound decode batch: 4 points.
TINY = {
    "name": "tiny-fp8",
    "base": {"model": "olmoe-1b-7b", "hardware": {"profile": "h100_sxm", "num_gpus": 1},
             "deployment": {"tp": 1, "framework": "vllm"},
             "workload": {"batch_size": 16, "input_len": 512, "output_len": 128},
             "routing": {"distribution": "balanced"}},
    "axes": {
        "dtype": [
            {"label": {"precision": "bf16"}, "deployment.weight_dtype": "bf16"},
            {"label": {"precision": "fp8"}, "deployment.weight_dtype": "fp8",
             "deployment.activation_dtype": "fp8"}],
        "workload.batch_size": [1, 16],
    },
    "study": {
        "title": "tiny fp8",
        "plot": {"x": "workload.batch_size", "color": "precision", "x_scale": "log"},
        "compare": [{"label": "fp8 vs bf16", "a": {"precision": "fp8"},
                     "b": {"precision": "bf16"}, "at": {"workload.batch_size": 16},
                     "paper": {"text": "+20-30 %", "low": 20, "high": 30}}],
    },
}


def _write(tmp_path: Path, doc: dict, name: str = "tiny-fp8") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not HAVE_ALTAIR, reason="altair is not installed")
def test_small_study_end_to_end(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert main(["study", str(path), "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 10
    text = capsys.readouterr().out
    assert (out / "tiny-fp8.csv").is_file() and (out / "tiny-fp8.html").is_file()
    assert (out / "tiny-fp8.png").is_file() == HAVE_VL
    if HAVE_VL:
        assert (out / "tiny-fp8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vega" in (out / "tiny-fp8.html").read_text().lower()
    rows = _rows(out / "tiny-fp8.csv")
    assert len(rows) == 4 and all(r["feasible"] == "True" for r in rows)
    # The label column sits next to the linked axis's index column.
    cols = list(rows[0])
    assert cols[cols.index("dtype") + 1] == "precision"
    thr = {(r["precision"], int(r["workload.batch_size"])): float(r["throughput_output_tok_per_s"])
           for r in rows}
    # Decode at batch 16 reads every expert's weights each step: half the bytes is faster.
    assert thr[("fp8", 16)] > thr[("bf16", 16)] * 1.05
    assert thr[("bf16", 16)] > thr[("bf16", 1)]
    # The summary line quotes the same figure.
    pct = (thr[("fp8", 16)] / thr[("bf16", 16)] - 1) * 100
    assert f"fp8 vs bf16 at batch size 16: {pct:+.0f} %" in text
    assert "paper: +20-30 %" in text


def test_run_study_findings_and_label_columns(tmp_path):
    s = st.load_study(_write(tmp_path, TINY))
    assert s.label_columns == ["precision"]
    res = st.run_study(s, tmp_path, png=False)
    (f,) = res.findings
    assert len(f.values) == 1 and f.values[0][1] is not None and f.values[0][1] > 0
    assert not (tmp_path / "tiny-fp8.png").exists()


def test_png_fallback_without_vl_convert(tmp_path, monkeypatch):
    pytest.importorskip("altair")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vl_convert" else real(name, *a))
    res = st.run_study(st.load_study(_write(tmp_path, TINY)), tmp_path)
    assert (tmp_path / "tiny-fp8.html").is_file() and not (tmp_path / "tiny-fp8.png").exists()
    assert any("vl-convert" in n and "HTML only" in n for n in res.notes)


def test_csv_only_without_altair(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "altair", None)  # import altair -> ImportError
    res = st.run_study(st.load_study(_write(tmp_path, TINY)), tmp_path)
    assert (tmp_path / "tiny-fp8.csv").is_file() and not (tmp_path / "tiny-fp8.html").exists()
    assert any("altair" in n for n in res.notes)


def test_shipped_studies_load_and_stay_small():
    files = st.study_files()
    names = {p.stem for p in files}
    assert {"batch-size", "input-length", "ffn-size", "num-experts", "top-k", "fp8", "fused-moe",
            "speculative", "pruning", "tp-vs-ep"} <= names
    for p in files:
        s = st.load_study(p)
        assert s.compare, p
        # `moesim study NAME` must take seconds: small grids (stochastic routing is ~0.1-1 s a
        # point, so those studies stay smaller still).
        assert len(s.sweep) <= 300, p
        assert s.sweep.base["hardware"]["profile"] == "h100_sxm"


def test_list_and_unknown_name(capsys):
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    assert "fp8" in out and "tp-vs-ep" in out
    assert main(["study", "no-such-study"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: study: unknown study 'no-such-study'") and "fp8" in err
    assert main(["study"]) == 2


def test_bad_study_files(tmp_path):
    bad = dict(TINY, study={**TINY["study"], "plot": {"x": "workload.nope"}})
    with pytest.raises(InputError, match="study.plot.x"):
        st.load_study(_write(tmp_path, bad))
    bad = dict(TINY, study={**TINY["study"], "colour": "x"})
    with pytest.raises(InputError, match="study.colour"):
        st.load_study(_write(tmp_path, bad))
    # A comparison whose sides select several points (batch size not pinned) is ambiguous.
    comp = {**TINY["study"]["compare"][0], "at": {}}
    amb = dict(TINY, study={**TINY["study"], "compare": [comp]})
    s = st.load_study(_write(tmp_path, amb))
    with pytest.raises(InputError, match="selects 2 points"):
        st.run_study(s, tmp_path, png=False)


@pytest.mark.parametrize("values, verdict", [
    ([25.0, 28.0], "agrees"),
    ([25.0, 45.0], "direction agrees, magnitude differs (1/2 within +20-30 %)"),
    ([-10.0, -3.0], "disagrees"),
    ([0.2, -0.4], "disagrees (no change in moesim)"),
    ([25.0, -5.0], "mixed (1/2 in its direction)"),
])
def test_verdicts(values, verdict):
    claim = st.PaperClaim("+20-30 %", 20, 30)
    c = st.Comparison("x", {"a": 1}, {"a": 0}, paper=claim)
    assert st.Finding(c, [(str(i), v) for i, v in enumerate(values)]).verdict == verdict
    down = st.Comparison("x", {"a": 1}, {"a": 0}, paper=st.PaperClaim("falls", direction="down"))
    assert st.Finding(down, [("", -12.0)]).verdict == "direction agrees"


def _has_speculative() -> bool:
    from moesim.spec.workload import Workload

    return "speculative" in Workload.model_fields


@pytest.mark.skipif(not _has_speculative(), reason="workload.speculative not in this tree")
def test_speculative_study_points_equal_predict():
    """The speculative study varies only the workload, so the sweep's fast path evaluates its
    points; each must equal predict (a drafted point must not be priced as plain decoding)."""
    from moesim.analytic import predict
    from moesim.spec.scenario import parse_scenario
    from moesim.sweep import run_sweep, set_path

    s = st.load_study(st.find_study("speculative"))
    res = st.with_labels(s, run_sweep(s.sweep, progress=False))
    rows = res.dicts()
    picked = [r for r in rows if r["workload.batch_size"] in (1, 64)
              and r["acceptance"] == 0.7 and r["draft_tokens"] in (0, 1, 4)]
    assert len(picked) == 2 * 2 * 3
    for r in picked:
        doc = copy.deepcopy(s.sweep.base)
        for path in s.sweep.input_columns():
            if path in ("setup", "spec"):  # linked axes' index columns
                continue
            v = r[path]
            set_path(doc, path, json.loads(v) if isinstance(v, str) and v.startswith("{") else v)
        ref = predict(parse_scenario(doc, base_dir=s.sweep.base_dir))
        assert r["throughput_output_tok_per_s"] == pytest.approx(
            ref.throughput_output_tok_per_s, rel=1e-9), (r["model"], r["draft_tokens"])
    by = {(r["model"], r["workload.batch_size"], r["draft_tokens"]):
          r["throughput_output_tok_per_s"] for r in picked}
    # At batch 64 decode is memory-bound: verifying 4 drafted tokens (acceptance 0.7) beats
    # plain decoding.
    assert by[("deepseek-v2-lite", 64, 4)] > by[("deepseek-v2-lite", 64, 0)] * 1.2


def test_summary_line_names_the_source():
    c = st.Comparison("fp8 vs bf16", {"p": "fp8"}, {"p": "bf16"}, at={"workload.batch_size": 64},
                      per=("model",), paper=st.PaperClaim("falls", direction="down",
                                                          source="expected"))
    line = st.Finding(c, [("m1", -12.4), ("m2", 150.0), ("m3", None)]).line()
    assert line.startswith("fp8 vs bf16 at batch size 64: m1 -12 %, m2 2.50x, m3 n/a")
    assert line.endswith("expected: falls -> mixed (1/2 in its direction)")
