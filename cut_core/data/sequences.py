"""Token sequences, one owner: prompt ids, response ids, left truncation, response log-probs.

Training (contrast.py -> trainer.py), generation (generate.py), evaluation (evaluate.py) and the
demo's warm start (demo_task.py) all build their token ids here, so the prefix a model is trained
on and the prefix it answers or is scored under cannot drift apart:

    prompt ids    the rendered prompt text (templates.render) encoded without special tokens,
                  with BOS in front when the tokenizer adds one to a plain encode (Llama does,
                  GPT-2 does not), never a second one when the text already starts with it (a
                  chat template usually writes BOS as text)
    response ids  the response text encoded once without special tokens, then EOS (EOS takes
                  part in the loss and in held-out NLL)
    fitting       when prompt + response exceed max_length, the prompt is cut from the left,
                  BOS kept; a response that would leave the prompt less than a quarter of
                  max_length (PROMPT_RESERVE_FRACTION) is itself cut at its end (EOS dropped)

Response log-probs (`gold_response_logprobs`) come from one forward pass: by default from the
final hidden states through `loss.fused_gold_logprobs` (the [tokens, vocab] logits never exist
whole, in forward or backward), else from materialized logits at the response positions. A
head that cannot be fused (an unknown output transform, LoRA dropout on lm_head, DoRA) falls
back to materialized logits and says so once per model, through the `cut_core.data.sequences` logger.
`response_outputs` is that forward pass's outputs (hidden states with the head, or logits) and
gold targets, for a loss that needs more than the gold log-probs (the trainer's self-distillation).
Of (prompt ids, response ids) pairs: `response_logprobs` (one tensor a pair, in batches of similar
length: evaluation's scoring) and `batch_response_logprobs` (the pairs as one padded batch in their
order, [pairs, N] with a mask: the demo's warm start trains through it).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cut_core.train.loss import fused_gold_logprobs, gold_logprobs

log = logging.getLogger(__name__)

# When a target is too long, the prompt still keeps this share of max_length.
PROMPT_RESERVE_FRACTION = 0.25


# ---------------------------------------------------------------- ids

def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one to a plain encode (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a")["input_ids"][:1] == [bos] else None


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Texts -> ids without special tokens, one batched call (the tokenizer raises on an empty batch)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Rendered prompt texts -> [BOS] + ids (no second BOS when the text starts with it)."""
    ids = encode_texts(tokenizer, prompts)
    bos, bos_text = bos_to_add(tokenizer), tokenizer.bos_token
    if bos is None:
        return [list(x) for x in ids]
    return [list(x) if (bos_text and p.startswith(bos_text)) else [bos] + list(x) for p, x in zip(prompts, ids)]


def response_ids(tokenizer: Any, responses: Sequence[str]) -> list[list[int]]:
    """Response texts -> ids + EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every response ends with EOS")
    return [list(x) + [tokenizer.eos_token_id] for x in encode_texts(tokenizer, responses)]


def plain_prompt_ids(tokenizer: Any, instructions: Sequence[Any], template: str,
                     *, max_prompt_tokens: int | None = None,
                     contexts: Sequence[Any] | None = None) -> list[list[int]]:
    """The plain prompt x of each instruction (input already appended), as training encodes it:
    what the model answers at generation and is scored under at evaluation. An instruction may
    be a conversation (a list of {role, content} turns ending with the user's), or its text with
    the stored turns in `contexts` (templates.render)."""
    from cut_core.data import templates

    contexts = contexts if contexts is not None else [None] * len(instructions)
    texts = [templates.render("plain", template, x, tokenizer=tokenizer, context=c)
             for x, c in zip(instructions, contexts)]
    return encode_prompts(tokenizer, texts, max_prompt_tokens=max_prompt_tokens)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompt texts -> ids as training encodes them, cut from the left (BOS kept) to max_prompt_tokens."""
    ids = prompt_ids(tokenizer, prompts)
    if max_prompt_tokens is None:
        return ids
    bos = bos_to_add(tokenizer)
    return [cut_prompt(x, max_prompt_tokens, bos) for x in ids]


# ---------------------------------------------------------------- fitting into max_length

def cut_prompt(prompt: list[int], room: int, bos: int | None) -> list[int]:
    """Keep the prompt's end (the instruction's tail and the response header) in `room` tokens,
    and its BOS in front when it has one."""
    if len(prompt) <= room:
        return prompt
    if room < 1:
        raise ValueError(f"no room for the prompt ({room} tokens)")
    if bos is not None and prompt[:1] == [bos]:
        return [bos] + prompt[len(prompt) - (room - 1):] if room > 1 else [bos]
    return prompt[len(prompt) - room:]


def response_room(max_length: int, prompt_length: int) -> int:
    """Tokens a response may take: max_length less the prompt's reserve, which is the prompt's
    length up to PROMPT_RESERVE_FRACTION of max_length."""
    reserve = min(prompt_length, max(1, int(max_length * PROMPT_RESERVE_FRACTION)))
    return max_length - reserve


@dataclass
class Fitted:
    prompt: list[int]
    response: list[int]
    prompt_truncated: bool
    response_truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.response

    @property
    def response_start(self) -> int:
        return len(self.prompt)


def fit(prompt: list[int], response: list[int], max_length: int | None, bos: int | None, *,
        reserve_prompt_length: int | None = None) -> Fitted:
    """prompt + response cut to max_length (module docstring). `reserve_prompt_length`: the
    prompt length the response's room is decided by (default this prompt's); pass the longest
    prompt of rows that share a response (Align-N and Misalign) so that they cut it alike."""
    if max_length is None:
        return Fitted(list(prompt), list(response), False, False)
    room = response_room(max_length, len(prompt) if reserve_prompt_length is None else reserve_prompt_length)
    response_truncated = len(response) > room
    response = list(response[:room])
    prompt_room = max_length - len(response)
    return Fitted(cut_prompt(list(prompt), prompt_room, bos), response, len(prompt) > prompt_room, response_truncated)


# ---------------------------------------------------------------- batches

def pad_id(tokenizer: Any = None, model: Any = None) -> int:
    """The one pad-id rule: the tokenizer's pad token, else the model's generation-config pad,
    else the tokenizer's EOS, else 0. Any valid id will do: every padded position is masked
    (attention mask 0 and never a target), so the choice never changes a result."""
    generation_config = getattr(model, "generation_config", None)
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(generation_config, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def right_padded(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. `predict_mask` marks positions whose next token is a
    response token (the logits the loss needs); `response_lengths` counts them per sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    predict = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        if not 1 <= start <= len(s):
            raise ValueError(f"response start {start} outside [1, {len(s)}]")
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, :len(s)] = 1
        predict[i, start - 1:len(s) - 1] = True
    lengths = torch.tensor([len(s) - start for s, start in zip(seqs, starts)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attn, "predict_mask": predict, "response_lengths": lengths}


def left_aligned(flat: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values, sequence after sequence, -> [sequences, max length] and its mask."""
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat), mask


# ---------------------------------------------------------------- the output head

@dataclass
class OutputHead:
    """What turns a final hidden state into logits: softcap(h W^T + b). `weight` is differentiable
    (LoRA on lm_head: the base weight plus its low-rank update)."""

    module: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside DDP / peft wrappers."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def output_head(model: Any) -> tuple[OutputHead | None, str]:
    """The model's output head as (weight, bias, softcap), or None and why it cannot be fused."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    if head is None:
        return None, f"{type(lm).__name__} has no output embeddings"
    if type(head) is torch.nn.Linear:
        return OutputHead(head, head.weight, head.bias, softcap), "linear head"
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):  # a peft LoRA layer on lm_head
        base = head.base_layer
        if type(base) is not torch.nn.Linear or getattr(head, "fan_in_fan_out", False):
            return None, f"LoRA on a {type(base).__name__} head"
        active = [a for a in head.active_adapters if a in head.lora_A]
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False) or not active:
            return OutputHead(head, base.weight, base.bias, softcap), "LoRA head (adapter inactive or merged)"
        if any(getattr(head, "use_dora", {}).get(a, False) for a in active):
            return None, "DoRA on lm_head"
        if head.training and any(not isinstance(head.lora_dropout[a], torch.nn.Identity) for a in active):
            return None, "LoRA dropout on lm_head (targeted with lora_dropout > 0)"
        weight = base.weight
        for a in active:
            delta = head.lora_B[a].weight @ head.lora_A[a].weight * head.scaling[a]
            weight = weight + delta.to(weight.dtype)
        return OutputHead(head, weight, base.bias, softcap), "LoRA head (W + s B A)"
    return None, f"output head {type(head).__name__} is not a Linear layer"


@contextmanager
def _head_bypassed(model: Any, head: torch.nn.Module):
    """The model's forward returns the final hidden states (at logits_to_keep) in place of logits:
    the head returns its input and the model's own soft-cap is off for the duration."""
    lm = causal_lm(model)
    config = lm.config
    had_forward = "forward" in head.__dict__
    original = head.__dict__.get("forward")
    cap = getattr(config, "final_logit_softcapping", None)
    head.forward = lambda x, *args, **kwargs: x
    if cap is not None:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        if had_forward:
            head.forward = original
        else:
            del head.forward
        if cap is not None:
            config.final_logit_softcapping = cap


_CHECKED = "_cut_align_fused_head"


def fusable_head(model: Any) -> tuple[OutputHead | None, str]:
    """`output_head`, checked once per model: on a short row, in eval mode, the model's own logits
    must equal softcap(h W^T + b) from its hidden states, or the head is not fused (a model that
    scales its logits in its forward, e.g. Cohere's logit_scale, fails here, not silently)."""
    head, why = output_head(model)
    if head is None:
        return None, why
    if _is_sharded(head.weight):
        # FSDP2 (fully_shard) keeps the head's weight as a DTensor shard outside its own forward:
        # the fused path would mix it with plain tensors. Materialized logits are exact there.
        return None, "the output head's weight is sharded (FSDP2 DTensor): logits are materialized"
    lm = causal_lm(model)
    verdict = getattr(lm, _CHECKED, None)
    if verdict is None:
        verdict = _verify(model, head)
        setattr(lm, _CHECKED, verdict)
    return (head, why) if verdict[0] else (None, verdict[1])


def _is_sharded(weight: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(weight, DTensor)


@torch.no_grad()
def _verify(model: Any, head: OutputHead) -> tuple[bool, str]:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    lm = causal_lm(model)
    device = head.weight.device
    vocab = head.weight.shape[0]
    ids = torch.arange(1, 9, device=device)[None] % vocab
    was_training = inner.training
    inner.eval()
    try:
        want = inner(input_ids=ids, use_cache=False).logits[0].float()
        eval_head, _ = output_head(model)  # eval mode: the LoRA head without dropout
        with _head_bypassed(model, eval_head.module):
            hidden = inner(input_ids=ids, use_cache=False).logits[0]
        got = torch.nn.functional.linear(hidden.to(eval_head.weight.dtype), eval_head.weight, eval_head.bias).float()
        if eval_head.softcap:
            got = torch.tanh(got / eval_head.softcap) * eval_head.softcap
    except Exception as error:  # e.g. a forward that adds a [vocab] vector to its logits
        return False, f"{type(lm).__name__}'s forward does not run with its head bypassed ({error})"
    finally:
        inner.train(was_training)
    tol = 1e-3 if head.weight.dtype == torch.float32 else 5e-2
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    if got.shape != want.shape or not err <= tol:
        return False, (f"{type(lm).__name__}'s logits are not softcap(h W^T + b) of its hidden states "
                       f"(relative error {err:.2g})")
    return True, "verified"


_WARNED: set[tuple[str, str]] = set()


def response_outputs(model: Any, input_ids: torch.Tensor, predict_mask: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     fused: bool = True) -> tuple[torch.Tensor, OutputHead | None, torch.Tensor]:
    """One forward pass's outputs at the `predict_mask` positions, flat (row-major): (outputs
    [n, d], head, targets [n]). With fused=True and a head `fusable_head` accepts, the outputs
    are the final hidden states (the head bypassed) and `head` projects them; else they are the
    logits and `head` is None (the fallback logged once per model, with why). `targets` are the
    gold next tokens. What a loss that needs more than the gold log-probs (self-distillation's
    divergence) is computed from; `gold_response_logprobs` is the gold log-probs of it."""
    targets = input_ids[:, 1:][predict_mask[:, :-1]]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  logits_to_keep=predict_mask, use_cache=False)
    if fused:
        head, why = fusable_head(model)
        if head is not None:
            with _head_bypassed(model, head.module):
                hidden = model(**kwargs).logits
            return hidden.reshape(-1, hidden.shape[-1]), head, targets
        key = (type(causal_lm(model)).__name__, why)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("log-probs from materialized logits for %s: %s", key[0], why)
    logits = model(**kwargs).logits
    return logits.reshape(-1, logits.shape[-1]), None, targets


def gold_response_logprobs(model: Any, input_ids: torch.Tensor, predict_mask: torch.Tensor, *,
                           attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                           fused: bool = True, chunk_size: int | None = None) -> torch.Tensor:
    """log p(next token) at every `predict_mask` position, flat (row-major) fp32 [n].

    fused=True: the forward returns the final hidden states at those positions only and
    `loss.fused_gold_logprobs` projects them chunk by chunk (no [n, vocab] logits, none kept for
    backward); falls back to materialized logits, logging why once, for a head it cannot fuse.
    fused=False: logits at those positions (`logits_to_keep`), then `loss.gold_logprobs`.
    """
    outputs, head, targets = response_outputs(model, input_ids, predict_mask, attention_mask=attention_mask,
                                              position_ids=position_ids, fused=fused)
    return gold_logprobs_of(outputs, head, targets, chunk_size=chunk_size)


def gold_logprobs_of(outputs: torch.Tensor, head: OutputHead | None, targets: torch.Tensor, *,
                     chunk_size: int | None = None) -> torch.Tensor:
    """log p(target) of `response_outputs`' outputs: through `head` (hidden states) or from logits (None)."""
    if head is not None:
        return fused_gold_logprobs(outputs, head.weight, targets, bias=head.bias, softcap=head.softcap,
                                   chunk_size=chunk_size)
    return gold_logprobs(outputs, targets, chunk_size=chunk_size)


def response_logprobs(model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                      batch_size: int, fused: bool = True) -> list[torch.Tensor]:
    """log p(y_t | y<t, prompt) of every response token of (prompt ids, response ids) pairs (fit
    them first), one fp32 tensor each, in order; batches of similar length, right-padded.
    Differentiable when called with grad enabled."""
    out: list[torch.Tensor | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        flat, lengths = _one_batch(model, [pairs[i] for i in batch], pad_id, fused)
        for i, piece in zip(batch, torch.split(flat, lengths.tolist())):
            out[i] = piece
    return out  # type: ignore[return-value]


def batch_response_logprobs(model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int,
                            fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logprobs` of the pairs as ONE right-padded batch in their order, returned as
    [pairs, longest response] (left-aligned) with its mask: what a loss over a training batch
    reads (the demo's warm start trains through it)."""
    flat, lengths = _one_batch(model, pairs, pad_id, fused)
    return left_aligned(flat, lengths)


def _one_batch(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int,
               fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat response log-probs, response lengths) of the pairs right-padded into one batch."""
    device = next(model.parameters()).device
    b = right_padded([p + r for p, r in pairs], [len(p) for p, _ in pairs], pad_id)
    flat = gold_response_logprobs(model, b["input_ids"].to(device), b["predict_mask"].to(device),
                                  attention_mask=b["attention_mask"].to(device), fused=fused)
    return flat, b["response_lengths"]
