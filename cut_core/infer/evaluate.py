"""Held-out evaluation: does the model make fewer of the mistakes its judges name?

`evaluate` generates a response to every held-out instruction (greedy, plain template), asks
the pipeline's judge about each, and reports:

  positive_rate       positive judgments / OK judgments (for a verifier judge: accuracy).
                      Failed judge calls are left out of the denominator and counted apart.
                      None (no score) when more than `max_failed_rate` of the judge calls
                      failed or fewer than `min_judged` succeeded: `refused` then says why.
  judged              OK judgments: the denominator of positive_rate
  failed_judgments    judge calls that failed (never counted as negatives)
  heldout_nll         mean per-token NLL of the `reference` column given the plain prompt
                      (response tokens + EOS, as training scores them); None without references
  flagged_token_rate  over the responses the judge calls negative: the fraction of their tokens
                      that CUT's detector (Eq. 5) flags, p(y_t|x,j-) / p(y_t|x) > lambda, i.e.
                      how much of a bad answer the model itself "knows" the judgment is about
  judge_prompt_tokens, judge_completion_tokens
                      token usage of the judge calls, summed over the replies that reported
                      `usage`; None when none did (unknown, not zero)
  judge_usage_unknown replies that reported no usage (their tokens are not in the sums)
  n, positives, negatives

plus `samples` (the first `samples` rows: instruction, response, judgment, polarity) and
`flag_samples` (the negative ones among them, each token with both probabilities and its flag),
which `report.flag_report_html` turns into a page like the paper's Fig. 2.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from cut_core.data import sequences, templates
from cut_core.infer.generate import generate
from cut_core.errors import UserError
from cut_core.judge import NEGATIVE, POSITIVE, Judge, score_refusal, scrub_result, usage_totals
from cut_core.train.loss import cut_token_loss


# ---------------------------------------------------------------- scoring a response under a prompt

def _response_ids(tokenizer: Any, responses: Sequence[str]) -> list[list[int]]:
    """Response text -> ids + EOS, as training builds targets (the EOS takes part in the loss)."""
    return sequences.response_ids(tokenizer, responses)


@torch.inference_mode()
def scored_logprobs(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], responses: Sequence[list[int]], *,
                    batch_size: int, max_length: int | None = None,
                    reserve_prompt_lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
    """log p(y_t | y<t, prompt) for every response token (fp32, on CPU), one tensor per pair.

    Each (prompt ids, response ids) pair is fitted into max_length as training fits it
    (sequences.fit: the prompt cut from the left, BOS kept; an over-long response cut at its end,
    by the room `reserve_prompt_lengths` leaves, default each prompt's own length), then scored
    by `sequences.response_logprobs` (only the response positions' log-probs, no full logits).
    """
    bos = sequences.bos_to_add(tokenizer)
    pairs = []
    for k, (p, r) in enumerate(zip(prompt_ids, responses)):
        f = sequences.fit(list(p), list(r), max_length, bos,
                          reserve_prompt_length=reserve_prompt_lengths[k] if reserve_prompt_lengths else None)
        pairs.append((f.prompt, f.response))
    out = sequences.response_logprobs(model, pairs, pad_id=sequences.pad_id(tokenizer), batch_size=batch_size)
    return [t.float().cpu() for t in out]


def token_flags(model: Any, tokenizer: Any, items: Sequence[tuple[str, str, str]], *, threshold: float,
                batch_size: int, template: str = "alpaca", max_length: int | None = None) -> list[dict]:
    """Eq. 5 on (instruction, response, negative judgment) triplets; an instruction may be a
    conversation (a list of {role, content} turns ending with the user's).

    For each: response ids, log p under the judge prompt [x, j-] (Align-N) and the plain prompt
    x (Misalign), and the flags of `loss.cut_token_loss` (the same rule training applies).
    """
    if not items:
        return []
    ids = _response_ids(tokenizer, [r for _, r, _ in items])
    judged_prompts = sequences.prompt_ids(tokenizer, [templates.render("judge", template, x, judgment=j, tokenizer=tokenizer)
                                                      for x, _, j in items])
    plain_prompts = sequences.plain_prompt_ids(tokenizer, [x for x, _, _ in items], template)
    # Both contexts cut the response alike (by the longer prompt's room), as contrast.py does.
    reserve = [max(len(a), len(b)) for a, b in zip(judged_prompts, plain_prompts)]
    judged = scored_logprobs(model, tokenizer, judged_prompts, ids, batch_size=batch_size, max_length=max_length,
                             reserve_prompt_lengths=reserve)
    plain = scored_logprobs(model, tokenizer, plain_prompts, ids, batch_size=batch_size, max_length=max_length,
                            reserve_prompt_lengths=reserve)
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

class EvaluationRefused(UserError, RuntimeError):
    """An evaluation whose judge calls failed too often to give a score: no score, no promotion.
    `metrics` holds the counts (judged, failed_judgments) for the record."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})

    def __reduce__(self):  # survives pickling (Prefect may persist a task's exception)
        return type(self), (str(self), self.metrics)


def evaluate(model: Any, tokenizer: Any, heldout_rows: Sequence[Mapping[str, Any]], judge: Judge, *,
             max_new_tokens: int, batch_size: int, samples: int, threshold: float,
             template: str = "alpaca", max_length: int | None = None,
             max_failed_rate: float = 0.05, min_judged: int = 10,
             responses: Sequence[str] | None = None) -> dict:
    """Generate, judge and score the held-out rows; returns {'metrics', 'samples', 'flag_samples',
    'refused'}: `refused` is None, or why the model gets no score (too many failed judge calls,
    see `judges.score_refusal`), in which case metrics['positive_rate'] is None.

    heldout_rows: mappings with 'instruction' (optional 'input', appended after a newline, and
    'reference', a reference response for heldout_nll), or with 'messages' in place of
    'instruction': a conversation's prompt turns, ending with the user turn to answer (the judge
    reads it as text, templates.conversation_text). Every value in 'metrics' is a number or
    None (e.g. heldout_nll without references), ready for MLflow. `responses`: answers already generated by another engine
    (cut_core.infer.engines), one per row; None generates them in-process.
    """
    rows = list(heldout_rows)
    # a row holds an instruction, or a conversation's prompt turns under 'messages'
    prompts = [templates.check_turns(r["messages"]) if r.get("messages") is not None
               else templates.format_instruction(r["instruction"], r.get("input")) for r in rows]
    instructions = [templates.prompt_text(p) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        if responses is None:
            responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, template=template)
        elif len(responses) != len(rows):
            raise ValueError(f"{len(responses)} responses for {len(rows)} held-out rows")
        responses = list(responses)
        results = judge.judge_batch(list(zip(instructions, responses))) if rows else []
        # The samples are stored: no text in them may hold the judge's key, whatever it echoed.
        results = [scrub_result(r, getattr(judge, "secrets", ())) for r in results]

        ok = [r for r in results if r.status == "ok"]
        positives = sum(r.polarity == POSITIVE for r in ok)
        refused = score_refusal(len(ok), len(results) - len(ok), max_failed_rate=max_failed_rate,
                                min_judged=min_judged)
        metrics: dict[str, float | int | None] = {
            "n": len(rows),
            "positive_rate": positives / len(ok) if ok and refused is None else None,
            "judged": len(ok),
            "positives": positives,
            "negatives": len(ok) - positives,
            "failed_judgments": len(results) - len(ok),
        }
        # Token usage of the judge calls (None: no reply reported usage; judge_usage_unknown
        # counts the replies that did not, whose tokens are not in the sums).
        metrics.update({f"judge_{k}": v for k, v in usage_totals(results).items()})

        # Held-out NLL of the references: token-weighted, like the training loss over a corpus.
        refs = [(x, r["reference"]) for x, r in zip(prompts, rows) if r.get("reference")]
        metrics["heldout_nll"] = None
        if refs:
            logps = scored_logprobs(
                model, tokenizer, sequences.plain_prompt_ids(tokenizer, [x for x, _ in refs], template),
                _response_ids(tokenizer, [y for _, y in refs]), batch_size=batch_size, max_length=max_length)
            metrics["heldout_nll"] = -float(sum(t.sum() for t in logps)) / sum(len(t) for t in logps)

        # Eq. 5 on every negatively judged response.
        negative_idx = [k for k, r in enumerate(results) if r.status == "ok" and r.polarity == NEGATIVE]
        flags = token_flags(model, tokenizer, [(prompts[k], responses[k], results[k].judgment)
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
    return {"metrics": metrics, "samples": table, "flag_samples": flag_samples, "refused": refused}
