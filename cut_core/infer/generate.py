"""Batched generation with the plain template: how the model answers new instructions.

Online iterations generate responses with the current model (greedy, the paper's setting) and
evaluation generates on held-out prompts; both go through `generate`. Prompts are encoded by
`sequences.py`, the one owner of token ids that `contrast.py` builds training prompts with (BOS +
prompt ids, no second BOS when a chat template already wrote one), so the model sees at inference
exactly the prefix it was trained on.

Batches are left-padded: every prompt then ends at the same position, and the new tokens of the
whole batch start at one column. Given the attention mask, `generate` derives position ids from
it, so a padded batch decodes the same tokens as one prompt at a time (tested).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

# Prompts are encoded by the one owner of token sequences (bos_to_add, encode_prompts re-exported).
from cut_core.data import sequences
from cut_core.data.sequences import bos_to_add, encode_prompts, plain_prompt_ids  # noqa: F401


def load_model(path: str, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder: bf16 on CUDA, fp32 on CPU, eval mode.

    A tokenizer without a pad token gets its EOS as pad (batched generation needs one; the
    attention mask keeps pads out of the computation, and decoding stops at the first EOS).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # safetensors only: a pickled .bin checkpoint can run code when loaded
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# ---------------------------------------------------------------- generation

@torch.inference_mode()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int, greedy: bool = True, max_prompt_tokens: int | None = None) -> list[str]:
    """Continue each prompt text; returns the new text only (up to the first EOS), stripped."""
    if not prompts:
        return []
    return generate_from_ids(model, tokenizer, encode_prompts(tokenizer, prompts, max_prompt_tokens=max_prompt_tokens),
                             max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=greedy)


@torch.inference_mode()
def generate_from_ids(model: Any, tokenizer: Any, ids: Sequence[list[int]], *, max_new_tokens: int,
                      batch_size: int, greedy: bool = True, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None) -> list[str]:
    """Continue each prompt (token ids, as sequences.py encodes them); returns the new text only.

    Sampling (greedy=False) uses `temperature` / `top_p` when given (else the model's generation
    config); `seed` seeds torch once before the first batch, so the same seed, prompts and batch
    size give the same samples."""
    return generate_from_ids_ended(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   greedy=greedy, temperature=temperature, top_p=top_p, seed=seed)[0]


@torch.inference_mode()
def generate_from_ids_ended(model: Any, tokenizer: Any, ids: Sequence[list[int]], *, max_new_tokens: int,
                            batch_size: int, greedy: bool = True, temperature: float | None = None,
                            top_p: float | None = None, seed: int | None = None) -> tuple[list[str], list[bool]]:
    """generate_from_ids, and per prompt whether the model stopped (wrote an EOS) within
    max_new_tokens; False: the limit cut the response (train it without EOS: contrast.UNFINISHED)."""
    if not ids:
        return [], []
    if seed is not None and not greedy:
        torch.manual_seed(seed)
    eos_ids, pad_id = _eos_ids(model, tokenizer), sequences.pad_id(tokenizer, model)
    device = model.device
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory batch
    # shows up at the start instead of after an hour of work.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    ended: list[bool] = [False] * len(ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: the prompt sits at the right end
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]):] = 1
        sampling = {"do_sample": False} if greedy else {"do_sample": True, **(
            {"temperature": temperature} if temperature is not None else {}), **(
            {"top_p": top_p} if top_p is not None else {})}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=sorted(eos_ids) or None, **sampling)
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in eos_ids), len(new))
            outputs[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            ended[i] = cut < len(new)
    return outputs, ended


def generate(model: Any, tokenizer: Any, instructions: Sequence[Any], *, max_new_tokens: int,
             batch_size: int, greedy: bool = True, template: str = "alpaca",
             max_prompt_tokens: int | None = None) -> list[str]:
    """One response per instruction, in order, from the plain prompt of `template`.

    `instructions` already hold any `input` (see templates.format_instruction); one may be a
    conversation, a list of {role, content} turns ending with the user's. Greedy by
    default, as the paper generates its online data. The prompt ids are
    `sequences.plain_prompt_ids`: the very ids training puts before a Misalign / Align-P response.
    """
    return generate_ended(model, tokenizer, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          greedy=greedy, template=template, max_prompt_tokens=max_prompt_tokens)[0]


def generate_ended(model: Any, tokenizer: Any, instructions: Sequence[str], *, max_new_tokens: int,
                   batch_size: int, greedy: bool = True, template: str = "alpaca",
                   max_prompt_tokens: int | None = None) -> tuple[list[str], list[bool]]:
    """generate(), and per instruction whether the model stopped before max_new_tokens
    (generate_from_ids_ended)."""
    ids = plain_prompt_ids(tokenizer, instructions, template, max_prompt_tokens=max_prompt_tokens)
    return generate_from_ids_ended(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   greedy=greedy)
