"""bench/gpu.py's reduced mode runs end to end on CPU and prints its one JSON line.

The full mode needs one CUDA GPU (a Qwen2-1.5B-like model); this proves the script, its FLOP
counting and every variant (LoRA / full fine-tuning x fused / materialized x gradient
checkpointing on / off, generation) work, so a GPU run is one command.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_cpu_smoke_prints_every_variant():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--cpu-smoke"], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "cpu_smoke"
    assert set(result["steps"]) == {f"{k}_{p}_{g}" for k in ("lora", "full") for p in ("fused", "materialized")
                                    for g in ("gc", "nogc")}
    for key, step in result["steps"].items():
        assert step["tokens_per_s"] > 0 and step["tflops_per_s"] > 0, key
        assert step["mfu"] is None                       # no peak FLOP/s is claimed for a CPU
    assert result["generated_tokens"] == 4 * 8 and result["generation_tokens_per_s"] > 0
