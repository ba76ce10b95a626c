"""Judgment vs reward (METHOD.md §7, the paper's UltraFeedback comparison) on the demo task.

The same sampled responses, two kinds of feedback:

    CUT   learns from each response's *judgment* (the verifier's text naming the wrong digit)
    DPO   learns from each response's *scalar reward* (1 right, 0 wrong), as preference pairs:
          per problem, a right answer against each wrong one (TRL's DPOTrainer)

The demo's warm-started base model answers N training problems K times each (sampling, so
answers to one problem differ); the verifier judges every answer. Both objectives then run the
offline pipeline on that one file from the same base, with the demo's optimizer settings except
the learning rate, which is swept for both (each objective's best is reported, and the grid), and
are evaluated on the demo's 500 held-out problems.

    .venv/bin/python bench/judgment_vs_reward.py [--problems 500] [--samples 4] [--lrs 1e-5,3e-5,1e-4]

Last line: {"best": {"cut": ..., "dpo": ...}, "accuracy": {"cut": {lr: acc}, "dpo": {lr: acc}}, "base": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (quiet, offline library defaults)


def sample_feedback(model_path: str, prompts_file: Path, problems: int, samples: int, out: Path, seed: int) -> dict:
    """K sampled answers per problem, each with its judgment and its reward, as a JSONL source."""
    import polars as pl
    import torch

    from cut_core.tasks.arithmetic import judge
    from cut_core.infer.generate import generate, load_model

    instructions = pl.read_ndjson(prompts_file)["instruction"].head(problems).to_list()
    model, tokenizer = load_model(model_path)
    torch.manual_seed(seed)
    rows = []
    for _ in range(samples):
        answers = generate(model, tokenizer, instructions, max_new_tokens=6, batch_size=100, greedy=False)
        for instruction, answer in zip(instructions, answers):
            judgment = judge(instruction, answer)
            rows.append({"instruction": instruction, "output": answer, "judgment": judgment,
                         "reward": 0.0 if judgment else 1.0})
    # The same answer sampled twice is one triplet (ingestion dedupes it): write it once.
    unique = list({(r["instruction"], r["output"]): r for r in rows}.values())
    out.write_text("".join(json.dumps(r) + "\n" for r in unique))
    right = sum(r["reward"] for r in unique)
    return {"sampled": len(rows), "triplets": len(unique), "right": int(right), "wrong": len(unique) - int(right)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4", help="learning rates tried for each objective")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(ROOT / "work" / "bench-judgment-vs-reward"))
    args = parser.parse_args()

    from cut_core.dsl import DPO, Polarity, Source
    from flows.align import offline_align, prepare_model
    from flows.demo import demo_pipeline, standard_error

    demo = demo_pipeline()
    base_model = prepare_model(demo)  # the demo's warm-started base, built once and shared
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source_file = workdir / f"feedback-{args.problems}x{args.samples}-seed{args.seed}.jsonl"
    started = time.perf_counter()
    data = sample_feedback(base_model, Path(demo.online.prompts), args.problems, args.samples, source_file, args.seed)
    print(f"sampled {data['sampled']} answers -> {data['triplets']} distinct triplets "
          f"({data['right']} right, {data['wrong']} wrong) in {time.perf_counter() - started:.1f} s", flush=True)

    # The reward enters as the source's score (DPO's pairs); polarity (CUT's) follows from it.
    source = Source(paths=[str(source_file)], polarity=Polarity(score_column="reward", score_threshold=0.5))
    accuracy, seconds, stats, base = {"cut": {}, "dpo": {}}, {}, {}, None
    for name in ("cut", "dpo"):
        for lr in [float(x) for x in args.lrs.split(",")]:
            objective = demo.objective if name == "cut" else DPO(beta=args.beta)
            pipeline = demo.model_copy(update={
                "name": f"judgment-vs-reward-{name}", "workdir": str(workdir / name), "sources": [source],
                "objective": objective, "training": demo.training.model_copy(update={"learning_rate": lr}),
                "online": demo.online.model_copy(update={"iterations": 0}),
                "model": demo.model.model_copy(update={"path": base_model})})
            started = time.perf_counter()
            result = offline_align(pipeline.to_json(), pipeline.name)
            seconds[f"{name}@{lr:g}"] = round(time.perf_counter() - started, 1)
            base = result["base"].get("positive_rate")
            accuracy[name][f"{lr:g}"] = result["iterations"][-1]["metrics"]["positive_rate"]
            stats[name] = json.loads(next((workdir / name / "examples").glob("*.json")).read_text())["rows_by_kind"]
            print(f"{name:<4} lr {lr:g}: {100 * accuracy[name][f'{lr:g}']:.1f}%  trained on {stats[name]}",
                  flush=True)
    best = {name: max(by_lr.values()) for name, by_lr in accuracy.items()}

    n = demo.evaluation.max_prompts
    print(f"base {100 * base:.1f}%; best: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in best.items())
          + f"; held-out problems: {n}; standard error of one accuracy near 50%: {100 * standard_error(0.5, n):.1f} points")
    print(json.dumps({"best": best, "accuracy": accuracy, "base": base, "examples": stats, "data": data,
                      "n_heldout": n, "beta": args.beta, "seconds": seconds}))


if __name__ == "__main__":
    main()
