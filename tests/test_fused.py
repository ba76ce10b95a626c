"""Gold log-probs from hidden states (loss.fused_gold_logprobs, sequences.gold_response_logprobs).

Proves: the fused path equals the materialized one (logits, then log-softmax) within 1e-5 in
fp32, in value and in the gradient of every trainable parameter, for full fine-tuning of an
untied Llama, LoRA on a tied-embedding head (Qwen2), LoRA targeting lm_head itself, a head with
a bias (Phi), a soft-capped head (Gemma 2) and a scaled one (Cohere); no tensor saved for backward holds [tokens,
vocab] values on the fused path (it does on the materialized one); a model whose forward
transforms its logits in a way the config does not declare and LoRA dropout on lm_head fall back to materialized logits and
say so; CUTTrainer's `logprob_path` switch gives the same loss and gradients both ways.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cut_core.data import sequences
from cut_core.train.loss import fused_gold_logprobs, gold_logprobs
from cut_core.data.sequences import gold_response_logprobs, right_padded

VOCAB = 211
TOL = 1e-5


# ---------------------------------------------------------------- the function alone

@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_equals_logits_then_log_softmax(softcap, with_bias):
    torch.manual_seed(0)
    h = torch.randn(53, 24, requires_grad=True)
    w = torch.randn(VOCAB, 24, requires_grad=True)
    b = torch.randn(VOCAB, requires_grad=True) if with_bias else None
    y = torch.randint(0, VOCAB, (53,))
    y[[3, 40]] = -100                     # ignored labels: 0 and no gradient
    g = torch.randn(53)
    params = [t for t in (h, w, b) if t is not None]

    got = fused_gold_logprobs(h, w, y, bias=b, softcap=softcap, chunk_size=7)
    got_grads = torch.autograd.grad((got * g).sum(), params)
    z = torch.nn.functional.linear(h, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want = gold_logprobs(z, y)
    want_grads = torch.autograd.grad((want * g).sum(), params)

    assert got[3] == 0 and got[40] == 0
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_the_same_one(softcap):
    """A frozen head (LoRA) takes the forward-gradient path: d out / d h computed in forward."""
    torch.manual_seed(1)
    h = torch.randn(29, 8, requires_grad=True)
    w, b = torch.randn(VOCAB, 8), torch.randn(VOCAB)
    y = torch.randint(0, VOCAB, (29,))
    y[5] = -100
    g = torch.randn(29)
    out = fused_gold_logprobs(h, w, y, bias=b, softcap=softcap, chunk_size=4)
    (out * g).sum().backward()
    assert w.grad is None and b.grad is None
    h2 = h.detach().clone().requires_grad_(True)
    z = torch.nn.functional.linear(h2, w, b)
    want = gold_logprobs(softcap * torch.tanh(z / softcap) if softcap else z, y)
    (want * g).sum().backward()
    torch.testing.assert_close(out, want, atol=TOL, rtol=0)
    torch.testing.assert_close(h.grad, h2.grad, atol=TOL, rtol=1e-5)


# ---------------------------------------------------------------- real models

def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def _qwen2_tied():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def _phi_bias():
    from transformers import PhiConfig, PhiForCausalLM
    model = PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
    assert model.lm_head.bias is not None
    with torch.no_grad():
        model.lm_head.bias.normal_()       # a bias that matters
    return model


def _gemma2_softcap():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=0.5, attn_logit_softcapping=None,
                                          query_pre_attn_scalar=8, attn_implementation="eager"))


def _cohere_scaled():
    from transformers import CohereConfig, CohereForCausalLM
    return CohereForCausalLM(CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.3))


def _lora(model, targets, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():                  # B starts at 0: make every adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


CASES = {
    "llama-full-ft-untied": lambda: _llama(tied=False),
    "qwen2-tied-head-lora": lambda: _lora(_qwen2_tied(), ["q_proj", "v_proj", "down_proj"]),
    "llama-lora-on-lm_head": lambda: _lora(_llama(tied=False), ["q_proj", "lm_head"]),
    "phi-head-bias-full-ft": _phi_bias,
    "gemma2-softcap-full-ft": _gemma2_softcap,
    # Cohere multiplies its logits by logit_scale: linear, so it commutes with the head (verified).
    "cohere-logit-scale-full-ft": _cohere_scaled,
}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs, starts = [], []
    for n in (19, 11, 25):
        s = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        seqs.append(s)
        starts.append(n // 3)
    return right_padded(seqs, starts, pad_id=0)


def _grads(model, batch, fused: bool):
    model.zero_grad(set_to_none=True)
    flat = gold_response_logprobs(model, batch["input_ids"], batch["predict_mask"],
                                  attention_mask=batch["attention_mask"], fused=fused, chunk_size=5)
    weights = torch.linspace(0.5, 1.5, flat.numel())
    (-(flat * weights).sum()).backward()
    return flat.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_materialized_on_real_models(case):
    torch.manual_seed(0)
    model = CASES[case]().float().train()
    batch = _batch()
    head, why = sequences.fusable_head(model)
    assert head is not None, why
    fused, g_fused = _grads(model, batch, fused=True)
    materialized, g_mat = _grads(model, batch, fused=False)
    assert fused.shape == (int(batch["response_lengths"].sum()),)
    torch.testing.assert_close(fused, materialized, atol=TOL, rtol=0)
    assert g_fused.keys() == g_mat.keys() and g_fused
    for name in g_mat:
        torch.testing.assert_close(g_fused[name], g_mat[name], atol=TOL, rtol=1e-4, msg=name)
    if "lm_head" in case:                  # the head's own adapter is trained through the fused path
        assert any("lm_head" in n and "lora_B" in n for n in g_fused)


def _saved_vocab_rows(model, batch, fused: bool) -> list[tuple]:
    """Shapes of the tensors saved for backward that hold >= `tokens` rows of vocabulary values."""
    tokens = int(batch["response_lengths"].sum())
    found = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == VOCAB and t.numel() >= tokens * VOCAB:
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gold_response_logprobs(model, batch["input_ids"], batch["predict_mask"],
                               attention_mask=batch["attention_mask"], fused=fused).sum().backward()
    return found


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    torch.manual_seed(0)
    model = _llama(tied=True).float().train()
    batch = _batch()
    assert _saved_vocab_rows(model, batch, fused=False)       # the materialized path keeps logits
    assert _saved_vocab_rows(model, batch, fused=True) == []


def _undeclared_cap():
    """A Llama whose forward squashes its logits without saying so in its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class SquashedLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 0.3 * torch.tanh(out.logits / 0.3)
            return out

    return SquashedLlama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))


def test_a_head_it_cannot_fuse_falls_back_and_says_so(caplog):
    torch.manual_seed(0)
    model = _undeclared_cap().float().train()
    batch = _batch()
    head, why = sequences.fusable_head(model)
    assert head is None and "not softcap(h W^T + b)" in why
    with caplog.at_level(logging.WARNING, logger="cut_core.data.sequences"):
        fused, _ = _grads(model, batch, fused=True)
    assert "materialized logits for SquashedLlama" in caplog.text
    materialized, _ = _grads(model, batch, fused=False)
    torch.testing.assert_close(fused, materialized, atol=TOL, rtol=0)


def test_lora_dropout_on_lm_head_falls_back_in_training_and_fuses_in_eval(caplog):
    torch.manual_seed(0)
    model = _lora(_llama(tied=False), ["q_proj", "lm_head"], dropout=0.1).train()
    head, why = sequences.fusable_head(model)
    assert head is None and "dropout" in why
    with caplog.at_level(logging.WARNING, logger="cut_core.data.sequences"):
        _grads(model, _batch(), fused=True)
    assert "dropout" in caplog.text
    model.eval()
    assert sequences.fusable_head(model)[0] is not None


# ---------------------------------------------------------------- the trainer's switch

def test_trainer_logprob_path_switch_gives_the_same_loss_and_gradients(tmp_path):
    from cut_core.train.trainer import CUTCollator, CUTConfig, CUTTrainer, Record, RecordDataset

    torch.manual_seed(0)
    model = _lora(_qwen2_tied(), ["q_proj", "v_proj"]).float().train()
    g = torch.Generator().manual_seed(3)
    records = []
    for i in range(4):
        prompt = torch.randint(3, VOCAB, (6 + i,), generator=g).tolist()
        judgment = torch.randint(3, VOCAB, (4,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (5 + 2 * i,), generator=g).tolist()
        if i % 2:
            records.append(Record("cut", f"t{i}", prompt + response, len(prompt),
                                  prompt + judgment + response, len(prompt) + len(judgment)))
        else:
            records.append(Record("nll", f"t{i}", prompt + response, len(prompt)))
    batch = CUTCollator(pad_token_id=0)(records)
    results = {}
    for path in ("fused", "materialized"):
        args = CUTConfig(output_dir=str(tmp_path / path), threshold=1.0001, alpha=1.0, logprob_path=path,
                         report_to="none", dataloader_pin_memory=False)
        trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records))
        model.zero_grad(set_to_none=True)
        loss, parts = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        assert parts.flagged.any()          # both terms of L1 take part
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["fused"][0], results["materialized"][0], atol=TOL, rtol=0)
    for name, grad in results["materialized"][1].items():
        torch.testing.assert_close(results["fused"][1][name], grad, atol=TOL, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="logprob_path"):
        CUTConfig(output_dir=str(tmp_path / "bad"), logprob_path="liger")
