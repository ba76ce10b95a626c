"""Recurring offline rounds over feedback that keeps arriving (flows/align.py offline_align
with recurring=True: a served offline deployment, `cut-align run PIPELINE --round NAME`).

Proves, on a folder of unlabeled feedback files that the declared judge labels, with a tiny
model trained by the real subprocess and a real MLflow store and Prefect run:
- round 1 (no champion yet) starts from the declared base and says so, and trains on the first
  file's triplets;
- a round that crashed after its triplets were fixed resumes with the same triplets although a
  file arrived meanwhile;
- round 2 starts from the registered champion (its RESULT's start_model, the training config)
  and trains ONLY the triplets of the file that arrived after round 1 (the triplet ids of the
  examples it trained on); the judge was asked about the new rows only;
- a round with no new triplets (`cut-align run --round`) ends cleanly and says so: a RESULT with
  the reason, no iteration run, no new version; rerunning a finished round does nothing;
- in the warehouse (warehouse.select_round): a triplet counts as used only by a finished round of
  the same pipeline name, matched exactly; an unfinished round's selection is replaced when it is
  selected again and leaves its triplets to the next round; only labeled triplets of the named
  files are selected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from cut_core.dsl import CUT, FunctionJudge, Model, Pipeline, Source, Training

NAME = "rounds-test"


@pytest.fixture(scope="module")
def demo_tiny(tmp_path_factory):
    from cut_core.tasks.arithmetic import tokenizer_corpus
    from cut_core.models.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model", tokenizer_corpus(n=300), vocab_size=256)


@pytest.fixture
def flow_log():
    """Lines the flow runs log (their Prefect run logger)."""
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

        @property
        def text(self):
            return "\n".join(self.lines)

    import flows.align  # noqa: F401 - its imports (re)configure logging: attach after them
    handler = Lines()
    loggers = [logging.getLogger("prefect.flow_runs"), logging.getLogger("prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def feedback_file(path: Path, problems: list[tuple[int, int]]) -> Path:
    """Unlabeled arithmetic feedback: half the answers right, half off by one (the judge decides)."""
    rows = [{"instruction": f"What is {a} + {b}?", "response": str(a + b + (i % 2))}
            for i, (a, b) in enumerate(problems)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def file_triplet_ids(warehouse: Path, path: Path) -> set[str]:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return {r[0] for r in con.sql("SELECT id FROM triplets WHERE source = $s", params={"s": str(path)}).fetchall()}
    finally:
        con.close()


def trained_ids(workdir: Path, result: dict) -> tuple[dict, set[str]]:
    """(train config, triplet ids of the examples) the round's training read."""
    out = workdir / "runs" / result["run_key"] / "iter-1" / "train" / "out"
    config = json.loads((out / "train_config.json").read_text())
    return config, set(pq.read_table(config["examples"]).column("triplet_id").to_pylist())


def rounds_pipeline(tmp_path: Path, model: Path) -> Pipeline:
    return Pipeline(
        name=NAME, workdir=str(tmp_path / "work"),
        sources=[Source(paths=[str(tmp_path / "feedback" / "*.jsonl")], labeled=False)],
        model=Model(path=str(model), max_length=64),
        judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
        objective=CUT(threshold=1.1, alpha=1.0, align_p_ratio=1.0),  # every positive kept: ids comparable
        adapter=None,
        training=Training(full_finetune=True, learning_rate=1e-3, micro_batch_size=8, gradient_accumulation=1,
                          scheduler="constant", warmup_steps=0, save_steps=1000, logging_steps=1),
    )


@pytest.mark.slow
def test_recurring_offline_rounds_train_only_new_triplets_from_the_champion(
        tmp_path, demo_tiny, prefect_harness, monkeypatch, flow_log, capsys):
    import flows.align as align
    from flows.cli import main
    from flows.serve import served_flow
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "feedback"
    folder.mkdir()
    day1 = feedback_file(folder / "day1.jsonl", [(a, a + 1) for a in range(10, 26)])    # 16 rows
    pipeline = rounds_pipeline(tmp_path, demo_tiny)
    workdir, warehouse = Path(pipeline.workdir), Path(pipeline.workdir) / "warehouse.duckdb"
    client = tracking.use_store()

    # ---- round 1: a scheduled run of the served deployment; no champion yet, so the declared base
    monkeypatch.setattr(align, "scheduled_round", lambda: "night1")
    first = served_flow(pipeline).fn()
    assert first["start_model"] == {"base": str(demo_tiny)}
    assert f"no champion for {NAME} yet: starting from the declared base {demo_tiny}" in flow_log.text
    assert first["run_key"].endswith("-night1") and first["trained"] is True
    day1_ids = file_triplet_ids(warehouse, day1)
    assert len(day1_ids) == 16 and first["round"]["triplets"] == 16
    _, ids = trained_ids(workdir, first)
    assert ids == day1_ids
    assert [it["version"] for it in first["iterations"]] == [1]
    # no evaluation declared, so nothing was promoted: promote version 1 by hand
    assert tracking.champion_version(NAME) is None
    client.set_registered_model_alias(NAME, tracking.CHAMPION, "1")

    # ---- a file arrives; round 2 crashes after fixing its triplets, and another file arrives
    day2 = feedback_file(folder / "day2.jsonl", [(a, a + 2) for a in range(30, 40)])    # 10 rows
    real_start = align.round_start

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the selection")

    monkeypatch.setattr(align, "round_start", crash)
    with pytest.raises(Exception, match="simulated crash"):
        align.offline_align(pipeline.to_json(), pipeline.name, round_name="night2")
    monkeypatch.setattr(align, "round_start", real_start)
    # the judge was asked about the new file's rows only (day 1's were labeled in round 1)
    assert "judge cut_core.tasks.arithmetic:judge: 10 requested, 0 cached" in flow_log.text
    day3 = feedback_file(folder / "day3.jsonl", [(a, a + 3) for a in range(50, 56)])    # 6 rows

    # ---- round 2 resumed: from the champion, on day 2's triplets only (day 3 came after it started)
    flow_log.lines.clear()
    second = align.offline_align(pipeline.to_json(), pipeline.name, round_name="night2")
    start = second["start_model"]
    assert start["uri"] == f"models:/{NAME}/1" and start["version"] == 1
    assert "no champion" not in flow_log.text
    assert "[skip] select: finished earlier" in flow_log.text
    day2_ids = file_triplet_ids(warehouse, day2)
    config, ids = trained_ids(workdir, second)
    assert config["model_path"] == start["path"]
    assert len(day2_ids) == 10 and ids == day2_ids and not ids & day1_ids
    assert second["round"]["triplets"] == 10
    assert [it["version"] for it in second["iterations"]] == [2]
    # resumed, it labeled only day 3's rows (day 2's were labeled before the crash), and kept them for later
    (parent2,) = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                    f"tags.cut_align.run_key = '{second['run_key']}'")
    assert parent2.data.metrics["label.requested"] == 6

    # ---- round 3 (the CLI): only day 3 is new
    declaration = tmp_path / "rounds_pipeline.py"
    declaration.write_text("from cut_core.dsl import Pipeline\n"
                           f"pipeline = Pipeline.model_validate_json({pipeline.to_json()!r})\n")
    assert main(["run", str(declaration), "--round", "night3"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["start_model"]["uri"] == f"models:/{NAME}/1"   # v2 was not promoted (no evaluation)
    _, ids = trained_ids(workdir, third)
    assert ids == file_triplet_ids(warehouse, day3) and len(ids) == 6

    # ---- round 4: nothing new: ends cleanly, says so, trains and registers nothing
    flow_log.lines.clear()
    assert main(["run", str(declaration), "--round", "night4"]) == 0
    fourth = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fourth["trained"] is False and fourth["iterations"] == [] and fourth["start_model"] is None
    assert fourth["reason"].startswith("no new triplets")
    assert f"round {fourth['run_key']} ends without training: no new triplets" in flow_log.text
    assert (workdir / "runs" / fourth["run_key"] / "final" / "RESULT.json").exists()
    assert not (workdir / "runs" / fourth["run_key"] / "iter-1").exists()
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == [1, 2, 3]
    runs = client.search_runs([client.get_experiment_by_name(NAME).experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 3   # one iteration run per trained round

    # ---- rerunning a finished round does nothing
    again = align.offline_align(pipeline.to_json(), pipeline.name, round_name="night2")
    assert again["skipped"] is True
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == [1, 2, 3]


def test_a_round_name_must_be_folder_safe():
    from cut_core.errors import UserError
    from flows.align import round_label

    assert round_label(True, "2026-12-05") == "2026-12-05"
    assert round_label(False, None) is None
    for bad in ("../up", "a b", "", "x" * 65):
        with pytest.raises(UserError, match="folder-safe"):
            round_label(True, bad)


def test_round_selection_in_the_warehouse(tmp_path):
    from cut_core.data import warehouse as wh

    con = wh.connect(tmp_path / "w.duckdb")
    rows = [("a", "positive", "f1"), ("b", "negative", "f1"), ("c", None, "f1"), ("d", "negative", "f2"),
            ("e", "positive", "f3")]
    for n, (tid, polarity, digest) in enumerate(rows):
        con.execute("INSERT INTO triplets (id, instruction, response, polarity, batch, source, row_number, "
                    "file_digest) VALUES (?, ?, 'r', ?, 'b', 's', ?, ?)", [tid, f"i{tid}", polarity, n, digest])

    # only labeled triplets of the named files
    assert wh.select_round(con, pipeline="p", round="p-r1", digests=["f1", "f2"]) == \
        {"triplets": 3, "positives": 1, "negatives": 2}
    assert wh.round_triplet_ids(con, "p-r1") == ["a", "b", "d"]
    # not finished (no version): the next round may take the same triplets
    assert wh.select_round(con, pipeline="p", round="p-r2", digests=["f1", "f2"])["triplets"] == 3
    assert wh.round_trained(con, round="p-r1", version=1) == 3
    # selected again (a crash before the stage was stored): replaced, now without r1's triplets
    assert wh.select_round(con, pipeline="p", round="p-r2", digests=["f1", "f2", "f3"])["triplets"] == 1
    assert wh.round_triplet_ids(con, "p-r2") == ["e"]
    assert wh.labeled_triplets(con, round="p-r2")["id"].to_list() == ["e"]
    # another pipeline, even one whose name starts with this one's, has its own history
    assert wh.select_round(con, pipeline="p-2", round="p-2-r1", digests=["f1", "f2", "f3"])["triplets"] == 4
    wh.round_trained(con, round="p-r2", version=2)
    assert wh.select_round(con, pipeline="p", round="p-r3", digests=["f1", "f2", "f3"])["triplets"] == 0
    con.close()
