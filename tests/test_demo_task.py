"""The arithmetic demo task (cut_core.tasks.arithmetic) and its bundled data.

Proves: the verifier judges right answers positive (None) and, for wrong ones, names the wrong
digit and the reason without repeating the wrong answer; `is_correct` agrees with it; the
held-out, online and warm-start splits are disjoint and cover every problem; generate.py
writes the same bytes every time and the committed files are its output; a short
`build_base_model` saves a model that loads offline with AutoModelForCausalLM, a tokenizer
that round-trips a prompt (digits one token each), and is reused when asked again; the
recommended online settings are valid DSL sections that fit the bundled prompt file.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from cut_core.tasks import arithmetic as dt
from cut_core.data import templates

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "datasets" / "arithmetic"


# ---------------------------------------------------------------- verifier

@pytest.mark.parametrize("a,b", [(37, 48), (10, 10), (99, 99), (45, 55), (50, 50), (12, 87)])
def test_right_answers_are_positive(a, b):
    ins = dt.instruction(a, b)
    assert dt.judge(ins, str(a + b)) is None
    assert dt.judge(ins, f" {a + b}\n") is None          # surrounding whitespace is not a mistake
    assert dt.is_correct(ins, str(a + b))


@pytest.mark.parametrize("a,b,response,named", [
    (37, 48, "75", "The tens digit is wrong"),           # carry dropped
    (45, 55, "90", "The tens digit is wrong and the hundreds digit is missing"),
    (31, 42, "83", "The tens digit is wrong"),           # a carry added where none exists
    (31, 42, "74", "The ones digit is wrong"),
    (99, 99, "189", "The ones and tens digits are wrong"),
    (57, 68, "25", "The hundreds digit is missing"),
    (31, 42, "730", "too many digits"),
    (31, 42, "seventy-three", "not a number"),
])
def test_wrong_answers_name_the_digit(a, b, response, named):
    ins = dt.instruction(a, b)
    judgment = dt.judge(ins, response)
    assert judgment is not None and named in judgment
    assert not dt.is_correct(ins, response)
    assert not judgment.lower().startswith("perfect")    # the pipeline's positive prefix


def test_carry_judgment_gives_the_reason():
    assert dt.judge("What is 37 + 48?", "75") == "The tens digit is wrong: the carry from 7 + 8 = 15 was not added."


def test_judgments_never_repeat_the_wrong_answer():
    """The model must read the judgment, not copy the wrong number out of it."""
    for a, b in dt.all_problems():
        if dt.has_carry(a, b):
            wrong = str(dt.carry_dropped(a, b))
            judgment = dt.judge(dt.instruction(a, b), wrong)
            assert wrong not in re.findall(r"\d+", judgment), (a, b, judgment)


def test_instruction_round_trip_and_rejects_others():
    assert dt.parse_instruction(dt.instruction(12, 34)) == (12, 34)
    with pytest.raises(ValueError):
        dt.judge("Write a poem.", "42")


# ---------------------------------------------------------------- splits and files

def test_splits_are_disjoint_and_cover_all_problems():
    s = dt.split_problems()
    sets = {k: set(v) for k, v in s.items()}
    assert len(sets["heldout"]) == dt.N_HELDOUT and len(sets["online"]) == dt.N_ONLINE
    assert not sets["heldout"] & sets["online"]
    assert not sets["heldout"] & sets["warmstart"]
    assert not sets["online"] & sets["warmstart"]
    assert sets["heldout"] | sets["online"] | sets["warmstart"] == set(dt.all_problems())
    assert dt.split_problems() == s                       # deterministic by seed
    assert dt.split_problems(seed=1) != s


def _generate_module():
    spec = importlib.util.spec_from_file_location("arith_generate", DATA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_is_deterministic_and_matches_committed_files(tmp_path):
    gen = _generate_module()
    first = gen.write(tmp_path / "a")
    second = gen.write(tmp_path / "b")
    for split, path in first.items():
        data = path.read_bytes()
        assert data == second[split].read_bytes()
        assert data == (DATA / path.name).read_bytes(), f"{path.name} is stale: rerun generate.py"
    heldout = [line for line in (DATA / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == dt.N_HELDOUT


# ---------------------------------------------------------------- base model

@pytest.mark.slow
def test_short_build_saves_an_offline_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = dt.build_base_model(tmp_path / "base", seed=0, steps=3, batch_size=8)
    assert (out / dt.MARKER).exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = templates.plain_prompt(dt.instruction(37, 48))
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt
    assert [tok.decode([i]) for i in tok("125", add_special_tokens=False)["input_ids"]] == ["1", "2", "5"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([dt.encode_prompt(tok, prompt)])).logits
    assert logits.shape[-1] == len(tok)

    weights = next(out.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    assert dt.build_base_model(out, seed=0, steps=3, batch_size=8) == out   # same settings: reused
    assert weights.stat().st_mtime_ns == before


def test_online_settings_are_valid_dsl_sections():
    from cut_core.dsl import CUT, Evaluation, Online, Pipeline, Training, parse_objective

    s = dt.ONLINE_SETTINGS
    pipeline = Pipeline(
        name="demo-settings", objective=parse_objective(s["objective"]), adapter=s["adapter"],
        training=Training(**s["training"]),
        online=Online(prompts=str(DATA / "online.jsonl"), **s["online"]),
        evaluation=Evaluation(heldout=str(DATA / "heldout.jsonl"), **s["evaluation"]),
        judge={"kind": "function", "callable": "cut_core.tasks.arithmetic:judge"})
    assert isinstance(pipeline.objective, CUT) and pipeline.online.iterations >= 2
    # every iteration takes new prompts: the bundled online file must hold them all
    assert pipeline.online.iterations * pipeline.online.prompts_per_iteration <= dt.N_ONLINE
    assert pipeline.evaluation.max_prompts >= 500          # noise ~2 points


def test_build_refuses_a_folder_that_is_not_a_demo_base(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        dt.build_base_model(tmp_path / "model", steps=1)
