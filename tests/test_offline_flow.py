"""The offline flow end to end on real data: the CUT-online iteration-1 triplets are ingested
by the foundation flow, CUT trains a tiny local model on CPU, the merged model generates, the
run is tracked in MLflow (parent run, nested iteration run, a registered version), and a rerun
of the finished pipeline trains nothing and registers nothing."""

import json
from pathlib import Path

import pytest
from conftest import mlflow_runs_by_nesting

from cut_core.dsl import CUT, Ingestion, LoRA, Model, Pipeline, Source, Training

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_model(tmp_path, shared_data):
    from cut_core.models.tiny import make_tiny_model
    records = json.loads((shared_data / "cut-online" / "iter1.json").read_text())
    texts = [r["instruction"] + "\n" + (r["output"] or "") + "\n" + (r["judgment"] or "") for r in records[:400]]
    return make_tiny_model(tmp_path / "tiny", texts, vocab_size=2000)


def test_offline_cut_on_cut_online_iter1(tmp_path, shared_data, tiny_model, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from cut_core.infer.generate import generate, load_model
    from flows.align import offline_align
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = Pipeline(
        name="iter1-offline", workdir=str(tmp_path / "work"),
        sources=[Source(paths=[str(shared_data / "cut-online" / "iter1.json")])],
        ingestion=Ingestion(max_reject_rate=0.10),
        model=Model(path=str(tiny_model), max_length=192),
        objective=CUT(threshold=1.1, alpha=1.0),
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

    # the registered model is the base plus the trained adapter, and training moved it
    import pyarrow.parquet as pq
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cut_core.data import templates
    from cut_core.infer.generate import encode_prompts

    model, tokenizer = load_model(iteration["model"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    probe = torch.tensor(tokenizer("Give three tips for staying healthy.")["input_ids"])[None]
    with torch.no_grad():
        merged_logits, base_logits = model(input_ids=probe).logits, base(input_ids=probe).logits
        adapted = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), train_dir / "adapter").eval()
        torch.testing.assert_close(merged_logits, adapted(input_ids=probe).logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3, "the merged model equals the base: nothing was trained"

    # CUT keeps maximum likelihood on the positives: the trained model gives their responses a lower NLL
    examples = pq.read_table(next((tmp_path / "work" / "examples").glob("*.parquet"))).to_pylist()

    def response_nll(m) -> float:
        with torch.no_grad():
            per_row = []
            for row in [r for r in examples if r["kind"] == "align_p"][:40]:
                ids = torch.tensor(row["input_ids"])[None]
                logp = m(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
                per_row.append(-logp[row["response_start"] - 1:].mean())
            return torch.stack(per_row).mean().item()

    assert response_nll(model) < response_nll(base) - 0.01

    # generation answers with the trained model's own greedy continuation of the plain prompt
    instruction = "Give three tips for staying healthy."
    outputs = generate(model, tokenizer, [instruction], max_new_tokens=8, batch_size=1)
    ids = torch.tensor(encode_prompts(tokenizer, [templates.render("plain", "alpaca", instruction,
                                                                      tokenizer=tokenizer)]))
    new = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert len(outputs) == 1 and outputs[0] == tokenizer.decode(new, skip_special_tokens=True).strip()

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
