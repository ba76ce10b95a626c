"""cut_core.models.tiny proves: a tiny Llama + tokenizer builds in about a second, saves with
save_pretrained, loads offline through AutoModelForCausalLM / AutoTokenizer, runs a forward
pass, and its tokenizer round-trips text exactly (spaces, tabs, newlines, unicode), keeps the
template headers as single tokens, splits digits one by one and adds BOS like Llama's."""

from __future__ import annotations

import time

import pytest
import torch

from cut_core.data import templates
from cut_core.models.tiny import BOS, EOS, PAD, UNK, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    make_tiny_model(out, seed=0)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def loaded(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoModelForCausalLM.from_pretrained(tiny[0]), AutoTokenizer.from_pretrained(tiny[0])


def test_saves_files_and_builds_fast(tiny):
    out, seconds = tiny
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    # ~1 s measured (first call in a process pays the transformers imports); generous for a busy CI box.
    assert seconds < 30


def test_loads_offline_and_forward_pass(loaded):
    model, tok = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS, EOS, PAD, UNK)
    assert model.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok(templates.plain_prompt("What is 2 + 2?"))["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("text", [
    "plain words",
    "  two leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand a blank line",
    "digits 12345 and 3.14, -7",
    "unicode: é ü 中文 🙂",
    templates.judge_prompt("Compute 12 * 3.", "Wrong: 12 * 3 = 36.") + "12 * 3 = 35.",
    templates.refine_prompt("x", "y", "z"),
])
def test_round_trip(loaded, text):
    _, tok = loaded
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS added like Llama's tokenizer
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_template_pieces_are_single_tokens_and_digits_split(loaded):
    _, tok = loaded
    for piece in templates.TEMPLATE_TOKENS:
        assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece
    assert tok.convert_ids_to_tokens(tok("2024", add_special_tokens=False)["input_ids"]) == ["2", "0", "2", "4"]
    # The plain prompt is short: preamble, headers and newlines are a handful of tokens.
    assert len(tok(templates.plain_prompt("hi"))["input_ids"]) < 15


def test_deterministic_and_configurable(tmp_path, tiny):
    a = make_tiny_model(tmp_path / "a", seed=0)
    assert (a / "tokenizer.json").read_bytes() == (tiny[0] / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(tiny[0] / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    chat = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    b = make_tiny_model(tmp_path / "b", ["some text", "more text 123"], vocab_size=300, hidden_size=32,
                        num_layers=1, num_heads=2, intermediate_size=64, extra_tokens=["<|user|>"],
                        chat_template=chat)
    from transformers import AutoConfig, AutoTokenizer

    cfg, tok = AutoConfig.from_pretrained(b), AutoTokenizer.from_pretrained(b)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (32, 1, 2)
    assert tok.chat_template == chat
    assert len(tok("<|user|>", add_special_tokens=False)["input_ids"]) == 1
