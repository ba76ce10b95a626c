"""Typed stage results (tasks/results.py) and the stage record (tasks/stages.py run_stage).

Proves that:
- a marker written by the code before typed results (a plain dict per stage, as the old
  `run_stage(path, lambda d: task(...))` stored what the task returned) loads as the typed
  result, without running the stage, and writes back the same JSON: a workdir made before resumes;
- a stage that runs calls its task with the arguments given (no lambda), stores the task's dict
  unchanged and returns the typed result, the same one a rerun reads back;
- a key a record does not declare survives the round trip; a run's final record keeps the key
  order the flows have always returned (the CLI prints it).
"""

from __future__ import annotations

import json

import pytest

from cut_core.files import write_json_atomic
from tasks.results import (Evaluated, Examples, Generated, IterationResult, IterationRun, Judged, ParentRun,
                           Registered, RoundSelection, RunSummary, Sampled, StartChoice, Trained)
from tasks.stages import RESULT, read_record, run_stage

RUN = "/w/runs/online-test-4a2b318ef81c"

# Markers as the previous code wrote them (taken from a run of it, paths shortened).
OLD_MARKERS = {
    "start": (StartChoice, {"base": "/w/base-model"}),
    "start-champion": (StartChoice, {"version": 3, "via": "models:/online-test@champion"}),
    "select": (RoundSelection, {"triplets": 16, "positives": 9, "negatives": 7, "round": "p-abc-night1",
                                "files": 2}),
    "sample": (Sampled, {"n": 48, "path": f"{RUN}/iter-1/sample/prompts.parquet"}),
    "generate": (Generated, {"engine": "transformers", "n": 48, "path": f"{RUN}/iter-1/generate/generations.parquet",
                             "seconds": 0.1011795830054325}),
    "judge": (Judged, {"cached": 0, "completion_tokens": None, "failed": 0, "judged": 48, "labeled": 48,
                       "negatives": 46, "ok": 48, "path": f"{RUN}/iter-1/judge/judgments.parquet", "positives": 2,
                       "prompt_tokens": None, "requested": 48, "retried": 0, "triplets_added": 48,
                       "unlabeled": 0, "usage_unknown": 0}),
    "materialize": (Examples, {"digest": "99371d4f8b466c99f8af14f63d2a7cce",
                               "path": "/w/examples/99371d4f8b466c99f8af14f63d2a7cce.parquet",
                               "stats": {"rows": 94, "rows_by_kind": {"align_n": 46, "align_p": 2, "misalign": 46},
                                         "labeled": 48, "seconds": 0.022}}),
    "train": (Trained, {"adapter": None, "history": [{"epoch": 0.33, "loss": 1.05, "step": 2}],
                        "merged": f"{RUN}/iter-1/train/out/merged", "output_dir": f"{RUN}/iter-1/train/out"}),
    "evaluate": (Evaluated, {"dir": f"{RUN}/iter-1/evaluate",
                             "metrics": {"failed_judgments": 0, "heldout_nll": 1.38, "judge_prompt_tokens": None,
                                         "judged": 48, "n": 48, "positive_rate": 0.0}}),
    "register": (Registered, {"champion": False, "digest": "415d3b86cb09", "model": "online-test",
                              "previous_champion_metric": None, "refused": None, "version": 1}),
}

OLD_FINAL = {
    "base": {"n": 48, "positive_rate": 0.0},
    "iterations": [
        {"champion": False, "iteration": 1, "metrics": {"n": 48, "positive_rate": 0.0},
         "model": f"{RUN}/iter-1/train/out/merged", "start_model": {"base": "/w/base-model"}, "version": 1},
        {"champion": True, "iteration": 2, "metrics": {"n": 48, "positive_rate": 0.5},
         "model": f"{RUN}/iter-2/train/out/merged",
         "start_model": {"digest": "415d", "name": "online-test", "path": "/w/registry/1", "source": "local",
                         "uri": "models:/online-test/1", "version": 1}, "version": 2}],
    "metric": "positive_rate", "pipeline": "online-test", "run_key": "online-test-4a2b318ef81c",
    "start_model": {"base": "/w/base-model"},
}


def not_run(*args, **kwargs):
    raise AssertionError("a finished stage ran again")


@pytest.mark.parametrize("stage", sorted(OLD_MARKERS))
def test_a_marker_of_the_previous_code_loads_as_the_typed_result(tmp_path, stage):
    record_type, old = OLD_MARKERS[stage]
    write_json_atomic(tmp_path / stage / RESULT, old)  # as the previous run_stage stored the task's dict
    before = (tmp_path / stage / RESULT).read_text()
    lines = []

    result = run_stage(tmp_path / stage, not_run, "ignored", result_type=record_type, log=lines.append)

    assert isinstance(result, record_type)
    assert lines == [f"[skip] {stage}: finished earlier"]
    assert result.to_dict() == old and not getattr(result, "extra", {})  # every key is a field
    for key, value in old.items():
        assert getattr(result, key) == value
    assert (tmp_path / stage / RESULT).read_text() == before  # a skipped stage writes nothing


def test_the_typed_results_read_as_the_flows_use_them(tmp_path):
    for stage, (record_type, old) in OLD_MARKERS.items():
        write_json_atomic(tmp_path / stage / RESULT, old)
    load = {stage: run_stage(tmp_path / stage, not_run, result_type=t, log=lambda _: None)
            for stage, (t, _) in OLD_MARKERS.items()}
    assert load["start"].version is None and load["start"].base == "/w/base-model"
    assert (load["start-champion"].version, load["start-champion"].via) == (3, "models:/online-test@champion")
    assert load["select"].triplets == 16
    assert load["judge"].numbers() == {"cached": 0, "failed": 0, "judged": 48, "labeled": 48, "negatives": 46,
                                       "ok": 48, "positives": 2, "requested": 48, "retried": 0,
                                       "triplets_added": 48, "unlabeled": 0, "usage_unknown": 0}
    assert load["materialize"].stats["rows"] == 94
    assert load["train"].adapter is None and load["train"].history[0]["step"] == 2
    assert load["evaluate"].metrics["n"] == 48
    assert (load["register"].version, load["register"].champion) == (1, False)


def test_a_stage_runs_its_task_with_the_arguments_given_and_stores_its_dict(tmp_path):
    calls = []

    def task(path, n, *, engine):
        calls.append((path, n, engine))
        return {"path": path, "n": n, "engine": engine, "seconds": 1.5}

    stage = tmp_path / "iter-1" / "generate"
    first = run_stage(stage, task, str(stage / "generations.parquet"), 8, engine="vllm", result_type=Generated,
                      log=lambda _: None)
    assert calls == [(str(stage / "generations.parquet"), 8, "vllm")]
    assert first == Generated(path=str(stage / "generations.parquet"), n=8, engine="vllm", seconds=1.5)
    assert json.loads((stage / RESULT).read_text()) == {"path": str(stage / "generations.parquet"), "n": 8,
                                                        "engine": "vllm", "seconds": 1.5}
    again = run_stage(stage, not_run, result_type=Generated, log=lambda _: None)
    assert again == first and calls == [(str(stage / "generations.parquet"), 8, "vllm")]


def test_a_stage_may_return_its_record_and_a_start_marker_keeps_its_keys(tmp_path):
    start = run_stage(tmp_path / "start", lambda: StartChoice(base="/w/base"), result_type=StartChoice,
                      log=lambda _: None)
    assert json.loads((tmp_path / "start" / RESULT).read_text()) == {"base": "/w/base"}  # no None keys
    assert run_stage(tmp_path / "start", not_run, result_type=StartChoice, log=lambda _: None) == start


def test_an_undeclared_key_is_kept(tmp_path):
    counts = {**OLD_MARKERS["judge"][1], "refused_by_policy": 2}
    write_json_atomic(tmp_path / "judge" / RESULT, counts)
    judged = run_stage(tmp_path / "judge", not_run, result_type=Judged, log=lambda _: None)
    assert judged.extra == {"refused_by_policy": 2} and judged.numbers()["refused_by_policy"] == 2
    assert judged.to_dict() == counts
    with pytest.raises(ValueError, match="no field"):
        StartChoice.from_dict({"base": "/w", "surprise": 1})


def test_the_mlflow_run_records_of_the_previous_code_load(tmp_path):
    (tmp_path / "mlflow.json").write_text('{\n  "parent_run_id": "d35d3852b3f74f2faaf4ca29d1aac046"\n}')
    (tmp_path / "iter-1").mkdir()
    (tmp_path / "iter-1" / "mlflow.json").write_text('{\n  "run_id": "1e554dc3ef074429a5871c04c0d970f2"\n}')
    assert read_record(tmp_path / "mlflow.json", ParentRun).parent_run_id == "d35d3852b3f74f2faaf4ca29d1aac046"
    assert read_record(tmp_path / "iter-1" / "mlflow.json", IterationRun).run_id == "1e554dc3ef074429a5871c04c0d970f2"
    assert read_record(tmp_path / "iter-2" / "mlflow.json", IterationRun) is None


def test_a_final_record_of_the_previous_code_loads_and_keeps_its_order(tmp_path):
    summary = RunSummary.from_dict(OLD_FINAL)
    assert [it.version for it in summary.iterations] == [1, 2]
    assert summary.iterations[1].start_model["uri"] == "models:/online-test/1"
    assert summary.round is None and summary.trained is None
    assert summary.to_dict() == OLD_FINAL
    # The order the flows returned (and the CLI printed): online / plain offline run ...
    core = ["pipeline", "run_key", "metric", "start_model", "base", "iterations"]
    assert list(summary.to_dict()) == core
    assert list(summary.to_dict()["iterations"][0]) == ["iteration", "model", "start_model", "version", "champion",
                                                        "metrics"]
    # ... a recurring offline round that trained, and one that ended without training.
    selection = RoundSelection.from_dict(OLD_MARKERS["select"][1])
    trained = RunSummary.from_dict({**OLD_FINAL, "round": OLD_MARKERS["select"][1], "trained": True})
    assert trained.round == selection and list(trained.to_dict()) == ["round", "trained", *core]
    ended = RunSummary(pipeline="p", run_key="p-abc-night4", round=selection, metric="positive_rate",
                       start_model=None, base={}, iterations=[], trained=False, reason="no new triplets")
    assert list(ended.to_dict()) == ["pipeline", "run_key", "round", "metric", "start_model", "base", "iterations",
                                     "trained", "reason"]
    assert RunSummary.from_dict(json.loads(json.dumps(ended.to_dict()))) == ended


def test_an_iteration_result_summarizes_as_the_final_record_lists_it():
    registered = Registered.from_dict(OLD_MARKERS["register"][1])
    result = IterationResult(iteration=1, model="/w/merged", metrics={"n": 48}, registered=registered,
                             start_model={"base": "/w/base-model"})
    assert result.summary().to_dict() == {"iteration": 1, "model": "/w/merged", "start_model": {"base": "/w/base-model"},
                                          "version": 1, "champion": False, "metrics": {"n": 48}}
    assert IterationResult.from_dict(result.to_dict()) == result
