"""benchmarks/gpu_check.py: where no GPU is visible it says so in one line and exits 0 (issue 22)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_skips_in_one_line_without_a_gpu():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "skipped" in proc.stdout and "no CUDA GPU" in proc.stdout
