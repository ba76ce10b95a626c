"""Quality benchmark, fair by construction: CUT against nine other ways to learn from the same
verifier, on the demo task (2-digit additions; cut_core/tasks/arithmetic.py).

Every method starts from the demo's warm-started base model and runs the same online loop:
K iterations, each on P new problems (never reused), the model answering with its current
weights, then training, then the next iteration from the trained model. What is equal:

    budget      every method trains S = ceil(P / B) optimizer steps of B records per iteration
                (B = the demo's batch, 16): the same examples seen and optimizer steps, whatever
                its data holds (a smaller set is cycled, a larger one sampled by the trainer's
                shuffled order); a record is one loss item (a CUT pair, an NLL row, a DPO pair)
    settings    the demo's optimizer settings (full fine-tune, AdamW, constant schedule), except:
    lr          each method gets its own learning rate, the best of the same grid (--lrs, >= 3
                values) by mean accuracy on a validation split: the last V online problems, never
                trained on and not the held-out set
    seeds       >= 3 training seeds per (method, lr): data order and, where a method samples,
                its samples; the base model is the same for all
    test        the demo's 500 held-out problems, greedy, verifier-checked, scored once per seed
                at the chosen lr; per method: mean, std over seeds, and a paired comparison
                with CUT on the same problems and seeds (mean difference of per-problem
                correctness with its standard error, and McNemar's discordant counts)

Methods (what each trains on per iteration; "greedy" = the model's greedy answer per problem,
judged by the verifier; "k samples" = k sampled answers per problem, checked by the verifier):

    cut                 CUT on the greedy answers' judgments (Align-P/Align-N/Misalign; lambda 1.1, alpha 1)
    sft                 SFT on the verifier-correct greedy answers
    rs_sft              rejection-sampling SFT: SFT on the verifier-correct of k samples
    hindsight           y given [x, j], every greedy triplet
    forward_prediction  y given x, then j given [x, y]
    ilf_mle             SFT on refinements the model writes from (x, y, j) (refiner "model")
    ilf_dpo             TRL's DPO, the refinement over the wrong answer
    dpo                 TRL's DPO on sampled pairs: per problem, a right sample over each wrong one
                        (0/1 reward, as bench/judgment_vs_reward.py)
    unlikelihood        CUT with every token of a negative flagged (unlikelihood on all tokens;
                        the paper's ablation, which it reports does not converge)
    self_distill        judgment-conditioned self-distillation on CUT's pairs (objective
                        'self_distill': the Align-N context is the teacher of the Misalign context)

Controls (CUT at its chosen lr, all seeds; demo_task.control_judgments): judgments swapped
between problems, terse ("The answer is wrong."), digit-naming only ("The tens digit is wrong.").

    .venv/bin/python bench/quality.py            # full: 3 iterations x 500 problems, 3 lrs x 3 seeds
    .venv/bin/python bench/quality.py --quick    # smoke size (minutes)

Runs in-process with cut_core (no Prefect, no MLflow): the same materialization (contrast.py,
preference.py), trainers (CUTTrainer, TRL's DPOTrainer via dpo.py) and model saving as the
pipeline, on the demo's settings. What is task-specific (the verifier and its judgments, the prompt
template, generation lengths, the CUT section, LoRA or full fine-tuning, the device) is a `Task`;
`demo_task()` is this bench's, and bench/real_model.py runs the same loop (`run_one`) on a real
chat model and the constraints task. Last line: JSON
{"methods": {name: {"lr", "accuracy": [per seed], "mean", "std", "validation": {lr: mean}, "vs_cut": {...}}},
 "controls": {...}, "base": ..., "n_heldout": n, "n_validation": v, "size": {...}, "seconds": ...}
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (quiet, offline library defaults)

METHODS = ("cut", "sft", "rs_sft", "hindsight", "forward_prediction", "ilf_mle", "ilf_dpo", "dpo",
           "unlikelihood", "self_distill")
MAX_LENGTH = 128
ANSWER_TOKENS = 6


# ---------------------------------------------------------------- the task: what the loop does not fix

@dataclass(frozen=True)
class Task:
    """What the online loop needs from a task and its model; the loop itself is task-blind.

    judge       the verifier's judgment writer: (instruction, response) -> None when right, else
                the judgment text (what trains CUT; its verdict labels samples for rs_sft and dpo)
    correct     the verifier's verdict, as scored on the validation and held-out splits
    template    the prompt template every prompt is rendered in ('alpaca' or 'chat')
    max_length  the token cap of a training sequence (CUT/SFT examples, TRL's DPO max_length)
    max_new_tokens, generation_batch_size   answers: greedy, sampled and refinements
    cut         the CUT section the cut (and unlikelihood) runs train with: threshold, alpha,
                gamma, weighting, align_p_ratio
    adapter     a dsl.LoRA, or None for full fine-tuning (then training.full_finetune must hold)
    device      where answers are generated ("cpu", or None: CUDA when there is one)
    greedy_fn   optional fast greedy decoder (model, tokenizer, instructions) -> answers; None:
                cut_core.infer.generate.generate with the settings above
    controls    optional (control, instructions, responses, seed) -> judgments (swapped, terse,
                ...); None: the task has no controls and only the verifier's judgments exist
    """
    name: str
    judge: Callable[[str, str], str | None]
    correct: Callable[[str, str], bool]
    cut: Any
    template: str = "alpaca"
    max_length: int = MAX_LENGTH
    max_new_tokens: int = ANSWER_TOKENS
    generation_batch_size: int = 100
    adapter: Any = None
    device: str | None = "cpu"
    greedy_fn: Callable[[Any, Any, list[str]], list[str]] | None = None
    controls: Callable[[str | None, list[str], list[str], int], list[str | None]] | None = None

    def greedy(self, model, tokenizer, instructions: list[str]) -> list[str]:
        return self.greedy_ended(model, tokenizer, instructions)[0]

    def greedy_ended(self, model, tokenizer, instructions: list[str]) -> tuple[list[str], list[bool]]:
        """Greedy answers and, per answer, whether the model stopped within max_new_tokens (False: the
        limit cut it; its training sequences get no EOS, contrast.UNFINISHED). A greedy_fn's answers
        count as stopped (the demo's: a number and EOS within 6 tokens)."""
        if self.greedy_fn is not None:
            return self.greedy_fn(model, tokenizer, instructions), [True] * len(instructions)
        from cut_core.infer.generate import generate_ended

        return generate_ended(model, tokenizer, instructions, max_new_tokens=self.max_new_tokens,
                              batch_size=self.generation_batch_size, greedy=True, template=self.template)

    def sample(self, model, tokenizer, instructions: list[str]) -> list[str]:
        """One sampled answer per instruction (temperature 1 unless the model's generation config says otherwise)."""
        return self.sample_ended(model, tokenizer, instructions)[0]

    def sample_ended(self, model, tokenizer, instructions: list[str]) -> tuple[list[str], list[bool]]:
        """sample(), and per answer whether the model stopped within max_new_tokens."""
        from cut_core.infer.generate import generate_ended

        return generate_ended(model, tokenizer, instructions, max_new_tokens=self.max_new_tokens,
                              batch_size=self.generation_batch_size, greedy=False, template=self.template)

    def judgments(self, control: str | None, instructions: list[str], responses: list[str],
                  seed: int) -> list[str | None]:
        if self.controls is not None:
            return self.controls(control, instructions, responses, seed)
        if control not in (None, "none"):
            raise ValueError(f"the {self.name} task has no control judgments (asked for {control!r})")
        return [self.judge(x, y) for x, y in zip(instructions, responses)]


def demo_task() -> Task:
    """The demo's 2-digit additions: its verifier and controls, alpaca prompts, 6 answer tokens,
    full fine-tuning, CUT at lambda 1.1 / alpha 1 with a quarter of the positives as Align-P, on CPU."""
    from cut_core.tasks import arithmetic as dt
    from cut_core.dsl import CUT

    return Task(name="demo", judge=dt.judge, correct=dt.is_correct,
                cut=CUT(threshold=1.1, alpha=1.0, align_p_ratio=0.25),
                greedy_fn=lambda model, tokenizer, xs: dt.greedy_answers(model, tokenizer, xs,
                                                                         max_new_tokens=ANSWER_TOKENS),
                controls=dt.control_judgments)


# ---------------------------------------------------------------- data: answers, judgments, examples

def read_instructions(path: Path) -> list[str]:
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]


def correctness(model_path: str, instructions: list[str], task: Task | None = None) -> list[bool]:
    """Greedy answers of the model, verifier-checked, one bool per problem."""
    from cut_core.infer.generate import load_model

    task = task or demo_task()
    model, tokenizer = load_model(model_path, device=task.device)
    return verdicts(model, tokenizer, instructions, task)


def verdicts(model, tokenizer, instructions: list[str], task: Task) -> list[bool]:
    """The verifier's verdict on the loaded model's greedy answer to each instruction."""
    answers = task.greedy(model, tokenizer, instructions)
    return [task.correct(x, y) for x, y in zip(instructions, answers)]


def triplets(instructions: list[str], responses: list[str], judgments: list[str | None], tag: str,
             ended: list[bool] | None = None):
    """The triplet frame materialize reads; `ended` False marks a response the length limit cut
    (contrast.UNFINISHED: trained without EOS)."""
    import polars as pl

    return pl.DataFrame({
        "id": [f"{tag}-{i}" for i in range(len(instructions))], "instruction": instructions,
        "response": responses, "judgment": judgments,
        "polarity": ["positive" if j is None else "negative" for j in judgments],
        "score": [1.0 if j is None else 0.0 for j in judgments],
        "unfinished": [not e for e in ended] if ended is not None else [False] * len(instructions)})


def sampled(model_path: str, instructions: list[str], k: int, seed: int,
            task: Task | None = None) -> tuple[list[str], list[str], list[bool]]:
    """k sampled answers per problem (temperature 1), distinct per problem, and whether each ended
    within the length limit."""
    import torch

    from cut_core.infer.generate import load_model

    task = task or demo_task()
    model, tokenizer = load_model(model_path, device=task.device)
    torch.manual_seed(seed)
    seen, xs, ys, ends = set(), [], [], []
    for _ in range(k):
        answers, ended = task.sample_ended(model, tokenizer, instructions)
        for x, y, e in zip(instructions, answers, ended):
            if (x, y) not in seen:
                seen.add((x, y))
                xs.append(x)
                ys.append(y)
                ends.append(e)
    return xs, ys, ends


def iteration_data(method: str, model_path: str, prompts: list[str], out: Path, *, seed: int, k: int,
                   control: str | None, task: Task | None = None) -> tuple[str, Path | None, dict]:
    """What `method` trains on this iteration: ("examples" | "pairs", file or None, stats)."""
    from cut_core.data.contrast import materialize, read_stats
    from cut_core.dsl import ILFDPO, ILFMLE, SelfDistill, parse_objective
    from cut_core.infer.generate import load_model
    from cut_core.data.preference import materialize_pairs
    from cut_core.infer.refine import ModelRefiner
    from transformers import AutoTokenizer

    task = task or demo_task()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if method in ("rs_sft", "dpo"):
        xs, ys, ends = sampled(model_path, prompts, k, seed, task)
        frame = triplets(xs, ys, [task.judge(x, y) for x, y in zip(xs, ys)], "s", ends)
    else:
        model, _ = load_model(model_path, device=task.device)
        ys, ends = task.greedy_ended(model, tokenizer, prompts)
        del model
        frame = triplets(prompts, ys, task.judgments(control, prompts, ys, seed), "g", ends)
    stats = {"triplets": frame.height, "right": int((frame["polarity"] == "positive").sum()),
             "unfinished": int(frame["unfinished"].sum())}

    name = {"rs_sft": "sft", "unlikelihood": "cut"}.get(method, method)
    refiner = ModelRefiner(model_path, template=task.template, max_new_tokens=task.max_new_tokens,
                           batch_size=task.generation_batch_size) if method.startswith("ilf") else None
    # Each method's own section: the data settings it reads (the loss settings are train_iteration's).
    sections = {"cut": task.cut,
                "self_distill": SelfDistill(align_p_ratio=task.cut.align_p_ratio),
                "ilf_mle": ILFMLE(refiner="model", refine_max_new_tokens=task.max_new_tokens),
                "ilf_dpo": ILFDPO(refiner="model", refine_max_new_tokens=task.max_new_tokens)}
    objective = sections[name] if name in sections else parse_objective({"name": name})  # sft, hindsight, ...
    if name in ("dpo", "ilf_dpo"):
        try:
            path = materialize_pairs(frame, tokenizer, objective=objective, template=task.template, out_dir=out,
                                     refine_fn=refiner)
        except ValueError:  # no pair this iteration (e.g. no refinement, or every sample right)
            return "pairs", None, {**stats, "records": 0}
        return "pairs", path, {**stats, "records": read_stats(path)["rows"]}
    path = materialize(frame, tokenizer, objective=objective, template=task.template, max_length=task.max_length,
                       out_dir=out, seed=seed, refine_fn=refiner)
    rows = read_stats(path).get("rows_by_kind", {})
    records = sum(v for kind, v in rows.items() if kind != "align_n")
    return "examples", (path if records else None), {**stats, "records": records}


# ---------------------------------------------------------------- training: one iteration, S steps

def _unlikelihood_trainer():
    """CUTTrainer with U = every response token of a negative: 1/2 (NLL(Align-N) + UL(Misalign)),
    UL = -(1/N) sum_t log(1 - p_M,t) (alpha 1), the reference weighting of CUT with nothing left
    to detection. Align-P records stay NLL."""
    import torch

    from cut_core.train.loss import log1m_exp, masked_nll
    from cut_core.train.trainer import CUTTrainer

    class AllTokensUnlikelihood(CUTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logp, mask, logp_n, mask_n = self._both_passes(model, inputs)
            n, w = mask_n.shape
            m = mask[:n, :w]
            ul = -torch.where(m, log1m_exp(logp[:n, :w]), torch.zeros_like(logp[:n, :w])).sum(-1) \
                / m.sum(-1).clamp(min=1)
            per_record = torch.cat([0.5 * (masked_nll(logp_n, mask_n) + ul), masked_nll(logp[n:], mask[n:])])
            if num_items_in_batch is None:
                return per_record.mean()
            return per_record.sum() / num_items_in_batch

    return AllTokensUnlikelihood


def train_iteration(method: str, kind: str, data: Path, model_path: str, out: Path, *, lr: float, seed: int,
                    steps: int, training, task: Task | None = None) -> str:
    """S optimizer steps of `method` on `data` from `model_path`; returns the trained model folder
    (merged: with a LoRA adapter, the adapter is merged into the weights)."""
    from transformers import AutoTokenizer

    from cut_core.dsl import DPO
    from cut_core.train.trainer import (CUTConfig, CUTTrainer, RecordDataset, load_model, load_records, save_final,
                                  training_arguments)

    task = task or demo_task()
    if task.adapter is None and not training.full_finetune:
        raise ValueError(f"the {task.name} task has no LoRA adapter: its training must set full_finetune=True")
    training = training.model_copy(update={"learning_rate": lr, "seed": seed, "save_steps": 10 ** 6,
                                           "logging_steps": max(1, steps)})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    targs = training_arguments(training, output_dir=out / "checkpoints", max_steps=steps, report_to="none")
    targs["save_strategy"] = "no"
    from transformers import set_seed
    set_seed(seed)
    if kind == "pairs":
        from cut_core.train.dpo import build_trainer

        trainer = build_trainer(model_path=model_path, pairs_path=str(data), checkpoints=out / "checkpoints",
                                objective=DPO(), adapter=task.adapter, training=training,
                                tokenizer=tokenizer, max_steps=steps, max_length=task.max_length, report_to="none",
                                callbacks=[])
        trainer.args.save_strategy = "no"
    else:
        model = load_model(model_path, task.adapter, full_finetune=training.full_finetune)
        args = CUTConfig(threshold=task.cut.threshold, alpha=task.cut.alpha, gamma=task.cut.gamma,
                         weighting=task.cut.weighting,
                         objective="self_distill" if method == "self_distill" else "cut", **targs)
        cls = _unlikelihood_trainer() if method == "unlikelihood" else CUTTrainer
        trainer = cls(model=model, args=args, train_dataset=RecordDataset(load_records(data)),
                      processing_class=tokenizer)
    trainer.train()
    written = save_final(trainer.model, tokenizer, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return written["merged"]


def run_one(method: str, lr: float, seed: int, *, base: str, train_prompts: list[list[str]], evals: dict,
            workdir: Path, steps: int, k: int, training, control: str | None = None,
            task: Task | None = None) -> dict:
    """One online run: K iterations of data -> S steps; scored on every split in `evals`.
    Per iteration it logs triplets, right, records and trained (False: no data, no step)."""
    task = task or demo_task()
    tag = f"{method}{'-' + control if control else ''}-lr{lr:g}-s{seed}"
    root = workdir / "runs" / tag
    done = root / "RESULT.json"
    if done.exists():  # finished earlier (the bench resumes after an interruption)
        return json.loads(done.read_text())
    started = time.perf_counter()
    model_path, log = base, []
    for it, prompts in enumerate(train_prompts, 1):
        kind, data, stats = iteration_data(method, model_path, prompts, root / f"data-{it}", seed=seed + 1000 * it,
                                           k=k, control=control, task=task)
        if data is not None:
            model_path = train_iteration(method, kind, data, model_path, root / f"iter-{it}", lr=lr, seed=seed,
                                         steps=steps, training=training, task=task)
        log.append({"iteration": it, **stats, "trained": data is not None})
    from cut_core.infer.generate import load_model

    model, tokenizer = load_model(model_path, device=task.device)  # once for every split
    result = {"method": method, "control": control, "lr": lr, "seed": seed, "iterations": log,
              **{f"{split}_correct": verdicts(model, tokenizer, xs, task) for split, xs in evals.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    for it in range(1, len(train_prompts)):  # keep the final model only
        shutil.rmtree(root / f"iter-{it}", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------- statistics

def mean(xs):
    return sum(xs) / len(xs)


def paired(method_runs: list[dict], cut_runs: list[dict]) -> dict:
    """Per-problem paired comparison on the held-out set, seed by seed (same problems, same seed)."""
    diffs, cut_only, method_only = [], 0, 0
    by_seed = {r["seed"]: r for r in cut_runs}
    for r in method_runs:
        c = by_seed[r["seed"]]["heldout_correct"]
        for a, b in zip(r["heldout_correct"], c):
            diffs.append(int(a) - int(b))
            cut_only += (not a) and b
            method_only += a and not b
    d = mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean_difference": round(d, 4), "standard_error": round(se, 4),
            "mcnemar": {"cut_right_method_wrong": cut_only, "method_right_cut_wrong": method_only}}


def summary(runs: list[dict]) -> dict:
    acc = [mean(r["heldout_correct"]) for r in sorted(runs, key=lambda r: r["seed"])]
    return {"accuracy": [round(a, 4) for a in acc], "mean": round(mean(acc), 4),
            "std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
            "seeds": sorted(r["seed"] for r in runs)}


def choose(runs: dict[str, dict[float, list[dict]]], seeds: list[int]) -> tuple[dict, dict]:
    """Per method, the lr of the best mean validation accuracy over its seeds (ties: the smaller lr),
    its held-out summary at that lr, and a paired comparison with CUT at CUT's chosen lr (on the
    seeds both have). runs: {method: {lr: [run_one results]}}. Returns (per-method results, {method: lr})."""
    lrs = sorted({lr for by_lr in runs.values() for lr in by_lr})
    result_methods, chosen = {}, {}
    for method, by_lr in runs.items():
        by_lr = {lr: rs for lr, rs in by_lr.items() if rs}
        if not by_lr:
            continue
        validation_mean = {lr: mean([mean(r["validation_correct"]) for r in rs]) for lr, rs in by_lr.items()}
        best = max(by_lr, key=lambda lr: (validation_mean[lr], -lr))  # ties: the smaller lr
        chosen[method] = best
        result_methods[method] = {"lr": best, **summary(by_lr[best]),
                                  "validation": {f"{lr:g}": round(v, 4) for lr, v in validation_mean.items()},
                                  "heldout_by_lr": {f"{lr:g}": round(mean([mean(r["heldout_correct"]) for r in rs]), 4)
                                                    for lr, rs in by_lr.items()},
                                  "records_first_iteration": [r["iterations"][0]["records"] for r in by_lr[best]],
                                  "complete": all(len(by_lr.get(lr, [])) == len(seeds) for lr in lrs)}
    if "cut" in chosen:
        cut_runs = runs["cut"][chosen["cut"]]
        for method in result_methods:
            if method != "cut":
                shared = [r for r in runs[method][chosen[method]] if r["seed"] in {c["seed"] for c in cut_runs}]
                if shared:
                    result_methods[method]["vs_cut"] = paired(shared, cut_runs)
    return result_methods, chosen


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--controls", default="swapped,terse,digit_only", help="'' for none")
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4", help="the grid every method chooses from")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=500, help="new problems per iteration")
    parser.add_argument("--validation", type=int, default=500, help="problems of the validation split")
    parser.add_argument("--heldout", type=int, default=500, help="held-out problems scored (the demo's 500)")
    parser.add_argument("--samples", type=int, default=4, help="k samples per problem (rs_sft, dpo)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke size: 1 iteration x 32 problems, 32 validation, 64 held-out, lrs 1e-5,1e-4, seeds 0,1, "
                        "a 150-step warm start of its own")
    parser.add_argument("--base", default=None, help="a base model folder (default: the demo's, built if absent)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a crowded machine)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no run after this many minutes; summarize the finished ones (seed-major order)")
    parser.add_argument("--workdir", default=str(ROOT / "work" / "bench-quality"))
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.prompts, args.validation, args.heldout = 1, 32, 32, 64
        args.lrs, args.seeds = "1e-5,1e-4", "0,1"

    import torch

    from cut_core.tasks.arithmetic import build_base_model
    from flows.demo import demo_pipeline

    torch.set_num_threads(args.threads)
    demo = demo_pipeline()
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    controls = [c for c in args.controls.split(",") if c]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    online = read_instructions(Path(demo.online.prompts))
    heldout = read_instructions(Path(demo.evaluation.heldout))[:args.heldout]
    if args.iterations * args.prompts + args.validation > len(online):
        raise SystemExit(f"{args.iterations} x {args.prompts} training + {args.validation} validation problems "
                         f"exceed the {len(online)} online problems")
    train_prompts = [online[i * args.prompts:(i + 1) * args.prompts] for i in range(args.iterations)]
    validation = online[len(online) - args.validation:]  # the tail: never a training problem
    batch = demo.training.micro_batch_size * demo.training.gradient_accumulation
    steps = math.ceil(args.prompts / batch)
    size = {"iterations": args.iterations, "prompts_per_iteration": args.prompts, "steps_per_iteration": steps,
            "records_per_step": batch, "validation": len(validation), "heldout": len(heldout), "lrs": lrs,
            "seeds": seeds, "samples_per_problem": args.samples}
    workdir = Path(args.workdir) / ("quick" if args.quick else "x".join(str(v) for v in (
        args.iterations, args.prompts, args.validation, args.heldout)))
    started = time.perf_counter()
    if args.base:
        base = args.base
    elif args.quick:  # a briefly warm-started base: enough mistakes to learn from, built in a minute
        base = str(build_base_model(workdir / "base-model", steps=150, batch_size=32))
    else:
        base = str(build_base_model(Path(demo.model.path)))  # the demo's base (built once, reused)
    base_acc = mean(correctness(base, heldout))
    print(f"base {100 * base_acc:.1f}% on {len(heldout)} held-out; size {size}", flush=True)

    common = dict(base=base, train_prompts=train_prompts, evals={"validation": validation, "heldout": heldout},
                  workdir=workdir, steps=steps, k=args.samples, training=demo.training)
    # Seed-major order: every method and lr gets its first seed before any gets its second, so a
    # run cut short by --budget-minutes still covers every method (and says what it lacks).
    deadline = started + 60 * args.budget_minutes if args.budget_minutes else None
    runs: dict[str, dict[float, list[dict]]] = {m: {lr: [] for lr in lrs} for m in methods}
    stopped = False
    for seed in seeds:
        for lr in lrs:
            for method in methods:
                if deadline and time.perf_counter() > deadline:
                    stopped = True
                    break
                r = run_one(method, lr, seed, **common)
                runs[method][lr].append(r)
                print(f"{method:<19} lr {lr:<7g} seed {seed}: validation {100 * mean(r['validation_correct']):5.1f}%"
                      f"  held-out {100 * mean(r['heldout_correct']):5.1f}%  ({r['seconds']} s)", flush=True)
    if stopped:
        print(f"stopped at the {args.budget_minutes}-minute budget: the summary covers the finished runs only",
              flush=True)

    result_methods, chosen = choose(runs, seeds)

    result_controls = {}
    if controls and "cut" in chosen:
        lr = chosen["cut"]
        for control in controls:
            rs = []
            for seed in [r["seed"] for r in runs["cut"][lr]]:
                if deadline and time.perf_counter() > deadline:
                    stopped = True
                    break
                rs.append(run_one("cut", lr, seed, control=control, **common))
            if not rs:
                continue
            result_controls[control] = {"lr": lr, **summary(rs), "vs_cut": paired(rs, runs["cut"][lr]),
                                        "complete": len(rs) == len(seeds)}
            print(f"control {control:<11} lr {lr:g}: held-out {[round(100 * a, 1) for a in result_controls[control]['accuracy']]}",
                  flush=True)

    print("\nheld-out accuracy at each method's validation-chosen lr (mean ± std over seeds; vs CUT: paired)")
    for name, m in list(result_methods.items()) + [(f"cut/{c}", v) for c, v in result_controls.items()]:
        vs = m.get("vs_cut")
        extra = f"  vs CUT {100 * vs['mean_difference']:+.1f} ± {100 * vs['standard_error']:.1f} pts" if vs else ""
        print(f"  {name:<22} lr {m['lr']:<7g} {100 * m['mean']:5.1f} ± {100 * m['std']:.1f}%{extra}")
    print(json.dumps({"methods": result_methods, "controls": result_controls, "base": round(base_acc, 4),
                      "n_heldout": len(heldout), "n_validation": len(validation), "size": size,
                      "stopped_at_budget": stopped,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
