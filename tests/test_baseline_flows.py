"""The preference and ILF baselines through the offline flow, on a tiny local model.

Proves: a source with a score column becomes DPO pairs in the warehouse-to-pairs step, TRL's
DPOTrainer trains them in the training subprocess, and the run is tracked like CUT's (nested
MLflow run with DPO's reward metrics, a registered version); ILF-MLE with `refiner="model"` has
the model being aligned write the refinements the data lacks (counted in the run's metrics) and
trains on them.
"""

import json
from pathlib import Path

import pytest
from conftest import mlflow_runs_by_nesting

from cut_core.dsl import DPO, ILFMLE, LoRA, Model, ObjectiveSection, Pipeline, Polarity, Source, Training

pytestmark = pytest.mark.slow


@pytest.fixture
def scored_source(tmp_path) -> Path:
    """Two rated answers per question: the right sum (rating 9) and one off by one (rating 2)."""
    rows = []
    for i in range(8):
        for j in range(3):
            q = f"What is {i} + {j}?"
            rows.append({"instruction": q, "output": f"{i + j}.", "judgment": None, "rating": 9})
            rows.append({"instruction": q, "output": f"{i + j + 1}.", "judgment": "The sum is off by one.",
                         "rating": 2})
    path = tmp_path / "rated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_model(tmp_path):
    from cut_core.models.tiny import make_tiny_model
    texts = [f"What is {i} + {j}? {i + j}. The sum is off by one." for i in range(10) for j in range(10)]
    return make_tiny_model(tmp_path / "tiny", texts, vocab_size=400)


def pipeline_for(tmp_path, source: Path, model: Path, objective: ObjectiveSection) -> Pipeline:
    return Pipeline(
        name=f"rated-{objective.name.replace('_', '-')}", workdir=str(tmp_path / "work"),
        sources=[Source(paths=[str(source)], polarity=Polarity(score_column="rating", score_threshold=5))],
        model=Model(path=str(model), max_length=96),
        objective=objective, adapter=LoRA(r=8),
        training=Training(learning_rate=5e-3, micro_batch_size=4, gradient_accumulation=1, warmup_steps=0,
                          save_steps=1000, logging_steps=2),
    )


def iteration_metrics(tmp_path, name: str) -> dict:
    from mlflow import MlflowClient

    from tasks import tracking
    client = MlflowClient(tracking.tracking_uri())
    parents, children = mlflow_runs_by_nesting(client, name)
    assert len(parents) == 1 and len(children) == 1
    assert client.get_model_version(name, "1").run_id == children[0].info.run_id
    return children[0].data.metrics


def test_offline_dpo_from_scores(tmp_path, scored_source, tiny_model, prefect_harness, monkeypatch):
    from flows.align import offline_align

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = pipeline_for(tmp_path, scored_source, tiny_model, DPO(beta=0.1))
    result = offline_align(pipeline.to_json(), pipeline.name)

    (iteration,) = result["iterations"]
    assert (Path(iteration["model"]) / "config.json").exists()
    metrics = iteration_metrics(tmp_path, pipeline.name)
    assert metrics["data.rows"] == 24 and metrics["data.instructions_paired"] == 24  # one pair per question
    assert "train.rewards/margins" in metrics and "train.rewards/accuracies" in metrics


def test_offline_ilf_mle_with_model_written_refinements(tmp_path, scored_source, tiny_model, prefect_harness,
                                                        monkeypatch):
    from flows.align import offline_align

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    objective = ILFMLE(refiner="model", refine_max_new_tokens=8)
    pipeline = pipeline_for(tmp_path, scored_source, tiny_model, objective)
    offline_align(pipeline.to_json(), pipeline.name)

    metrics = iteration_metrics(tmp_path, pipeline.name)
    # every one of the 24 negatives was sent to the model; what it wrote was used, the rest counted
    assert metrics["data.ilf_refined_generated"] + metrics["data.ilf_skipped_no_refinement"] == 24
    assert metrics["data.ilf_refined_from_column"] == 0 and metrics["data.ilf_positives_as_is"] == 24
    assert metrics["data.rows"] == 24 + metrics["data.ilf_refined_generated"]
