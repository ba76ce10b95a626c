"""The bundled verifiable demo task: 2-digit + 2-digit addition.

A tiny Llama is warm-started ("the base model") so that it adds correctly but drops the carry
from the ones column on most carrying problems (greedy: ~53% held-out accuracy, ~1% on carrying
problems, 100% on the others). Each online iteration it answers new problems, the verifier
`judge` writes a judgment naming the wrong digit and why, and CUT trains on the triplets.
Everything here is deterministic by seed and runs offline on a laptop CPU.

Design decisions, each backed by a measurement (see `ONLINE_SETTINGS`):
- The judgment names *which* digit is wrong and *why* ("The tens digit is wrong: the carry from
  7 + 8 = 15 was not added.") but never repeats the wrong answer: a judgment quoting the answer
  lets the model "match" it by copying digits, so the Align-N/Misalign contrast would measure
  copying, not reading. Controls on the same base: the same CUT run with each negative's
  judgment swapped for another problem's, or replaced by one naming the ones digit instead,
  flags almost nothing and leaves accuracy at the base level; the true judgments fix the carry.
- The warm start drops the carry with probability 0.75: greedy decoding then almost never
  carries, so SFT on the model's own correct answers has nothing to learn from and stays at the
  base, while CUT learns from the negative judgments. (At 0.6 the correct mode keeps ~40% of
  the mass and SFT flips the model within two iterations as well as CUT does.)
- Judge-template warm-start examples are scored on the judgment text too (its column sums
  "7 + 8 = 15" are arithmetic practice): the base learns to add ~2x sooner (the "jump" comes
  at 400-800 steps instead of 900-2000+) and reads judgments sharply enough for CUT to be stable.
"""

from __future__ import annotations

import random
import re

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
    Used by the pipeline as FunctionJudge(callable='cut_core.tasks.arithmetic:judge').
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


# ---------------------------------------------------------------- control judgments

# Controls that show whether CUT learns from what a judgment *says* (bench/quality.py --controls).
# Each keeps the verifier's polarity (which answers are wrong) and changes only the text.
TERSE_JUDGMENT = "The answer is wrong."
CONTROLS = ("swapped", "terse", "digit_only")


def judge_terse(instruction: str, response: str) -> str | None:
    """Control: the verifier's verdict with no content ("The answer is wrong.")."""
    return None if judge(instruction, response) is None else TERSE_JUDGMENT


def judge_digit_only(instruction: str, response: str) -> str | None:
    """Control: names the wrong digit only, without why ("The tens digit is wrong.")."""
    text = judge(instruction, response)
    return None if text is None else text.split(":", 1)[0].rstrip(".") + "."


def swap_judgments(instructions: list[str], judgments: list[str | None], seed: int = 0) -> list[str | None]:
    """Control: every negative gets the judgment of another problem's wrong answer (a random
    permutation of the negatives' judgments in which no problem keeps its own); positives stay
    positive (None). Fewer than two negatives: nothing to swap with, returned unchanged."""
    neg = [i for i, j in enumerate(judgments) if j is not None]
    if len(neg) < 2:
        return list(judgments)
    rng = random.Random(seed)
    order = neg[:]
    while True:  # a derangement over problems (expected ~e tries)
        rng.shuffle(order)
        if all(instructions[a] != instructions[b] for a, b in zip(neg, order)):
            break
    out = list(judgments)
    for a, b in zip(neg, order):
        out[a] = judgments[b]
    return out


def control_judgments(control: str | None, instructions: list[str], responses: list[str],
                      seed: int = 0) -> list[str | None]:
    """The verifier's judgments of (instruction, response) pairs, or a control's (CONTROLS)."""
    if control in (None, "none"):
        return [judge(x, y) for x, y in zip(instructions, responses)]
    if control == "terse":
        return [judge_terse(x, y) for x, y in zip(instructions, responses)]
    if control == "digit_only":
        return [judge_digit_only(x, y) for x, y in zip(instructions, responses)]
    if control == "swapped":
        return swap_judgments(instructions, [judge(x, y) for x, y in zip(instructions, responses)], seed)
    raise ValueError(f"unknown control {control!r}; expected one of {CONTROLS}")


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
    from cut_core.data import templates

    rng = random.Random(seed)
    texts = []
    for a, b in rng.sample(all_problems(), n):
        ins = instruction(a, b)
        for r in (a + b, a + b - 10, a + b + 10, _wrong_answer(rng, a, b)):
            texts.append(templates.judge_prompt(ins, judge(ins, str(r)) or POSITIVE_JUDGMENT) + str(r))
    texts.append(judge("What is 10 + 10?", "x"))
    return texts


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """[BOS] + prompt ids: sequences.prompt_ids, as training, generation and evaluation encode prompts."""
    from cut_core.data import sequences

    return sequences.prompt_ids(tokenizer, [prompt])[0]


def encode_response(tokenizer, response: str) -> list[int]:
    from cut_core.data import sequences

    return sequences.response_ids(tokenizer, [response])[0]


def greedy_answers(model, tokenizer, instructions: list[str], *, max_new_tokens: int = 5,
                   batch_size: int = 500) -> list[str]:
    """Greedy plain-template (alpaca) answers, through the project's generation (infer/generate.py:
    the prompt ids training uses, decoding up to the first EOS), in eval mode."""
    from cut_core.infer.generate import generate

    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        greedy=True, template="alpaca")
    finally:
        model.train(was_training)


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
    """One warm-start batch: plain (prompts, responses) and judge-template (heads, continuations, n_answer).

    Plain examples answer right, except that a carrying problem drops its carry with
    probability p_drop: the systematic mistake the online loop must fix. Judge-template
    examples pair a judgment with a response that matches it (half right with "Perfect.",
    half wrong with the verifier's judgment of that wrong answer), so the base model learns
    to read judgments in context, which CUT's Align-N/Misalign contrast relies on. A judge
    example is split after its "### Judgment:" header: the continuation (judgment text,
    response header, answer, EOS) is scored, the last n_answer tokens being the answer + EOS;
    predicting the judgment's column sums ("7 + 8 = 15") teaches the digit arithmetic faster.
    """
    from cut_core.data import templates

    n_judge = round(size * judge_fraction)
    plain_p, plain_r, heads, conts, n_answer = [], [], [], [], []
    header = tokenizer.convert_tokens_to_ids(templates.JUDGMENT_HEADER)
    for k in range(size):
        a, b = rng.choice(problems)
        ins = instruction(a, b)
        if k >= n_judge:
            r = carry_dropped(a, b) if rng.random() < p_drop else a + b
            plain_p.append(encode_prompt(tokenizer, templates.plain_prompt(ins)))
            plain_r.append(encode_response(tokenizer, str(r)))
        else:
            r = a + b if rng.random() < 0.5 else _wrong_answer(rng, a, b)
            ids = encode_prompt(tokenizer, templates.judge_prompt(ins, judge(ins, str(r)) or POSITIVE_JUDGMENT))
            cut = ids.index(header) + 1
            answer = encode_response(tokenizer, str(r))
            heads.append(ids[:cut])
            conts.append(ids[cut:] + answer)
            n_answer.append(len(answer))
    return (plain_p, plain_r), (heads, conts, n_answer)


# The tiny Llama of the demo (~0.5M parameters; tokenizer ~420 tokens, digits one token each,
# template headers and preambles one token each: a plain prompt is 20 tokens, a judge prompt ~45).
MODEL_SIZE = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "intermediate_size": 256,
              "vocab_size": 512, "max_position_embeddings": 256}
# Warm-start recipe: ~120 s on 2 quiet CPU threads (0.085 s/step, ~2-3x that on a loaded box).
WARM_START = {"steps": 1200, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "p_drop": 0.75,
              "judge_fraction": 0.5, "judgment_loss_weight": 1.0}

# The online CUT settings of the demo, as DSL sections (the CUT objective, Training, Online, Evaluation;
# adapter None = full fine-tune). Measured with 4 base seeds x 2 training seeds, 500 new prompts
# per iteration, 500 held-out problems: base 52-54% -> iteration 1: 88-97% -> iteration 3:
# 93-98%; SFT on the correct answers at the same settings stays at 52-67%. lr matters: 3e-5 is
# faster on most bases but oscillates on some (carry <-> spurious carry, 75-82%); 1e-4 fails on
# half of them; 1e-3 collapses every time.
ONLINE_SETTINGS = {
    "objective": {"name": "cut", "threshold": 1.1, "alpha": 1.0, "gamma": 0.0,
                  "weighting": "reference", "align_p_ratio": 0.25},
    "adapter": None,
    "training": {"full_finetune": True, "learning_rate": 1e-5, "epochs": 1.0, "micro_batch_size": 16,
                 "gradient_accumulation": 1, "scheduler": "constant", "warmup_steps": 0,
                 "weight_decay": 0.0, "seed": 42},
    "online": {"iterations": 3, "prompts_per_iteration": 500, "max_new_tokens": 6, "greedy": True},
    "evaluation": {"max_prompts": 500, "max_new_tokens": 6},
    "base_seed": 0,
}
MARKER = "DEMO_BASE.json"


def build_base_model(out_dir, *, seed: int = 0, steps: int | None = None, batch_size: int | None = None,
                     lr: float | None = None, warmup_steps: int | None = None, p_drop: float | None = None,
                     judge_fraction: float | None = None, judgment_loss_weight: float | None = None,
                     model_size: dict | None = None,
                     split_seed: int = SPLIT_SEED, eval_every: int = 0, threads: int | None = None,
                     log=None, progress_every_s: float = 15.0):
    """Build the tiny model and warm-start it into the demo's base model; returns its folder.

    A plain torch loop (this is "making the base model", not alignment): AdamW, linear warm-up
    then cosine decay, gradient clipping 1.0, on `warm_start_batch` batches drawn from the
    warm-start split only (never a held-out or online problem). The folder holds the model and
    tokenizer (save_pretrained) and a marker, written last, with the settings and the base's
    held-out accuracy; a folder whose marker has the same settings is reused as is.
    `log` (a callable taking one line) gets progress every `progress_every_s` (step / total,
    loss, ETA) and the held-out accuracy at the end; flows call this through the prepare-model
    task (tasks/prepare.py), which passes its Prefect logger.
    """
    import json
    import math
    import time
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.data import sequences
    from cut_core.files import build_dir
    from cut_core.models.tiny import make_tiny_model

    cfg = dict(WARM_START)
    for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                     p_drop=p_drop, judge_fraction=judge_fraction,
                     judgment_loss_weight=judgment_loss_weight).items():
        if v is not None:
            cfg[k] = v
    settings = {"seed": seed, "split_seed": split_seed, **cfg, "model": {**MODEL_SIZE, **(model_size or {})}}
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists():
        if json.loads(marker.read_text()).get("settings") == settings:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} holds something that is not a demo base model; choose another folder")
    log = log or (lambda *_: None)
    if threads:
        torch.set_num_threads(threads)

    # Built aside and renamed into place at the end: `out` never holds a half-trained model
    # (the flows build a model only when its folder has no config.json).
    with build_dir(out) as tmp:  # replaces an older build with other settings (checked above) in one rename
        make_tiny_model(tmp, tokenizer_corpus(seed), seed=seed, **settings["model"])
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        model.train()
        splits = split_problems(split_seed)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
        total, warm = cfg["steps"], cfg["warmup_steps"]
        pad = sequences.pad_id(tokenizer)
        started = last_progress = time.monotonic()
        for step in range(1, total + 1):
            scale = min(1.0, step / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * scale
            (plain_p, plain_r), (heads, conts, n_answer) = warm_start_batch(
                rng, splits["warmstart"], tokenizer, cfg["batch_size"], cfg["p_drop"], cfg["judge_fraction"])
            per_record = []
            if plain_p:
                logp, mask = sequences.batch_response_logprobs(model, list(zip(plain_p, plain_r)), pad_id=pad)
                per_record.append(-(logp * mask).sum(-1) / mask.sum(-1))
            if heads:
                logp, mask = sequences.batch_response_logprobs(model, list(zip(heads, conts)), pad_id=pad)
                lengths = mask.sum(-1, keepdim=True)
                pos = torch.arange(mask.shape[1])[None, :]
                answer = mask & (pos >= lengths - torch.tensor(n_answer)[:, None])
                text = mask & ~answer
                nll_answer = -(logp * answer).sum(-1) / answer.sum(-1)
                nll_text = -(logp * text).sum(-1) / text.sum(-1).clamp(min=1)
                per_record.append(nll_answer + cfg["judgment_loss_weight"] * nll_text)
            loss = torch.cat(per_record).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            now = time.monotonic()
            if now - last_progress >= progress_every_s and step < total:
                last_progress = now
                eta = (now - started) / step * (total - step)
                log(f"warm start step {step}/{total} ({100 * step / total:.0f}%), loss {loss.item():.3f}, "
                    f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
            if eval_every and (step % eval_every == 0) and step < total:
                acc = accuracy(model, tokenizer, splits["heldout"])
                log(f"warm start step {step}/{total} loss {loss.item():.3f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        model.eval()
        acc = accuracy(model, tokenizer, splits["heldout"])
        log(f"warm start done: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"settings": settings, "heldout": acc}, indent=1))
    return out
