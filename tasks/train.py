"""The train task: launches `python -m cut_core.train.cli` in a subprocess.

Why a subprocess: a Prefect timeout cannot stop a thread, a crashed CUDA context cannot take
the orchestrator down with it, and the same command line scales out under `torchrun` or
`accelerate launch` (the declaration's `launch` section, or CUT_ALIGN_LAUNCHER: cut_core/train/launch.py).
The subprocess writes checkpoints with completion markers; launching it again on the same
output folder resumes from the last complete checkpoint, or does nothing if it finished.
A deterministic error (exit code USER_ERROR: a bad config, LoRA targets that match nothing,
processes that form no group) is raised as TrainingConfigError and never retried.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from prefect import task

from cut_core.errors import UserError
from cut_core.files import write_text_atomic
from cut_core.train.launch import LAUNCHER_ENV, describe, launch_command
from cut_core.train.cli import USER_ERROR
from tasks.logs import task_logger

HISTORY, PROGRESS = "log_history.jsonl", "progress.json"
# Where the rows already handed on are counted: a relaunch (retry, resume) does not repeat them.
STREAMED = "history_streamed.json"


class HistoryStreamer:
    """Hands each new row of a training run's log_history.jsonl to `on_rows`, each step once.

    The file is re-read whole at every poll (it is small, and the subprocess rewrites it on a
    resume and at the end); a row counts once its line is complete. The last step handed on is
    kept in `STREAMED` beside it, so a relaunched run (a retry, a resume from a checkpoint) hands
    on only steps after it: the steps it replays from its checkpoint were handed on before.
    """

    def __init__(self, output_dir: Path, on_rows: Callable[[list[dict]], None]):
        self.history, self.cursor_path, self.on_rows = output_dir / HISTORY, output_dir / STREAMED, on_rows
        self.last_step = json.loads(self.cursor_path.read_text())["step"] if self.cursor_path.exists() else 0

    def poll(self) -> int:
        """Hand on the new complete rows; returns how many."""
        if not self.history.exists():
            return 0
        text = self.history.read_text()
        rows = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n") or not line.strip():
                continue  # a line still being written
            row = json.loads(line)
            if row.get("step", 0) > self.last_step and (not rows or row["step"] > rows[-1]["step"]):
                rows.append(row)
        if rows:
            self.on_rows(rows)
            self.last_step = rows[-1]["step"]
            write_text_atomic(self.cursor_path, json.dumps({"step": self.last_step}))
        return len(rows)


def progress_line(progress: dict) -> str:
    """'train: step 40/120 (33%), 1830 tokens/s, ETA 2m10s' from a progress.json."""
    step, total = progress.get("step", 0), progress.get("max_steps") or 0
    parts = [f"train: step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "")]
    if progress.get("tokens_per_s") is not None:
        parts.append(f"{progress['tokens_per_s']:.0f} tokens/s")
    elif progress.get("steps_per_s"):
        parts.append(f"{progress['steps_per_s']:.2f} steps/s")
    eta = progress.get("eta_s")
    if eta is not None:
        parts.append(f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
    return ", ".join(parts)


def watch(proc: subprocess.Popen, output_dir: Path, *, streamer: HistoryStreamer | None, log, timeout_s: float | None,
          poll_s: float, progress_every_s: float | None) -> int:
    """Wait for the subprocess, streaming history rows and logging progress; kill it past timeout_s."""
    every = float(os.environ.get("CUT_ALIGN_PROGRESS_S", "30")) if progress_every_s is None else progress_every_s
    started = last_progress = time.monotonic()
    last_line = None
    while True:
        try:
            proc.wait(timeout=poll_s)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        if streamer is not None:
            streamer.poll()
        now = time.monotonic()
        if now - last_progress >= every or finished:
            last_progress = now
            progress_path = output_dir / PROGRESS
            try:
                line = progress_line(json.loads(progress_path.read_text())) if progress_path.exists() else None
            except (OSError, ValueError):
                line = None  # replaced while read: next time
            if line and line != last_line:
                log(line)
                last_line = line
        if finished:
            return proc.returncode
        if timeout_s is not None and now - started > timeout_s:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(proc.args, timeout_s)


class TrainingConfigError(UserError):
    """The training subprocess refused its input (exit code USER_ERROR): retrying cannot help."""


def _last_error_line(log_path: Path) -> str:
    """The subprocess's own one-line verdict ('error: ...'), the last one in its log."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("error: ")]
    return lines[-1][len("error: "):] if lines else f"training refused its configuration; see {log_path}"


def launch_training(config: dict, output_dir: Path, *, launch=None, timeout_s: float | None = None,
                    log=print, on_rows: Callable[[list[dict]], None] | None = None, poll_s: float | None = None,
                    progress_every_s: float | None = None) -> dict:
    """Run training to completion in a subprocess; return the summary it wrote.

    While it runs: every `poll_s` (default $CUT_ALIGN_POLL_S or 2 s), new rows of its log_history.jsonl go to `on_rows` (each step
    once, across relaunches: see HistoryStreamer), and every `progress_every_s` (default
    $CUT_ALIGN_PROGRESS_S or 30 s) its progress.json becomes one `log` line: steps done / total,
    tokens/s, ETA. `launch`: a dsl.Launch (processes, accelerate config), None for one process."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "output_dir": str(output_dir)}
    if launch is not None and not os.environ.get(LAUNCHER_ENV):
        config["processes"] = launch.processes  # the subprocess stops if fewer form a group
    config_path = output_dir / "train_config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = output_dir / "train.log"
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    streamer = HistoryStreamer(output_dir, on_rows) if on_rows is not None else None
    with open(log_path, "a") as log_file:
        command = launch_command(config_path, launch)
        log(f"training: {describe(launch)}")
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        poll_s = float(os.environ.get("CUT_ALIGN_POLL_S", "2")) if poll_s is None else poll_s
        watch(proc, output_dir, streamer=streamer, log=log, timeout_s=timeout_s, poll_s=poll_s,
              progress_every_s=progress_every_s)
    if proc.returncode == USER_ERROR:
        raise TrainingConfigError(_last_error_line(log_path))
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


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: a crash is retried (the relaunch resumes), a UserError is not."""
    try:
        state.result(raise_on_failure=True)
    except UserError:
        return False
    except BaseException:  # noqa: BLE001 — any other failure may be transient
        return True
    return True


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train(config: dict, output_dir: str, timeout_s: float | None = None, mlflow_run_id: str | None = None,
          launch_json: str | None = None) -> dict:
    """Retried once after a crash: a relaunch resumes from the last complete checkpoint, not from
    scratch. Never retried for a UserError (the same input would fail the same way).
    `launch_json`: the declaration's dsl.Launch as JSON (processes, accelerate config).

    With `mlflow_run_id`, training metrics stream into that MLflow run while the subprocess runs
    (`train.<key>` at each logged step, each step once, also across a retry or a resumed run)."""
    logger = task_logger(__name__)
    on_rows = None
    if mlflow_run_id:
        import mlflow

        from tasks import tracking

        def on_rows(rows: list[dict]) -> None:
            """All new rows in as few calls as MLflow allows (1000 metrics a batch)."""
            now = int(time.time() * 1000)
            metrics = [mlflow.entities.Metric(f"train.{k}", float(v), now, int(row.get("step") or 0))
                       for row in rows for k, v in row.items()
                       if k != "step" and isinstance(v, (int, float)) and v == v]
            client = tracking.use_store()
            for i in range(0, len(metrics), 1000):
                client.log_batch(mlflow_run_id, metrics=metrics[i:i + 1000])
    from cut_core.dsl import Launch

    launch = Launch.model_validate_json(launch_json) if launch_json else None
    return launch_training(config, Path(output_dir), launch=launch, timeout_s=timeout_s, log=logger.info,
                           on_rows=on_rows)
