"""Calibration microbenchmarks (and, later, fitting) for moesim.

This package is the only part of the repo that imports torch / triton, and it does so lazily:
importing ``calibration`` or ``calibration.cli`` / ``calibration.layouts`` needs neither.
Entry point: ``python -m calibration run --device cpu|cuda [--quick] --out DIR``; see README.md.
"""
