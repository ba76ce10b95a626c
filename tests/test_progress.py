"""Live progress (tasks/train.py, cut_core/train/cli.py, tasks/prepare.py).

Proves: MLflow holds training metrics while the training subprocess is still running (a real
subprocess, a real SQLite store polled from the test), every logged step lands exactly once,
and the train task logs progress lines (steps done / total, tokens/s, ETA) read from the
progress.json the subprocess writes; the history streamer hands each step on once across a
relaunch that rewrites and replays the history (a resume); the declared model builder runs as
the prepare-model Prefect task and gets the task's logger for its progress.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.train import HistoryStreamer, progress_line

STEPS = 60


def _examples(path: Path, vocab: int, n: int = 64) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt = [1] + [rng.randrange(4, vocab) for _ in range(rng.randrange(3, 10))]
        response = [rng.randrange(4, vocab) for _ in range(rng.randrange(3, 10))] + [2]
        judged = prompt + [rng.randrange(4, vocab) for _ in range(4)]
        rows += [{"triplet_id": f"t{i}", "kind": "align_n", "input_ids": judged + response, "response_start": len(judged)},
                 {"triplet_id": f"t{i}", "kind": "misalign", "input_ids": prompt + response, "response_start": len(prompt)}]
    schema = pa.schema([("triplet_id", pa.string()), ("kind", pa.string()),
                        ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_mlflow_holds_training_metrics_while_the_subprocess_runs(tmp_path, monkeypatch, caplog):
    from cut_core.models.tiny import make_tiny_model
    from tasks import tracking
    from tasks.train import train

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.setenv("CUT_ALIGN_PROGRESS_S", "0")       # a progress line at every poll that brings news
    monkeypatch.setenv("CUT_ALIGN_POLL_S", "0.05")       # stream rows as they come: an idle machine trains fast
    model = make_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, intermediate_size=64)
    config = {"model_path": str(model), "examples": str(_examples(tmp_path / "ex.parquet", 200)),
              "objective": {"name": "cut", "threshold": 1.1, "alpha": 1.0},
              "adapter": {"r": 2, "alpha": 4, "dropout": 0.0},
              "training": {"learning_rate": 1e-3, "micro_batch_size": 2, "gradient_accumulation": 1,
                           "logging_steps": 1, "save_steps": 1000, "warmup_steps": 0},
              "max_steps": STEPS}
    run_id = tracking.start_run("progress-test", "iteration-1")
    out = tmp_path / "out"
    result: dict = {}

    def training():
        result["trained"] = train.fn(config, str(out), mlflow_run_id=run_id)

    client = tracking.use_store()
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        worker = threading.Thread(target=training)
        worker.start()
        seen_live = None
        deadline = time.monotonic() + 300
        while worker.is_alive() and time.monotonic() < deadline:
            rows = client.get_metric_history(run_id, "train.loss")
            if rows and not (out / "COMPLETE").exists():
                seen_live = (len(rows), max(r.step for r in rows))
                break
            time.sleep(0.2)
        worker.join(timeout=300)
    assert seen_live is not None, "no training metric reached MLflow before training finished"
    assert seen_live[1] < STEPS

    history = result["trained"]["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    losses = client.get_metric_history(run_id, "train.loss")
    assert sorted(r.step for r in losses) == list(range(1, STEPS + 1))      # every step, once
    assert {r.step: r.value for r in losses} == pytest.approx({h["step"]: h["loss"] for h in history})

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    assert lines, caplog.text
    assert any(f"/{STEPS} (" in line and "tokens/s" in line and "ETA" in line for line in lines), lines
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] and progress["step"] == STEPS and progress["tokens_per_s"] > 0


def test_the_streamer_hands_each_step_on_once_across_a_resume(tmp_path):
    history = tmp_path / "log_history.jsonl"
    got: list[int] = []

    def write(steps, partial=False):
        text = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
        history.write_text(text + ('{"step": 99, "lo' if partial else ""))

    streamer = HistoryStreamer(tmp_path, lambda rows: got.extend(r["step"] for r in rows))
    assert streamer.poll() == 0                              # no file yet
    write([1, 2, 3], partial=True)                           # a line still being written is left
    assert streamer.poll() == 3 and got == [1, 2, 3]
    assert streamer.poll() == 0                              # nothing new: nothing again
    # The run dies after step 3; its relaunch resumes from the checkpoint at step 2: the history
    # is cut back to step 2, then the replayed step 3 and a new step 4 are appended.
    write([1, 2])
    relaunched = HistoryStreamer(tmp_path, lambda rows: got.extend(r["step"] for r in rows))
    assert relaunched.poll() == 0
    write([1, 2, 3, 4])
    assert relaunched.poll() == 1 and got == [1, 2, 3, 4]


def test_progress_line_reads_like_a_progress_report():
    assert progress_line({"step": 40, "max_steps": 120, "tokens_per_s": 1830.4, "eta_s": 130}) == \
        "train: step 40/120 (33%), 1830 tokens/s, ETA 2m10s"
    assert progress_line({"step": 1, "max_steps": 0, "steps_per_s": 0.5, "eta_s": None}) == \
        "train: step 1/0, 0.50 steps/s"


# ---------------------------------------------------------------- prepare-model task

def builder(path, log):
    """A model builder for the test: reports progress through `log` and writes a config."""
    path = Path(path)
    path.mkdir(parents=True)
    for step in (1, 2):
        log(f"building step {step}/2")
    (path / "config.json").write_text("{}")
    (path / "built_with_log.txt").write_text("yes")


@pytest.mark.slow
def test_the_model_builder_runs_as_the_prepare_model_task(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from cut_core.dsl import Model, Pipeline
    from flows.align import prepare_model

    pipeline = Pipeline(name="prep", model=Model(path=str(tmp_path / "base"), build="test_progress:builder"),
                        workdir=str(tmp_path / "work"))

    @flow(name="prepare-only")
    def prepare_only() -> str:
        return prepare_model(pipeline)

    state = prepare_only(return_state=True)
    assert Path(state.result()) == tmp_path / "base"
    assert (tmp_path / "base" / "built_with_log.txt").read_text() == "yes"
    import anyio

    async def names():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return [(r.name, r.state_type.value) for r in runs]

    found = anyio.run(names)
    assert any(name.startswith("prepare-model") and st == "COMPLETED" for name, st in found), found
