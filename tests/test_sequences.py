"""One owner of token sequences (cut_core/data/sequences.py): training and inference see the same ids.

Proves: for the same (instruction, template), the prompt ids contrast.py writes into the training
examples are the ids generation feeds the model and the ids evaluation scores a response under
(plain and judge prompts, with and without left truncation, alpaca and chat templates); an
over-long pair is cut alike in training and in evaluation (BOS kept, response cut by the longer
twin's room); BOS is added once, never twice when the prompt text already starts with it.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch

from cut_core.data import contrast, sequences, templates
from cut_core.infer import evaluate, generate
from cut_core.dsl import CUT

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
INSTRUCTION = "What is 12 + 7? Explain every step of the sum, then give the final answer on its own line."
RESPONSE = "12 + 7 = 19. The ones digits give 9, the tens digit stays 1, so the answer is 19."
JUDGMENT = "The response is correct but it misses the explanation of the tens digit."


@pytest.fixture(scope="module", params=["alpaca", "chat"])
def setup(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.models.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", chat_template=CHAT)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return request.param, tok, model


def _examples(tok, template, max_length, tmp_path) -> pl.DataFrame:
    triplets = pl.DataFrame({"id": ["a", "b"], "instruction": [INSTRUCTION, INSTRUCTION + " Be brief."],
                             "response": [RESPONSE, RESPONSE], "judgment": [JUDGMENT, None],
                             "polarity": ["negative", "positive"]})
    path = contrast.materialize(triplets, tok, objective=CUT(align_p_ratio=1.0),
                                template=template, max_length=max_length, out_dir=tmp_path)
    return pl.read_parquet(path)


def _row(examples, kind) -> tuple[list[int], list[int]]:
    row = examples.filter(pl.col("kind") == kind).row(0, named=True)
    ids = list(row["input_ids"])
    return ids[:row["response_start"]], ids[row["response_start"]:]


@pytest.mark.parametrize("max_length", [None, 40])
def test_training_prompts_are_the_generation_and_evaluation_prompts(setup, tmp_path, monkeypatch, max_length):
    template, tok, model = setup
    examples = _examples(tok, template, max_length or 4096, tmp_path)
    train_plain, train_response = _row(examples, "misalign")
    train_judged, judged_response = _row(examples, "align_n")
    assert judged_response == train_response
    if max_length:
        assert examples["input_ids"].list.len().max() <= max_length
        assert train_judged[0] == tok.bos_token_id     # the left cut keeps BOS

    # generation: the ids handed to model.generate
    seen: list[list[int]] = []
    original = model.generate

    def recording(*args, input_ids, attention_mask, **kwargs):
        seen.append(input_ids[0][attention_mask[0].bool()].tolist())
        return original(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    generate.generate(model, tok, [INSTRUCTION], max_new_tokens=2, batch_size=1, template=template)
    untruncated = sequences.plain_prompt_ids(tok, [INSTRUCTION], template)[0]
    if max_length is None:
        assert seen == [train_plain]
    else:
        assert seen == [untruncated] and untruncated[-len(train_plain) + 1:] == train_plain[1:]

    # evaluation: the (prompt, response) pairs scored for Eq. 5 flags, both contexts
    scored: list[tuple[list[int], list[int]]] = []
    real = sequences.response_logprobs

    def recording_scores(model_, pairs, **kwargs):
        scored.extend(pairs)
        return real(model_, pairs, **kwargs)

    monkeypatch.setattr(sequences, "response_logprobs", recording_scores)
    evaluate.token_flags(model, tok, [(INSTRUCTION, RESPONSE, JUDGMENT)], threshold=1.2, batch_size=2,
                         template=template, max_length=max_length)
    assert scored == [(train_judged, train_response), (train_plain, train_response)]


def test_bos_is_added_once(setup):
    _, tok, _ = setup
    bos = tok.bos_token_id
    plain, already = sequences.prompt_ids(tok, ["Hello there", tok.bos_token + "Hello there"])
    assert plain[0] == bos and plain[1] != bos
    assert already[0] == bos and already[1] != bos and plain == already
    chat = templates.render("plain", "chat", "Hello", tokenizer=tok)
    assert chat.startswith(tok.bos_token)               # the chat template writes BOS as text
    assert sequences.prompt_ids(tok, [chat])[0].count(bos) == 1


def test_fit_cuts_twins_alike_and_keeps_bos():
    bos = 1
    judged, plain, response = [bos] + list(range(10, 40)), [bos] + list(range(10, 20)), list(range(100, 160))
    reserve = max(len(judged), len(plain))
    a = sequences.fit(judged, response, 48, bos, reserve_prompt_length=reserve)
    b = sequences.fit(plain, response, 48, bos, reserve_prompt_length=reserve)
    assert a.response == b.response == response[:36] and a.response_truncated and b.response_truncated
    assert len(a.input_ids) == 48 and a.prompt == [bos] + judged[-11:] and a.prompt_truncated
    assert b.prompt == plain and not b.prompt_truncated
    short = sequences.fit(plain, response[:5], 48, bos)
    assert short.input_ids == plain + response[:5] and not (short.prompt_truncated or short.response_truncated)
    with pytest.raises(ValueError, match="response start"):
        sequences.right_padded([[1, 2]], [0], pad_id=0)


def test_response_logprobs_match_a_full_forward(setup):
    _, tok, model = setup
    prompt = sequences.plain_prompt_ids(tok, [INSTRUCTION], "alpaca")[0]
    response = sequences.response_ids(tok, [RESPONSE])[0]
    (got,) = sequences.response_logprobs(model, [(prompt, response)], pad_id=tok.pad_token_id, batch_size=1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    want = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(response)[:, None])[:, 0]
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


def test_one_batch_of_response_logprobs_is_response_logprobs_in_order(setup):
    """batch_response_logprobs (the demo's warm start: one padded batch, in order, [pairs, N] with a
    mask) gives each pair the log-probs response_logprobs (sorted, batched) gives it."""
    _, tok, model = setup
    prompts = sequences.plain_prompt_ids(tok, [INSTRUCTION, "Say hi."], "alpaca")
    responses = sequences.response_ids(tok, [RESPONSE, "Hi"])
    pairs = list(zip(prompts, responses))
    with torch.no_grad():
        rows, mask = sequences.batch_response_logprobs(model, pairs, pad_id=tok.pad_token_id)
        each = sequences.response_logprobs(model, pairs, pad_id=tok.pad_token_id, batch_size=1)
    assert mask.sum(-1).tolist() == [len(r) for r in responses]
    for row, m, want in zip(rows, mask, each):
        torch.testing.assert_close(row[m], want, atol=1e-5, rtol=0)
