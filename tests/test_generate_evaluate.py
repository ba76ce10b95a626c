"""Generation, held-out evaluation and the flagged-token report, on a tiny real Llama.

Proves that:
- `load_model` gives an fp32 eval-mode model on CPU and a pad token even when the tokenizer has none;
- `generate` returns one string per instruction, and left-padded batches decode exactly the same
  greedy outputs as one prompt at a time (batch-size invariance);
- decoding keeps only the new tokens and stops at the first EOS (forced through the LM head);
- a TransformersJudge parses a "Perfect" judgment as positive and an empty one as a failure;
- `evaluate` computes positive_rate with a function judge (failed calls left out and counted),
  heldout_nll equal to the model's own loss on the reference, and flags identical to an
  unbatched Eq. 5 computation; lambda = inf flags nothing;
- the HTML report highlights exactly the flagged tokens, with both probabilities in the tooltip.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil

import pytest
import torch

from cut_core.data import templates
from cut_core.infer.evaluate import evaluate, token_texts
from cut_core.infer.generate import generate, generate_ended, load_model
from cut_core.judge import FunctionJudge, TransformersJudge
from cut_core.infer.report import flag_report_html
from cut_core.models.tiny import make_tiny_model

INSTRUCTIONS = [
    "What is 12 + 7?",
    "Write a poem about the sea, the sky, and a long list of other things that are blue.",
    "Hi",
    "List three fruits:",
    "Explain why the sky is blue.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A tiny model's ops are microseconds long; on a shared 2-core box intra-op threads spend
    # far more time synchronising than computing (measured: 50x slower decoding with 2 threads).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


@contextlib.contextmanager
def forced_tokens(model, ids: list[int]):
    """Make the LM head emit `ids` one per decoding step (then keep repeating the last one)."""
    step = {"n": 0}

    def hook(module, inputs, logits):
        target = ids[min(step["n"], len(ids) - 1)]
        step["n"] += 1
        forced = torch.full_like(logits, -1e4)
        forced[..., target] = 1e4
        return forced

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- load_model, generate

def test_load_model_cpu_fp32_eval_and_pad_from_eos(tiny, tiny_dir, tmp_path):
    model, tokenizer = tiny
    assert model.dtype == torch.float32 and not model.training and model.device.type == "cpu"
    assert tokenizer.pad_token is not None

    no_pad = tmp_path / "no-pad"
    shutil.copytree(tiny_dir, no_pad)
    tokenizer_copy = type(tokenizer).from_pretrained(str(tiny_dir))
    tokenizer_copy.pad_token = None
    tokenizer_copy.save_pretrained(str(no_pad))
    _, reloaded = load_model(str(no_pad))
    assert reloaded.pad_token == reloaded.eos_token


def test_generate_one_string_per_instruction_and_batching_invariance(tiny):
    model, tokenizer = tiny
    one_at_a_time = [generate(model, tokenizer, [x], max_new_tokens=16, batch_size=1)[0] for x in INSTRUCTIONS]
    for batch_size in (2, 8):
        batched = generate(model, tokenizer, INSTRUCTIONS, max_new_tokens=16, batch_size=batch_size)
        assert len(batched) == len(INSTRUCTIONS) and all(isinstance(s, str) for s in batched)
        assert batched == one_at_a_time
    assert generate(model, tokenizer, [], max_new_tokens=4, batch_size=2) == []


def test_generate_decodes_only_new_tokens_and_stops_at_eos(tiny):
    model, tokenizer = tiny
    answer = tokenizer(" Paris is the capital.", add_special_tokens=False)["input_ids"]
    junk = tokenizer("junk", add_special_tokens=False)["input_ids"][0]
    with forced_tokens(model, answer + [tokenizer.eos_token_id, junk]):
        out = generate(model, tokenizer, INSTRUCTIONS[:3], max_new_tokens=40, batch_size=8)
    assert out == ["Paris is the capital."] * 3  # stripped, no prompt text, nothing after EOS


def test_generate_ended_tells_an_answer_the_length_limit_cut_from_one_that_stopped(tiny):
    """A cut answer must be trained without EOS (contrast.UNFINISHED): generation has to say which it was."""
    model, tokenizer = tiny
    answer = tokenizer(" Paris is the capital.", add_special_tokens=False)["input_ids"]
    with forced_tokens(model, answer + [tokenizer.eos_token_id]):
        stopped = generate_ended(model, tokenizer, INSTRUCTIONS[:2], max_new_tokens=len(answer) + 1, batch_size=8)
    with forced_tokens(model, answer + [tokenizer.eos_token_id]):
        cut = generate_ended(model, tokenizer, INSTRUCTIONS[:2], max_new_tokens=len(answer), batch_size=8)
    assert stopped == (["Paris is the capital."] * 2, [True, True])
    assert cut == (["Paris is the capital."] * 2, [False, False])  # same text, no EOS within the limit
    assert generate_ended(model, tokenizer, [], max_new_tokens=4, batch_size=2) == ([], [])


def test_transformers_judge_parses_and_fails_on_empty(tiny):
    model, tokenizer = tiny
    judge = TransformersJudge(model=model, tokenizer=tokenizer, prompt=templates.PROMPT_FORWARD,
                              max_new_tokens=12)
    perfect = tokenizer("Perfect.", add_special_tokens=False)["input_ids"]
    with forced_tokens(model, perfect + [tokenizer.eos_token_id]):
        [res] = judge.judge_batch([("What is 1 + 1?", "2")])
    assert (res.status, res.polarity, res.judgment) == ("ok", "positive", "Perfect.")
    with forced_tokens(model, [tokenizer.eos_token_id]):
        [res] = judge.judge_batch([("What is 1 + 1?", "2")])
    assert (res.status, res.polarity, res.judgment) == ("failed", None, None)


# ---------------------------------------------------------------- evaluate + report

def _independent_logprobs(model, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """log p(response + EOS | prompt), one sequence, no padding, straight from the logits."""
    p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + r])).logits[0].float()
    logp = logits.log_softmax(-1)[len(p) - 1:len(p) - 1 + len(r)]
    return logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)


def _judge_fn(instruction: str, response: str) -> str | None:
    if "crash" in instruction:
        raise RuntimeError("verifier down")
    if "12 + 7" in instruction or "Hi" == instruction:
        return None  # positive
    return "Wrong: the <answer> does not address the instruction."


def test_evaluate_metrics_flags_and_report(tiny):
    model, tokenizer = tiny
    rows = [{"instruction": x} for x in INSTRUCTIONS] + [{"instruction": "crash now"}]
    rows[0]["reference"] = "12 + 7 = 19."
    judge = FunctionJudge(_judge_fn)
    out = evaluate(model, tokenizer, rows, judge, max_new_tokens=12, batch_size=4, samples=4, threshold=1.0,
                   max_failed_rate=0.2, min_judged=5)
    m = out["metrics"]

    assert m["n"] == 6 and m["failed_judgments"] == 1 and m["judged"] == 5 and out["refused"] is None
    assert (m["positives"], m["negatives"]) == (2, 3)
    assert m["positive_rate"] == pytest.approx(2 / 5)  # the failed call is not a negative

    # heldout_nll: the model's own mean token loss on prompt + reference + EOS, prompt masked.
    ref_logp = _independent_logprobs(model, tokenizer, templates.plain_prompt(INSTRUCTIONS[0]), "12 + 7 = 19.")
    assert m["heldout_nll"] == pytest.approx(-ref_logp.mean().item(), rel=1e-5)

    # Flags: identical to an unbatched Eq. 5 on each negative sample.
    assert [s["polarity"] for s in out["samples"]] == ["positive", "negative", "positive", "negative"]
    assert [s["instruction"] for s in out["flag_samples"]] == [INSTRUCTIONS[1], INSTRUCTIONS[3]]
    total = flagged = 0
    for sample in out["flag_samples"]:
        lj = _independent_logprobs(model, tokenizer, templates.judge_prompt(sample["instruction"], sample["judgment"]),
                                   sample["response"])
        lp = _independent_logprobs(model, tokenizer, templates.plain_prompt(sample["instruction"]), sample["response"])
        toks = sample["tokens"]
        assert len(toks) == len(lj)
        assert [t["p_judged"] for t in toks] == pytest.approx(lj.exp().tolist(), rel=1e-4)
        assert [t["p_plain"] for t in toks] == pytest.approx(lp.exp().tolist(), rel=1e-4)
        for t, a, b in zip(toks, lj.tolist(), lp.tolist()):
            if abs(a - b) > 1e-4:  # away from the decision boundary, where fp noise could flip it
                assert t["flagged"] == (a - b > math.log(1.0))
        assert "".join(t["text"] for t in toks) == sample["response"] + tokenizer.eos_token
        total += len(toks)
        flagged += sum(t["flagged"] for t in toks)
    assert 0 < flagged < total  # a random model: some tokens gain from the judgment, some lose
    assert 0.0 < m["flagged_token_rate"] < 1.0

    page = flag_report_html(out["flag_samples"], metrics=m)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    spans = re.findall(r'<span class="tok flag[^"]*" title="([^"]*)"', page)
    assert len(spans) == sum(t["flagged"] for s in out["flag_samples"] for t in s["tokens"])
    assert all("p(y|x,j\u2212) = " in tip and "p(y|x) = " in tip for tip in spans)
    assert "Wrong: the &lt;answer&gt; does not address" in page  # user text is escaped
    assert "positive_rate" in page


def test_infinite_threshold_flags_nothing(tiny):
    model, tokenizer = tiny
    rows = [{"instruction": x} for x in INSTRUCTIONS[1:4]]
    out = evaluate(model, tokenizer, rows, FunctionJudge(lambda i, r: "Wrong."), max_new_tokens=8,
                   batch_size=2, samples=3, threshold=math.inf, min_judged=3)
    assert out["metrics"]["flagged_token_rate"] == 0.0 and out["metrics"]["positive_rate"] == 0.0
    assert out["metrics"]["heldout_nll"] is None  # no references given
    assert not any(t["flagged"] for s in out["flag_samples"] for t in s["tokens"])
    assert 'class="tok flag' not in flag_report_html(out["flag_samples"])


def test_token_texts_reassemble_the_text(tiny):
    _, tokenizer = tiny
    text = "Café au lait: 12 + 7 = 19.\n  Done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(tokenizer, ids)) == text
