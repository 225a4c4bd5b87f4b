"""examples/*.py: each corrected seed listing runs as a script and trains."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["cnn", "rnn", "lstm", "attention"])
def test_example_script_trains_a_few_steps(name):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--steps", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(v) for v in re.findall(r"^step \d+: loss (\S+)", result.stdout, flags=re.MULTILINE)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), result.stdout
    if name == "attention":
        weights = re.search(r"attention over the 20 steps of sequence 0: (.*)", result.stdout).group(1).split()
        assert len(weights) == 20 and abs(sum(map(float, weights)) - 1) < 0.05
