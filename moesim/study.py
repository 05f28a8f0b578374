"""Studies: one sweep, one plot and one headline comparison each (``python -m moesim study``).

A study file (``examples/studies/NAME.yaml``) is a sweep file (see :mod:`moesim.sweep`) with
two additions, both removed before the sweep is parsed:

- a ``study:`` block::

      study:
        title: FP8 vs BF16 throughput on H100 (vLLM)
        plot:
          x: workload.batch_size            # any column of the result table
          y: throughput_output_tok_per_s    # default
          color: precision
          column: model                     # optional facets: column, row
          x_scale: log                      # linear (default) or log; y_scale likewise
          independent_y: true               # each facet its own y range
          titles: {precision: weights / activations}   # axis and legend titles
        compare:                            # the headline numbers, one line each
          - label: fp8 vs bf16
            a: {precision: fp8}             # rows selected by column values ...
            b: {precision: bf16}            # ... compared with these: y(a) / y(b) - 1
            at: {workload.batch_size: 64}   # held fixed
            per: [model]                    # one figure per value of these columns
            paper: {text: "+20-30 %", low: 20, high: 30}   # or {text, direction: up|down};
                                            # source: expected for a direction not the paper's

- a ``label:`` mapping inside each value of a linked axis, which becomes named columns (a
  linked axis's own column only holds the value's index)::

      dtype:
        - {label: {precision: bf16}, deployment.weight_dtype: bf16}
        - {label: {precision: fp8}, deployment.weight_dtype: fp8, deployment.activation_dtype: fp8}

A run writes ``NAME.csv`` (the sweep's rows plus the label columns), ``NAME.html`` and
``NAME.png`` (altair; PNG through vl-convert) and prints one line per comparison. Plots show the
points that are valid and fit in memory; the CSV keeps every point with its reason. altair is
imported only to plot: moesim itself does not depend on it (``pip install 'moesim[study]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .errors import InputError

if TYPE_CHECKING:  # the sweep machinery (numpy) loads on use: `python -m moesim` starts fast
    from .sweep import SweepResult, SweepSpec

#: Where ``python -m moesim study NAME`` looks for ``NAME.yaml`` (the repository's examples).
STUDIES_DIR = Path(__file__).resolve().parent.parent / "examples" / "studies"
DEFAULT_Y = "throughput_output_tok_per_s"
FLAT_PCT = 1.0  # a change below 1 % is no change: the model is nowhere near that precise
INSTALL_HINT = "pip install 'moesim[study]'"

# Friendlier axis titles than the dotted column names.
_TITLES = {
    "throughput_output_tok_per_s": "output throughput (tok/s)",
    "throughput_output_tok_per_s_per_gpu": "output throughput per GPU (tok/s)",
    "tpot_ms": "TPOT (ms)", "ttft_ms": "TTFT (ms)",
    "workload.batch_size": "batch size",
    "workload.input_len": "input length (tokens)",
    "workload.output_len": "output length (tokens)",
    "hardware.num_gpus": "GPUs",
    "model.num_experts_per_tok": "top-k (experts per token)",
    "deployment.moe_strategy": "MoE kernels",
}


# =============================================================================================
# The study file
# =============================================================================================

@dataclass(frozen=True)
class PaperClaim:
    """What a comparison is held against: a range in percent, or only a direction. ``source``
    says whose claim it is: ``paper`` (a figure MoE-Inference-Bench reports) or ``expected``
    (the direction one expects, where no figure of the paper is at hand)."""

    text: str
    low: Optional[float] = None
    high: Optional[float] = None
    direction: Optional[str] = None  # "up" / "down" when no range is given
    source: str = "paper"

    @property
    def sign(self) -> int:
        if self.low is not None and self.high is not None:
            mid = (self.low + self.high) / 2
            return (mid > 0) - (mid < 0)
        return {"up": 1, "down": -1}.get(self.direction or "", 0)


@dataclass(frozen=True)
class Comparison:
    label: str
    a: dict[str, Any]
    b: dict[str, Any]
    at: dict[str, Any] = field(default_factory=dict)
    per: tuple[str, ...] = ()
    metric: str = DEFAULT_Y
    paper: Optional[PaperClaim] = None


@dataclass(frozen=True)
class PlotSpec:
    x: str
    y: str = DEFAULT_Y
    color: Optional[str] = None
    column: Optional[str] = None
    row: Optional[str] = None
    x_scale: str = "linear"
    y_scale: str = "linear"
    independent_y: bool = False
    titles: dict[str, str] = field(default_factory=dict)  # column -> axis / legend title


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    path: Path
    sweep: SweepSpec
    plot: PlotSpec
    compare: tuple[Comparison, ...]
    labels: dict[str, list[dict[str, Any]]]  # linked axis -> one label mapping per value

    @property
    def columns(self) -> list[str]:
        """Every column of the study's table."""
        from .sweep import OUTPUT_COLUMNS

        return self.sweep.input_columns() + self.label_columns + list(OUTPUT_COLUMNS)

    @property
    def label_columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for values in self.labels.values():
            for lab in values:
                for k in lab:
                    seen.setdefault(k, None)
        return list(seen)


def _mapping(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InputError(where, f"needs a mapping; got {v!r}")
    return v


def _only(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise InputError(f"{where}.{sorted(extra)[0]}", "unknown field",
                         f"valid: {', '.join(sorted(allowed))}")


def _paper(raw: Any, where: str) -> Optional[PaperClaim]:
    if raw is None:
        return None
    raw = _mapping(raw, where)
    _only(raw, {"text", "low", "high", "direction", "source"}, where)
    low, high, direction = raw.get("low"), raw.get("high"), raw.get("direction")
    if (low is None) != (high is None):
        raise InputError(where, "give both low and high (percent), or neither")
    if low is None and direction not in ("up", "down"):
        raise InputError(where, "needs low and high (percent) or direction: up | down")
    source = raw.get("source", "paper")
    if source not in ("paper", "expected"):
        raise InputError(f"{where}.source", f"unknown source {source!r}", "use paper or expected")
    return PaperClaim(str(raw.get("text", "")), None if low is None else float(low),
                      None if high is None else float(high), direction, source)


def _comparison(raw: Any, where: str, default_metric: str) -> Comparison:
    raw = _mapping(raw, where)
    _only(raw, {"label", "a", "b", "at", "per", "metric", "paper"}, where)
    for k in ("a", "b"):
        if k not in raw:
            raise InputError(f"{where}.{k}", "required field is missing",
                             "a mapping {column: value} selecting the rows")
    per = raw.get("per", [])
    if isinstance(per, str):
        per = [per]
    return Comparison(label=str(raw.get("label", "a vs b")),
                      a=dict(_mapping(raw["a"], f"{where}.a")),
                      b=dict(_mapping(raw["b"], f"{where}.b")),
                      at=dict(_mapping(raw.get("at", {}), f"{where}.at")),
                      per=tuple(str(p) for p in per),
                      metric=str(raw.get("metric", default_metric)),
                      paper=_paper(raw.get("paper"), f"{where}.paper"))


def _plot(raw: Any) -> PlotSpec:
    raw = _mapping(raw, "study.plot")
    _only(raw, set(PlotSpec.__dataclass_fields__), "study.plot")
    if "x" not in raw:
        raise InputError("study.plot.x", "required field is missing", "a column of the table")
    for k in ("x_scale", "y_scale"):
        if raw.get(k, "linear") not in ("linear", "log"):
            raise InputError(f"study.plot.{k}", f"unknown scale {raw[k]!r}", "use linear or log")
    titles = raw.get("titles", {})
    if not isinstance(titles, dict):
        raise InputError("study.plot.titles", "needs a mapping {column: title}")
    return PlotSpec(**{**raw, "titles": {str(k): str(v) for k, v in titles.items()}})


def _split_labels(axes: Any) -> dict[str, list[dict[str, Any]]]:
    """Remove the ``label`` mappings from the linked axes' values (in place) and return them."""
    labels: dict[str, list[dict[str, Any]]] = {}
    if not isinstance(axes, dict):
        return labels
    for name, values in axes.items():
        if not isinstance(values, list) or not any(isinstance(v, dict) and "label" in v
                                                   for v in values):
            continue
        labs = []
        for i, v in enumerate(values):
            lab = v.pop("label", {}) if isinstance(v, dict) else {}
            labs.append(dict(_mapping(lab, f"axes.{name}[{i}].label")))
        labels[str(name)] = labs
    return labels


def load_study(path: Union[str, Path]) -> Study:
    """Read and check a study file; every column it plots or compares must exist."""
    from .sweep import parse_sweep, read_document

    p = Path(path)
    raw = read_document(p, field="study")
    if not isinstance(raw, dict):
        raise InputError("study", f"{p} is not a mapping", "see examples/studies/")
    raw = dict(raw)
    block = _mapping(raw.pop("study", None), "study")
    _only(block, {"title", "plot", "compare"}, "study")
    labels = _split_labels(raw.get("axes"))
    spec = parse_sweep(raw, base_dir=p.parent)
    plot = _plot(block.get("plot"))
    comps = block.get("compare", [])
    if isinstance(comps, dict):
        comps = [comps]
    if not isinstance(comps, list):
        raise InputError("study.compare", "needs a list of comparisons")
    study = Study(name=p.stem, title=str(block.get("title") or spec.name), path=p, sweep=spec,
                  plot=plot, labels=labels,
                  compare=tuple(_comparison(c, f"study.compare[{i}]", plot.y)
                                for i, c in enumerate(comps)))
    cols = set(study.columns)
    for name in labels:
        if name not in {a.name for a in spec.axes if a.linked}:
            raise InputError(f"axes.{name}", "only a linked axis's values carry labels")
    wanted = [(f"study.plot.{k}", getattr(plot, k)) for k in ("x", "y", "color", "column", "row")]
    for i, c in enumerate(study.compare):
        wanted += [(f"study.compare[{i}].metric", c.metric)]
        wanted += [(f"study.compare[{i}].{k}", col) for k in ("a", "b", "at")
                   for col in getattr(c, k)]
        wanted += [(f"study.compare[{i}].per", col) for col in c.per]
    for where, col in wanted:
        if col is not None and col not in cols:
            raise InputError(where, f"{col!r} is not a column of this study's table",
                             "use an axis path, a label or an output column")
    return study


def study_files(folder: Path = STUDIES_DIR) -> list[Path]:
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def find_study(name: str, folder: Path = STUDIES_DIR) -> Path:
    """A study's file: ``name`` is a file path or the stem of a file in ``folder``."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json") and p.is_file():
        return p
    cand = folder / f"{name}.yaml"
    if cand.is_file():
        return cand
    known = [f.stem for f in study_files(folder)]
    raise InputError("study", f"unknown study {name!r}",
                     f"valid: {', '.join(known)}, all, or a path to a study file" if known
                     else f"no studies in {folder}; give a path to a study file")


# =============================================================================================
# Running one
# =============================================================================================

@dataclass(frozen=True)
class Finding:
    comparison: Comparison
    values: list[tuple[str, Optional[float]]]  # (per-group label, percent change or None)

    @property
    def verdict(self) -> str:
        """How moesim's figures sit against the paper's claim."""
        claim = self.comparison.paper
        got = [v for _, v in self.values if v is not None]
        if claim is None:
            return ""
        if not got:
            return "no figure"
        if all(abs(v) < FLAT_PCT for v in got):
            return "disagrees (no change in moesim)"
        same = sum(1 for v in got if v * claim.sign >= FLAT_PCT)
        if claim.low is not None and claim.high is not None:
            inside = sum(1 for v in got if claim.low <= v <= claim.high)
            if inside == len(got):
                return "agrees"
            if same == len(got):
                return (f"direction agrees, magnitude differs ({inside}/{len(got)} within "
                        f"{claim.text})")
        elif same == len(got):
            return "direction agrees"
        return "disagrees" if same == 0 else f"mixed ({same}/{len(got)} in its direction)"

    def line(self) -> str:
        c = self.comparison
        at = ", ".join(f"{_short(k)} {v}" for k, v in c.at.items())
        figs = ", ".join(f"{g} {_change(v)}" if g else _change(v) for g, v in self.values)
        text = f"{c.label}{f' at {at}' if at else ''}: {figs} ({_TITLES.get(c.metric, c.metric)})"
        if c.paper is not None:
            text += f"; {c.paper.source}: {c.paper.text} -> {self.verdict}"
        return text


@dataclass
class StudyResult:
    study: Study
    table: SweepResult
    findings: list[Finding]
    files: list[Path]
    notes: list[str]


def _short(col: str) -> str:
    return col.rsplit(".", 1)[-1].replace("_", " ")


def _change(pct: Optional[float]) -> str:
    if pct is None:
        return "n/a"
    ratio = 1 + pct / 100
    if ratio >= 2 or ratio <= 0.5:  # big factors read better as ratios
        return f"{ratio:.2f}x"
    return f"{pct:+.0f} %"


def with_labels(study: Study, result: SweepResult) -> SweepResult:
    """The sweep's table with each linked axis's label columns after its index column."""
    if not study.labels:
        return result
    cols = list(result.columns)
    rows = [list(r) for r in result.rows]
    for axis, labs in study.labels.items():
        i = cols.index(axis)
        keys = [k for k in study.label_columns if any(k in lab for lab in labs)]
        for r in rows:
            idx = r[i]
            lab = labs[idx] if isinstance(idx, int) and 0 <= idx < len(labs) else {}
            r[i + 1:i + 1] = [lab.get(k, "") for k in keys]
        cols[i + 1:i + 1] = keys
    return replace(result, columns=cols, rows=[tuple(r) for r in rows])


def usable(row: dict[str, Any]) -> bool:
    """A point to plot and compare: a valid scenario that fits in memory."""
    return bool(row.get("feasible")) and bool(row.get("fits")) and \
        isinstance(row.get(DEFAULT_Y), (int, float)) and math.isfinite(row[DEFAULT_Y])


def _matches(row: dict[str, Any], sel: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in sel.items())


def compare(rows: Sequence[dict[str, Any]], c: Comparison, where: str = "study.compare"
            ) -> Finding:
    """``y(a) / y(b) - 1`` in percent for each group of ``c.per`` (None where either side is
    missing or does not fit). A side that selects several points is a study-file error: the
    figure would depend on row order."""
    groups: dict[tuple[Any, ...], None] = {}
    for r in rows:
        if _matches(r, c.at):
            groups.setdefault(tuple(r.get(p) for p in c.per), None)
    values: list[tuple[str, Optional[float]]] = []
    for g in groups:
        sel = {**c.at, **dict(zip(c.per, g))}

        def pick(side: dict[str, Any]) -> Optional[float]:
            hits = [r for r in rows if _matches(r, {**sel, **side})]
            if len(hits) > 1:
                raise InputError(where, f"{side} at {sel} selects {len(hits)} points, not one",
                                 "add the other columns that vary to `at` or `per`")
            if not hits or not usable(hits[0]):
                return None
            v = hits[0].get(c.metric)
            return float(v) if isinstance(v, (int, float)) else None

        ya, yb = pick(c.a), pick(c.b)
        pct = (ya / yb - 1) * 100 if ya is not None and yb else None
        values.append((" ".join(str(v) for v in g), pct))
    return Finding(c, values)


def run_study(study: Study, out_dir: Optional[Path] = None, *, workers: int = 1,
              png: bool = True, limit: Optional[int] = None) -> StudyResult:
    """Run the study's sweep, write ``NAME.csv`` / ``.html`` / ``.png`` to ``out_dir`` (default:
    beside the study file) and compute its comparisons."""
    from .sweep import run_sweep, write_table

    out = Path(out_dir) if out_dir is not None else study.path.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("--out", f"cannot create {out}: {exc.strerror}") from None
    result = with_labels(study, run_sweep(study.sweep, workers=workers, progress=False,
                                          limit=limit))
    csv_path = out / f"{study.name}.csv"
    write_table(result, csv_path)
    rows = result.dicts()
    findings = [compare(rows, c, f"study.compare[{i}]")
                for i, c in enumerate(study.compare)]
    notes = [f"warning: {w}" for w in result.warnings]
    skipped = sum(1 for r in rows if not usable(r))
    if skipped:
        notes.append(f"{skipped} of {len(rows)} points are invalid or do not fit in memory: "
                     "in the CSV, not in the plot")
    files = [csv_path]
    files_plot, plot_notes = plot(study, [r for r in rows if usable(r)], out, png=png)
    return StudyResult(study, result, findings, files + files_plot, notes + plot_notes)


# =============================================================================================
# The plot (altair, imported here only)
# =============================================================================================

def _field(col: str) -> str:
    # Vega-Lite reads dots in a field name as nested access.
    return col.replace(".", "_")


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def chart(study: Study, rows: Sequence[dict[str, Any]]) -> Any:
    """The altair chart of ``rows`` (raises ImportError without altair)."""
    import altair as alt

    ps = study.plot

    def _title(col: str) -> str:
        return ps.titles.get(col) or _TITLES.get(col, _short(col))

    used = [c for c in (ps.x, ps.y, ps.color, ps.column, ps.row) if c]
    tips = [c for c in ("tpot_ms", "ttft_ms", "max_batch_size") if c not in used]
    data = [{_field(c): r.get(c) for c in used + tips} for r in rows]

    def order(col: str) -> list[Any]:  # the sweep's order, not alphabetical
        return list(dict.fromkeys(r.get(col) for r in rows))

    def kind(col: str, discrete: bool) -> str:
        vals = order(col)
        if _numeric(vals):
            return "O" if discrete else "Q"
        return "N"

    x_kind = kind(ps.x, False)
    x_args: dict[str, Any] = {"title": _title(ps.x)}
    if x_kind == "Q":
        x_args["scale"] = alt.Scale(type=ps.x_scale, **({"base": 2} if ps.x_scale == "log"
                                                         else {}))
        vals = sorted(set(order(ps.x)))
        ratios = {round(b / a, 9) for a, b in zip(vals, vals[1:]) if a > 0}
        if ps.x_scale == "log" and len(ratios) == 1:  # a geometric grid: tick every point
            x_args["axis"] = alt.Axis(values=vals, format="~g")
    else:
        x_args["sort"] = order(ps.x)
    enc: dict[str, Any] = {
        "x": alt.X(f"{_field(ps.x)}:{x_kind}", **x_args),
        "y": alt.Y(f"{_field(ps.y)}:Q", title=_title(ps.y),
                   scale=alt.Scale(type=ps.y_scale, zero=ps.y_scale == "linear")),
        "tooltip": [alt.Tooltip(f"{_field(c)}:{kind(c, True)}", title=_title(c))
                    for c in used + tips],
    }
    if ps.color:
        # A categorical palette even for numbers: a sequential one makes the low values faint.
        enc["color"] = alt.Color(f"{_field(ps.color)}:{kind(ps.color, True)}",
                                 title=_title(ps.color), sort=order(ps.color),
                                 scale=alt.Scale(scheme="tableau10"))
    base = alt.Chart(alt.Data(values=data)).mark_line(point=True).encode(**enc)
    if not (ps.column or ps.row):
        return base.properties(width=420, height=280, title=study.title)
    facet: dict[str, Any] = {}
    if ps.column:
        facet["column"] = alt.Column(f"{_field(ps.column)}:{kind(ps.column, True)}",
                                     title=_title(ps.column), sort=order(ps.column))
    if ps.row:
        facet["row"] = alt.Row(f"{_field(ps.row)}:{kind(ps.row, True)}",
                               title=_title(ps.row), sort=order(ps.row))
    out = base.properties(width=220, height=180).facet(**facet).properties(title=study.title)
    return out.resolve_scale(y="independent") if ps.independent_y else out


def plot(study: Study, rows: Sequence[dict[str, Any]], out: Path, *, png: bool = True
         ) -> tuple[list[Path], list[str]]:
    """Write ``NAME.html`` and (with vl-convert) ``NAME.png``; returns the files and notes."""
    try:
        ch = chart(study, rows)
    except ImportError:
        return [], [f"plots need altair, not installed: wrote the CSV only ({INSTALL_HINT})"]
    html = out / f"{study.name}.html"
    ch.save(str(html))
    files, notes = [html], []
    if not png:
        return files, notes
    if importlib.util.find_spec("vl_convert") is None:
        return files, [f"PNG needs vl-convert-python, not installed: wrote HTML only "
                       f"({INSTALL_HINT})"]
    png_path = out / f"{study.name}.png"
    try:
        ch.save(str(png_path), scale_factor=1.0)
    except Exception as exc:  # noqa: BLE001 - any renderer failure leaves the HTML usable
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return files, [f"PNG export failed ({first}): wrote HTML only"]
    return files + [png_path], notes


# =============================================================================================
# CLI
# =============================================================================================

def _print_result(res: StudyResult) -> None:
    s = res.study
    n = len(res.table.rows)
    print(f"{s.name}: {s.title}  [{n} points, {res.table.seconds:.1f} s]")
    for f in res.findings:
        print(f"  {f.line()}")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"  wrote {', '.join(str(p) for p in res.files)}")


def _cmd_study(args: argparse.Namespace) -> int:
    if args.list:
        for p in study_files():
            try:
                s = load_study(p)
            except InputError as exc:  # list the others; running this one reports it
                print(f"{p.stem:<18}(cannot load: {exc.one_line()})")
                continue
            print(f"{s.name:<18}{s.title}  ({len(s.sweep)} points)")
        return 0
    if not args.name:
        raise InputError("study", "name a study, 'all', or give --list",
                         f"e.g. python -m moesim study fp8; studies live in {STUDIES_DIR}")
    paths = study_files() if args.name == "all" else [find_study(args.name)]
    if not paths:
        raise InputError("study", f"no studies in {STUDIES_DIR}")
    studies = [load_study(p) for p in paths]  # check every file before running any
    for s in studies:
        _print_result(run_study(s, args.out, workers=args.workers, png=not args.no_png))
    return 0


def add_cli(subparsers: Any) -> None:
    """Register ``study`` on the main parser's sub-parsers."""
    from .sweep_cli import _workers

    p = subparsers.add_parser(
        "study", help="regenerate a MoE-Inference-Bench style study: sweep, CSV, plot, summary",
        description="Run a study (a sweep file with a plot and headline comparisons, see "
                    "examples/studies/): write NAME.csv, NAME.html and NAME.png beside the "
                    "study file (or in --out) and print moesim's figures next to the paper's.")
    p.add_argument("name", nargs="?", help="a study in examples/studies/, 'all', or a path")
    p.add_argument("--list", action="store_true", help="list the studies")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the CSV / HTML / PNG here (default: beside the study file)")
    p.add_argument("--no-png", action="store_true", help="HTML only (no vl-convert needed)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="local processes for the sweep (default 1)")
    p.set_defaults(func=_cmd_study)
