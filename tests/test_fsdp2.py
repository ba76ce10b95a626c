"""The CUT step under FSDP2 (torch's fully_shard) on 2 CPU processes with gloo.

accelerate applies FSDP only to GPU runs (a CPU run with pipelines/accelerate/fsdp2.yaml trains
as DDP and says so), so this drives fully_shard directly: each rank scores its share of the
records with CUTTrainer.compute_loss (two forward passes before one backward) on the sharded
model. Proves: the summed loss and every gathered gradient equal the unsharded step on all
records; the fused log-prob path sees the sharded head and uses materialized logits, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import model_dir  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cut_step_under_fsdp2_equals_the_unsharded_step(model_dir):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(REPO / "tests" / "fsdp2_worker.py"), str(model_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["path"]: r for r in (json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{"))}
    assert set(results) == {"materialized", "fused"}
    for r in results.values():
        assert r["loss"] == pytest.approx(r["reference_loss"], rel=1e-5)
        assert r["grad_max_abs_diff"] < 1e-6
    assert "the output head's weight is sharded (FSDP2 DTensor): logits are materialized" in out.stdout + out.stderr
