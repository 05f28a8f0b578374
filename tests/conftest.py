from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m moesim`` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture
def scenario_dict() -> dict:
    return json.loads((ROOT / "examples" / "mixtral-8x7b_2xh100_tp2.json").read_text())
