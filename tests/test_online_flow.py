"""The online flow end to end with the demo's verifier: K iterations each generate, judge,
train and register; MLflow holds one nested run and one model version per iteration with the
`champion` alias on the best one; instructions are never reused; a rerun of the finished
pipeline trains nothing and registers nothing; a run that crashed mid-way resumes from its
last finished stage."""

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import mlflow_runs_by_nesting

from cut_core.dsl import CUT, Evaluation, FunctionJudge, Model, Online, Pipeline, Training

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A briefly warm-started demo model: it makes plenty of mistakes, which is what we need."""
    import torch

    from cut_core.tasks.arithmetic import build_base_model
    threads = torch.get_num_threads()
    try:
        return build_base_model(tmp_path_factory.mktemp("base") / "model", steps=150, batch_size=32)
    finally:
        torch.set_num_threads(threads)


def online_pipeline(workdir: Path, model: Path, name: str) -> Pipeline:
    return Pipeline(
        name=name, workdir=str(workdir),
        model=Model(path=str(model), max_length=128),
        judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
        objective=CUT(threshold=1.1, alpha=1.0),
        adapter=None,
        training=Training(full_finetune=True, learning_rate=1e-4, micro_batch_size=8, gradient_accumulation=1,
                          scheduler="constant", warmup_steps=0, save_steps=1000, logging_steps=2),
        online=Online(iterations=2, prompts=str(ROOT / "datasets/arithmetic/online.jsonl"),
                      prompts_per_iteration=48, max_new_tokens=6, generation_batch_size=48),
        evaluation=Evaluation(heldout=str(ROOT / "datasets/arithmetic/heldout.jsonl"), max_prompts=48,
                              max_new_tokens=6, samples=5),
    )


def test_online_iterations_are_tracked_registered_and_not_redone(tmp_path, small_base, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from flows.align import online_align
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = online_pipeline(tmp_path / "work", small_base, "online-test")
    result = online_align(pipeline.to_json(), pipeline.name)

    assert [it["iteration"] for it in result["iterations"]] == [1, 2]
    client = MlflowClient(tracking.tracking_uri())
    parent, nested = mlflow_runs_by_nesting(client, "online-test")
    assert len(parent) == 1 and len(nested) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parent[0].info.run_id}
    for run in nested:
        assert {"eval.positive_rate", "train.loss", "judge.judged"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model", "evaluation", "loss_curve.png"} <= artifacts
        assert "flags.html" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}

    versions = sorted(client.search_model_versions("name='online-test'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    assert int(client.get_model_version_by_alias("online-test", "candidate").version) == 2
    # champion: the flow's claim, the rule it follows and the registry must agree. The rule,
    # recomputed here from the evaluated scores: an iteration takes the alias iff it beats the
    # base and every earlier iteration.
    scores = [result["base"]["positive_rate"]] + [it["metrics"]["positive_rate"] for it in result["iterations"]]
    for run in nested:  # the scores the flow returned are the ones MLflow recorded
        assert run.data.metrics["eval.positive_rate"] == scores[int(run.data.tags["cut_align.iteration"])]
    expected = [scores[k] > max(scores[:k]) for k in (1, 2)]
    assert [it["champion"] for it in result["iterations"]] == expected
    if any(expected):  # the alias sits on the last iteration that took it, with that iteration's score
        winner = max(k for k in (1, 2) if expected[k - 1])
        champion = client.get_model_version_by_alias("online-test", "champion")
        assert int(champion.version) == winner
        assert champion.tags["iteration"] == str(winner)
        assert float(champion.tags["positive_rate"]) == scores[winner] == max(scores)
        assert client.get_run(champion.run_id).data.metrics["eval.positive_rate"] == scores[winner]
    else:  # no iteration beat the base: no version may hold the alias
        from mlflow.exceptions import MlflowException
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias("online-test", "champion")

    # new instructions each iteration, never reused
    run_dir = Path(result["iterations"][0]["model"]).parents[3]
    prompts = [pl.read_parquet(run_dir / f"iter-{k}" / "sample" / "prompts.parquet")["instruction"].to_list()
               for k in (1, 2)]
    assert len(set(prompts[0]) | set(prompts[1])) == 96

    # a rerun of the finished pipeline: no training, no new version
    again = online_align(pipeline.to_json(), pipeline.name)
    assert again["skipped"] is True
    assert len(client.search_model_versions("name='online-test'")) == 2


def test_crashed_run_resumes_from_its_last_finished_stage(tmp_path, small_base, prefect_harness, monkeypatch):
    from flows.align import online_align

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = online_pipeline(tmp_path / "work", small_base, "crash-test")
    pipeline = pipeline.model_copy(update={"online": pipeline.online.model_copy(update={"iterations": 1})})

    # crash inside iteration 1's evaluation (the second evaluation, after the base's):
    # sampling, generation, judging, materialization and training have finished by then
    import tasks.evaluate as evaluate_module
    real = evaluate_module.evaluate
    calls = []

    def crash_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", crash_on_second_call)
    with pytest.raises(Exception, match="simulated crash"):
        online_align(pipeline.to_json(), pipeline.name)

    run_dir = next((tmp_path / "work" / "runs").iterdir())
    train_marker = run_dir / "iter-1" / "train" / "RESULT.json"
    assert train_marker.exists() and not (run_dir / "iter-1" / "evaluate" / "RESULT.json").exists()
    stamp = train_marker.stat().st_mtime_ns
    result = online_align(pipeline.to_json(), pipeline.name)
    assert train_marker.stat().st_mtime_ns == stamp, "training was redone after the crash"
    assert result["iterations"][0]["metrics"]["n"] == 48
    assert len(calls) == 3, "the resumed run redid more than the crashed evaluation"
