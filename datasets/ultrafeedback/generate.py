"""Write an UltraFeedback-shaped example file (deterministic: same seed, same bytes).

    python datasets/ultrafeedback/generate.py            # rewrites sample.jsonl next to this script
    python datasets/ultrafeedback/generate.py --out DIR  # writes it elsewhere

UltraFeedback (openbmb/UltraFeedback) nests several judged responses per prompt. Each line here
has its shape, with arithmetic content a program can check:

    {"source": str, "instruction": str, "models": [str, ...],
     "completions": [{"model": str, "response": str, "critique": str,
                      "overall_score": float, "fine-grained_score": float}, ...],
     "correct_answers": [str], "incorrect_answers": [str]}

Read it with a column map that explodes `completions` (one triplet per completion):

    Source(paths=["datasets/ultrafeedback/sample.jsonl"],
           columns={"instruction": "instruction", "response": "completions[*].response",
                    "judgment": "completions[*].critique", "score": "completions[*].overall_score"},
           polarity=Polarity(score_column="score", score_threshold=7))

Rows are generated to exercise quarantine too (see datasets/README.md): the last rows carry an
empty `completions` list, a completion with a blank response, and a repeated completion.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20260105
ROWS = 12
MODELS = ("alpaca-7b", "llama-2-13b-chat", "gpt-3.5-turbo", "wizardlm-7b")
FILE = "sample.jsonl"


# Each model phrases its answer its own way, so the completions of one prompt never coincide.
STYLE = {"alpaca-7b": "{a} + {b} = {s}.", "llama-2-13b-chat": "Sure! {a} plus {b} equals {s}.",
         "gpt-3.5-turbo": "The sum of {a} and {b} is {s}.", "wizardlm-7b": "Answer: {s}"}


def _completion(rng: random.Random, model: str, a: int, b: int) -> dict:
    right = a + b
    kind = rng.choice(("right", "right", "carry", "off_by_ten", "rambling"))
    if kind == "carry" and (a % 10 + b % 10) < 10:   # no carry to forget
        kind = "off_by_ten"
    say = lambda s: STYLE[model].format(a=a, b=b, s=s)  # noqa: E731
    if kind == "right":
        response = say(right)
        critique, score = "Perfect. The sum is correct and stated plainly.", rng.choice((8.5, 9.0, 10.0))
    elif kind == "carry":
        response = say(right - 10)
        critique, score = ("The answer is wrong: the carry from the ones column was not added to the tens.",
                           rng.choice((2.0, 3.0)))
    elif kind == "off_by_ten":
        response = say(right + 10)
        critique, score = "The tens digit is wrong by one; the ones digit is right.", rng.choice((3.0, 4.0))
    else:
        response = "Adding numbers is a basic skill, as everyone learns at school. " + say(right)
        critique, score = ("The sum is right but the response pads it with irrelevant remarks; answer only.",
                           rng.choice((5.0, 6.0)))
    return {"model": model, "response": response, "critique": critique, "overall_score": score,
            "fine-grained_score": round(score / 2, 2)}


def rows(seed: int = SEED, n: int = ROWS) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        models = rng.sample(MODELS, 4)
        out.append({"source": "arithmetic", "instruction": f"What is {a} + {b}?", "models": models,
                    "completions": [_completion(rng, m, a, b) for m in models],
                    "correct_answers": [str(a + b)], "incorrect_answers": [str(a + b + 10)]})
    # rows a real export has too, kept to show quarantine at work:
    out[-1]["completions"] = []                               # nothing judged: empty_array
    out[-2]["completions"][1]["response"] = "  "              # a blank response: missing_response
    out[-3]["completions"][3] = dict(out[-3]["completions"][2])   # the same completion twice: duplicate
    return out


def write(out_dir: str | Path, seed: int = SEED) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(seed)), encoding="utf-8")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    print(write(parser.parse_args().out))
