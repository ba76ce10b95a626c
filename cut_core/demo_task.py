"""The bundled verifiable demo task: 2-digit + 2-digit addition.

A tiny model is warm-started ("the base model") so that it often drops the carry from the
ones column; a Python verifier then judges its answers in natural language, naming the wrong
digit and the reason, and CUT learns from those judgments. Everything here is deterministic
by seed and runs offline on a laptop CPU.

Judgment design (why it is shaped this way): a negative judgment names *which* digit is wrong
and *why* (the column arithmetic), but never repeats the wrong answer. A judgment that quotes
the answer lets the model "match the judgment" by copying digits, so the Align-N/Misalign
contrast would measure copying rather than reading; here the model can only make the named
mistake more likely by understanding "the carry was not added".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# ---------------------------------------------------------------- problems

LOW, HIGH = 10, 99                      # both operands are 2-digit numbers
N_HELDOUT = 500                         # held-out evaluation problems (binomial std ~2.2 points)
N_ONLINE = 2000                         # online prompts: 4 iterations x 500, never reused
SPLIT_SEED = 20241221                   # the bundled datasets/arithmetic files use this seed

_INSTRUCTION_RE = re.compile(r"^\s*What is (\d+) \+ (\d+)\?\s*$")
_PLACES = ("ones", "tens", "hundreds", "thousands")


def instruction(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def parse_instruction(text: str) -> tuple[int, int]:
    m = _INSTRUCTION_RE.match(text)
    if m is None:
        raise ValueError(f"not a demo addition instruction: {text!r}")
    return int(m.group(1)), int(m.group(2))


def all_problems() -> list[tuple[int, int]]:
    return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def split_problems(seed: int = SPLIT_SEED, n_heldout: int = N_HELDOUT,
                   n_online: int = N_ONLINE) -> dict[str, list[tuple[int, int]]]:
    """Disjoint splits of all 8100 ordered pairs: 'heldout', 'online', 'warmstart' (the rest).

    The warm start never sees a held-out or online problem, so held-out accuracy measures
    generalisation and every online prompt is new to the model.
    """
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    if n_heldout + n_online >= len(problems):
        raise ValueError("held-out + online leave no problems for the warm start")
    return {
        "heldout": problems[:n_heldout],
        "online": problems[n_heldout:n_heldout + n_online],
        "warmstart": problems[n_heldout + n_online:],
    }


def has_carry(a: int, b: int) -> bool:
    """True when the ones column carries into the tens (the mistake the base model makes)."""
    return a % 10 + b % 10 >= 10


def carry_dropped(a: int, b: int) -> int:
    """The answer written without the carry from the ones column (== a + b when no carry)."""
    return a + b - 10 if has_carry(a, b) else a + b


# ---------------------------------------------------------------- verifier

def _parse_answer(response: str) -> int | None:
    # Digit tokens may be decoded with spaces between them ("8 5"); whitespace carries no
    # meaning in a number, anything else (words, signs, a second number) makes it unparseable.
    text = re.sub(r"\s+", "", response or "")
    return int(text) if text.isdigit() and len(text) <= 6 else None


def is_correct(instruction: str, response: str) -> bool:
    a, b = parse_instruction(instruction)
    return _parse_answer(response) == a + b


def _column_reason(a: int, b: int, place: int) -> str:
    """The column arithmetic behind the digit at `place` (0 ones, 1 tens, 2 hundreds)."""
    a0, b0, a1, b1 = a % 10, b % 10, a // 10, b // 10
    c1 = int(a0 + b0 >= 10)
    s2 = a1 + b1 + c1
    if place == 0:
        return f"{a0} + {b0} = {a0 + b0}"
    if place == 1:
        return f"{a1} + {b1} + 1 = {s2}" if c1 else f"{a1} + {b1} = {s2}"
    return f"the tens make {s2}, which carries 1" if s2 >= 10 else f"the tens make {s2}, which carries nothing"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def judge(instruction: str, response: str) -> str | None:
    """The demo's verifier: None when the answer is right, else a judgment naming the mistake.

    The judgment says which digit is wrong (or missing, or extra) and why, in terms of the
    column sums; it never repeats the wrong answer (see the module docstring).
    Used by the pipeline as FunctionJudge(callable='cut_core.demo_task:judge').
    """
    a, b = parse_instruction(instruction)
    correct = a + b
    answer = _parse_answer(response)
    if answer is None:
        return "The answer is not a number: it must be the sum written in digits only."
    if answer == correct:
        return None
    cs, rs = str(correct)[::-1], str(answer)[::-1]        # right-aligned: index 0 = ones
    wrong = [i for i in range(min(len(cs), len(rs))) if cs[i] != rs[i]]
    missing = list(range(len(rs), len(cs)))
    extra = list(range(len(cs), len(rs)))
    parts = []
    if wrong:
        names = [_PLACES[min(i, 3)] for i in wrong]
        parts.append(f"the {_join(names)} digit{'s are' if len(names) > 1 else ' is'} wrong")
    if missing:
        parts.append(f"the {_join([_PLACES[min(i, 3)] for i in missing])} digit is missing")
    if extra:
        parts.append("the answer has too many digits")
    what = " and ".join(parts)
    what = what[0].upper() + what[1:]

    a0, b0 = a % 10, b % 10
    if has_carry(a, b) and answer == correct - 10:
        why = f"the carry from {a0} + {b0} = {a0 + b0} was not added"
    elif not has_carry(a, b) and answer == correct + 10:
        why = f"{a0} + {b0} = {a0 + b0} has no carry, but one was added"
    else:
        first = (wrong + missing + extra)[0]
        why = _column_reason(a, b, min(first, 2))
    return f"{what}: {why}."


# ---------------------------------------------------------------- warm start ("the base model")

POSITIVE_JUDGMENT = "Perfect."           # judge-template warm-start examples with a right answer


def _wrong_answer(rng: random.Random, a: int, b: int) -> int:
    """A wrong answer for a judge-template example: mostly the carry mistake, sometimes others."""
    c = a + b
    u = rng.random()
    if u < 0.6:                                   # the base model's own mistake (or its mirror)
        return c - 10 if has_carry(a, b) else c + 10
    digits = list(str(c))
    pos = -1 if u < 0.8 else -2                    # a wrong ones or tens digit
    digits[pos] = str((int(digits[pos]) + rng.randint(1, 9)) % 10)
    return int("".join(digits))


def tokenizer_corpus(seed: int = 0, n: int = 1500) -> list[str]:
    """Texts the demo tokenizer is trained on: prompts, judgments and answers of the task."""
    from cut_core import templates

    rng = random.Random(seed)
    texts = []
    for a, b in rng.sample(all_problems(), n):
        ins = instruction(a, b)
        for r in (a + b, a + b - 10, a + b + 10, _wrong_answer(rng, a, b)):
            texts.append(templates.judge_prompt(ins, judge(ins, str(r)) or POSITIVE_JUDGMENT) + str(r))
    texts.append(judge("What is 10 + 10?", "x"))
    return texts


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """[BOS] + prompt ids, as contrast.py and generate.py encode prompts."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_response(tokenizer, response: str) -> list[int]:
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """log p(response token | prefix) per record, as [R, N] with a mask (right padding)."""
    import torch

    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    logits = model(input_ids=ids, attention_mask=att).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    n = max(map(len, responses))
    idx = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        idx[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        mask[i, :len(r)] = True
    return logp.gather(1, idx), mask


def greedy_answers(model, tokenizer, instructions: list[str], *, max_new_tokens: int = 5,
                   batch_size: int = 500) -> list[str]:
    """Greedy plain-template answers, fast: prompts of one length run unpadded together."""
    import torch
    from cut_core import templates

    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tokenizer, templates.plain_prompt(x)) for x in instructions]
    out: list[str | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for group in by_len.values():
            for k in range(0, len(group), batch_size):
                rows = group[k:k + batch_size]
                ids = torch.tensor([prompts[i] for i in rows])
                new = []
                for _ in range(max_new_tokens):
                    nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
                    new.append(nxt)
                    ids = torch.cat([ids, nxt[:, None]], 1)
                    if (torch.stack(new, 1) == eos).any(1).all():
                        break
                for i, toks in zip(rows, torch.stack(new, 1).tolist()):
                    toks = toks[:toks.index(eos)] if eos in toks else toks
                    out[i] = tokenizer.decode(toks, skip_special_tokens=True)
    model.train(was_training)
    return out  # type: ignore[return-value]


def accuracy(model, tokenizer, problems: list[tuple[int, int]]) -> dict[str, float]:
    """Held-out greedy accuracy, overall and split by whether the ones column carries."""
    answers = greedy_answers(model, tokenizer, [instruction(a, b) for a, b in problems])
    ok = [_parse_answer(r) == a + b for (a, b), r in zip(problems, answers)]
    carry = [o for (a, b), o in zip(problems, ok) if has_carry(a, b)]
    plain = [o for (a, b), o in zip(problems, ok) if not has_carry(a, b)]
    return {"accuracy": sum(ok) / len(ok), "carry": sum(carry) / max(1, len(carry)),
            "no_carry": sum(plain) / max(1, len(plain))}


def warm_start_batch(rng: random.Random, problems: list[tuple[int, int]], tokenizer, size: int,
                     p_drop: float, judge_fraction: float):
    """One warm-start batch: (plain prompts, plain responses), (judge prompts, judge responses).

    Plain examples answer right, except that a carrying problem drops its carry with
    probability p_drop: the systematic mistake the online loop must fix. Judge-template
    examples pair a judgment with a response that matches it (half right with "Perfect.",
    half wrong with the verifier's judgment of that wrong answer), so the base model learns
    to read judgments in context, which CUT's Align-N/Misalign contrast relies on.
    """
    from cut_core import templates

    n_judge = round(size * judge_fraction)
    plain_p, plain_r, judge_p, judge_r = [], [], [], []
    for k in range(size):
        a, b = rng.choice(problems)
        ins = instruction(a, b)
        if k >= n_judge:
            r = carry_dropped(a, b) if rng.random() < p_drop else a + b
            plain_p.append(templates.plain_prompt(ins))
            plain_r.append(str(r))
        else:
            r = a + b if rng.random() < 0.5 else _wrong_answer(rng, a, b)
            judge_p.append(templates.judge_prompt(ins, judge(ins, str(r)) or POSITIVE_JUDGMENT))
            judge_r.append(str(r))

    def enc(ps, rs):
        return ([encode_prompt(tokenizer, p) for p in ps], [encode_response(tokenizer, r) for r in rs])

    return enc(plain_p, plain_r), enc(judge_p, judge_r)


# Tiny Llama for the demo (~0.5M parameters) and its warm-start recipe (validated by experiment,
# see datasets/README.md and the demo notes in the final report).
MODEL_SIZE = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "intermediate_size": 256,
              "vocab_size": 512, "max_position_embeddings": 256}
WARM_START = {"steps": 2400, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "p_drop": 0.6,
              "judge_fraction": 0.5}
MARKER = "DEMO_BASE.json"


def build_base_model(out_dir, *, seed: int = 0, steps: int | None = None, batch_size: int | None = None,
                     lr: float | None = None, warmup_steps: int | None = None, p_drop: float | None = None,
                     judge_fraction: float | None = None, model_size: dict | None = None,
                     split_seed: int = SPLIT_SEED, eval_every: int = 0, threads: int | None = None,
                     log=None):
    """Build the tiny model and warm-start it into the demo's base model; returns its folder.

    A plain torch loop (this is "making the base model", not alignment): AdamW, linear warm-up
    then cosine decay, gradient clipping 1.0, on `warm_start_batch` batches drawn from the
    warm-start split only (never a held-out or online problem). The folder holds the model and
    tokenizer (save_pretrained) and a marker, written last, with the settings and the base's
    held-out accuracy; a folder whose marker has the same settings is reused as is.
    """
    import json
    import math
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.tiny import make_tiny_model

    cfg = dict(WARM_START)
    for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                     p_drop=p_drop, judge_fraction=judge_fraction).items():
        if v is not None:
            cfg[k] = v
    settings = {"seed": seed, "split_seed": split_seed, **cfg, "model": {**MODEL_SIZE, **(model_size or {})}}
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("settings") == settings:
            return out
    marker.unlink(missing_ok=True)
    log = log or (lambda *_: None)
    if threads:
        torch.set_num_threads(threads)

    msize = settings["model"]
    make_tiny_model(out, tokenizer_corpus(seed), seed=seed, **msize)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.train()
    splits = split_problems(split_seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    total, warm = cfg["steps"], cfg["warmup_steps"]
    pad = tokenizer.pad_token_id
    for step in range(1, total + 1):
        scale = min(1.0, step / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * scale
        loss = torch.zeros(())
        for prompts, responses in warm_start_batch(rng, splits["warmstart"], tokenizer, cfg["batch_size"],
                                                   cfg["p_drop"], cfg["judge_fraction"]):
            if prompts:
                logp, mask = response_logprobs(model, prompts, responses, pad)
                per_record = -(logp * mask).sum(-1) / mask.sum(-1)
                loss = loss + per_record.sum() / cfg["batch_size"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if eval_every and (step % eval_every == 0) and step < total:
            acc = accuracy(model, tokenizer, splits["heldout"])
            log(f"warm start step {step}/{total} loss {loss.item():.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    model.eval()
    acc = accuracy(model, tokenizer, splits["heldout"])
    log(f"warm start done: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps({"settings": settings, "heldout": acc}, indent=1))
    return out
