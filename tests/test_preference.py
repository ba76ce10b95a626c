"""The preference baselines (cut_core/data/preference.py, cut_core/train/dpo.py, cut_core/infer/refine.py).

Proves: DPO pairs come from scores (the best response of an instruction against each worse one;
polarity stands in for a missing score; single-response instructions give no pair); ILF-DPO pairs
put the refinement over the response, taking the data's `refined` text first and asking the
refiner only for the rest; the pairs file is digest-addressed (a rerun calls no refiner, new
scores make a new DPO file); no pair is a clear error; the built-in ModelRefiner writes one
refinement per item with a tiny model and its name follows the model's weights; DPO trains
through TRL's DPOTrainer in the training subprocess contract (LoRA and full fine-tuning, COMPLETE,
merged model, rerun no-op, resume after a crash to the uninterrupted run's losses) and moves the
policy's preference margin towards the chosen answers; a missing TRL names the extra to install;
the materialize task routes dpo objectives to pairs and reads scores from the warehouse.
"""

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from cut_core.train import cli as train_cli
from cut_core.data.contrast import read_stats
from cut_core.dsl import CUT, DPO, ILFDPO, ILFMLE
from cut_core.data.preference import PAIR_SCHEMA, materialize_pairs
from cut_core.infer.refine import ModelRefiner, model_fingerprint
from cut_core.models.tiny import make_tiny_model

COLUMNS = ["id", "instruction", "response", "judgment", "polarity", "refined", "score"]


def frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=COLUMNS, orient="row")


SCORED = frame([
    ("a1", "Add 2 and 2.", "4", None, "positive", None, 9.0),
    ("a2", "Add 2 and 2.", "5", "Wrong.", "negative", None, 2.0),
    ("a3", "Add 2 and 2.", "four", None, "positive", None, 7.0),
    ("b1", "Name a fruit.", "Apple.", None, "positive", None, None),   # no score: polarity decides
    ("b2", "Name a fruit.", "Rock.", "Not a fruit.", "negative", None, None),
    ("c1", "Say hi.", "Hi.", None, "positive", None, 5.0),              # one response: no pair
    ("d1", "Count to 2.", "1 2", None, "positive", None, 3.0),         # equal rewards: no pair
    ("d2", "Count to 2.", "1, 2", None, "positive", None, 3.0),
    ("u1", "Unlabeled.", "x", None, None, None, None),
])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    texts = [f"Add {i} and {j}. {i + j} {i + j + 1} Wrong. Name a fruit. Apple. Rock." for i in range(10) for j in range(10)]
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), texts, vocab_size=400)


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny)


# ---------------------------------------------------------------- the pairs

def test_dpo_pairs_from_scores_then_polarity(tok, tmp_path):
    path = materialize_pairs(SCORED, tok, objective=DPO(), out_dir=tmp_path)
    pairs = pl.read_parquet(path)
    assert dict(pairs.schema) == PAIR_SCHEMA
    got = {(r["chosen_id"], r["triplet_id"], r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"])
           for r in pairs.iter_rows(named=True)}
    assert got == {("a1", "a2", "4", "5", 9.0, 2.0), ("a1", "a3", "4", "four", 9.0, 7.0),
                   ("b1", "b2", "Apple.", "Rock.", 1.0, 0.0)}
    assert pairs.filter(pl.col("triplet_id") == "a2")["prompt"][0].endswith("### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    stats = read_stats(path)
    assert (stats["instructions"], stats["instructions_paired"], stats["instructions_without_pair"]) == (4, 2, 2)
    assert stats["unlabeled_skipped"] == 1 and stats["scored_triplets"] == 6


def test_dpo_digest_follows_scores(tok, tmp_path):
    first = materialize_pairs(SCORED, tok, objective=DPO(), out_dir=tmp_path)
    assert materialize_pairs(SCORED, tok, objective=DPO(), out_dir=tmp_path) == first
    rescored = SCORED.with_columns(pl.when(pl.col("id") == "a3").then(10.0).otherwise(pl.col("score")).alias("score"))
    second = materialize_pairs(rescored, tok, objective=DPO(), out_dir=tmp_path)
    assert second != first
    assert set(pl.read_parquet(second).filter(pl.col("chosen_id") == "a3")["triplet_id"]) == {"a1", "a2"}


def test_ilf_dpo_prefers_the_refinement_and_asks_the_refiner_only_for_the_rest(tok, tmp_path):
    t = SCORED.with_columns(pl.when(pl.col("id") == "a2").then(pl.lit("4")).otherwise(None).alias("refined"))
    calls = []

    def refiner(items):
        calls.append(items)
        return ["A fruit: apple." for _ in items]

    path = materialize_pairs(t, tok, objective=ILFDPO(refiner="x:y"), out_dir=tmp_path,
                             refine_fn=refiner, refine_name="test-refiner")
    pairs = {r["triplet_id"]: (r["chosen"], r["rejected"]) for r in pl.read_parquet(path).iter_rows(named=True)}
    assert pairs == {"a2": ("4", "5"), "b2": ("A fruit: apple.", "Rock.")}  # positives give no pair
    assert calls == [[("Name a fruit.", "Rock.", "Not a fruit.")]]
    stats = read_stats(path)
    assert (stats["ilf_refined_from_column"], stats["ilf_refined_generated"]) == (1, 1)
    # the same inputs and refiner name: the file is found, the refiner is not called again
    assert materialize_pairs(t, tok, objective=ILFDPO(), out_dir=tmp_path,
                             refine_fn=refiner, refine_name="test-refiner") == path
    assert len(calls) == 1


def test_no_pair_is_a_clear_error(tok, tmp_path):
    single = SCORED.filter(pl.col("id").is_in(["c1", "d1", "d2"]))
    with pytest.raises(ValueError, match="at least two responses with different rewards"):
        materialize_pairs(single, tok, objective=DPO(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a refiner"):
        materialize_pairs(SCORED, tok, objective=ILFDPO(refined_column=False), out_dir=tmp_path)
    with pytest.raises(ValueError, match="contrast.materialize"):
        materialize_pairs(SCORED, tok, objective=CUT(), out_dir=tmp_path)


# ---------------------------------------------------------------- the built-in refiner

def test_model_refiner_writes_one_refinement_each_and_names_the_weights(tiny, tmp_path):
    refiner = ModelRefiner(tiny, max_new_tokens=6, batch_size=2)
    out = refiner([("Add 2 and 2.", "5", "Wrong."), ("Name a fruit.", "Rock.", "Not a fruit."), ("Say hi.", "Yo", "Rude.")])
    assert len(out) == 3 and all(o is None or (isinstance(o, str) and o.strip()) for o in out)
    assert refiner([]) == []
    # retrained weights (a new file) give a new name, so no examples digest reuses old refinements
    copy = make_tiny_model(tmp_path / "other", seed=1)
    assert model_fingerprint(copy) != model_fingerprint(tiny)
    assert ModelRefiner(tiny, max_new_tokens=6).name == refiner.name
    assert ModelRefiner(tiny, max_new_tokens=7).name != refiner.name


def test_model_refiner_prompt_keeps_response_and_judgment(tiny, monkeypatch):
    """The refine prompt (x, y, j) may use the model's context, not the training max_length."""
    import cut_core.infer.generate
    seen = {}
    real = cut_core.infer.generate.generate_texts

    def spy(model, tokenizer, prompts, **kw):
        seen.update(prompts=list(prompts), **kw)
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(cut_core.infer.generate, "generate_texts", spy)
    ModelRefiner(tiny, max_new_tokens=6)([("Add 2 and 2.", "5", "The sum is off by one.")])
    assert seen["prompts"][0].endswith("### Response:\n5\n\n### Judgment:\nThe sum is off by one.\n\n### Refined Response:\n")
    assert seen["max_prompt_tokens"] == 2048 - 6 and seen["greedy"] is True


# ---------------------------------------------------------------- training through TRL

ADD_PAIRS = [(f"Add {i} and {j}.", f"{i + j} Apple.", f"{i + j} Rock.") for i in range(6) for j in range(4)]


def preference_margin(model_dir: Path, prompts_chosen_rejected) -> float:
    """Mean log p(chosen|x) - log p(rejected|x) under a model folder (what DPO should raise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.data import templates
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logp(prompt: str, answer: str) -> float:
        p_ids = tok(templates.plain_prompt(prompt))["input_ids"]
        ids = tok(templates.plain_prompt(prompt) + answer + tok.eos_token)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        target = torch.tensor(ids[1:])
        return logits.gather(-1, target[:, None])[len(p_ids) - 1:].sum().item()

    return sum(logp(x, c) - logp(x, r) for x, c, r in prompts_chosen_rejected) / len(prompts_chosen_rejected)


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_dpo_trains_through_trl(tiny, tok, tmp_path, full_finetune):
    rows = []
    for k, (x, good, bad) in enumerate(ADD_PAIRS):
        rows += [(f"g{k}", x, good, None, "positive", None, 1.0), (f"b{k}", x, bad, "Off by one.", "negative", None, 0.0)]
    pairs = materialize_pairs(frame(rows), tok, objective=DPO(), out_dir=tmp_path / "ex")
    config = {"model_path": str(tiny), "examples": str(pairs), "output_dir": str(tmp_path / "out"),
              "objective": {"name": "dpo", "beta": 0.1},
              "adapter": None if full_finetune else {"r": 8, "alpha": 16, "dropout": 0.0},
              "training": {"learning_rate": 3e-4 if full_finetune else 5e-3, "micro_batch_size": 4,
                           "gradient_accumulation": 1, "warmup_steps": 0, "logging_steps": 3, "epochs": 2,
                           "scheduler": "constant", "full_finetune": full_finetune},
              "max_length": 64}
    summary = train_cli.run(config)
    out = tmp_path / "out"
    assert summary["steps"] == 12 and summary["records"] == len(ADD_PAIRS) and (out / "COMPLETE").exists()
    assert (out / "adapter").is_dir() != full_finetune and (out / "merged" / "config.json").exists()
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(history[-1])
    # DPO moved probability mass from the rejected answers towards the chosen ones
    before, after = preference_margin(tiny, ADD_PAIRS), preference_margin(out / "merged", ADD_PAIRS)
    assert after > before + 2.0, (before, after)  # measured: 0.39 -> 4.2 (LoRA), 3.7 (full)
    assert history[-1]["rewards/margins"] > 0 and history[-1]["rewards/accuracies"] >= 0.75
    assert train_cli.run(config)["skipped"] is True  # a finished run is not redone


class _Crash(RuntimeError):
    pass


def test_dpo_resumes_after_a_crash_to_the_uninterrupted_losses(tiny, tok, tmp_path):
    from transformers import TrainerCallback

    rows = []
    for k, (x, good, bad) in enumerate(ADD_PAIRS):
        rows += [(f"g{k}", x, good, None, "positive", None, 1.0), (f"b{k}", x, bad, "Off by one.", "negative", None, 0.0)]
    pairs = materialize_pairs(frame(rows), tok, objective=DPO(), out_dir=tmp_path / "ex")

    def config(out: Path) -> dict:
        return {"model_path": str(tiny), "examples": str(pairs), "output_dir": str(out),
                "objective": {"name": "dpo"}, "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {"learning_rate": 5e-3, "micro_batch_size": 4, "gradient_accumulation": 1,
                             "warmup_steps": 0, "logging_steps": 1, "epochs": 1, "save_steps": 3}, "max_length": 64}

    train_cli.run(config(tmp_path / "ref"))

    class CrashAtStep4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise _Crash("injected after checkpoint-3")

    with pytest.raises(_Crash):
        train_cli.run(config(tmp_path / "run"), callbacks=[CrashAtStep4()])
    resumed = train_cli.run(config(tmp_path / "run"))
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 6

    def losses(out: Path) -> list[tuple[int, float]]:
        return [(h["step"], h["loss"]) for h in map(json.loads, (out / "log_history.jsonl").read_text().splitlines())]

    got, want = losses(tmp_path / "run"), losses(tmp_path / "ref")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4, 5, 6]
    assert [l for _, l in got] == pytest.approx([l for _, l in want], rel=1e-4, abs=1e-6)


def test_missing_trl_names_the_extra(tiny, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "trl", None)  # what an install without the extra looks like
    config = {"model_path": str(tiny), "examples": str(tmp_path / "none.parquet"), "output_dir": str(tmp_path / "o"),
              "objective": {"name": "ilf_dpo"}}
    with pytest.raises(ImportError, match=r"pip install 'cut-align\[dpo\]'"):
        train_cli.run(config)


# ---------------------------------------------------------------- the Prefect task

def test_task_builds_pairs_from_warehouse_scores(tiny, tmp_path):
    from cut_core.data import warehouse as wh
    from tasks.materialize import materialize_examples, refiner_for

    db = tmp_path / "warehouse.duckdb"
    con = wh.connect(db)
    for i, r in enumerate(SCORED.iter_rows(named=True)):
        con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, score, batch, source,"
                    " row_number) VALUES (?, ?, ?, ?, ?, ?, 'b', 'test', ?)",
                    [r["id"], r["instruction"], r["response"], r["judgment"], r["polarity"], r["score"], i])
    con.close()
    res = materialize_examples.fn(warehouse=str(db), batch=None, model_path=str(tiny),
                                  objective_json=DPO().model_dump_json(), max_length=64,
                                  workdir=str(tmp_path / "work"))
    assert res["stats"]["rows_by_kind"] == {"dpo": 3}
    # the refiner a declaration names: the model itself, a function, or none (and none for CUT)
    fn, name = refiner_for(ILFDPO(), str(tiny), "alpaca")
    assert isinstance(fn, ModelRefiner) and name.startswith("model:")
    fn, name = refiner_for(ILFMLE(refiner="cut_core.tasks.arithmetic:judge"), str(tiny), "alpaca")
    assert name == "cut_core.tasks.arithmetic:judge" and callable(fn)
    assert refiner_for(CUT(), str(tiny), "alpaca") == (None, None)
