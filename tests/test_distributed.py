"""Several training processes on CPU (gloo): data-parallel for real, or a clear stop.

Proves: the launch section becomes the right torchrun / accelerate command (CUT_ALIGN_LAUNCHER
still wins); two processes launched by the train task (tasks/train.py, the flow's path) print
exactly one summary, take ceil(records / global batch) steps and log the losses of a
one-process run at the same global batch (the last, short global batch included, which is
filled with weight-0 records); a 2-process run SIGKILLed after a checkpoint resumes to the same
losses; a run declared with 2 processes but started alone stops before any work with a
one-line error and is not retried.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cut_core.train import cli as train_cli
from cut_core.dsl import Launch
from cut_core.train.launch import launch_command
from tasks.train import TrainingConfigError, launch_training
from test_trainer import assert_same_history, config_for, history, make_rows, model_dir, write_examples  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_launch_section_becomes_the_command(monkeypatch, tmp_path):
    monkeypatch.delenv("CUT_ALIGN_LAUNCHER", raising=False)
    cfg = tmp_path / "c.json"
    assert launch_command(cfg, None, python="py") == ["py", "-m", "cut_core.train.cli", str(cfg)]
    assert launch_command(cfg, Launch(processes=4), python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "cut_core.train.cli", str(cfg)]
    assert launch_command(cfg, Launch(processes=2, accelerate_config="/c/fsdp2.yaml"), python="py") == [
        "py", "-m", "accelerate.commands.launch", "--config_file", "/c/fsdp2.yaml", "--num_processes", "2",
        "-m", "cut_core.train.cli", str(cfg)]
    monkeypatch.setenv("CUT_ALIGN_LAUNCHER", "torchrun --nnodes 2 --node-rank 1")
    assert launch_command(cfg, Launch(processes=4))[:5] == ["torchrun", "--nnodes", "2", "--node-rank", "1"]


def _config(model_dir, examples, out, *, micro, accumulation, **extra):
    cfg = config_for(model_dir, examples, out, micro_batch_size=micro, gradient_accumulation=accumulation,
                     **{"save_steps": 1, **extra})
    cfg["adapter"]["dropout"] = 0.0  # dropout draws differ between 1 and 2 processes; the data must not
    cfg.pop("max_steps")
    return cfg


@pytest.mark.slow
def test_two_processes_train_one_model_with_the_single_process_losses(model_dir, tmp_path):
    records = 13  # a short last global batch: 13 = 8 + 5, filled up to 8 on two processes
    examples = write_examples(tmp_path / "examples.parquet", make_rows(records, seed=3))
    one = train_cli.run(_config(model_dir, examples, tmp_path / "one", micro=2, accumulation=4))
    lines = []
    two = launch_training(_config(model_dir, examples, tmp_path / "two", micro=2, accumulation=2),
                          tmp_path / "two", launch=Launch(processes=2), log=lines.append, poll_s=0.5)
    assert one["steps"] == math.ceil(records / 8) == len(two["history"])
    assert_same_history(history(tmp_path / "two"), history(tmp_path / "one"),
                        keys=("loss", "nll", "ut", "flagged_fraction", "learning_rate", "grad_norm"))
    summaries = [ln for ln in (tmp_path / "two/train.log").read_text().splitlines() if ln.startswith('{"output_dir"')]
    assert len(summaries) == 1, summaries
    summary = json.loads(summaries[0])
    assert summary["processes"] == 2 and summary["records"] == records and summary["steps"] == 2
    assert any("torchrun, 2 processes" in ln for ln in lines)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_to_the_same_losses(model_dir, tmp_path):
    examples = write_examples(tmp_path / "examples.parquet", make_rows(120, seed=6))  # 15 steps of 8
    train_cli.run(_config(model_dir, examples, tmp_path / "ref", micro=2, accumulation=4, save_steps=2))
    out = tmp_path / "run"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**_config(model_dir, examples, out, micro=2, accumulation=2, save_steps=2),
                                       "processes": 2}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("CUT_ALIGN_LAUNCHER", None)
    command = launch_command(config_path, Launch(processes=2))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/checkpoint-*/COMPLETE")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    # The launcher and both workers, as a lost node would (torchrun starts workers in their own sessions).
    import psutil

    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        victim.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert not (out / "COMPLETE").exists(), "the run ended before it could be killed: " + err.decode()[-2000:]
    assert list(out.glob("checkpoints/checkpoint-*/COMPLETE")), err.decode()[-3000:]

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [ln for ln in done.stdout.splitlines() if ln.startswith('{"output_dir"')]
    assert len(summaries) == 1
    assert json.loads(summaries[0])["resumed_from"] is not None
    assert_same_history(history(out), history(tmp_path / "ref"))


def test_declared_processes_without_a_group_stop_before_any_work(model_dir, tmp_path, monkeypatch):
    """launch.processes=2 but the launcher started one lone process (here: CUT_ALIGN_LAUNCHER is
    plain python): exit code 3, one line naming the fix, no checkpoint, and no retry."""
    examples = write_examples(tmp_path / "examples.parquet", make_rows(4))
    monkeypatch.delenv("CUT_ALIGN_LAUNCHER", raising=False)
    out = tmp_path / "run"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**_config(model_dir, examples, out, micro=2, accumulation=1), "processes": 2}))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "CUT_ALIGN_LAUNCHER")}
    done = subprocess.run([sys.executable, "-m", "cut_core.train.cli", str(config_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == train_cli.USER_ERROR
    assert done.stderr.strip().splitlines()[-1].startswith("error: launch.processes=2")
    assert "Traceback" not in done.stderr
    assert not (out / "checkpoints").exists()

    # Through the train task's launcher: the same refusal becomes a TrainingConfigError (not retried).
    monkeypatch.setenv("CUT_ALIGN_LAUNCHER", sys.executable)
    with pytest.raises(TrainingConfigError, match="launch.processes=2"):
        launch_training({**_config(model_dir, examples, out, micro=2, accumulation=1), "processes": 2}, out,
                        launch=None, poll_s=0.2)
