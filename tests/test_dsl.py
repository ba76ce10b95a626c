"""The pipeline DSL: shipped declarations load and check; a wrong declaration fails at load
time naming the field and the fix; a declaration round-trips through JSON unchanged. Each
objective is its own section chosen by name: it holds (and `check` shows) only what its method
reads, refuses another method's field with the section to write, and the one-class
`Objective(...)` form and its JSON still load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pydantic import ValidationError

from cut_core.dsl import (CUT, DPO, ILFDPO, ILFMLE, LEGACY_OBJECTIVE_DEFAULTS, OBJECTIVES, SFT, FunctionJudge,
                          LoRA, Model, Objective, Online, OpenAIJudge, Pipeline, PipelineError, Polarity,
                          SelfDistill, Source, Training, load_pipeline, parse_objective)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.py"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_pipelines_load_and_round_trip(path):
    pipeline = load_pipeline(path)
    assert Pipeline.from_json(pipeline.to_json()) == pipeline
    assert json.loads(pipeline.to_json()) == json.loads(Pipeline.from_json(pipeline.to_json()).to_json())
    # relative paths are resolved against the pipeline file, not the working directory
    assert Path(pipeline.workdir).is_absolute()
    for source in pipeline.sources:
        assert all(Path(p).is_absolute() for p in source.paths)


def test_full_declaration_round_trips_with_every_section():
    pipeline = Pipeline(
        name="everything",
        sources=[Source(paths=["a/*.jsonl", "b.csv"], format="auto", columns={"instruction": "question"},
                        polarity=Polarity(score_column="rating", score_threshold=8, quarantine_contradictions=True))],
        model=Model(path="m", template="chat", max_length=1024),
        judge=OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="judge", concurrency=3),
        objective=CUT(threshold=float("inf"), alpha=1.0, gamma=0.5, weighting="paper", align_p_ratio=None),
        adapter=LoRA(r=8, target_modules=["q_proj", "v_proj"]),
        training=Training(learning_rate=1e-4, micro_batch_size=2, gradient_accumulation=4),
        online=Online(iterations=2, prompts="p.jsonl", prompts_per_iteration=10),
    )
    again = Pipeline.from_json(pipeline.to_json())
    assert again == pipeline
    assert again.judge.kind == "openai" and again.objective.threshold == float("inf")
    assert isinstance(Pipeline.from_json(Pipeline(name="f", judge=FunctionJudge(callable="m.n:f")).to_json()).judge,
                      FunctionJudge)
    params = pipeline.flat_params()
    assert params["objective.alpha"] == "1.0" and params["sources.0.columns.instruction"] == "question"


@pytest.mark.parametrize("body, field, fix_words", [
    ('objective=CUT(alpha=-1)', "objective.alpha", "unlikelihood weight"),
    ('objective=CUT(threshold=0.5)', "objective.threshold", "flagged"),
    ('objective=Objective(alpha=-1)', "objective.alpha", "unlikelihood weight"),   # the pre-sections form
    ('objective=Objective(name="dpo_magic")', "objective.name", "must be one of: cut, sft,"),
    ('objective=ILFDPO(refiner="my_refiner")', "objective.refiner", "module:function"),
    ('objective=DPO(beta=0)', "objective.beta", "DPO temperature"),
    ('objective=SFT(threshold=1.1)', "objective: objective 'sft' has no field 'threshold'", "write SFT()"),
    ('objective={"name": "ilf_mle", "beta": 0.2}', "objective: objective 'ilf_mle' has no field 'beta'",
     "'beta' belongs to DPO, ILFDPO"),
    ('training=Training(learnig_rate=1e-4)', "training.learnig_rate", "unknown field"),
    ('sources=[Source(paths=[])]', "sources[i].paths", "glob"),
    ('judge=OpenAIJudge(model="gpt-4")', "judge.base_url", "OpenAI-compatible"),
])
def test_wrong_declaration_names_field_and_fix(tmp_path, body, field, fix_words):
    head = "from cut_core.dsl import *\n"
    path = tmp_path / "bad.py"
    path.write_text(head + f'pipeline = Pipeline(name="bad", {body})\n')
    with pytest.raises(PipelineError) as err:
        load_pipeline(path)
    message = str(err.value)
    assert field in message and fix_words in message, message


def test_cross_field_rules_explain_themselves(tmp_path):
    with pytest.raises(Exception, match="needs online.prompts"):
        Online(iterations=2)
    with pytest.raises(Exception, match="needs a judge"):
        Pipeline(name="x", online=Online(iterations=1, prompts="p.jsonl"))
    with pytest.raises(Exception, match="score_column and score_threshold"):
        Polarity(score_column="s")
    with pytest.raises(Exception, match="use 'ilf_dpo' or 'cut' online"):
        Pipeline(name="x", online=Online(iterations=1, prompts="p.jsonl"), objective=DPO(),
                 judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"))


def test_file_without_pipeline_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(PipelineError, match="must define exactly one Pipeline"):
        load_pipeline(path)


def test_check_command_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(ROOT / "pipelines" / "shepherd_offline.py")],
                         capture_output=True, text=True, cwd=ROOT)
    # The objective line is the section as declared, with every field it has: all CUT reads.
    assert "  objective   CUT(threshold=1.2, alpha=0.5, gamma=0.0, weighting='reference', align_p_ratio=0.25)\n" \
        in out.stdout
    assert "ingest -> label unlabeled -> materialize -> train" in out.stdout
    # The example names a model the user brings: check says so, one line, after the plan.
    assert out.returncode == 2 and out.stderr.startswith("error: model.path "), out.stderr
    assert "does not exist" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_check_names_the_missing_dpo_extra():
    ilf_dpo = str(ROOT / "pipelines" / "shepherd_ilf_dpo.py")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", ilf_dpo], capture_output=True, text=True, cwd=ROOT)
    objective = next(line for line in out.stdout.splitlines() if line.startswith("  objective"))
    assert objective == ("  objective   ILFDPO(refined_column=True, refiner='model', refine_max_new_tokens=512, "
                         "beta=0.1): via TRL"), out.stderr
    assert "cut-align[dpo]" not in out.stderr  # TRL is installed here; only the absent model is reported
    # an install without the extra: TRL cannot be imported
    hide_trl = "import sys; sys.modules['trl'] = None; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-c", hide_trl, command, ilf_dpo], capture_output=True, text=True,
                             cwd=ROOT)
        assert out.returncode == 2 and "pip install 'cut-align[dpo]'" in out.stderr, (command, out.stderr)


def test_check_command_fails_with_the_field(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from cut_core.dsl import *\npipeline = Pipeline(name='b', training=Training(epochs=0))\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "training.epochs" in out.stderr


# ---------------------------------------------------------------- objective sections

@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_section_round_trips_and_holds_only_its_settings(name):
    section = OBJECTIVES[name]()
    pipeline = Pipeline(name="p", objective=section)
    again = Pipeline.from_json(pipeline.to_json())
    assert again == pipeline and type(again.objective) is type(section) and again.objective.name == name
    assert set(json.loads(pipeline.to_json())["objective"]) == {"name", *section.reads()}
    assert parse_objective(section.model_dump_json()) == section == parse_objective({"name": name})
    # flat params (MLflow) carry the method's fields and no other method's
    params = {k for k in pipeline.flat_params() if k.startswith("objective.")}
    assert params == {f"objective.{f}" for f in ("name", *section.reads())}


def test_sections_read_what_their_method_reads():
    assert CUT.reads() == ("threshold", "alpha", "gamma", "weighting", "align_p_ratio")
    assert SelfDistill.reads() == ("distillation_alpha", "align_p_ratio")
    assert ILFMLE.reads() == ("refined_column", "refiner", "refine_max_new_tokens")
    assert ILFDPO.reads() == ("refined_column", "refiner", "refine_max_new_tokens", "beta")
    assert DPO.reads() == ("beta",)
    assert all(OBJECTIVES[n].reads() == () for n in ("sft", "hindsight", "forward_prediction"))
    # every field of the one-class Objective lives on in some section
    assert set(LEGACY_OBJECTIVE_DEFAULTS) == {"name"} | {f for c in OBJECTIVES.values() for f in c.reads()}
    # the evaluation's flag report: CUT's own lambda, else CUT's default
    assert CUT(threshold=1.1).flag_threshold() == 1.1 and SFT().flag_threshold() == CUT().threshold


def test_a_field_of_another_method_is_refused_with_the_section_to_write():
    with pytest.raises(ValidationError) as err:
        SFT(threshold=1.1)
    assert ("objective 'sft' has no field 'threshold' (SFT reads no settings; 'threshold' belongs to CUT): "
            "write SFT()") in str(err.value)
    with pytest.raises(ValidationError) as err:
        Pipeline.from_json(json.dumps({"name": "p", "objective": {"name": "cut", "threshold": 1.1, "beta": 0.2}}))
    assert ("objective 'cut' has no field 'beta' (CUT reads: threshold, alpha, gamma, weighting, align_p_ratio; "
            "'beta' belongs to DPO, ILFDPO): write CUT(threshold=1.1)") in str(err.value)
    with pytest.raises(ValidationError, match="has no field 'threshhold' .CUT reads: threshold,"):
        CUT(threshhold=1.1)  # a misspelling belongs to no method: the fields CUT reads are the hint
    with pytest.raises(ValidationError, match="must be one of: cut, sft, hindsight"):
        Pipeline.from_json(json.dumps({"name": "p", "objective": {"name": "ppo"}}))


def test_the_one_class_objective_form_still_builds_its_section():
    assert Objective(name="cut", threshold=1.1, alpha=1.0) == CUT(threshold=1.1, alpha=1.0)
    assert Objective() == CUT()
    assert Objective(name="ilf_dpo", refiner="model", beta=0.2) == ILFDPO(refiner="model", beta=0.2)
    assert Objective(name="sft") == SFT()
    # ... and a field the method does not read shows the declaration to write instead
    with pytest.raises(ValidationError) as err:
        Objective(name="ilf_mle", refiner="model", threshold=1.1, alpha=1.0)
    message = str(err.value)
    assert "objective 'ilf_mle' has no fields 'threshold', 'alpha'" in message
    assert "'threshold', 'alpha' belong to CUT): write ILFMLE(refiner='model')" in message


def test_old_json_declarations_load():
    # a hand-written declaration of the one-class era, and one without a name (it meant cut)
    p = Pipeline.from_json(json.dumps({"name": "p", "objective": {"name": "cut", "threshold": 1.1}}))
    assert p.objective == CUT(threshold=1.1)
    assert Pipeline.from_json(json.dumps({"name": "p", "objective": {"alpha": 1.0}})).objective == CUT(alpha=1.0)
    assert Pipeline.from_json(json.dumps({"name": "p"})).objective == CUT()
    # a dump of the one-class Objective holds every method's fields at their defaults: they carry
    # nothing and are dropped; a value set away from its default is still refused
    dump = {**LEGACY_OBJECTIVE_DEFAULTS, "name": "dpo", "beta": 0.3}
    assert parse_objective(json.dumps(dump)) == DPO(beta=0.3)
    assert parse_objective({**LEGACY_OBJECTIVE_DEFAULTS, "threshold": 1.1}) == CUT(threshold=1.1)
    with pytest.raises(ValidationError, match="objective 'sft' has no field 'align_p_ratio'"):
        parse_objective({**LEGACY_OBJECTIVE_DEFAULTS, "name": "sft", "align_p_ratio": None})


def test_check_shows_only_the_methods_fields(tmp_path):
    path = tmp_path / "sft.py"
    path.write_text("from cut_core.dsl import *\npipeline = Pipeline(name='s', objective=SFT())\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(path)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "  objective   SFT()\n" in out.stdout
    old = tmp_path / "old.py"
    old.write_text("from cut_core.dsl import *\n"
                   "pipeline = Pipeline(name='o', objective=Objective(name='sft', align_p_ratio=0.5))\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(old)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode != 0
    assert f"{old}:2:" in out.stderr and "objective: objective 'sft' has no field 'align_p_ratio'" in out.stderr
    assert "write SFT()" in out.stderr
