"""``moesim validate``: predict every row of a measured table with the predictor's own op-cost
functions and report the errors.

A table is a CSV in one of the layouts of ``shared/reference/measurements`` (see its README):
``gemm``, ``moe``, ``collective``, ``allreduce_custom``, ``attention_context``,
``attention_generation``, ``moe_a2a`` or ``e2e_serving``; the layout is recognised from the
columns. Every row gets a prediction or a listed reason why it has none; nothing is dropped.

How each layout is predicted (the same functions :mod:`moesim.step` calls):

- ``gemm``: :func:`moesim.costs.gemm.gemm` of ``[m, k] x [k, n]``; bfloat16 = bf16 x bf16,
  fp8 = per-tensor fp8 x fp8, fp8_block = 128x128 block-scaled fp8 weights x fp8 activations.
  Kernel time only (the table times kernels, not launches).
- ``moe``: one fused-MoE call on one GPU as the reference README defines it: all ``num_tokens``
  tokens enter the kernel, the GPU holds ``num_experts / moe_ep`` experts of ``inter_size /
  moe_tp`` columns, and the loads are those of the most loaded EP group. The router GEMM and the
  top-k kernel are NOT included (the routing output is given); :func:`moesim.costs.moe.expert_ops`
  is. ``balanced`` rows use the measurement's own balanced assignment (token ``i`` picks experts
  ``i + j * ceil(E/k)`` mod E; see :func:`balanced_assignment_loads` - it piles up a little where
  ``E`` is not a multiple of ``k``, unlike :func:`moesim.routing.balanced_loads`). ``power_law_A``
  rows: the measured time is ONE random draw of the README's bounded-Pareto recipe whose loads we
  cannot know, so we draw :data:`POWER_LAW_DRAWS` of them with the predictor's own sampler
  (:func:`moesim.routing.sample_loads`, seeded from the row's routing shape: deterministic, and
  identical across rows that differ only in dtype / hidden / moe_tp / moe_ep) and report the
  MEDIAN prediction, i.e. the time of a typical draw - not the mean over draws, which no single
  measurement is; the lowest and highest draw are kept in ``pred_draw_min_us`` /
  ``pred_draw_max_us`` so a reader can see how much of an error the draw alone could explain.
- ``collective``: ``all_reduce`` -> :func:`moesim.costs.comm.all_reduce`; ``alltoall``,
  ``all_gather`` and ``reduce_scatter`` -> :func:`moesim.costs.comm.all_to_all`. The latter two
  have no function of their own in ``comm.py``; nccl-tests defines their bus bandwidth exactly as
  all-to-all's, busbw = (S / t) (n - 1) / n with S the size column, and NCCL reaches the same
  busbw on all three over NVSwitch (research notes §1.2), so the all-to-all alpha-beta model is
  the model of all three. ``message_bytes`` is the per-rank buffer S.
- ``allreduce_custom``: vLLM's custom all-reduce, predicted with the same ``all_reduce``.
- ``attention_context``: :func:`moesim.costs.attention.prefill` of ``batch_size`` sequences of
  ``seq_len`` new tokens after ``kv_len`` cached ones (0 in the reference table).
- ``attention_generation``: :func:`moesim.costs.attention.decode` with ``kv_len + 1`` keys (the
  ``kv_len`` cached tokens and the new one, as :mod:`moesim.step` calls it).
- ``moe_a2a``: one DeepEP dispatch or combine, :func:`moesim.costs.deepep.deepep_op` of the
  row's ``comm_backend`` (``deepep_ht`` / ``deepep_ll`` / ``deepep_v2_context`` /
  ``deepep_v2_generation``) and ``phase``, with the copies a rank sends over NVLink under uniform
  routing of its ``num_tokens`` tokens (:func:`moesim.costs.deepep.expected_remote_copies`) and
  the row's ``sms``. Intra-node rows only (``nodes`` = 1).

Time unit. The kernel tables' ``latency_us`` column is read as µs unless ``time_unit``
(``--time-unit``) says otherwise (``ns`` or ``ms``); the value is never rescaled silently. A
``moe_a2a`` table is checked first (:func:`check_a2a_unit`): its best row must move its NVLink
bytes at between :data:`A2A_MIN_LINK_FRACTION` and 1x the link's per-direction peak under the
unit used; a table slower than that everywhere (e.g. ns in the µs column: 20 s for a 5 GB
combine) or faster than the link is refused with a one-line error naming ``--time-unit``. The
report and the ``--out`` CSV (columns ``latency_unit``, ``measured_us``) state the unit used.
- ``e2e_serving``: a scenario per row (model = ``model_path``, hardware = ``system`` x
  ``tp * attention_dp * pp`` GPUs, parallel sizes, dtypes from the quant-mode columns, framework
  = ``backend``, workload = ``batch_size / isl / osl``) through :func:`moesim.predict`.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from .costs.op import eager_time_us
from .errors import InputError
from .spec.hardware import Quantity

# ---------------------------------------------------------------------------------------------
# Layouts

#: Columns that identify each layout (a table may have more). Checked in this order: the first
#: layout whose columns are all present wins, so more specific layouts come first.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "e2e_serving": ("model_path", "backend", "isl", "osl", "batch_size", "tp_size",
                    "silicon_ttft_ms", "silicon_tpot_ms"),
    "moe_a2a": ("comm_backend", "phase", "ep_size", "hidden_size", "topk", "num_experts",
                "num_tokens", "latency_us"),
    "moe": ("num_tokens", "hidden_size", "inter_size", "num_experts", "topk", "moe_tp", "moe_ep",
            "distribution", "dtype", "latency_us"),
    "gemm": ("m", "n", "k", "dtype", "latency_us"),
    # attention_context and attention_generation share their columns; the rows tell them apart.
    "attention": ("batch_size", "seq_len", "kv_len", "num_heads", "num_kv_heads", "head_dim",
                  "kv_cache_dtype", "window_size", "latency_us"),
    "allreduce_custom": ("kernel", "op", "num_gpus", "message_bytes", "latency_us"),
    "collective": ("op", "num_gpus", "message_bytes", "latency_us"),
}
LAYOUT_NAMES = ("gemm", "moe", "collective", "allreduce_custom", "attention_context",
                "attention_generation", "moe_a2a", "e2e_serving")

#: Routing draws predicted per power-law moe row (the median prediction is reported).
POWER_LAW_DRAWS = 7

TOKEN_BANDS = ((16, "1-16"), (128, "17-128"), (1024, "129-1024"), (8192, "1025-8192"),
               (math.inf, ">8192"))
BYTE_BANDS = ((64 << 10, "<=64KiB"), (1 << 20, "64KiB-1MiB"), (16 << 20, "1-16MiB"),
              (256 << 20, "16-256MiB"), (math.inf, ">256MiB"))


def token_band(n: float) -> str:
    for limit, name in TOKEN_BANDS:
        if n <= limit:
            return name
    raise AssertionError("unreachable")


def byte_band(n: float) -> str:
    for limit, name in BYTE_BANDS:
        if n <= limit:
            return name
    raise AssertionError("unreachable")


def _band_order(name: str) -> tuple:
    for i, (_, b) in enumerate(TOKEN_BANDS + BYTE_BANDS):
        if b == name:
            return (0, i, "")
    try:
        return (1, float(name), "")
    except ValueError:
        return (2, 0.0, name)


class _Unpredictable(Exception):
    """A row that has no prediction; the message is the reason listed in the report."""


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class ValidationResult:
    """What :func:`run` returns. ``text``: the report for a person (or the summary as JSON when
    asked); ``summary``: JSON-able figures; ``rows``: every input row with its prediction and
    error columns (written to ``out`` when given); ``columns``: their order."""

    table: str
    layout: str
    text: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_table(path: str) -> tuple[list[str], list[dict[str, str]]]:
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k.strip() if k else k): (v.strip() if isinstance(v, str) else v)
                     for k, v in r.items()} for r in reader]
    except FileNotFoundError:
        raise InputError("table", f"{path} not found", "give the path of a measurement CSV") \
            from None
    except IsADirectoryError:
        raise InputError("table", f"{path} is a directory", "give the path of a CSV file") \
            from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError("table", f"cannot read {path}: {exc}".splitlines()[0],
                         "give a readable CSV file") from None
    if not columns:
        raise InputError("table", f"{path} has no header row", "give a CSV with a header line")
    return columns, rows


def detect_layout(columns: list[str], rows: list[dict[str, str]]) -> str:
    """Name of the layout whose columns ``columns`` has (see :data:`LAYOUTS`)."""
    have = set(columns)
    for name, needed in LAYOUTS.items():
        if have.issuperset(needed):
            if name == "attention":
                return _attention_kind(rows)
            return name
    expected = "; ".join(
        f"{n}: {', '.join(LAYOUTS['attention' if n.startswith('attention') else n])}"
        for n in LAYOUT_NAMES)
    raise InputError("table", f"the columns ({', '.join(columns)}) match no known layout",
                     f"expected the columns of one of {', '.join(LAYOUT_NAMES)} ({expected})")


def _attention_kind(rows: list[dict[str, str]]) -> str:
    """Generation (decode) tables have one new token per sequence after a non-empty cache;
    anything else is a context (prefill) table."""
    if not rows:
        return "attention_context"
    try:
        decode = all(int(r["seq_len"]) == 1 and int(r["kv_len"]) >= 1 for r in rows)
    except (TypeError, ValueError):
        return "attention_context"
    return "attention_generation" if decode else "attention_context"


# ---------------------------------------------------------------------------------------------
# Row helpers


def _int(row: dict[str, str], col: str, default: Optional[int] = None) -> int:
    v = row.get(col)
    if v is None or v == "":
        if default is not None:
            return default
        raise _Unpredictable(f"column {col} is empty")
    try:
        f = float(v)
    except ValueError:
        raise _Unpredictable(f"column {col} is not a number ({v!r})") from None
    if not math.isfinite(f) or f != int(f):
        raise _Unpredictable(f"column {col} is not an integer ({v!r})")
    return int(f)


def _float(row: dict[str, str], col: str) -> float:
    v = row.get(col)
    if v is None or v == "":
        raise _Unpredictable(f"column {col} is empty")
    try:
        f = float(v)
    except ValueError:
        raise _Unpredictable(f"column {col} is not a number ({v!r})") from None
    if not math.isfinite(f):
        raise _Unpredictable(f"column {col} is not finite ({v!r})")
    return f


def _dtype(name: str) -> str:
    from .spec.dtypes import canonical

    try:
        return canonical(name)
    except ValueError:
        raise _Unpredictable(f"unknown dtype {name!r}") from None


def _gemm_dtypes(label: str) -> tuple[str, str]:
    """(weight, activation) dtypes of a GEMM / MoE ``dtype`` label."""
    d = _dtype(label)
    if d in ("fp8", "fp8_block"):
        return d, "fp8"
    if d in ("bf16", "fp16", "fp32"):
        return d, d
    raise _Unpredictable(f"dtype {label!r} has no kernel-table mapping (bf16, fp8, fp8_block)")


class _Hardware:
    """Profiles by id, loaded once; ``forced`` (--hardware) overrides the table's system."""

    def __init__(self, forced: Optional[str], calibrated: bool = True) -> None:
        self.forced = forced
        self.calibrated = calibrated  # False: the base profiles, without calibrated overlays
        self.cache: dict[str, Any] = {}
        self.memo: dict[tuple, float] = {}  # per-run memo of predictions by shape
        self.for_fit = False  # table_ops: ops of uncalibrated families are kept (ideal times)
        if forced is not None:
            from .spec.hardware import load_profile

            self.cache[forced] = load_profile(forced, calibrated=calibrated,
                                              field="hardware")  # bad id: InputError

    def id_of(self, row: dict[str, str]) -> str:
        if self.forced is not None:
            return self.forced
        sys_id = row.get("system") or ""
        if not sys_id:
            raise _Unpredictable("no system column value and no --hardware given")
        return sys_id

    def get(self, row: dict[str, str]):
        from .spec.hardware import load_profile

        ref = self.id_of(row)
        if ref not in self.cache:
            try:
                self.cache[ref] = load_profile(ref, calibrated=self.calibrated,
                                               field="hardware")
            except InputError as exc:
                self.cache[ref] = exc
        hw = self.cache[ref]
        if isinstance(hw, InputError):
            raise _Unpredictable(f"hardware {ref!r}: {hw.message}")
        return hw


# ---------------------------------------------------------------------------------------------
# Kernel predictors: row -> predicted µs (raise _Unpredictable with a reason)


def _predict_gemm(row: dict[str, str], hws: _Hardware) -> list:
    from .costs.gemm import linear

    hw = hws.get(row)
    m, n, k = _int(row, "m"), _int(row, "n"), _int(row, "k")
    if min(m, n, k) < 1:
        raise _Unpredictable("m, n and k must be >= 1")
    wd, ad = _gemm_dtypes(row.get("dtype", ""))
    return linear("gemm", m, n, k, hw, wd, ad)


def balanced_assignment_loads(num_tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Per-expert token counts of the reference's balanced routing: token ``i`` takes experts
    ``(i + j * stride) mod E`` for ``j < k``, ``stride = ceil(E / k)``; with fewer tokens than
    ``stride`` the tokens are spread out, ``floor(i * stride / T + j * stride) mod E``."""
    stride = -(-num_experts // top_k)
    i = np.arange(num_tokens, dtype=np.float64)[:, None]
    j = np.arange(top_k, dtype=np.float64)[None, :]
    if num_tokens >= stride:
        e = (i + j * stride) % num_experts
    else:
        e = np.floor(i * stride / num_tokens + j * stride) % num_experts
    return np.bincount(e.astype(np.int64).ravel(), minlength=num_experts)


def _max_group(loads: np.ndarray, ep: int) -> np.ndarray:
    groups = loads.reshape(ep, -1)
    return groups[int(np.argmax(groups.sum(axis=1)))]


def _draw_seed(*key: Any) -> int:
    return zlib.crc32(repr(key).encode())


def _moe_routing(row: dict[str, str]) -> tuple[str, list[np.ndarray]]:
    """(distribution label, list of local-expert load arrays of the measured GPU)."""
    T, E, k = _int(row, "num_tokens"), _int(row, "num_experts"), _int(row, "topk")
    ep = _int(row, "moe_ep", 1)
    if min(T, E, k, ep) < 1:
        raise _Unpredictable("num_tokens, num_experts, topk and moe_ep must be >= 1")
    if k > E:
        raise _Unpredictable(f"topk={k} exceeds num_experts={E}")
    if E % ep:
        raise _Unpredictable(f"moe_ep={ep} does not divide num_experts={E}")
    dist = (row.get("distribution") or "").strip().lower()
    return dist, _routing_draws(dist, T, E, k, ep)


@lru_cache(maxsize=None)
def _global_draws(dist: str, T: int, E: int, k: int) -> tuple[bytes, ...]:
    """Per-expert loads of every expert, one entry per routing draw (cached by shape)."""
    if dist in ("balanced", "uniform"):
        return (balanced_assignment_loads(T, E, k).astype(np.int64).tobytes(),)
    if dist.startswith("power_law"):
        try:
            alpha = float(dist[len("power_law"):].lstrip("_"))
        except ValueError:
            raise _Unpredictable(f"cannot read the exponent of distribution {dist!r}") from None
        if alpha <= 0 or alpha == 1.0:
            raise _Unpredictable(f"power-law exponent {alpha} outside the recipe (> 0, != 1)")
        from .routing import sample_loads
        from .spec.routing import RoutingSpec

        # The predictor's own sampler of the README recipe; the draws are its "layers". One
        # generator per routing shape: rows that differ only in dtype, hidden size, moe_tp or
        # moe_ep see the same draws (their EP group is then chosen per row).
        rng = np.random.default_rng(_draw_seed("power_law", alpha, T, E, k))
        draws = sample_loads(RoutingSpec(distribution="power_law", alpha=alpha), T, E, k,
                             POWER_LAW_DRAWS, rng)
        return tuple(np.asarray(d, dtype=np.int64).tobytes() for d in draws)
    raise _Unpredictable(f"unknown distribution {dist!r} (balanced or power_law_A)")


@lru_cache(maxsize=None)
def _routing_draws_cached(dist: str, T: int, E: int, k: int, ep: int) -> tuple[bytes, ...]:
    return tuple(_max_group(np.frombuffer(g, dtype=np.int64), ep).tobytes()
                 for g in _global_draws(dist, T, E, k))


def _routing_draws(dist: str, T: int, E: int, k: int, ep: int) -> list[np.ndarray]:
    return [np.frombuffer(b, dtype=np.int64) for b in _routing_draws_cached(dist, T, E, k, ep)]


# moe.csv rows name a shape, not a model. Experts are SwiGLU (3 matrices) in every model we
# support except NVIDIA Nemotron-3-Nano-30B-A3B (hidden 2688, 128 experts, top-6, expert
# intermediate 1856), whose experts are squared-ReLU MLPs with 2 matrices (its HF config:
# mlp_hidden_act "relu2"). An architecture fact, used to pick the expert's matrix count.
NON_GATED_SHAPES = {(2688, 1856, 128, 6)}


def _expert_ops(loads: np.ndarray, T: int, k: int, H: int, inter: int, hw, wd: str,
                ad: str, gated: bool = True, num_experts=None, output_copies: int = 0) -> list:
    from .costs.moe import expert_ops

    return expert_ops(loads, T, k, H, inter, hw, wd, ad, gated, "fused",
                      num_experts=num_experts, output_copies=output_copies)


@lru_cache(maxsize=None)
def _output_copies(framework: str) -> int:
    """Write-back copies of the fused MoE's output by the engine a moe row names in its
    ``framework`` column (``moesim/frameworks/<id>.yaml``); other values (this repo's own
    ``torch`` benchmarks, which write in place) and a blank make none."""
    from .spec.framework import FRAMEWORKS_DIR, load_framework

    name = framework.strip().lower()
    if not name or not (FRAMEWORKS_DIR / f"{name}.yaml").exists():
        return 0
    return int(load_framework(name).moe_output_copies.value)


def _predict_moe(row: dict[str, str], hws: _Hardware) -> list[list]:
    """One op list per routing draw (the measurement is one draw: see :func:`run`)."""
    hw = hws.get(row)
    T, k = _int(row, "num_tokens"), _int(row, "topk")
    H, inter_full = _int(row, "hidden_size"), _int(row, "inter_size")
    tp = _int(row, "moe_tp", 1)
    if tp < 1 or inter_full % tp:
        raise _Unpredictable(f"moe_tp={tp} does not divide inter_size={inter_full}")
    wd, ad = _gemm_dtypes(row.get("dtype", ""))
    copies = _output_copies(row.get("framework") or "")
    _, draws = _moe_routing(row)
    preds = []
    for d in draws:
        # Rows repeat shapes (the same draw under several dtypes, equal draws after sorting):
        # memoise; expert_ops does not depend on the order of the experts.
        key = ("moe", hws.id_of(row), np.sort(d).tobytes(), T, k, H, inter_full // tp, wd, ad,
               _int(row, "num_experts"), copies)
        if key not in hws.memo:
            gated = (H, inter_full, _int(row, "num_experts"), k) not in NON_GATED_SHAPES
            hws.memo[key] = _expert_ops(d, T, k, H, inter_full // tp, hw, wd, ad, gated,
                                        _int(row, "num_experts"), copies)
        preds.append(hws.memo[key])
    return preds


def _median_draw(draws: list[list]) -> tuple[list, float, float, float]:
    """(ops of the median draw, median, min, max) of per-draw total times; an even count takes
    the mean of the middle two as the median and the lower one's ops."""
    totals = sorted((eager_time_us(ops), i) for i, ops in enumerate(draws))
    n = len(totals)
    median = totals[n // 2][0] if n % 2 else 0.5 * (totals[n // 2 - 1][0] + totals[n // 2][0])
    mid = totals[(n - 1) // 2][1]
    return draws[mid], float(median), float(totals[0][0]), float(totals[-1][0])


def _predict_collective(row: dict[str, str], hws: _Hardware) -> list:
    from .costs import comm

    hw = hws.get(row)
    op = (row.get("op") or "").strip().lower().replace("-", "_")
    n, size = _int(row, "num_gpus"), _float(row, "message_bytes")
    if n < 1 or size < 0:
        raise _Unpredictable("num_gpus must be >= 1 and message_bytes >= 0")
    if op in ("all_reduce", "allreduce"):
        kernel = row.get("kernel") or ""
        custom = "custom" in (row.get("library") or "") or "custom" in kernel
        ar = comm.all_reduce(op, size, n, hw, custom=custom)
        # Rows timed inside a CUDA graph have no host dispatch per call.
        return [replace(ar, in_graph=True)] if "graph" in kernel else [ar]
    if op in ("alltoall", "all_to_all"):
        return [comm.all_to_all(op, size, n, hw)]
    if op in ("all_gather", "allgather", "reduce_scatter", "reducescatter"):
        return [comm.all_gather(op, size, n, hw)]
    raise _Unpredictable(f"no cost function for collective {op!r}")


def _predict_attention_context(row: dict[str, str], hws: _Hardware) -> list:
    from .costs.attention import prefill

    hw = hws.get(row)
    args = _attention_args(row)
    b, q, prefix = _int(row, "batch_size"), _int(row, "seq_len"), _int(row, "kv_len", 0)
    if min(b, q) < 1 or prefix < 0:
        raise _Unpredictable("batch_size and seq_len must be >= 1, kv_len >= 0")
    heads, kv_heads, hd, kvd, window = args
    return [prefill(b, q, prefix, heads, kv_heads, hd, hd, hw, kvd, window)]


def _predict_attention_generation(row: dict[str, str], hws: _Hardware) -> list:
    from .costs.attention import decode

    hw = hws.get(row)
    heads, kv_heads, hd, kvd, window = _attention_args(row)
    b, kv = _int(row, "batch_size"), _int(row, "kv_len")
    if b < 1 or kv < 0:
        raise _Unpredictable("batch_size must be >= 1 and kv_len >= 0")
    q = _int(row, "seq_len", 1)
    if q != 1:
        raise _Unpredictable(f"generation row with seq_len={q} (decode is one token per sequence)")
    return [decode(b, kv + 1, heads, kv_heads, hd, hd, hw, kvd, window)]


def _attention_args(row: dict[str, str]) -> tuple[int, int, int, str, int]:
    heads, kv_heads, hd = _int(row, "num_heads"), _int(row, "num_kv_heads"), _int(row, "head_dim")
    if min(heads, kv_heads, hd) < 1 or heads % kv_heads:
        raise _Unpredictable(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
    window = _int(row, "window_size", 0)
    if window < 0:
        raise _Unpredictable("window_size must be >= 0")
    return heads, kv_heads, hd, _dtype(row.get("kv_cache_dtype") or "bf16"), window


def _a2a_args(row: dict[str, str]) -> tuple[str, str, int, int, int, int, int, int]:
    """(backend, phase, ep, tokens per rank, hidden, topk, experts, sms) of a moe_a2a row."""
    from .costs import deepep

    backend = (row.get("comm_backend") or "").strip().lower()
    if not backend.startswith("deepep_") or backend[len("deepep_"):] not in deepep.BACKENDS:
        raise _Unpredictable(f"unknown comm_backend {backend!r} (valid: "
                             f"{', '.join('deepep_' + b for b in deepep.BACKENDS)})")
    phase = (row.get("phase") or "").strip().lower()
    if phase not in deepep.PHASES:
        raise _Unpredictable(f"unknown phase {phase!r} (dispatch or combine)")
    ep, T = _int(row, "ep_size"), _int(row, "num_tokens")
    H, k, E = _int(row, "hidden_size"), _int(row, "topk"), _int(row, "num_experts")
    nodes, sms = _int(row, "nodes", 1), _int(row, "sms", 0)
    if min(ep, T, H, k, E, nodes) < 1 or E % ep or k > E or sms < 0:
        raise _Unpredictable("needs ep_size | num_experts, topk <= num_experts, sizes >= 1")
    if nodes != 1:
        raise _Unpredictable(f"nodes={nodes}: only intra-node DeepEP (one NVLink domain) is "
                             "modelled")
    return backend[len("deepep_"):], phase, ep, T, H, k, E, sms


def _predict_moe_a2a(row: dict[str, str], hws: _Hardware) -> list:
    from .costs import deepep

    hw = hws.get(row)
    backend, phase, ep, T, H, k, E, sms = _a2a_args(row)
    if ep > int(hw.interconnect.nvlink_domain_size.value):
        raise _Unpredictable(f"ep_size={ep} exceeds {hw.id}'s NVLink domain")
    copies = deepep.expected_remote_copies(backend, T, k, E, ep)
    try:
        return [deepep.deepep_op(phase, backend, copies, H, hw, sms, unfitted=hws.for_fit)]
    except InputError as exc:  # no DeepEP fit in this profile
        raise _Unpredictable(exc.one_line()) from None


#: Lowest fraction of the NVLink per-direction peak the best row of a DeepEP table may reach
#: and still be taken at the unit used. DeepEP reaches 35-80 % of the link on large transfers
#: (DeepEP README: 153-158 GB/s of H800's ~160; research notes §1.2) and NCCL's all-to-all
#: ~70 %; a table whose best row reaches under 1 % (a 5 GB combine taking 20 s) is not
#: plausible, while the next unit down (ns in a µs column) is 1000x away, so the test cannot
#: confuse the two.
A2A_MIN_LINK_FRACTION = 0.01
#: --time-unit choices: µs per unit.
TIME_UNITS = {"us": 1.0, "ns": 1e-3, "ms": 1e3}


def check_a2a_unit(rows: list[dict[str, str]], hws: "_Hardware", unit: Optional[str]) -> None:
    """Refuse a moe_a2a table whose ``latency_us`` values, read in ``unit`` (default µs), are not
    physically plausible: the best row's bytes over NVLink at peak / its time must lie in
    [:data:`A2A_MIN_LINK_FRACTION`, 1]. Raises :class:`InputError` (one line, naming the fix)."""
    from .costs import deepep

    scale = TIME_UNITS[unit or "us"]
    best = None
    for row in rows:
        try:
            backend, phase, ep, T, H, k, E, _ = _a2a_args(row)
            hw = hws.get(row)
            meas = _float(row, "latency_us") * scale
        except _Unpredictable:
            continue
        link = hw.interconnect.nvlink_gb_per_s_per_direction.value * 1e3  # bytes/µs
        if meas <= 0 or link <= 0:
            continue
        moved = deepep.expected_remote_copies(backend, T, k, E, ep) * \
            deepep.bytes_per_copy(backend, phase, H)
        frac = moved / link / meas
        best = frac if best is None else max(best, frac)
    if best is None:
        return
    given = f"--time-unit {unit}" if unit else "µs, as the column name says"
    if best < A2A_MIN_LINK_FRACTION:
        fix = ("if the column holds nanoseconds, rerun with --time-unit ns" if unit in (None, "us")
               else "check the table's unit (--time-unit us, ns or ms)")
        raise InputError("latency_us", f"read as {given}, the fastest DeepEP row moves its "
                         f"NVLink bytes at {best * 100:.2g} % of the link's peak (plausible: "
                         f">= {A2A_MIN_LINK_FRACTION * 100:g} %); the values look like another "
                         "unit", fix)
    if best > 1.0:
        raise InputError("latency_us", f"read as {given}, a DeepEP row moves its NVLink bytes "
                         f"{best:.3g}x faster than the link's peak allows",
                         "check the table's unit (--time-unit us, ns or ms)")


def _unit_label(unit: Optional[str]) -> str:
    if unit in (None, "us"):
        return "us"
    return f"{unit} (--time-unit {unit}: measured_us = latency_us x {TIME_UNITS[unit]:g})"


KERNEL_PREDICTORS: dict[str, Callable[[dict[str, str], _Hardware], Any]] = {
    "gemm": _predict_gemm,
    "moe": _predict_moe,
    "collective": _predict_collective,
    "allreduce_custom": _predict_collective,
    "attention_context": _predict_attention_context,
    "attention_generation": _predict_attention_generation,
    "moe_a2a": _predict_moe_a2a,
}


# ---------------------------------------------------------------------------------------------
# e2e serving


def _size(row: dict[str, str], col: str) -> int:
    return _int(row, col, 1)  # blank parallel size = 1 (reference README)


#: Routing draws per ``e2e_serving`` row (precision of the mean, not a fitted value).
E2E_ROUTING_SAMPLES = 4
#: Requests per benchmark run, per unit of concurrency. The table does not record it; its
#: (isl, osl) x concurrency matrix for gpt-oss on vLLM is InferenceMAX's, whose client runs
#: ``--num-prompts $((CONC * 10)) --max-concurrency $CONC`` (InferenceMAX benchmark README,
#: "Benchmark Client Configuration"). The other rows are assumed to follow the same protocol.
E2E_REQUESTS_PER_CONCURRENCY = 10
#: The fitted routing skew of the benchmark traffic (see the file's header).
E2E_TRAFFIC_FILE = Path(__file__).resolve().parent / "e2e_traffic.yaml"


@lru_cache(maxsize=None)
def e2e_traffic_zipf_s() -> Quantity:
    """Zipf exponent of the routing of ``e2e_serving`` traffic, with its source."""
    return Quantity.model_validate(yaml.safe_load(E2E_TRAFFIC_FILE.read_text())["routing_zipf_s"])


def e2e_scenario(row: dict[str, str], hardware: Optional[str] = None,
                 zipf_s: Optional[float] = None) -> dict[str, Any]:
    """The scenario dict (``moesim.parse_scenario`` input) of one ``e2e_serving`` row; routing is
    zipf with exponent ``zipf_s`` (default: the fitted :func:`e2e_traffic_zipf_s`)."""
    tp, dp, pp = _size(row, "tp_size"), _size(row, "attention_dp_size"), _size(row, "pp_size")
    ep, moe_tp = _size(row, "moe_ep_size"), _size(row, "moe_tp_size")
    profile = hardware or row.get("system") or ""
    if not profile:
        raise _Unpredictable("no system column value and no --hardware given")
    mode = (row.get("mode") or "agg").strip().lower()
    if mode != "agg":
        raise _Unpredictable(f"mode={mode!r}: only aggregated serving (agg) is modelled")
    dep: dict[str, Any] = {"tp": tp, "attention_dp": dp, "pp": pp, "ep": ep, "moe_tp": moe_tp,
                           "framework": (row.get("backend") or "generic").strip().lower()}
    dep.update(_e2e_dtypes(row, profile))
    return {
        "name": row.get("id") or None,
        "model": row.get("model_path") or "",
        "hardware": {"profile": profile, "num_gpus": tp * dp * pp},
        "deployment": dep,
        "workload": {"batch_size": _int(row, "batch_size"), "input_len": _int(row, "isl"),
                     "output_len": _int(row, "osl"),
                     "num_requests": E2E_REQUESTS_PER_CONCURRENCY * _int(row, "batch_size")},
        # The table does not say how tokens were routed: served traffic is random top-k with a
        # popularity skew fitted once on the dev table (not the perfectly balanced split, which
        # touches every expert even at batch 1 x top_k = num_experts). Each step's MoE layers
        # draw independently, so a few draws give the mean step time to about a percent.
        "routing": {"distribution": "zipf", "samples": E2E_ROUTING_SAMPLES,
                    "s": e2e_traffic_zipf_s().value if zipf_s is None else zipf_s},
    }


def _e2e_dtypes(row: dict[str, str], profile: str) -> dict[str, str]:
    """Deployment dtypes of an ``e2e_serving`` row.

    A quantised checkpoint is served as published (the quant-mode labels name the engine's
    kernel family, README; e.g. gpt-oss-120b keeps MXFP4 experts and bf16 attention whether a row
    says fp4, nvfp4 or fp8): weights = the preset's ``checkpoint_dtype`` /
    ``checkpoint_expert_dtype``. A bf16 checkpoint is quantised online as the labels say
    (``gemm_quant_mode`` for dense / attention weights, ``moe_quant_mode`` for experts): fp8_block
    = 128x128 block-scaled fp8, fp8 = per-tensor fp8, fp4 / nvfp4 / mxfp4 = nvfp4 on a GPU with
    fp4 tensor cores, else weight-only mxfp4 experts (dense weights stay bf16). Activations are
    fp8 when the dense weights are fp8 (the engines' w8a8 kernels), nvfp4 with nvfp4 weights,
    else bf16. The KV cache is
    left at bf16 (the table does not say)."""
    gemm_q = (row.get("gemm_quant_mode") or row.get("precision") or "bf16").strip().lower()
    moe_q = (row.get("moe_quant_mode") or gemm_q).strip().lower()
    try:
        fp4_cores = _has_fp4(profile)
    except InputError as exc:
        raise _Unpredictable(f"hardware {profile!r}: {exc.message}") from None

    def from_label(label: str, experts: bool) -> str:
        if label in ("fp4", "nvfp4", "mxfp4", "w4a16_mxfp4"):
            if fp4_cores:
                return "nvfp4"
            return "mxfp4" if experts else "bf16"
        if label in ("fp8_block", "fp8"):
            return label
        if label in ("", "bf16", "bfloat16", "fp16", "float16", "none"):
            return "bf16"
        raise _Unpredictable(f"quant mode {label!r} has no dtype mapping")

    ckpt = _checkpoint_dtypes(row.get("model_path") or "")
    if ckpt is not None and (ckpt[0] not in _UNQUANTISED or ckpt[1] not in (None, *_UNQUANTISED)):
        weight, experts = ckpt[0], ckpt[1] or ckpt[0]
    else:
        weight, experts = from_label(gemm_q, False), from_label(moe_q, True)
    act = {"nvfp4": "nvfp4", "fp8": "fp8", "fp8_block": "fp8"}.get(weight, "bf16")
    return {"weight_dtype": weight, "expert_weight_dtype": experts, "activation_dtype": act}


_UNQUANTISED = ("bf16", "fp16", "fp32")


@lru_cache(maxsize=None)
def _checkpoint_dtypes(model_ref: str) -> Optional[tuple[str, Optional[str]]]:
    """(checkpoint dtype, expert dtype or None) of a model reference; None if it does not load
    (the scenario then reports why)."""
    from .spec.presets import load_model

    try:
        m = load_model(model_ref, field="model")
    except InputError:
        return None
    return m.checkpoint_dtype, m.checkpoint_expert_dtype


@lru_cache(maxsize=None)
def _has_fp4(profile: str) -> bool:
    from .spec.hardware import load_profile

    return load_profile(profile).compute.peak_dense_tflops.fp4 is not None


def _predict_e2e(row: dict[str, str], hardware: Optional[str]) -> tuple[float, float]:
    from . import parse_scenario, predict

    data = e2e_scenario(row, hardware)
    try:
        sc = parse_scenario(data)
    except InputError as exc:
        raise _Unpredictable(f"scenario rejected: {exc.one_line()}") from None
    p = predict(sc)
    return p.ttft_ms, p.tpot_ms


# ---------------------------------------------------------------------------------------------
# Statistics and grouping


def _stats(ape: list[float], ratio: list[float]) -> dict[str, Any]:
    if not ape:
        return {"n": 0}
    a = np.asarray(ape, dtype=np.float64)
    r = np.asarray(ratio, dtype=np.float64)
    return {"n": int(a.size), "median_ape_pct": float(np.median(a)),
            "p90_ape_pct": float(np.percentile(a, 90)), "mean_ape_pct": float(a.mean()),
            "max_ape_pct": float(a.max()),
            # < 1: the model predicts too little; > 1: too much (median of predicted/measured)
            "median_pred_over_meas": float(np.median(r))}


def ape_pct(predicted: float, measured: float) -> float:
    """Absolute percentage error of ``predicted`` against ``measured`` (> 0)."""
    return abs(predicted - measured) / measured * 100.0


def _group_keys(layout: str, row: dict[str, str]) -> dict[str, str]:
    """The groups a row's error is reported under."""
    g = row.get
    if layout == "gemm":
        return {"kernel": g("kernel") or "-", "dtype": g("dtype") or "-",
                "m_band": _band_of(row, "m")}
    if layout == "moe":
        shape = "H{}/I{}/E{}/k{}".format(g("hidden_size"), g("inter_size"), g("num_experts"),
                                          g("topk"))
        return {"kernel": g("kernel") or "-", "dtype": g("dtype") or "-",
                "token_band": _band_of(row, "num_tokens"),
                "distribution": g("distribution") or "-", "moe_ep": g("moe_ep") or "1",
                "moe_tp": g("moe_tp") or "1", "shape": shape}
    if layout in ("collective", "allreduce_custom"):
        out = {"op": g("op") or "-", "num_gpus": g("num_gpus") or "-",
               "size_band": _byte_band_of(row, "message_bytes")}
        if layout == "allreduce_custom":
            out = {"kernel": g("kernel") or "-", **out}
        else:
            out["dtype"] = g("dtype") or "-"
        return out
    if layout in ("attention_context", "attention_generation"):
        win = g("window_size") or "0"
        out = {"kv_cache_dtype": g("kv_cache_dtype") or "-",
               "window": "full" if win in ("", "0") else "sliding",
               "head_dim": g("head_dim") or "-"}
        try:
            if layout == "attention_context":
                out["token_band"] = token_band(int(g("batch_size")) * int(g("seq_len")))
            else:
                out["batch_band"] = token_band(int(g("batch_size")))
                out["kv_len_band"] = token_band(int(g("kv_len")) + 1)
        except (TypeError, ValueError):
            pass
        return out
    if layout == "moe_a2a":
        return {"comm_backend": g("comm_backend") or "-", "phase": g("phase") or "-",
                "token_band": _band_of(row, "num_tokens"), "hidden_size": g("hidden_size") or "-"}
    if layout == "e2e_serving":
        dp = g("attention_dp_size") or "1"
        return {"model": g("model_path") or "-", "backend": g("backend") or "-",
                "precision": g("precision") or "-",
                "parallel": f"tp{g('tp_size') or 1}/dp{dp}/ep{g('moe_ep_size') or 1}",
                "isl": g("isl") or "-", "batch_band": _band_of(row, "batch_size")}
    return {}


def _band_of(row: dict[str, str], col: str) -> str:
    try:
        return token_band(float(row.get(col) or "nan"))
    except (TypeError, ValueError, AssertionError):
        return "-"


def _byte_band_of(row: dict[str, str], col: str) -> str:
    try:
        return byte_band(float(row.get(col) or "nan"))
    except (TypeError, ValueError, AssertionError):
        return "-"


# ---------------------------------------------------------------------------------------------
# Driver


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:.6g}"


#: Rows listed by their error in the report (all of them are in ``--out``).
WORST_ROWS = 10


def run(table_path: str, hardware: Optional[str] = None, out: Optional[str] = None,
        as_json: bool = False, time_unit: Optional[str] = None) -> ValidationResult:
    """Predict every row of ``table_path`` and summarise the errors.

    ``hardware``: profile id or path used for every row (default: each row's ``system``);
    ``out``: write every row with its prediction and error columns to this CSV; ``as_json``:
    ``text`` is the summary as JSON instead of the human report; ``time_unit``: the unit of the
    ``latency_us`` column (``us`` default, ``ns``, ``ms``; see the module docstring)."""
    columns, rows = _read_table(table_path)
    layout = detect_layout(columns, rows)
    hws = _Hardware(hardware)
    e2e = layout == "e2e_serving"
    scale = _time_scale(layout, rows, hws, time_unit)
    metrics = ("ttft", "tpot") if e2e else ("latency",)
    measured_col = {"ttft": "silicon_ttft_ms", "tpot": "silicon_tpot_ms", "latency": "latency_us"}
    pred_col = {"ttft": "predicted_ttft_ms", "tpot": "predicted_tpot_ms",
                "latency": "predicted_us"}
    ape_col = {"ttft": "ttft_ape_pct", "tpot": "tpot_ape_pct", "latency": "ape_pct"}
    extra_cols = [c for m in metrics for c in (pred_col[m], ape_col[m])]
    if layout == "moe":
        extra_cols += ["pred_draw_min_us", "pred_draw_max_us"]
    extra_cols.append("unpredicted_reason")
    state_unit = not e2e and (layout == "moe_a2a" or time_unit not in (None, "us"))
    if state_unit:  # the CSV says how latency_us was read
        extra_cols += ["latency_unit", "measured_us"]
    out_columns = list(columns) + [c for c in extra_cols if c not in columns]

    ape: dict[str, list[float]] = {m: [] for m in metrics}
    ratio: dict[str, list[float]] = {m: [] for m in metrics}
    groups: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {m: {} for m in metrics}
    unpredicted: list[dict[str, Any]] = []
    out_rows: list[dict[str, Any]] = []
    errors: dict[str, list[dict[str, Any]]] = {m: [] for m in metrics}  # for the worst rows
    predictor = KERNEL_PREDICTORS.get(layout)

    for idx, row in enumerate(rows):
        out_row: dict[str, Any] = dict(row)
        for c in extra_cols:
            out_row[c] = ""
        if state_unit:
            out_row["latency_unit"] = time_unit or "us"
            try:
                out_row["measured_us"] = _fmt(_float(row, "latency_us") * scale)
            except _Unpredictable:
                pass
        preds: dict[str, float] = {}
        try:
            if e2e:
                preds["ttft"], preds["tpot"] = _predict_e2e(row, hardware)
            else:
                assert predictor is not None
                res = predictor(row, hws)
                if layout == "moe":
                    _, preds["latency"], lo, hi = _median_draw(res)
                    out_row["pred_draw_min_us"], out_row["pred_draw_max_us"] = _fmt(lo), _fmt(hi)
                else:
                    preds["latency"] = eager_time_us(res)
            for m, v in preds.items():
                if not math.isfinite(v) or v < 0:
                    raise _Unpredictable(f"the cost model returned {v!r} for {m}")
        except _Unpredictable as exc:
            reason = str(exc)
            out_row["unpredicted_reason"] = reason
            unpredicted.append({"row": idx, "reason": reason})
            out_rows.append(out_row)
            continue
        keys = _group_keys(layout, row)
        notes = []
        for m in metrics:
            out_row[pred_col[m]] = _fmt(preds[m])
            try:
                meas = _float(row, measured_col[m]) * (1.0 if e2e else scale)
            except _Unpredictable as exc:
                notes.append(f"{m}: {exc}")
                continue
            if meas <= 0:
                notes.append(f"{m}: measured value {meas} is not positive")
                continue
            e = ape_pct(preds[m], meas)
            out_row[ape_col[m]] = _fmt(e)
            ape[m].append(e)
            ratio[m].append(preds[m] / meas)
            errors[m].append({"row": idx, "label": row.get("id") or ", ".join(
                f"{k}={v}" for k, v in keys.items()), "measured": meas,
                "predicted": preds[m], "ape_pct": e})
            for gname, gval in keys.items():
                cell = groups[m].setdefault(gname, {}).setdefault(gval, {"ape": [], "ratio": []})
                cell["ape"].append(e)
                cell["ratio"].append(preds[m] / meas)
        if notes:
            reason = "no error computed: " + "; ".join(notes)
            out_row["unpredicted_reason"] = reason
            if len(notes) == len(metrics):
                unpredicted.append({"row": idx, "reason": reason})
        out_rows.append(out_row)

    reasons: dict[str, int] = {}
    for u in unpredicted:
        reasons[u["reason"]] = reasons.get(u["reason"], 0) + 1
    summary: dict[str, Any] = {
        "table": str(table_path),
        "layout": layout,
        "hardware": [hardware] if hardware else sorted({r.get("system", "") for r in rows} - {""}),
        "rows": len(rows),
        "latency_unit": None if e2e else _unit_label(time_unit),
        "predicted": len(rows) - len(unpredicted),
        "unpredicted": len(unpredicted),
        "unpredicted_reasons": reasons,
        "unpredicted_rows": unpredicted,
        "metrics": {m: _stats(ape[m], ratio[m]) for m in metrics},
        "groups": {m: {g: {v: _stats(c["ape"], c["ratio"])
                           for v, c in sorted(vals.items(), key=lambda kv: _band_order(kv[0]))}
                       for g, vals in groups[m].items()} for m in metrics},
        "warnings": _warnings(layout, {m: _stats(ape[m], ratio[m]) for m in metrics}),
        "worst_rows": {m: sorted(errors[m], key=lambda x: -x["ape_pct"])[:WORST_ROWS]
                       for m in metrics},
    }
    if layout == "moe":
        summary["power_law_draws"] = POWER_LAW_DRAWS
    if out:
        _write_rows(out, out_columns, out_rows)
    text = json.dumps(summary, indent=2) if as_json else _report(summary)
    return ValidationResult(str(table_path), layout, text, summary, out_rows, out_columns)


def _warnings(layout: str, stats: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for m, s in stats.items():
        r = s.get("median_pred_over_meas")
        if r is not None and (r < 1e-2 or r > 1e2):
            out.append(f"{m}: predictions are {r:.3g}x the measurements at the median - more "
                       "than 100x off suggests the table's unit is not the one its column names "
                       "(e.g. ns in a *_us column)")
    return out


def _write_rows(path: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
    try:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    except OSError as exc:
        raise InputError("out", f"cannot write {path}: {exc.strerror}",
                         "give a writable file path") from None


def _report(s: dict[str, Any]) -> str:
    lines = [f"table     {s['table']}",
             f"layout    {s['layout']}",
             f"hardware  {', '.join(s['hardware']) or '-'}",
             f"rows      {s['rows']}  predicted {s['predicted']}  unpredicted {s['unpredicted']}"]
    if s.get("latency_unit"):
        lines.append(f"unit      latency_us read as {s['latency_unit']}")
    if s["layout"] == "moe":
        lines.append(f"power-law rows: median prediction over {s['power_law_draws']} routing draws")
    head = f"  {'group':<34}{'n':>7}{'median APE':>12}{'p90 APE':>10}{'pred/meas':>11}"

    def line(name: str, st: dict[str, Any]) -> str:
        if not st.get("n"):
            return f"  {name:<34}{0:>7}{'-':>12}{'-':>10}{'-':>11}"
        return (f"  {name[:34]:<34}{st['n']:>7}{st['median_ape_pct']:>11.1f}%"
                f"{st['p90_ape_pct']:>9.1f}%{st['median_pred_over_meas']:>11.3g}")

    for m, st in s["metrics"].items():
        lines += ["", f"{m} (absolute percentage error; pred/meas = median predicted/measured)",
                  head, line("all", st)]
        for g, vals in s["groups"][m].items():
            lines.append(f"  by {g}:")
            for v, gst in vals.items():
                lines.append(line("  " + v, gst))
    for m, worst in s.get("worst_rows", {}).items():
        if not worst:
            continue
        lines += ["", f"{m}: the {len(worst)} worst rows (row = 0-based data row)"]
        for w in worst:
            lines.append(f"  {w['row']:>6}  measured {w['measured']:>11.4g}  predicted "
                         f"{w['predicted']:>11.4g}  APE {w['ape_pct']:7.1f}%  {w['label']}")
    if s["unpredicted"]:
        lines += ["", f"unpredicted rows ({s['unpredicted']}), by reason (row = 0-based data row; "
                  "CSV line = row + 2):"]
        for reason, n in sorted(s["unpredicted_reasons"].items(), key=lambda kv: -kv[1]):
            rows = [u["row"] for u in s["unpredicted_rows"] if u["reason"] == reason]
            shown = ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
            lines.append(f"  {n:>6}  {reason}  (rows {shown})")
    for w in s["warnings"]:
        lines += ["", f"warning: {w}"]
    return "\n".join(lines)


def _time_scale(layout: str, rows: list[dict[str, str]], hws: _Hardware,
                time_unit: Optional[str]) -> float:
    """µs per unit of the ``latency_us`` column, after the plausibility check of a moe_a2a
    table; bad ``time_unit`` or an e2e table with one: :class:`InputError`."""
    if time_unit is None:
        scale = 1.0
    elif time_unit not in TIME_UNITS:
        raise InputError("time_unit", f"unknown unit {time_unit!r}",
                         f"valid: {', '.join(TIME_UNITS)}")
    elif layout == "e2e_serving":
        raise InputError("time_unit", "e2e_serving tables have ms columns, not latency_us",
                         "drop --time-unit")
    else:
        scale = TIME_UNITS[time_unit]
    if layout == "moe_a2a":
        check_a2a_unit(rows, hws, time_unit)
    return scale


def table_ops(table_path: str, hardware: Optional[str] = None, time_unit: Optional[str] = None,
              calibrated: bool = True
              ) -> tuple[str, list[dict[str, str]], list[list], list[float]]:
    """For calibration: (layout, rows, the op list predicting each row, measured µs) of every
    predictable kernel-table row; moe rows use their median routing draw. Same predictors as
    :func:`run`, so a fit on these ops is a fit of the predictions ``validate`` reports.
    ``time_unit``: as in :func:`run` (the measured values are returned in µs). ``calibrated``:
    build the ops on the profiles with their calibrated overlays (False: on the base profiles,
    so that a fit does not depend on the overlay it replaces)."""
    columns, rows = _read_table(table_path)
    layout = detect_layout(columns, rows)
    predictor = KERNEL_PREDICTORS.get(layout)
    if predictor is None:
        raise InputError("table", f"{layout} tables have no per-kernel ops to fit",
                         "give a kernel table (gemm, moe, collective, attention, ...)")
    hws = _Hardware(hardware, calibrated)
    hws.for_fit = True
    scale = _time_scale(layout, rows, hws, time_unit)
    kept, ops_list, measured = [], [], []
    for row in rows:
        try:
            res = predictor(row, hws)
            meas = _float(row, "latency_us") * scale
        except _Unpredictable:
            continue
        ops = _median_draw(res)[0] if layout == "moe" else res
        if meas > 0:
            kept.append(row)
            ops_list.append(ops)
            measured.append(meas)
    return layout, kept, ops_list, measured
