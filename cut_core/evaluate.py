"""Held-out evaluation: does the model make fewer of the mistakes its judges name?

`evaluate` generates a response to every held-out instruction (greedy, plain template), asks
the pipeline's judge about each, and reports:

  positive_rate       positive judgments / OK judgments (for a verifier judge: accuracy).
                      Failed judge calls are left out of the denominator and counted apart.
  failed_judgments    judge calls that failed (never counted as negatives)
  heldout_nll         mean per-token NLL of the `reference` column given the plain prompt
                      (response tokens + EOS, as training scores them); None without references
  flagged_token_rate  over the responses the judge calls negative: the fraction of their tokens
                      that CUT's detector (Eq. 5) flags, p(y_t|x,j-) / p(y_t|x) > lambda, i.e.
                      how much of a bad answer the model itself "knows" the judgment is about
  n, positives, negatives

plus `samples` (the first `samples` rows: instruction, response, judgment, polarity) and
`flag_samples` (the negative ones among them, each token with both probabilities and its flag),
which `report.flag_report_html` turns into a page like the paper's Fig. 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from cut_core import templates
from cut_core.generate import bos_to_add, encode_prompts, generate
from cut_core.judges import NEGATIVE, POSITIVE, Judge
from cut_core.loss import cut_token_loss, gold_logprobs


# ---------------------------------------------------------------- scoring a response under a prompt

def _response_ids(tokenizer: Any, responses: Sequence[str]) -> list[list[int]]:
    """Response text -> ids + EOS, as contrast.py builds targets (the EOS takes part in the loss)."""
    if not responses:
        return []
    ids = tokenizer(list(responses), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def _fit(prompt: list[int], response: list[int], max_length: int | None, bos: int | None) -> list[int]:
    """Cut the prompt from the left (keeping BOS) when prompt + response exceed max_length."""
    if max_length is None or len(prompt) + len(response) <= max_length:
        return prompt
    room = max(1, max_length - len(response))
    if bos is not None and prompt[:1] == [bos] and room > 1:
        return [bos] + prompt[len(prompt) - (room - 1):]
    return prompt[len(prompt) - room:]


@torch.inference_mode()
def response_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[list[int]], *,
                      batch_size: int, max_length: int | None = None) -> list[torch.Tensor]:
    """log p(y_t | y<t, prompt) for every response token (fp32, on CPU), one tensor per pair.

    Batches are right-padded (the default positions are then correct) and only the response
    positions' logits are turned into log-probabilities.
    """
    prompt_ids = encode_prompts(tokenizer, prompts)
    bos = bos_to_add(tokenizer)
    seqs = []
    for p, r in zip(prompt_ids, responses):
        if max_length is not None and len(r) >= max_length:
            r = r[:max_length - 1]  # a response longer than the window: score what fits
        seqs.append((_fit(p, r, max_length, bos), r))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, labels, spans = [], [], [], []
        for row, i in enumerate(batch):
            p, r = seqs[i]
            input_ids[row, :len(p) + len(r)] = torch.tensor(p + r)
            attention[row, :len(p) + len(r)] = 1
            # logits at position t predict token t+1: the response starts at len(p)
            rows += [row] * len(r)
            cols += range(len(p) - 1, len(p) - 1 + len(r))
            labels += r
            spans.append(len(r))
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]
        logp = gold_logprobs(picked, torch.tensor(labels, device=logits.device)).cpu()
        for i, chunk in zip(batch, torch.split(logp, spans)):
            out[i] = chunk
    return out  # type: ignore[return-value]


def token_flags(model: Any, tokenizer: Any, items: Sequence[tuple[str, str, str]], *, threshold: float,
                batch_size: int, template: str = "alpaca", max_length: int | None = None) -> list[dict]:
    """Eq. 5 on (instruction, response, negative judgment) triplets.

    For each: response ids, log p under the judge prompt [x, j-] (Align-N) and the plain prompt
    x (Misalign), and the flags of `loss.cut_token_loss` (the same rule training applies).
    """
    if not items:
        return []
    ids = _response_ids(tokenizer, [r for _, r, _ in items])
    judged = response_logprobs(
        model, tokenizer, [templates.render("judge", template, x, judgment=j, tokenizer=tokenizer) for x, _, j in items],
        ids, batch_size=batch_size, max_length=max_length)
    plain = response_logprobs(
        model, tokenizer, [templates.render("plain", template, x, tokenizer=tokenizer) for x, _, _ in items],
        ids, batch_size=batch_size, max_length=max_length)
    width = max(len(t) for t in judged)
    lj = torch.zeros(len(items), width)
    lp = torch.zeros(len(items), width)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for k, (a, b) in enumerate(zip(judged, plain)):
        lj[k, :len(a)], lp[k, :len(b)], mask[k, :len(a)] = a, b, True
    _, flagged = cut_token_loss(lj, lp, mask, threshold=threshold, alpha=1.0)
    return [{"ids": ids[k][:len(judged[k])], "logp_judged": judged[k].tolist(), "logp_plain": plain[k].tolist(),
             "flagged": flagged[k, :len(judged[k])].tolist()} for k in range(len(items))]


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text (incremental decode: leading spaces and multi-byte
    characters split over tokens come out right; a token that ends mid-character shows as '')."""
    texts, previous = [], ""
    for k in range(len(ids)):
        current = tokenizer.decode(list(ids[:k + 1]), skip_special_tokens=False)
        if current.endswith("\ufffd"):  # incomplete UTF-8: the next token completes the character
            texts.append("")
            continue
        texts.append(current[len(previous):] if current.startswith(previous) else tokenizer.decode([ids[k]]))
        previous = current
    return texts


# ---------------------------------------------------------------- the evaluation

def evaluate(model: Any, tokenizer: Any, heldout_rows: Sequence[Mapping[str, Any]], judge: Judge, *,
             max_new_tokens: int, batch_size: int, samples: int, threshold: float,
             template: str = "alpaca", max_length: int | None = None) -> dict:
    """Generate, judge and score the held-out rows; returns {'metrics', 'samples', 'flag_samples'}.

    heldout_rows: mappings with 'instruction' (optional 'input', appended after a newline, and
    'reference', a reference response for heldout_nll). Every value in 'metrics' is a number or
    None (e.g. heldout_nll without references), ready for MLflow.
    """
    rows = list(heldout_rows)
    instructions = [templates.format_instruction(r["instruction"], r.get("input")) for r in rows]
    was_training = model.training
    model.eval()
    try:
        responses = generate(model, tokenizer, instructions, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, template=template)
        results = judge.judge_batch(list(zip(instructions, responses))) if rows else []

        ok = [r for r in results if r.status == "ok"]
        positives = sum(r.polarity == POSITIVE for r in ok)
        metrics: dict[str, float | int | None] = {
            "n": len(rows),
            "positive_rate": positives / len(ok) if ok else None,
            "positives": positives,
            "negatives": len(ok) - positives,
            "failed_judgments": len(results) - len(ok),
        }

        # Held-out NLL of the references: token-weighted, like the training loss over a corpus.
        refs = [(x, r["reference"]) for x, r in zip(instructions, rows) if r.get("reference")]
        metrics["heldout_nll"] = None
        if refs:
            logps = response_logprobs(
                model, tokenizer, [templates.render("plain", template, x, tokenizer=tokenizer) for x, _ in refs],
                _response_ids(tokenizer, [y for _, y in refs]), batch_size=batch_size, max_length=max_length)
            metrics["heldout_nll"] = -float(sum(t.sum() for t in logps)) / sum(len(t) for t in logps)

        # Eq. 5 on every negatively judged response.
        negative_idx = [k for k, r in enumerate(results) if r.status == "ok" and r.polarity == NEGATIVE]
        flags = token_flags(model, tokenizer, [(instructions[k], responses[k], results[k].judgment)
                                               for k in negative_idx],
                            threshold=threshold, batch_size=batch_size, template=template, max_length=max_length)
        n_tokens = sum(len(f["flagged"]) for f in flags)
        metrics["flagged_token_rate"] = (sum(sum(f["flagged"]) for f in flags) / n_tokens) if n_tokens else None
    finally:
        model.train(was_training)

    table = [{"instruction": instructions[k], "response": responses[k], "judgment": results[k].judgment,
              "polarity": results[k].polarity, "status": results[k].status, "error": results[k].error}
             for k in range(min(samples, len(rows)))]
    by_row = dict(zip(negative_idx, flags))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    flag_samples = []
    for k, sample in enumerate(table):
        f = by_row.get(k)
        if f is None:
            continue
        tokens = [{"text": text, "id": tid, "special": tid in special, "flagged": bool(flag),
                   "p_judged": math.exp(a), "p_plain": math.exp(b)}
                  for text, tid, flag, a, b in zip(token_texts(tokenizer, f["ids"]), f["ids"], f["flagged"],
                                                   f["logp_judged"], f["logp_plain"])]
        flag_samples.append({**sample, "threshold": threshold, "tokens": tokens})
    return {"metrics": metrics, "samples": table, "flag_samples": flag_samples}
