"""The train task: launches `python -m cut_core.train_cli` in a subprocess.

Why a subprocess: a Prefect timeout cannot stop a thread, a crashed CUDA context cannot take
the orchestrator down with it, and the same command line scales out under `torchrun` or
`accelerate launch` (set CUT_ALIGN_LAUNCHER, e.g. "torchrun --nproc-per-node 4").
The subprocess writes checkpoints with completion markers; launching it again on the same
output folder resumes from the last complete checkpoint, or does nothing if it finished.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger


def train_command(config_path: Path) -> list[str]:
    launcher = os.environ.get("CUT_ALIGN_LAUNCHER")
    if launcher:
        return [*shlex.split(launcher), "-m", "cut_core.train_cli", str(config_path)]
    return [sys.executable, "-m", "cut_core.train_cli", str(config_path)]


def launch_training(config: dict, output_dir: Path, *, timeout_s: float | None = None,
                    log=print) -> dict:
    """Run training to completion in a subprocess; return the summary it wrote."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(output_dir)}
    config_path = output_dir / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = output_dir / "train.log"
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "a") as log_file:
        proc = subprocess.run(train_command(config_path), stdout=log_file, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"training subprocess failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    if not (output_dir / "COMPLETE").exists():
        raise RuntimeError(f"training exited 0 but wrote no COMPLETE marker in {output_dir}")
    history = []
    history_path = output_dir / "log_history.jsonl"
    if history_path.exists():
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    log(f"training finished: {len(history)} logged steps -> {output_dir}")
    return {"output_dir": str(output_dir), "merged": str(output_dir / "merged"),
            "adapter": str(output_dir / "adapter") if (output_dir / "adapter").exists() else None,
            "history": history}


@task(name="train", retries=1, retry_delay_seconds=5)
def train(config: dict, output_dir: str, timeout_s: float | None = None) -> dict:
    """Retried once: a relaunch resumes from the last complete checkpoint, not from scratch."""
    logger = get_run_logger()
    return launch_training(config, Path(output_dir), timeout_s=timeout_s, log=logger.info)
