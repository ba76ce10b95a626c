"""The training subprocess: `python -m cut_core.train.cli CONFIG.json` (docs/architecture.md).

CONFIG.json keys:
    model_path   local directory of a HF causal LM and its tokenizer
    examples     the examples Parquet (contrast.py's output), or for dpo/ilf_dpo the pairs
                 Parquet (preference.py's output), trained by TRL's DPOTrainer (cut_core/train/dpo.py)
    output_dir   where everything below is written
    objective    the DSL objective section as JSON, chosen by name ({"name": "cut", "threshold": 1.1}, ...)
    adapter      dsl.LoRA as JSON, or null for full fine-tuning (needs training.full_finetune)
    training     dsl.Training as JSON
    report_to    optional: "none" (default), "mlflow", "tensorboard", ... (any Trainer integration)
    max_steps    optional: stop after this many optimizer steps (overrides training.epochs)
    max_length   optional: dpo/ilf_dpo only, TRL's cap on prompt + completion tokens (CUT
                 examples were already cut to fit when they were materialized)
    init_adapter optional: a LoRA run's adapter/ folder trained on this same model_path with the
                 same adapter section; the LoRA starts from its weights (the next iteration
                 continues the previous version's adapter: a version is base + ONE adapter).
                 A different adapter section is refused (exit USER_ERROR, one line)
    base_ref     optional: the registry reference of model_path (e.g. "models:/NAME/3"),
                 recorded in merged/cut_align_lineage.json
    processes    optional: the processes the declaration launched (dsl.Launch.processes); with
                 more than one, training stops before any work unless they form one group

Writes into output_dir:
    checkpoints/checkpoint-N/   each with COMPLETE written last; only those are resumed from
    progress.json               rewritten while training (at most every second): step, max_steps,
                                elapsed_s, steps_per_s, tokens_per_s, eta_s, done
    log_history.jsonl           one JSON object per logging step: step, loss, nll, ut,
                                flagged_fraction, padding_efficiency, learning_rate, grad_norm, epoch
                                (ut and flagged_fraction only when the window held CUT pairs);
                                dpo/ilf_dpo log TRL's keys instead: loss, rewards/*, logps/*, ...
    adapter/                    the LoRA adapter + tokenizer (LoRA runs only); its adapter_config.json
                                names model_path by absolute path (AutoModelForCausalLM-loadable here)
    merged/                     a standalone model + tokenizer (AutoModelForCausalLM-loadable); in LoRA
                                runs with cut_align_lineage.json (= model_path + adapter/)
    COMPLETE                    last; a rerun of a finished output_dir does nothing

Relaunching on the same output_dir resumes from the latest complete checkpoint with the
optimizer, scheduler, data position and RNG states it saved, so the resumed run logs the same
losses as an uninterrupted one.

Several processes (torchrun / accelerate launch, cut_core/train/launch.py): the processes first form
one group (gloo on CPU, NCCL on CUDA) or stop with an error; each trains on its share of every
global batch (micro_batch_size x gradient_accumulation x processes records), gradients are
all-reduced, and rank 0 alone writes checkpoints' COMPLETE markers, the history, adapter/,
merged/ and COMPLETE, and prints the summary. The losses equal a one-process run at the same
global batch (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import os
import sys

from cut_core.files import write_text_atomic
from pathlib import Path
from typing import Any

CONFIG_KEYS = {"model_path", "examples", "output_dir", "objective", "adapter", "training", "report_to", "max_steps",
               "max_length", "processes",
               "init_adapter", "base_ref"}
REQUIRED_KEYS = ("model_path", "examples", "output_dir")
HISTORY = "log_history.jsonl"
PROGRESS = "progress.json"
# progress.json is rewritten at most this often (seconds).
PROGRESS_EVERY_S = 1.0
USER_ERROR = 3  # exit code for a deterministic error the user must fix: the train task does not retry it


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
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))


def _progress_callback_class():
    from transformers import TrainerCallback

    class ProgressFile(TrainerCallback):
        """Rewrites progress.json (atomically) as steps end, at most every PROGRESS_EVERY_S:
        step, max_steps, elapsed_s, steps_per_s, tokens_per_s (response + prompt tokens of both
        passes, this process's count x processes; absent for trainers that do not count them),
        eta_s, done. The train task reads it to log progress while the subprocess runs."""

        def __init__(self, path: Path):
            self.path, self.trainer = path, None
            self._start = self._last = 0.0
            self._first_step = 0
            self._first_tokens = 0

        def _tokens(self) -> int | None:
            count = getattr(self.trainer, "tokens_trained", None)
            return int(count) if count is not None else None

        def on_train_begin(self, args, state, control, **kwargs):
            import time

            self._start, self._first_step = time.monotonic(), state.global_step
            self._first_tokens = self._tokens() or 0
            self._write(args, state, done=False)

        def on_step_end(self, args, state, control, **kwargs):
            import time

            if time.monotonic() - self._last >= PROGRESS_EVERY_S:
                self._write(args, state, done=False)

        def on_train_end(self, args, state, control, **kwargs):
            self._write(args, state, done=True)

        def _write(self, args, state, *, done: bool) -> None:
            import time

            now = time.monotonic()
            self._last = now
            elapsed = max(now - self._start, 1e-9)
            steps = state.global_step - self._first_step
            rate = steps / elapsed if steps else None
            entry = {"step": state.global_step, "max_steps": state.max_steps, "elapsed_s": round(elapsed, 2),
                     "steps_per_s": round(rate, 4) if rate else None,
                     "eta_s": round((state.max_steps - state.global_step) / rate, 1) if rate else None,
                     "done": done}
            tokens = self._tokens()
            if tokens is not None:
                entry["tokens_per_s"] = round((tokens - self._first_tokens) * max(1, args.world_size) / elapsed, 1)
            write_text_atomic(self.path, json.dumps(entry))

    return ProgressFile


def ProgressFile(path: Path):  # noqa: N802 — builds the callback without importing transformers at module import
    return _progress_callback_class()(path)


def validate_config(config: dict[str, Any]):
    """Check keys and parse the DSL sections; returns (objective, adapter, training)."""
    from cut_core.dsl import LoRA, Training, parse_objective

    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(CONFIG_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if not config.get(k)]
    if missing:
        raise ValueError(f"config is missing {missing}")
    objective = parse_objective(config.get("objective") or {})
    # An absent adapter means the default LoRA; an explicit null means full fine-tuning.
    adapter_json = config.get("adapter", {})
    adapter = LoRA.model_validate(adapter_json) if adapter_json is not None else None
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
    from cut_core.errors import UserError

    try:
        objective, adapter, training = validate_config(config)
    except ValueError as err:  # pydantic's ValidationError included: the config is the user's to fix
        raise UserError(f"training config {output_dir / 'train_config.json'}: {err}".replace("\n", " ")) from err

    from cut_core.train.launch import join_process_group

    world = join_process_group(config.get("processes"))  # before any work: N copies must never train

    import torch
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    from cut_core.train.trainer import (CompleteMarkerCallback, latest_complete_checkpoint, load_records,
                          remove_incomplete_checkpoints, save_final)

    torch.set_num_threads(_threads())
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / "checkpoints"
    history_path = output_dir / HISTORY
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has seen the checkpoints before rank 0 prunes incomplete ones

    dpo = objective.preference_pairs
    if dpo:
        from cut_core.train.dpo import require_trl

        require_trl()  # before any work: the install hint, not a traceback mid-run
        records = None
    else:
        records = load_records(config["examples"])
        if not objective.contrastive and any(r.kind == "cut" for r in records):
            raise ValueError(f"objective {objective.name!r} is a baseline but {config['examples']} holds CUT pairs "
                             "(align_n/misalign rows): materialize the examples for this objective")

    resume = latest_complete_checkpoint(checkpoints)
    if rank0:
        remove_incomplete_checkpoints(checkpoints)
        # Logs written after the resumed checkpoint belong to the interrupted run; drop them.
        kept_until = int(resume.name.split("-")[-1]) if resume else 0
        _write_history(history_path, [e for e in _read_history(history_path) if e["step"] <= kept_until])

    class JsonlHistory(TrainerCallback):
        """Appends each training log to log_history.jsonl as it happens (watchable live)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                with open(history_path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    progress = ProgressFile(output_dir / PROGRESS) if rank0 else None
    callbacks = [CompleteMarkerCallback(), JsonlHistory(), *([progress] if progress else []), *(callbacks or [])]
    # Seed before building the model: LoRA's A matrices are initialised randomly.
    set_seed(training.seed)
    if not Path(config["model_path"], "config.json").exists():
        raise UserError(f"model_path {config['model_path']} holds no model (no config.json); "
                        "fix: point it at a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    if dpo:
        from cut_core.train.dpo import build_trainer

        trainer = build_trainer(
            model_path=config["model_path"], pairs_path=config["examples"], checkpoints=checkpoints,
            objective=objective, adapter=adapter, training=training, tokenizer=tokenizer,
            max_steps=config.get("max_steps"), max_length=config.get("max_length"),
            report_to=config.get("report_to") or "none", callbacks=callbacks,
            init_adapter=config.get("init_adapter"))
    else:
        trainer = _cut_trainer(config, objective, adapter, training, tokenizer, records, checkpoints, callbacks)
    if progress is not None:
        progress.trainer = trainer  # tokens trained so far (CUTTrainer.tokens_trained)
    _say_what_accelerate_chose(trainer)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return {"output_dir": str(output_dir), "rank": int(os.environ.get("RANK", "0")), "skipped": False}

    # The trainer state (restored from the checkpoint on resume) is the authoritative history.
    history = [{"step": e["step"], **e} for e in trainer.state.log_history if "loss" in e]
    _write_history(history_path, history)
    written = save_final(trainer.model, tokenizer, output_dir, base_model=config["model_path"],
                         base_ref=config.get("base_ref"))
    summary = {"steps": trainer.state.global_step, "resumed_from": str(resume) if resume else None,
               "records": len(trainer.train_dataset), "processes": world, **written}
    write_text_atomic(marker, json.dumps(summary))  # whole or absent: a cut write is not 'finished'
    return {"output_dir": str(output_dir), "skipped": False, **summary}


def _cut_trainer(config, objective, adapter, training, tokenizer, records, checkpoints: Path, callbacks: list):
    """CUT and the MLE baselines: CUTTrainer on the examples' records."""
    from cut_core.train.trainer import CUTConfig, CUTTrainer, RecordDataset, load_model, training_arguments

    from cut_core.errors import UserError

    try:
        model = load_model(config["model_path"], adapter, full_finetune=training.full_finetune,
                           init_adapter=config.get("init_adapter"))
    except ValueError as err:  # LoRA targets that match nothing, an adapter-less non-full run
        raise UserError(str(err)) from err
    args = CUTConfig(
        **_loss_settings(objective),
        **training_arguments(training, output_dir=checkpoints, max_steps=config.get("max_steps"),
                             report_to=config.get("report_to") or "none"))
    return CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records), processing_class=tokenizer,
                      callbacks=callbacks)


def _loss_settings(objective) -> dict[str, Any]:
    """The CUTConfig loss fields of a section: CUT's threshold/alpha/gamma/weighting, SelfDistill's
    divergence mix; the MLE baselines set none (their examples are `mle` rows only, on which the
    CUT loss is plain NLL whatever its settings)."""
    from cut_core.dsl import CUT, SelfDistill

    if isinstance(objective, CUT):
        return dict(objective="cut", threshold=objective.threshold, alpha=objective.alpha, gamma=objective.gamma,
                    weighting=objective.weighting)
    if isinstance(objective, SelfDistill):
        return dict(objective="self_distill", distillation_alpha=objective.distillation_alpha)
    return dict(objective="cut")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cut_core.train.cli CONFIG.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text())
    from cut_core.errors import UserError, one_line

    try:
        summary = run(config)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR
    finally:
        _leave_process_group()
    if "rank" not in summary:  # one summary per run, from rank 0
        print(json.dumps(summary))
    return 0


def _say_what_accelerate_chose(trainer) -> None:
    """No silent fall-back: accelerate applies FSDP and DeepSpeed only to GPU runs. A CPU run
    launched with such a config trains as plain DDP (every process holds the whole model)."""
    asked = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(env, "false").lower() == "true"]
    got = str(trainer.accelerator.distributed_type).split(".")[-1]
    if asked and asked[0].upper() not in got.upper() and trainer.is_world_process_zero():
        print(f"warning: the accelerate config asks for {asked[0]} but accelerate runs this as {got} "
              "(it shards only on GPUs): every process holds the whole model", file=sys.stderr, flush=True)


def _leave_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # imported only by a run that trained
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
