"""Errors a person can act on, from the command line a user types.

Proves: `cut-align run` of a declaration whose model folder is missing stops before any
server starts with one line naming the field and the fix; a deterministic failure inside the
flow (LoRA targets that exist in no layer of the model the flow built) is not retried (one launch in
train.log), ends the command with a non-zero exit and one `error:` line, and puts no engine
traceback on the terminal; the log file records the failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CUT_ALIGN_MLRUNS": str(tmp_path / "mlruns"), "PREFECT_HOME": str(tmp_path / "prefect"),
                **env}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=600)


def test_run_with_a_missing_model_is_one_line_before_any_server(tmp_path):
    declaration = tmp_path / "p.py"
    declaration.write_text(textwrap.dedent("""
        from cut_core.dsl import *
        pipeline = Pipeline(name="no-model", model=Model(path="models/absent"))
    """))
    out = _cli(["run", str(declaration)], tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: model.path models/absent does not exist; fix: point model.path at a "
                     "local Hugging Face model folder (config.json, weights, tokenizer), or set model.build"], lines
    assert "temporary server" not in out.stdout + out.stderr


@pytest.mark.slow
def test_a_deterministic_training_failure_is_one_line_and_not_retried(tmp_path):
    rows = [{"instruction": f"What is {i} + {i}?", "response": f"{i} + {i} = {i + 1}.",
             "judgment": f"Wrong: {i} + {i} is {2 * i}."} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    declaration = tmp_path / "p.py"
    # The model is built by the flow, so `check` cannot see that these LoRA targets exist nowhere:
    # training finds out, inside the flow's subprocess.
    declaration.write_text(textwrap.dedent("""
        from cut_core.dsl import *
        pipeline = Pipeline(name="bad-targets", workdir="work", sources=[Source(paths=["data.jsonl"])],
                            model=Model(path="tiny", max_length=128, build="cut_core.models.tiny:make_tiny_model"),
                            adapter=LoRA(target_modules=["nonexistent_proj"]),
                            training=Training(micro_batch_size=2, gradient_accumulation=1, warmup_steps=0))
    """))
    out = _cli(["run", str(declaration)], tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: adapter.target_modules ['nonexistent_proj'] match no linear layer of LlamaForCausalLM"), out.stderr[-3000:]
    assert "fix:" in errors[0]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    (train_log,) = (tmp_path / "work").glob("runs/*/iter-1/train/out/train.log")
    assert train_log.read_text().count("error: adapter.target_modules") == 1, "the train task retried a user error"
    assert "TrainingConfigError" in (tmp_path / "work/cut-align.log").read_text()  # the log file has the story


def test_a_second_run_in_one_process_logs_each_line_once(tmp_path):
    """`cut-align run` twice in one process (a notebook, a worker): one log handler per file and
    one record factory, so the run's log holds each line once."""
    import logging

    from flows.cli import quiet_user_errors

    prefect_logger = logging.getLogger("prefect")
    before = list(prefect_logger.handlers)
    try:
        quiet_user_errors(tmp_path / "cut-align.log")
        factory = logging.getLogRecordFactory()
        quiet_user_errors(tmp_path / "cut-align.log")
        assert logging.getLogRecordFactory() is factory
        added = [h for h in prefect_logger.handlers if h not in before]
        assert len(added) == 1
        prefect_logger.warning("one line")
        added[0].flush()
        assert (tmp_path / "cut-align.log").read_text().count("one line") == 1
    finally:
        for h in prefect_logger.handlers[:]:
            if h not in before:
                prefect_logger.removeHandler(h)
                h.close()
