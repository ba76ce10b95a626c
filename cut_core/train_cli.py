"""The training subprocess: `python -m cut_core.train_cli CONFIG.json` (docs/architecture.md).

CONFIG.json keys:
    model_path   local directory of a HF causal LM and its tokenizer
    examples     the examples Parquet (contrast.py's output)
    output_dir   where everything below is written
    objective    dsl.Objective as JSON (threshold, alpha, gamma, weighting, ...)
    adapter      dsl.LoRA as JSON, or null for full fine-tuning (needs training.full_finetune)
    training     dsl.Training as JSON
    report_to    optional: "none" (default), "mlflow", "tensorboard", ... (any Trainer integration)
    max_steps    optional: stop after this many optimizer steps (overrides training.epochs)

Writes into output_dir:
    checkpoints/checkpoint-N/   each with COMPLETE written last; only those are resumed from
    log_history.jsonl           one JSON object per logging step: step, loss, nll, ut,
                                flagged_fraction, padding_efficiency, learning_rate, grad_norm, epoch
                                (ut and flagged_fraction only when the window held CUT pairs)
    adapter/                    the LoRA adapter (LoRA runs only)
    merged/                     a standalone model + tokenizer (AutoModelForCausalLM-loadable)
    COMPLETE                    last; a rerun of a finished output_dir does nothing

Relaunching on the same output_dir resumes from the latest complete checkpoint with the
optimizer, scheduler, data position and RNG states it saved, so the resumed run logs the same
losses as an uninterrupted one. Works under `torchrun` (one process per device).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

CONFIG_KEYS = {"model_path", "examples", "output_dir", "objective", "adapter", "training", "report_to", "max_steps"}
REQUIRED_KEYS = ("model_path", "examples", "output_dir")
HISTORY = "log_history.jsonl"


def _threads() -> int:
    """CPU threads for this process: OMP_NUM_THREADS if set, else this process's share of the
    cores it may run on (torchrun starts one process per device on the same cores)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_history(path: Path, entries: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
    tmp.replace(path)


def validate_config(config: dict[str, Any]):
    """Check keys and parse the DSL sections; returns (objective, adapter, training)."""
    from .dsl import LoRA, Objective, Training

    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if not config.get(k)]
    if missing:
        raise ValueError(f"config is missing {missing}")
    objective = Objective.model_validate(config.get("objective") or {})
    adapter = LoRA.model_validate(config["adapter"]) if config.get("adapter", {}) is not None else None
    training = Training.model_validate(config.get("training") or {})
    if adapter is None and not training.full_finetune:
        raise ValueError("adapter is null: set training.full_finetune=true, or give a LoRA adapter")
    return objective, adapter, training


def run(config: dict[str, Any], *, callbacks: list | None = None) -> dict[str, Any]:
    """Train as CONFIG says; returns a summary. `callbacks` are extra TrainerCallbacks."""
    output_dir = Path(config["output_dir"])
    marker = output_dir / "COMPLETE"
    if marker.exists():  # checked before the heavy imports: a finished run costs nothing
        return {"output_dir": str(output_dir), "skipped": True, **json.loads(marker.read_text() or "{}")}
    objective, adapter, training = validate_config(config)

    import torch
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    from .trainer import (CompleteMarkerCallback, CUTConfig, CUTTrainer, RecordDataset, latest_complete_checkpoint,
                          load_model, load_records, remove_incomplete_checkpoints, save_final, training_dtype)

    torch.set_num_threads(_threads())
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / "checkpoints"
    history_path = output_dir / HISTORY
    rank0 = int(os.environ.get("RANK", "0")) == 0

    records = load_records(config["examples"])
    if objective.name != "cut" and any(r.kind == "cut" for r in records):
        raise ValueError(f"objective {objective.name!r} is a baseline but {config['examples']} holds CUT pairs "
                         "(align_n/misalign rows): materialize the examples for this objective")

    resume = latest_complete_checkpoint(checkpoints)
    if rank0:
        remove_incomplete_checkpoints(checkpoints)
        # Logs written after the resumed checkpoint belong to the interrupted run; drop them.
        kept_until = int(resume.name.split("-")[-1]) if resume else 0
        _write_history(history_path, [e for e in _read_history(history_path) if e["step"] <= kept_until])

    # Seed before building the model: LoRA's A matrices are initialised randomly.
    set_seed(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    model = load_model(config["model_path"], adapter, full_finetune=training.full_finetune)
    on_gpu = torch.cuda.is_available()

    args = CUTConfig(
        output_dir=str(checkpoints),
        threshold=objective.threshold, alpha=objective.alpha, gamma=objective.gamma, weighting=objective.weighting,
        learning_rate=training.learning_rate, num_train_epochs=training.epochs,
        max_steps=config.get("max_steps") or -1,
        per_device_train_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        lr_scheduler_type=training.scheduler, warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay, seed=training.seed,
        activation_checkpointing=training.gradient_checkpointing,
        save_strategy="steps", save_steps=training.save_steps,
        logging_strategy="steps", logging_steps=training.logging_steps,
        bf16=on_gpu and training_dtype() == torch.bfloat16,
        report_to=config.get("report_to") or "none",
        dataloader_pin_memory=on_gpu, disable_tqdm=True,
    )

    class JsonlHistory(TrainerCallback):
        """Appends each training log to log_history.jsonl as it happens (watchable live)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                with open(history_path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records), processing_class=tokenizer,
                         callbacks=[CompleteMarkerCallback(), JsonlHistory(), *(callbacks or [])])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return {"output_dir": str(output_dir), "rank": int(os.environ.get("RANK", "0"))}

    # The trainer state (restored from the checkpoint on resume) is the authoritative history.
    history = [{"step": e["step"], **e} for e in trainer.state.log_history if "loss" in e]
    _write_history(history_path, history)
    written = save_final(trainer.model, tokenizer, output_dir)
    summary = {"steps": trainer.state.global_step, "resumed_from": str(resume) if resume else None,
               "records": len(records), **written}
    marker.write_text(json.dumps(summary))
    return {"output_dir": str(output_dir), "skipped": False, **summary}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cut_core.train_cli CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    summary = run(config)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
