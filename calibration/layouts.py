"""CSV layouts written by ``python -m calibration run``.

The first four are the layouts of the reference measurements
(``../shared/reference/measurements/h100_sxm/<layout>.csv``): same column names, same order, so the
fitting code can read calibration output and reference data with one reader. The others are new
layouts defined here (documented in ``calibration/README.md``).

This module imports neither torch nor triton (the ``fit`` sub-command may use it without them).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

PREFIX = ("system", "gpu", "framework", "framework_version")

#: layout name -> exact header; those in REFERENCE_LAYOUTS equal the reference files' headers.
LAYOUTS: dict[str, tuple[str, ...]] = {
    # reference layouts (copied from ../shared/reference/measurements/h100_sxm/*.csv)
    "gemm": PREFIX + ("kernel", "dtype", "m", "n", "k", "latency_us"),
    "moe": PREFIX + ("kernel", "dtype", "num_tokens", "hidden_size", "inter_size", "num_experts",
                     "topk", "moe_tp", "moe_ep", "distribution", "latency_us"),
    "collective": ("system", "gpu", "library", "library_version", "op", "dtype", "num_gpus",
                   "message_bytes", "latency_us"),
    # new layouts (calibration only)
    "launch": PREFIX + ("kernel", "mode", "num_kernels", "latency_us"),
    "stream": PREFIX + ("kernel", "bytes", "latency_us"),
    "router": PREFIX + ("kernel", "dtype", "num_tokens", "hidden_size", "num_experts", "topk",
                        "latency_us"),
    "elementwise": PREFIX + ("kernel", "dtype", "num_rows", "row_size", "topk", "bytes_moved",
                             "latency_us"),
}

#: layouts whose header is defined by the reference measurements folder
REFERENCE_LAYOUTS = ("gemm", "moe", "collective")


def reference_header(layout: str, reference_dir: str | Path) -> tuple[str, ...] | None:
    """Header of ``<reference_dir>/<layout>.csv`` or None when that file does not exist."""
    path = Path(reference_dir) / f"{layout}.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return tuple(next(csv.reader(f)))


def _fmt(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite value {value!r}")
        return f"{value:.4f}"
    return str(value)


class CsvSink:
    """Writes rows of one layout to ``<out>/<layout>.csv`` (header written on the first row, file
    flushed after every row so an interrupted run keeps what it measured)."""

    def __init__(self, out_dir: Path, layout: str):
        self.layout = layout
        self.columns = LAYOUTS[layout]
        self.path = Path(out_dir) / f"{layout}.csv"
        self._file = None
        self._writer = None
        self.rows = 0

    def write(self, row: dict) -> None:
        missing = [c for c in self.columns if c not in row]
        extra = [c for c in row if c not in self.columns]
        if missing or extra:
            raise ValueError(f"{self.layout}: row columns missing {missing}, unexpected {extra}")
        if self._file is None:
            self._file = self.path.open("w", newline="")
            self._writer = csv.writer(self._file, lineterminator="\n")
            self._writer.writerow(self.columns)
        self._writer.writerow([_fmt(row[c]) for c in self.columns])
        self._file.flush()
        self.rows += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
