"""DPO and ILF-DPO: the preference baselines, trained by TRL's DPOTrainer (the 'dpo' extra).

Not a hand-written DPO: TRL owns the loss, the reference model and the tokenization of
`prompt + chosen/rejected` (it appends EOS). This module only maps the DSL onto a `DPOConfig`
and hands the trainer the pairs file of `preference.py`; train_cli.py runs it with the same
contract as CUT (checkpoints with COMPLETE markers, resume, log_history.jsonl, adapter/,
merged/, COMPLETE).

The reference model: with LoRA, TRL wraps the base itself and the reference is the base with
the adapter disabled (no second copy in memory); a later iteration continues the previous
version's adapter on the same declared base (`init_adapter`), so its reference stays that
declared base (the round's anchor), not the previous iteration; with full fine-tuning, TRL loads a frozen copy
from the same local folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cut_core.dsl import DPO, ILFDPO, LoRA, Training

INSTALL_HINT = "objectives 'dpo' and 'ilf_dpo' need TRL: pip install 'cut-align[dpo]'"


def require_trl() -> None:
    """Fail early, with the install command, when the extra is missing."""
    try:
        import trl  # noqa: F401
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err


def build_trainer(
    *,
    model_path: str,
    pairs_path: str,
    checkpoints: Path,
    objective: DPO | ILFDPO,
    adapter: LoRA | None,
    training: Training,
    tokenizer: Any,
    max_steps: int | None,
    max_length: int | None,
    report_to: str,
    callbacks: list,
    init_adapter: str | None = None,
):
    """A ready DPOTrainer on the pairs file; the caller trains, resumes and saves it."""
    require_trl()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from cut_core.data.preference import load_pairs
    from cut_core.train.trainer import load_model, lora_config, training_arguments

    pairs = load_pairs(pairs_path)
    dataset = Dataset.from_dict({c: pairs[c].to_list() for c in ("prompt", "chosen", "rejected")})
    args = DPOConfig(beta=objective.beta, max_length=max_length,
                     **training_arguments(training, output_dir=checkpoints, max_steps=max_steps, report_to=report_to))
    if init_adapter is not None:  # the previous version's adapter, continued: TRL takes the PeftModel as is
        from cut_core.errors import UserError

        try:
            model = load_model(model_path, adapter, init_adapter=init_adapter)
        except ValueError as err:
            raise UserError(str(err)) from err
        peft_config = None
    else:
        model = load_model(model_path, adapter, full_finetune=training.full_finetune, wrap=False)
        peft_config = None if training.full_finetune else lora_config(adapter, model)
    return DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
