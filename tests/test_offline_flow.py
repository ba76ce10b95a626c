"""The offline flow end to end on real data: the CUT-online iteration-1 triplets are ingested
by the foundation flow, CUT trains a tiny local model on CPU, the merged model generates, the
run is tracked in MLflow (parent run, nested iteration run, a registered version), and a rerun
of the finished pipeline trains nothing and registers nothing."""

import json
from pathlib import Path

import pytest
from conftest import mlflow_runs_by_nesting

from cut_core.dsl import Ingestion, LoRA, Model, Objective, Pipeline, Source, Training

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_model(tmp_path, shared_data):
    from cut_core.tiny import make_tiny_model
    records = json.loads((shared_data / "cut-online" / "iter1.json").read_text())
    texts = [r["instruction"] + "\n" + (r["output"] or "") + "\n" + (r["judgment"] or "") for r in records[:400]]
    return make_tiny_model(tmp_path / "tiny", texts, vocab_size=2000)


def test_offline_cut_on_cut_online_iter1(tmp_path, shared_data, tiny_model, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from cut_core.generate import generate, load_model
    from flows.align import offline_align
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = Pipeline(
        name="iter1-offline", workdir=str(tmp_path / "work"),
        sources=[Source(paths=[str(shared_data / "cut-online" / "iter1.json")])],
        ingestion=Ingestion(max_reject_rate=0.10),
        model=Model(path=str(tiny_model), max_length=192),
        objective=Objective(name="cut", threshold=1.1, alpha=1.0),
        adapter=LoRA(),
        training=Training(learning_rate=1e-3, micro_batch_size=4, gradient_accumulation=2, warmup_steps=0,
                          save_steps=1000, logging_steps=5),
    )
    result = offline_align(pipeline.to_json(), pipeline.name)

    (iteration,) = result["iterations"]
    train_dir = Path(iteration["model"]).parent
    history = [json.loads(line) for line in (train_dir / "log_history.jsonl").read_text().splitlines()]
    assert history and all(row["loss"] == row["loss"] for row in history if "loss" in row)
    assert any("flagged_fraction" in row for row in history), "CUT logged no flagged-token fraction"

    model, tokenizer = load_model(iteration["model"])
    outputs = generate(model, tokenizer, ["Give three tips for staying healthy."], max_new_tokens=8, batch_size=1)
    assert len(outputs) == 1 and isinstance(outputs[0], str)

    # the examples were built from the 953 accepted triplets: 240 negatives, Align-P downsampled to 60
    stats = json.loads(next((tmp_path / "work" / "examples").glob("*.json")).read_text())
    assert stats["rows_by_kind"] == {"align_n": 240, "misalign": 240, "align_p": 60}

    client = MlflowClient(tracking.tracking_uri())
    parents, children = mlflow_runs_by_nesting(client, "iter1-offline")
    assert len(parents) == 1 and len(children) == 1
    assert parents[0].data.params["objective.threshold"] == "1.1"
    assert "train.loss" in children[0].data.metrics
    versions = client.search_model_versions("name='iter1-offline'")
    assert [int(v.version) for v in versions] == [1]
    assert int(client.get_model_version_by_alias("iter1-offline", "candidate").version) == 1

    # a rerun of the finished pipeline does no work: no training, no new version, no new run
    mtime = (train_dir / "COMPLETE").stat().st_mtime_ns
    again = offline_align(pipeline.to_json(), pipeline.name)
    assert again["skipped"] is True
    assert (train_dir / "COMPLETE").stat().st_mtime_ns == mtime
    assert len(client.search_model_versions("name='iter1-offline'")) == 1
    assert [len(runs) for runs in mlflow_runs_by_nesting(client, "iter1-offline")] == [1, 1]
