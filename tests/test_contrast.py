"""cut_core.data.templates + cut_core.data.contrast (+ tasks.materialize) prove:
- the Alpaca strings are METHOD.md §3's, byte for byte; the chat variant puts the judgment in
  its own block of the user turn and never doubles BOS;
- the examples Parquet follows docs/architecture.md: exact columns and types, every align_n has
  one misalign twin with identical response ids, the prompt is masked (response_start points at
  the first response token), sequences end with EOS;
- too long: the prompt is cut from the left (BOS kept) and the response stays whole; a response
  longer than max_length is cut at its end, alike in both twins, and counted;
- Align-P is downsampled to align_p_ratio x #negatives (seeded), None keeps all;
- the file is digest-addressed: same inputs return the same file untouched (mtime), row order
  does not matter, changed settings give a new digest;
- each baseline (sft, hindsight, forward_prediction, ilf_mle) writes the rows it promises;
- the Prefect task reads a DuckDB warehouse read-only and materializes;
- the real CUT online data (iter1) materializes (skipped when ../shared/data is absent)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
import pytest

from cut_core.data import templates
from cut_core.data.contrast import EXAMPLE_SCHEMA, examples_digest, materialize, read_stats
from cut_core.dsl import CUT, ForwardPrediction, Hindsight, ILFMLE, SFT
from cut_core.models.tiny import make_tiny_model
from cut_core.data.warehouse import content_key

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), extra_tokens=["<|user|>", "<|assistant|>"])
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("tiny_chat"), extra_tokens=["<|user|>", "<|assistant|>"],
                           chat_template=CHAT)
    return AutoTokenizer.from_pretrained(path)


def frame(rows: list[tuple]) -> pl.DataFrame:
    """rows: (id, instruction, response, judgment, polarity[, refined])."""
    rows = [r + (None,) * (6 - len(r)) for r in rows]
    return pl.DataFrame(rows, schema=["id", "instruction", "response", "judgment", "polarity", "refined"],
                        orient="row")


SMALL = frame([
    ("p1", "What is 2 + 2?", "2 + 2 = 4.", None, "positive"),
    ("p2", "Name a fruit.", "Apple.", "Perfect.", "positive"),
    ("n1", "What is 3 * 3?", "3 * 3 = 6.", "Wrong: 3 * 3 is 9.", "negative"),
    ("n2", "Say hello.", "Go away.", "The response is rude.", "negative"),
    ("u1", "Unlabeled.", "Whatever.", None, None),
])


def build(tok, tmp_path, triplets=SMALL, **kw) -> tuple[pl.DataFrame, Path]:
    kw.setdefault("objective", CUT(align_p_ratio=None))
    kw.setdefault("max_length", 256)
    path = materialize(triplets, tok, out_dir=tmp_path, **kw)
    return pl.read_parquet(path), path


def split(row: dict) -> tuple[list[int], list[int]]:
    ids, start = row["input_ids"], row["response_start"]
    return ids[:start], ids[start:]


# ---------------------------------------------------------------- templates

def test_exact_alpaca_strings():
    assert templates.PROMPT_PLAIN == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    assert templates.PROMPT_JUDGE == (
        "Below is an instruction that describes a task. Write a response to the instruction and the "
        "response should match the corresponding judgment.\n\n### Instruction:\n{instruction}\n\n"
        "### Judgment:\n{judgment}\n\n### Response:\n")
    assert templates.plain_prompt("X") == templates.PROMPT_PLAIN.replace("{instruction}", "X")
    assert templates.judge_prompt("X", "J").endswith("### Instruction:\nX\n\n### Judgment:\nJ\n\n### Response:\n")
    assert templates.format_instruction("Do it.", "") == "Do it."
    assert templates.format_instruction("Do it.", None) == "Do it."
    assert templates.format_instruction("Do it.", "with this") == "Do it.\nwith this"
    fwd = templates.forward_prompt("X", "Y")
    assert fwd.endswith("### Instruction:\nX\n\n### Response:\nY\n\n### Judgment:\n")
    assert templates.refine_prompt("X", "Y", "J").endswith("### Judgment:\nJ\n\n### Refined Response:\n")


def test_chat_variant(chat_tok, tok):
    plain = templates.chat_plain_prompt(chat_tok, "Say hi.")
    judged = templates.chat_judge_prompt(chat_tok, "Say hi.", "Too rude.")
    assert plain == "<s><|user|>\nSay hi.</s>\n<|assistant|>\n"
    assert "Say hi.\n\n### Judgment:\nToo rude.\n\n" in judged and judged.endswith("<|assistant|>\n")
    with pytest.raises(ValueError, match="chat template"):
        templates.chat_plain_prompt(tok, "x")


# ---------------------------------------------------------------- the contract

def test_contract_columns_twins_and_masking(tok, tmp_path):
    out, path = build(tok, tmp_path)
    assert dict(out.schema) == EXAMPLE_SCHEMA
    assert path.parent == tmp_path and path.suffix == ".parquet"
    assert sorted(out["kind"].to_list()) == ["align_n", "align_n", "align_p", "align_p", "misalign", "misalign"]
    assert "u1" not in out["triplet_id"].to_list()  # unlabeled rows are not trained on

    rows = {(r["triplet_id"], r["kind"]): r for r in out.iter_rows(named=True)}
    for tid in ("n1", "n2"):
        assert out.filter((pl.col("triplet_id") == tid) & (pl.col("kind") == "misalign")).height == 1
        n_prompt, n_resp = split(rows[(tid, "align_n")])
        m_prompt, m_resp = split(rows[(tid, "misalign")])
        assert n_resp == m_resp  # identical response ids: the loss pairs them position by position
        assert n_prompt != m_prompt

    src = {r["id"]: r for r in SMALL.iter_rows(named=True)}
    for (tid, kind), row in rows.items():
        prompt, resp = split(row)
        t = src[tid]
        expect = (templates.judge_prompt(t["instruction"], t["judgment"]) if kind == "align_n"
                  else templates.plain_prompt(t["instruction"]))
        assert prompt == [tok.bos_token_id] + tok(expect, add_special_tokens=False)["input_ids"]
        assert resp == tok(t["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(resp, skip_special_tokens=True) == t["response"]

    stats = read_stats(path)
    assert stats["rows_by_kind"] == {"align_n": 2, "align_p": 2, "misalign": 2}
    assert stats["unlabeled_skipped"] == 1 and stats["prompt_truncated"] == 0


def test_chat_template_examples(chat_tok, tmp_path):
    out, _ = build(chat_tok, tmp_path, template="chat")
    for row in out.iter_rows(named=True):
        prompt, _ = split(row)
        assert prompt.count(chat_tok.bos_token_id) == 1 and prompt[0] == chat_tok.bos_token_id
    n = out.filter(pl.col("triplet_id") == "n1")
    (a, b) = [split(r)[1] for r in n.iter_rows(named=True)]
    assert a == b


def test_left_truncation_keeps_response(tok, tmp_path):
    long_instruction = "Explain this in detail. " * 60
    t = frame([("n1", long_instruction, "Short answer.", "Too short.", "negative")])
    out, path = build(tok, tmp_path, triplets=t, max_length=64)
    resp_ids = tok("Short answer.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for row in out.iter_rows(named=True):
        prompt, resp = split(row)
        assert len(row["input_ids"]) == 64
        assert resp == resp_ids  # the response is whole, EOS included
        assert prompt[0] == tok.bos_token_id  # BOS survives the cut
        tail = tok(templates.RESPONSE_HEADER + "\n", add_special_tokens=False)["input_ids"]
        assert prompt[-len(tail):] == tail  # the cut is on the left: the prompt's end is intact
    judged = tok.decode(split(out.filter(pl.col("kind") == "align_n").row(0, named=True))[0])
    assert "### Judgment:\nToo short." in judged  # the judgment sits near the end and survives
    assert read_stats(path)["prompt_truncated"] == 2


def test_response_longer_than_max_length_is_cut_alike_and_counted(tok, tmp_path):
    t = frame([("n1", "Write a lot.", "word " * 400, "Far too long.", "negative")])
    out, path = build(tok, tmp_path, triplets=t, max_length=100)
    (n,) = out.filter(pl.col("kind") == "align_n").iter_rows(named=True)
    (m,) = out.filter(pl.col("kind") == "misalign").iter_rows(named=True)
    assert split(n)[1] == split(m)[1]
    assert len(n["input_ids"]) <= 100 and len(m["input_ids"]) <= 100
    assert split(n)[1][-1] != tok.eos_token_id  # a cut response does not end with EOS
    assert split(n)[1] == tok("word " * 400, add_special_tokens=False)["input_ids"][:len(split(n)[1])]
    assert "### Judgment:\nFar too long." in tok.decode(split(n)[0])  # the prompt keeps its judgment
    stats = read_stats(path)
    assert stats["response_truncated"] == 2


def test_align_p_downsampling(tok, tmp_path):
    rows = [(f"p{i:02d}", f"Question {i}?", f"Answer {i}.", None, "positive") for i in range(40)]
    rows += [(f"n{i:02d}", f"Task {i}.", f"Bad {i}.", f"Mistake {i}.", "negative") for i in range(12)]
    t = frame(rows)

    def kept(ratio, seed=0):
        out, path = build(tok, tmp_path, triplets=t, objective=CUT(align_p_ratio=ratio), seed=seed)
        return sorted(out.filter(pl.col("kind") == "align_p")["triplet_id"].to_list()), read_stats(path)

    ids, stats = kept(0.25)
    assert len(ids) == 3 and stats["align_p_kept"] == 3 and stats["align_p_available"] == 40
    assert kept(0.25)[0] == ids  # seeded
    assert kept(0.25, seed=1)[0] != ids
    assert len(kept(1.0)[0]) == 12
    assert len(kept(10.0)[0]) == 40  # never more than there are
    assert len(kept(None)[0]) == 40


# ---------------------------------------------------------------- digest addressing

def test_digest_reuse_and_change(tok, tmp_path):
    obj = CUT(align_p_ratio=None)
    _, first = build(tok, tmp_path, objective=obj)
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    _, again = build(tok, tmp_path, triplets=SMALL.reverse(), objective=obj)  # row order does not matter
    assert again == first and first.stat().st_mtime_ns == mtime  # reused, not rewritten
    # Loss-only settings do not change the examples, hence not the digest.
    assert build(tok, tmp_path, objective=CUT(align_p_ratio=None, alpha=1.0))[1] == first

    changed = [
        dict(objective=CUT(align_p_ratio=0.5)),
        dict(objective=SFT()),
        dict(objective=obj, max_length=128),
        dict(objective=obj, seed=7),
        dict(objective=obj, triplets=SMALL.with_columns(
            pl.when(pl.col("id") == "n1").then(pl.lit("Other text.")).otherwise(pl.col("judgment")).alias("judgment"))),
    ]
    paths = {build(tok, tmp_path, **kw)[1] for kw in changed}
    assert first not in paths and len(paths) == len(changed)
    assert examples_digest(SMALL, tok, objective=obj, template="alpaca", max_length=256) == first.stem
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no leftovers of the atomic write


def test_tokenizer_change_changes_digest(tok, chat_tok):
    obj = CUT()
    a = examples_digest(SMALL, tok, objective=obj, template="alpaca", max_length=256)
    b = examples_digest(SMALL, chat_tok, objective=obj, template="alpaca", max_length=256)
    assert a != b


# ---------------------------------------------------------------- baselines

def responses(tok, out: pl.DataFrame) -> list[tuple[str, str, str]]:
    """(triplet_id, prompt text, target text) with special tokens dropped."""
    return [(r["triplet_id"], tok.decode(split(r)[0], skip_special_tokens=True),
             tok.decode(split(r)[1], skip_special_tokens=True)) for r in out.iter_rows(named=True)]


def test_sft_rows(tok, tmp_path):
    out, _ = build(tok, tmp_path, objective=SFT())
    assert set(out["kind"]) == {"mle"}
    assert responses(tok, out) == [
        ("p1", templates.plain_prompt("What is 2 + 2?"), "2 + 2 = 4."),
        ("p2", templates.plain_prompt("Name a fruit."), "Apple."),
    ]


def test_hindsight_rows(tok, tmp_path):
    out, _ = build(tok, tmp_path, objective=Hindsight())
    got = {tid: (p, y) for tid, p, y in responses(tok, out)}
    assert set(got) == {"p1", "p2", "n1", "n2"}
    assert got["p1"] == (templates.judge_prompt("What is 2 + 2?", templates.POSITIVE_JUDGMENT_HINDSIGHT), "2 + 2 = 4.")
    assert got["p2"][0] == templates.judge_prompt("Name a fruit.", "Perfect.")
    assert got["n1"] == (templates.judge_prompt("What is 3 * 3?", "Wrong: 3 * 3 is 9."), "3 * 3 = 6.")


def test_forward_prediction_rows(tok, tmp_path):
    out, _ = build(tok, tmp_path, objective=ForwardPrediction())
    got = responses(tok, out)
    assert len(got) == 8 and set(out["kind"]) == {"mle"}
    assert ("n1", templates.plain_prompt("What is 3 * 3?"), "3 * 3 = 6.") in got
    assert ("n1", templates.forward_prompt("What is 3 * 3?", "3 * 3 = 6."), "Wrong: 3 * 3 is 9.") in got
    assert ("p1", templates.forward_prompt("What is 2 + 2?", "2 + 2 = 4."), templates.POSITIVE_JUDGMENT_FORWARD) in got
    assert ("p2", templates.forward_prompt("Name a fruit.", "Apple."), "Perfect.") in got


def test_ilf_mle_rows(tok, tmp_path):
    t = SMALL.with_columns(pl.when(pl.col("id") == "n1").then(pl.lit("3 * 3 = 9.")).otherwise(None).alias("refined"))
    out, path = build(tok, tmp_path, triplets=t, objective=ILFMLE())
    got = {tid: y for tid, _, y in responses(tok, out)}
    assert got == {"p1": "2 + 2 = 4.", "p2": "Apple.", "n1": "3 * 3 = 9."}  # n2: no refinement, skipped
    stats = read_stats(path)
    assert stats["ilf_skipped_no_refinement"] == 1 and stats["ilf_refined_from_column"] == 1

    calls = []

    def polite(items):
        calls.append(items)
        return ["Hello!" for _ in items]

    out, path = build(tok, tmp_path, triplets=t, objective=ILFMLE(), refine_fn=polite)
    assert calls == [[("Say hello.", "Go away.", "The response is rude.")]]  # only what lacks a refinement
    assert {tid: y for tid, _, y in responses(tok, out)}["n2"] == "Hello!"
    assert read_stats(path)["ilf_refined_generated"] == 1
    build(tok, tmp_path, triplets=t, objective=ILFMLE(), refine_fn=polite)
    assert len(calls) == 1  # reused file: no second generation

    with pytest.raises(ValueError, match="needs a refiner"):
        build(tok, tmp_path, triplets=t, objective=ILFMLE(refined_column=False))


def test_no_labeled_rows_writes_an_empty_file(tok, tmp_path):
    out, path = build(tok, tmp_path, triplets=SMALL.filter(pl.col("polarity").is_null()))
    assert out.height == 0 and dict(out.schema) == EXAMPLE_SCHEMA and read_stats(path)["rows"] == 0


# ---------------------------------------------------------------- the Prefect task

def test_task_reads_warehouse(tok, tmp_path):
    from cut_core.data import warehouse as wh
    from tasks.materialize import materialize_examples

    db = tmp_path / "warehouse.duckdb"
    con = wh.connect(db)
    for i, r in enumerate(SMALL.iter_rows(named=True)):
        con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, refined, batch, source,"
                    " row_number) VALUES (?, ?, ?, ?, ?, ?, ?, 'test', ?)",
                    [r["id"], r["instruction"], r["response"], r["judgment"], r["polarity"], r["refined"],
                     "b1" if i < 3 else "b2", i])
    con.close()
    tok.save_pretrained(tmp_path / "tok")
    kw = dict(warehouse=str(db), model_path=str(tmp_path / "tok"), objective_json=CUT(align_p_ratio=None)
              .model_dump_json(), template="alpaca", max_length=128, workdir=str(tmp_path / "work"))
    res = materialize_examples.fn(batch=None, **kw)
    assert Path(res["path"]) == tmp_path / "work" / "examples" / f"{res['digest']}.parquet"
    assert res["stats"]["rows_by_kind"] == {"align_n": 2, "align_p": 2, "misalign": 2}
    assert materialize_examples.fn(batch=None, **kw)["path"] == res["path"]
    only_b1 = materialize_examples.fn(batch="b1", **kw)
    assert only_b1["stats"]["rows_by_kind"] == {"align_n": 1, "align_p": 2, "misalign": 1}


# ---------------------------------------------------------------- real data

@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "cut-online" / "iter1.json").exists(),
                    reason="../shared/data/cut-online/iter1.json is absent (real CUT online data)")
def test_real_cut_online_iter1(tok, tmp_path):
    raw = pl.read_json(DATA / "cut-online" / "iter1.json")
    raw = raw.filter(pl.col("judgment").is_null() | (pl.col("judgment") != "$ERROR$"))  # failed judge calls
    instruction = [templates.format_instruction(i, x) for i, x in raw.select("instruction", "input").iter_rows()]
    triplets = raw.select(
        pl.Series("instruction", instruction, dtype=pl.String),
        pl.col("output").alias("response"),
        pl.col("judgment"),
        pl.when(pl.col("judgment").is_null()).then(pl.lit("positive")).otherwise(pl.lit("negative")).alias("polarity"),
    )
    triplets = triplets.with_columns(pl.Series("id", [content_key(*r) for r in triplets.select(
        "instruction", "response", "judgment").iter_rows()])).unique("id", keep="first")
    n_neg = triplets.filter(pl.col("polarity") == "negative").height
    assert n_neg == 287 - 47

    start = time.perf_counter()
    out, path = build(tok, tmp_path, triplets=triplets, objective=CUT(), max_length=1024)
    seconds = time.perf_counter() - start
    stats = read_stats(path)
    print(f"iter1: {triplets.height} triplets -> {out.height} examples in {seconds:.2f}s; {stats['by_kind']}")
    assert stats["rows_by_kind"]["align_n"] == stats["rows_by_kind"]["misalign"] == n_neg
    assert stats["rows_by_kind"]["align_p"] == int(0.25 * n_neg)
    twins = out.filter(pl.col("kind") != "align_p").with_columns(
        resp=pl.col("input_ids").list.slice(pl.col("response_start")))
    pairs = twins.group_by("triplet_id").agg(pl.col("resp").n_unique().alias("distinct"), pl.len().alias("n"))
    assert pairs["distinct"].to_list() == [1] * n_neg and pairs["n"].to_list() == [2] * n_neg
    assert out["input_ids"].list.len().max() <= 1024


def test_a_refiner_object_enters_the_digest_by_its_name_not_its_address():
    """A ModelRefiner is an object, not a function: its repr holds a memory address, which gave the
    same refinements a new examples file in every process. Its `name` (the weights' fingerprint) is used."""
    from cut_core.data.contrast import refiner_name

    class Refiner:
        def __init__(self, name):
            self.name = name

        def __call__(self, items):
            return [None for _ in items]

    assert refiner_name(Refiner("model:abc:alpaca:256"), None) == "model:abc:alpaca:256"
    assert refiner_name(Refiner("model:abc:alpaca:256"), "given") == "given"
    assert refiner_name(None, None) is None


def test_a_response_the_length_limit_cut_is_trained_without_eos(tok, tmp_path):
    """An online answer cut by max_new_tokens (unfinished) never had an EOS: its Align-P/SFT row
    must not teach a stop there, and CUT must not compare the two contexts on a made-up stop (on
    SmolLM2 that stop was the most-flagged token, README "A real model"). Finished answers keep EOS."""
    unfinished = SMALL.with_columns(pl.Series("unfinished", [True, False, True, False, False]))
    out, path = build(tok, tmp_path, triplets=unfinished)
    src = {r["id"]: r for r in SMALL.iter_rows(named=True)}
    for row in out.iter_rows(named=True):
        _, resp = split(row)
        words = tok(src[row["triplet_id"]]["response"], add_special_tokens=False)["input_ids"]
        cut = row["triplet_id"] in ("p1", "n1")
        assert resp == (words if cut else words + [tok.eos_token_id]), row
    n1 = {r["kind"]: split(r)[1] for r in out.filter(pl.col("triplet_id") == "n1").iter_rows(named=True)}
    assert n1["align_n"] == n1["misalign"]  # still identical twins
    assert read_stats(path)["rows_without_eos"] == 3  # p1 align_p, n1 align_n + misalign
    sft, _ = build(tok, tmp_path, triplets=unfinished, objective=SFT())
    assert {r["triplet_id"]: split(r)[1][-1] == tok.eos_token_id for r in sft.iter_rows(named=True)} == {
        "p1": False, "p2": True}
    # the flag names a different file; all False (or absent) is the data it always was
    kw = dict(objective=CUT(align_p_ratio=None), template="alpaca", max_length=256)
    none = SMALL.with_columns(pl.lit(False).alias("unfinished"))
    assert examples_digest(none, tok, **kw) == examples_digest(SMALL, tok, **kw) != examples_digest(unfinished, tok, **kw)
