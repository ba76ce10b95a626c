"""The folder-per-concern layout keeps what the flat layout stored as data working: declarations
with old `module:function` paths keep their run key and import, cached judgments stored under old
judge names are found again, and `python -m cut_core.train_cli` still starts training."""

from __future__ import annotations

import subprocess
import sys

from cut_core.data import warehouse as wh
from cut_core.dsl import CUT, FunctionJudge, Model, Online, Pipeline, import_callable
from cut_core.judge import build_judge, label_pending
from tasks.stages import run_key

# Printed by the flat layout (commit 3726e8d) for the declaration below.
OLD_RUN_KEY = "old-layout-bd63eaeb3ea7"
OLD_JUDGE_NAME = "cut_core.demo_task:judge"


def old_declaration() -> Pipeline:
    return Pipeline(name="old-layout", workdir="w", model=Model(path="m", build="cut_core.demo_task:build_base_model"),
                    judge=FunctionJudge(callable="cut_core.demo_task:judge"), objective=CUT(),
                    online=Online(iterations=1, prompts="p.jsonl", prompts_per_iteration=4))


def test_an_old_declaration_keeps_its_run_key_and_its_functions_import():
    pipeline = old_declaration()
    assert run_key(pipeline.to_json()) == OLD_RUN_KEY
    from cut_core.tasks import arithmetic
    assert import_callable("cut_core.demo_task:judge") is arithmetic.judge
    assert import_callable("cut_core.demo_task:build_base_model") is arithmetic.build_base_model
    assert import_callable("cut_core.models:smollm2_from_pypi").__module__ == "cut_core.models.gguf"


def test_judgments_cached_under_the_old_judge_name_are_reused(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    items = [("What is 12 + 39? Answer with the number only.", "41"),
             ("What is 25 + 31? Answer with the number only.", "56")]
    # A warehouse as the flat layout left it: the judgments stored under the old judge name.
    con = wh.connect(path)
    try:
        calls = []

        def old_judge(instruction: str, response: str) -> str | None:
            calls.append(instruction)
            return "The tens digit is wrong."

        from cut_core.judge import FunctionJudge as LibraryJudge
        label_pending(con, LibraryJudge(old_judge, name=OLD_JUDGE_NAME), items)
        assert len(calls) == 2
        con.execute("CHECKPOINT")
    finally:
        con.close()

    con = wh.connect(path)  # opening migrates the stored judge names
    try:
        judge = build_judge(old_declaration().judge)
        assert judge.name == "cut_core.tasks.arithmetic:judge"
        assert build_judge(FunctionJudge(callable="cut_core.tasks.arithmetic:judge")).name == judge.name
        original = judge.fn
        judge.fn = lambda *a: (_ for _ in ()).throw(AssertionError("a cached pair was judged again"))
        try:
            counts = label_pending(con, judge, items)
        finally:
            judge.fn = original
        assert counts["cached"] == 2 and counts["judged"] == 0
        names = {r[0] for r in con.sql("SELECT DISTINCT judge FROM judgments").fetchall()}
        assert names == {"cut_core.tasks.arithmetic:judge"}
    finally:
        con.close()


def test_the_flat_layouts_training_entry_still_runs():
    old = subprocess.run([sys.executable, "-m", "cut_core.train_cli"], capture_output=True, text=True)
    new = subprocess.run([sys.executable, "-m", "cut_core.train.cli"], capture_output=True, text=True)
    assert old.returncode == new.returncode == 2
    assert "CONFIG.json" in old.stderr + old.stdout
