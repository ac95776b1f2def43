"""An evaluation's model load on CUDA goes straight to the GPU: the process's CPU memory grows
by well under the model's size (bench/cuda_load.py measures it; skipped without CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "cuda_load.py"


def test_a_cuda_load_keeps_cpu_rss_below_the_models_size(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH.parent))
    from cuda_load import build

    # 2.4 GB in bf16: well above what CUDA and cuBLAS themselves add to RSS (about 0.45 GB)
    folder = build(tmp_path / "model", 1.2e9)
    out = subprocess.run(
        [sys.executable, str(BENCH), "--dir", str(folder), "--measure", "device_map"],
        capture_output=True,
        text=True,
        cwd=BENCH.parents[1],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["peak_anon_over_model"] < 0.5, figures
    assert figures["after_rss_over_model"] < 0.5, figures
