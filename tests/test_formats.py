"""Data as users hold it: conversations (`messages`, TRL's prompt/completion), Hugging Face
`datasets` folders (save_to_disk Arrow, hub-layout Parquet shards) and nested judgment rows
(UltraFeedback's completions[*]), each ingested with every row accounted for; a `messages`
pipeline trains one CUT step with the chat template, and generation and evaluation take a
multi-turn prompt.

Real components: a DuckDB warehouse file, folders written by the `datasets` library itself, a
tiny Llama from cut_core.models.tiny with a chat template, the real trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cut_core import dsl
from cut_core.data import ingest, templates
from cut_core.data import warehouse as wh

ROOT = Path(__file__).resolve().parents[1]
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


MULTI = turns(("system", "Answer with a number."), ("user", "What is 2 + 2?"), ("assistant", "4"),
              ("user", "And 3 + 5?"))
CONVERSATIONS = [
    # 1: single turn: the same triplet (and id) as a flat row would be
    {"messages": turns(("user", "Name a fruit."), ("assistant", "Apple.")), "judgment": "Perfect."},
    # 2: multi-turn, negative
    {"messages": MULTI + turns(("assistant", "9")), "judgment": "Wrong: 3 + 5 is 8."},
    # 3: TRL conversational prompt/completion
    {"prompt": MULTI, "completion": turns(("assistant", "8")), "judgment": "Perfect."},
    # 4: no assistant turn
    {"messages": turns(("user", "Hello?")), "judgment": "x"},
    # 5: a trailing user turn after the response
    {"messages": turns(("user", "Hi"), ("assistant", "Hello"), ("user", "thanks")), "judgment": "Good."},
    # 6: content that is not a string (multimodal parts)
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": "hello"}], "judgment": "Perfect."},
    # 7: the response follows a system turn, not a user turn
    {"messages": turns(("system", "Be brief."), ("assistant", "Ok.")), "judgment": "Perfect."},
    # 8: unlabeled (no judgment): awaits a judge
    {"messages": MULTI + turns(("assistant", "8"))},
    # 9: a conversation and an instruction at once
    {"messages": turns(("user", "a"), ("assistant", "b")), "instruction": "c", "judgment": "Perfect."},
    # 10: the same conversation as row 2: a duplicate
    {"messages": MULTI + turns(("assistant", "9")), "judgment": "Wrong: 3 + 5 is 8."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def accounted(con, source: str) -> tuple[set, set]:
    """(row numbers that became triplets, row numbers rejected) of one source file."""
    good = {r[0] for r in con.sql("SELECT row_number FROM triplets WHERE source = $s", params={"s": source}).fetchall()}
    bad = {r[0] for r in con.sql("SELECT row_number FROM rejects WHERE source = $s", params={"s": source}).fetchall()}
    return good, bad


# ---------------------------------------------------------------- messages


def test_messages_file_every_row_accounted_with_structured_context(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    con = wh.connect(tmp_path / "w.duckdb")
    report = ingest.ingest_files(con, dsl.Source(paths=[str(path)]))
    assert report.rows_read == len(CONVERSATIONS)
    assert report.accepted + report.rejected == report.rows_read
    assert report.rejected_by_reason == {"duplicate": 1, "malformed_messages": 2, "missing_instruction": 1,
                                         "missing_response": 1, "wrong_type": 1}
    assert (report.positives, report.negatives, report.unlabeled) == (2, 1, 1)
    good, bad = accounted(con, str(path))
    assert good | bad == set(range(1, len(CONVERSATIONS) + 1)) and not good & bad

    rows = {r[0]: r[1:] for r in con.sql("SELECT row_number, id, instruction, response, judgment, context "
                                         "FROM triplets").fetchall()}
    # a single user turn is a flat instruction: same id as the flat triplet, no context
    assert rows[1] == (wh.triplet_id("Name a fruit.", "Apple.", "Perfect."), "Name a fruit.", "Apple.", "Perfect.",
                       None)
    tid, instruction, response, judgment, context = rows[2]
    assert response == "9" and judgment == "Wrong: 3 + 5 is 8."
    assert json.loads(context) == MULTI          # the turns before the response, structured
    assert instruction == ("System: Answer with a number.\n\nUser: What is 2 + 2?\n\nAssistant: 4\n\n"
                           "User: And 3 + 5?")
    assert tid == wh.triplet_id(instruction, response, judgment, context) != wh.content_key(instruction, response,
                                                                                             judgment)
    assert rows[3][1:] == (instruction, "8", "Perfect.", context)    # prompt + completion: the same context

    rejects = {r[0]: r[1:] for r in con.sql("SELECT row_number, reason, detail, raw FROM rejects").fetchall()}
    assert rejects[4][:2] == ("missing_response", "messages has no assistant turn")
    assert "1 turn(s) after its last assistant turn" in rejects[5][1]
    assert rejects[6][:2] == ("wrong_type", "messages[0].content is an array, expected a string")
    assert rejects[7][1] == "messages[1] (the response) follows a 'system' turn, not a user turn"
    assert rejects[9][0] == "malformed_messages"
    assert rejects[10][0] == "duplicate" and "row 2" in rejects[10][1]
    for n in (4, 5, 6, 7, 9, 10):   # the record as the file holds it, not its flattened form
        assert json.loads(rejects[n][2]) == CONVERSATIONS[n - 1]


def test_flat_ids_and_old_warehouses_are_unchanged(tmp_path):
    """A warehouse made before contexts existed gains the columns on open; its ids stay."""
    import duckdb

    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE triplets (id VARCHAR NOT NULL, instruction VARCHAR NOT NULL, response VARCHAR NOT NULL,"
                " judgment VARCHAR, polarity VARCHAR, refined VARCHAR, contradiction BOOLEAN DEFAULT FALSE, batch "
                "VARCHAR NOT NULL, source VARCHAR NOT NULL, row_number BIGINT NOT NULL, ingested_at TIMESTAMP)")
    con.execute("INSERT INTO triplets VALUES (?, 'q', 'a', 'Bad.', 'negative', NULL, false, 'b', 's', 1, NULL)",
                [wh.content_key("q", "a", "Bad.")])
    con.close()
    con = wh.connect(db)
    frame = wh.labeled_triplets(con)
    # the sha256 id of earlier releases was rewritten on open, once (warehouse_meta)
    assert frame["id"].to_list() == [wh.triplet_id("q", "a", "Bad.")] and frame["context"].to_list() == [None]
    assert wh.triplet_id("q", "a", "Bad.") != wh.content_key("q", "a", "Bad.")
    path = write_jsonl(tmp_path / "flat.jsonl", [{"instruction": "q", "response": "a", "judgment": "Bad."}])
    report = ingest.ingest_files(con, dsl.Source(paths=[str(path)]))
    assert report.rejected_by_reason == {"duplicate": 1}      # the same id as the stored row


def test_chat_renders_turns_and_puts_the_judgment_in_the_last_user_turn(tmp_path):
    from transformers import AutoTokenizer

    from cut_core.models.tiny import make_tiny_model

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "m", extra_tokens=["<|user|>", "<|assistant|>",
                                                                                   "<|system|>"], chat_template=CHAT))
    text, context = templates.conversation_text(MULTI), templates.context_json(MULTI)
    judge = templates.render("judge", "chat", text, judgment="Wrong.", tokenizer=tok, context=context)
    want = tok.apply_chat_template(MULTI[:-1] + [{"role": "user", "content": templates.CHAT_JUDGE_USER.format(
        instruction="And 3 + 5?", judgment="Wrong.")}], tokenize=False, add_generation_prompt=True)
    assert judge == want
    plain = templates.render("plain", "chat", MULTI, tokenizer=tok)     # the turns themselves, as generation gets them
    assert plain == tok.apply_chat_template(MULTI, tokenize=False, add_generation_prompt=True)
    # Alpaca renders the conversation as the instruction's text
    assert templates.render("judge", "alpaca", text, judgment="Wrong.", context=context) == \
        templates.judge_prompt(text, "Wrong.")
    with pytest.raises(ValueError, match="ends with the user turn"):
        templates.render("plain", "chat", MULTI + turns(("assistant", "8")), tokenizer=tok)


# ---------------------------------------------------------------- datasets folders


def test_save_to_disk_and_hub_parquet_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["q1", "q2", "  ", "q4", "q5"], "response": ["a1", "a2", "a3", "a4", "a1"],
            "judgment": ["Perfect.", "Wrong: it is 3.", "x", "$ERROR$", "Perfect."],
            "meta": [{"lang": "en"}] * 5}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select([0, 1, 2]).to_parquet(str(tmp_path / "hub/data/train-00000-of-00002.parquet"))
    ds.select([3, 4]).to_parquet(str(tmp_path / "hub/data/train-00001-of-00002.parquet"))

    con = wh.connect(tmp_path / "w.duckdb")
    report = ingest.ingest_files(con, dsl.Source(paths=[str(tmp_path / "saved")], format="hf"), batch="saved")
    assert [Path(f.path).name for f in report.files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert {f.format for f in report.files} == {"arrow"}
    assert (report.rows_read, report.accepted) == (5, 3)
    assert report.rejected_by_reason == {"failed_judgment": 1, "missing_instruction": 1}
    assert sum(f.rows_read for f in report.files) == ds.num_rows
    for f in report.files:
        good, bad = accounted(con, f.path)
        assert good | bad == set(range(1, f.rows_read + 1))
    # the same validation and ids as a JSONL file of the same rows
    ids = {r[0] for r in con.sql("SELECT id FROM triplets").fetchall()}
    assert ids == {wh.triplet_id("q1", "a1", "Perfect."), wh.triplet_id("q2", "a2", "Wrong: it is 3."),
                   wh.triplet_id("q5", "a1", "Perfect.")}

    hub = ingest.ingest_files(con, dsl.Source(paths=[str(tmp_path / "hub")], format="hf"), batch="hub")
    assert [Path(f.path).name for f in hub.files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert hub.rows_read == 5 and hub.accepted == 0       # every good row is already stored
    assert hub.rejected_by_reason == {"duplicate": 3, "failed_judgment": 1, "missing_instruction": 1}

    split = ingest.ingest_files(con, dsl.Source(paths=[str(tmp_path / "dict")], format="hf"), batch="dict")
    assert [Path(f.path).parent.name for f in split.files] == ["train", "test"]
    assert split.rows_read == 6 and split.accepted + split.rejected == 6
    # naming one split's folder reads that split only
    only = ingest.check_sources([dsl.Source(paths=[str(tmp_path / "dict" / "test")], format="hf")])
    assert [p.parent.name for _, p in only] == ["test"]

    with pytest.raises(ingest.IngestError, match="is a folder"):
        ingest.check_sources([dsl.Source(paths=[str(tmp_path / "saved")])])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ingest.IngestError, match="holds no `datasets` data"):
        ingest.check_sources([dsl.Source(paths=[str(tmp_path / "empty")], format="hf")])


def test_repo_datasets_folder_does_not_shadow_the_library():
    """From the repo root (first on sys.path) `import datasets` is the installed library: the
    top-level datasets/ folder has no __init__.py, so it is only a namespace-package candidate."""
    pytest.importorskip("datasets")
    import importlib.util

    assert not (ROOT / "datasets" / "__init__.py").exists()
    assert importlib.util.find_spec("datasets").origin.endswith(os.path.join("datasets", "__init__.py"))  # in pytest
    out = subprocess.run([sys.executable, "-c", "import datasets, transformers.trainer as t; "
                          "print(datasets.__file__, t.is_datasets_available())"],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    where, available = out.stdout.split()
    assert Path(where).parent.parent != ROOT and where.endswith(os.path.join("datasets", "__init__.py"))
    assert available == "True"


# ---------------------------------------------------------------- nested fields


UF_COLUMNS = {"instruction": "instruction", "response": "completions[*].response",
              "judgment": "completions[*].critique", "score": "completions[*].overall_score"}


def test_ultrafeedback_rows_explode_into_one_triplet_per_completion(tmp_path):
    sample = ROOT / "datasets" / "ultrafeedback" / "sample.jsonl"
    records = [json.loads(line) for line in sample.read_text().splitlines()]
    con = wh.connect(tmp_path / "w.duckdb")
    source = dsl.Source(paths=[str(sample)], columns=UF_COLUMNS,
                        polarity=dsl.Polarity(score_column="score", score_threshold=7))
    report = ingest.ingest_files(con, source)
    units = sum(max(len(r["completions"]), 1) for r in records)
    assert report.rows_read == units and report.accepted + report.rejected == units
    assert report.rejected_by_reason == {"duplicate": 1, "empty_array": 1, "missing_response": 1}
    good, bad = accounted(con, str(sample))
    assert good | bad == set(range(1, len(records) + 1))

    stored = con.sql("SELECT row_number, element, instruction, response, judgment, score, polarity FROM triplets "
                     "ORDER BY row_number, element").fetchall()
    for row, element, instruction, response, judgment, score, polarity in stored:
        c = records[row - 1]["completions"][element]
        assert (instruction, response, judgment, score) == (records[row - 1]["instruction"], c["response"],
                                                              c["critique"], c["overall_score"])
        assert polarity == ("positive" if score >= 7 else "negative")
    rejects = con.sql("SELECT row_number, element, reason, detail FROM rejects ORDER BY row_number").fetchall()
    n = len(records)
    assert (n - 2, 3, "duplicate") == rejects[0][:3] and rejects[0][3].endswith(f"row {n - 2} element 2")
    assert rejects[1] == (n - 1, 1, "missing_response", "field completions[*].response is null or blank")
    assert rejects[2] == (n, None, "empty_array", "array completions is empty: no element to explode")


def test_column_paths_nested_indexed_and_dotted_names(tmp_path):
    rows = [{"q": {"text": "What is 1 + 1?"}, "answers": [{"text": "2"}, {"text": "3"}], "verdict": "Perfect."},
            {"q": {"text": "Hi"}, "answers": [], "verdict": "Perfect."},
            {"q.text": "literal dotted column", "answers": [{"text": "x"}], "verdict": "Bad."}]
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    con = wh.connect(tmp_path / "w.duckdb")
    src = dsl.Source(paths=[str(path)], columns={"instruction": "q.text", "response": "answers[0].text",
                                                 "judgment": "verdict"})
    report = ingest.ingest_files(con, src)
    assert (report.rows_read, report.accepted) == (3, 2)
    assert report.rejected_by_reason == {"missing_response": 1}
    got = con.sql("SELECT row_number, instruction, response, element FROM triplets ORDER BY 1").fetchall()
    assert got == [(1, "What is 1 + 1?", "2", None), (3, "literal dotted column", "x", None)]

    with pytest.raises(ValueError, match="explode different arrays"):
        dsl.Source(paths=["x.jsonl"], columns={"response": "a[*].r", "judgment": "b[*].j"})
    with pytest.raises(ValueError, match="more than one"):
        dsl.Source(paths=["x.jsonl"], columns={"response": "a[*].r[*]"})
    with pytest.raises(ValueError, match="not a key"):
        dsl.Source(paths=["x.jsonl"], columns={"response": "a..r"})


def test_ultrafeedback_generator_is_deterministic(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("uf_generate", ROOT / "datasets" / "ultrafeedback" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write(tmp_path)
    assert written.read_bytes() == (ROOT / "datasets" / "ultrafeedback" / "sample.jsonl").read_bytes(), \
        "datasets/ultrafeedback/sample.jsonl is stale: run python datasets/ultrafeedback/generate.py"


# ---------------------------------------------------------------- a messages pipeline trains


@pytest.mark.slow
def test_messages_pipeline_trains_one_cut_step_with_the_chat_template(tmp_path):
    import polars as pl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.train import cli as train_cli
    from cut_core.data.contrast import materialize, read_stats
    from cut_core.dsl import CUT
    from cut_core.infer.evaluate import evaluate
    from cut_core.infer.generate import generate
    from cut_core.judge import FunctionJudge
    from cut_core.models.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", extra_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
                                chat_template=CHAT)
    tok = AutoTokenizer.from_pretrained(model_dir)
    path = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    con = wh.connect(tmp_path / "w.duckdb")
    ingest.ingest_files(con, dsl.Source(paths=[str(path)]))
    triplets = wh.labeled_triplets(con)
    con.close()
    examples = materialize(triplets, tok, objective=CUT(align_p_ratio=None), template="chat", max_length=256,
                           out_dir=tmp_path / "examples")
    frame = pl.read_parquet(examples)
    assert read_stats(examples)["rows_by_kind"] == {"align_n": 1, "align_p": 2, "misalign": 1}
    negative = triplets.filter(pl.col("polarity") == "negative").row(0, named=True)
    by_kind = {r["kind"]: r for r in frame.filter(pl.col("triplet_id") == negative["id"]).iter_rows(named=True)}
    # Align-N: the earlier turns as turns, the judgment block in the last user turn; Misalign: the same
    # turns without it; both end with the very same response ids
    want_n = templates.render("judge", "chat", negative["instruction"], judgment=negative["judgment"],
                              tokenizer=tok, context=negative["context"])
    prompt_n = tok.decode(by_kind["align_n"]["input_ids"][:by_kind["align_n"]["response_start"]])
    prompt_m = tok.decode(by_kind["misalign"]["input_ids"][:by_kind["misalign"]["response_start"]])
    assert "Answer with a number." in prompt_m and "### Judgment:" in prompt_n and "### Judgment:" not in prompt_m
    assert tok(want_n, add_special_tokens=False)["input_ids"] == \
        by_kind["align_n"]["input_ids"][:by_kind["align_n"]["response_start"]]
    assert by_kind["align_n"]["input_ids"][by_kind["align_n"]["response_start"]:] == \
        by_kind["misalign"]["input_ids"][by_kind["misalign"]["response_start"]:]

    # DPO pairs from the same conversations: the prompt is the conversation through the chat template
    from cut_core.dsl import DPO
    from cut_core.data.preference import materialize_pairs

    pairs = pl.read_parquet(materialize_pairs(triplets, tok, objective=DPO(), template="chat", out_dir=tmp_path / "p"))
    assert pairs.select("prompt", "chosen", "rejected").rows() == [
        (tok.apply_chat_template(MULTI, tokenize=False, add_generation_prompt=True), "8", "9")]

    out = tmp_path / "run"
    train_cli.run({"model_path": str(model_dir), "examples": str(examples), "output_dir": str(out),
                   "objective": {"name": "cut", "threshold": 1.1, "alpha": 1.0},
                   "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
                   "training": {"learning_rate": 1e-3, "micro_batch_size": 2, "gradient_accumulation": 1,
                                "warmup_steps": 0, "logging_steps": 1, "save_steps": 100, "scheduler": "constant"},
                   "max_steps": 1})
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 1 and losses[0] > 0

    # generation and evaluation take the multi-turn prompt
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    answers = generate(model, tok, [MULTI, "Name a fruit."], max_new_tokens=3, batch_size=2, template="chat")
    assert len(answers) == 2
    seen = []

    def judge(instruction, response):
        seen.append(instruction)
        return "Perfect." if response.strip() == "8" else "The answer is not 8."

    result = evaluate(model, tok, [{"messages": MULTI, "reference": "8"}], FunctionJudge(judge, name="t"),
                      max_new_tokens=3, batch_size=1, samples=1, threshold=1.1, template="chat", min_judged=1)
    assert seen == [templates.conversation_text(MULTI)]   # the judge reads the conversation as text
    assert result["metrics"]["n"] == 1 and result["metrics"]["heldout_nll"] is not None


def test_heldout_prompt_files_may_hold_conversations(tmp_path):
    """Evaluation reads held-out `messages` rows (the flows' read_prompts keeps the turns);
    online sampling refuses them instead of flattening them to text."""
    from tasks.generate import read_prompts, sample_prompts

    path = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": MULTI, "reference": "8"}])
    rows = read_prompts(str(path)).to_dicts()
    assert rows[0]["messages"] == MULTI and rows[0]["instruction"] == templates.conversation_text(MULTI)
    with pytest.raises(ValueError, match="not yet generated for online"):
        sample_prompts.fn(str(path), str(tmp_path / "w.duckdb"), "p", 1, str(tmp_path / "s.parquet"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": MULTI + turns(("assistant", "8"))}])
    with pytest.raises(ValueError, match="row 1: a conversation prompt ends with the user turn"):
        read_prompts(str(bad))
