"""What is trained and how: Model, LoRA, Training, Launch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from cut_core.dsl.base import Section

# ---------------------------------------------------------------- model, judge

class Model(Section):
    path: str = Field(description="local directory of a Hugging Face causal LM (or a hub id when online)")
    template: Literal["alpaca", "chat"] = Field(
        default="alpaca", description="'alpaca' (the paper's templates) or 'chat' (the tokenizer's chat template)")
    max_length: int = Field(default=2048, gt=8, description="longest sequence in tokens; prompts are cut from the left")
    build: str | None = Field(
        default=None, pattern=r"^[\w.]+:[\w]+$",
        description="optional 'package.module:function' f(out_dir) that builds the model at `path` when it is missing "
        "(the demo builds and warm-starts its tiny model this way)")


# ---------------------------------------------------------------- adapter, training

class LoRA(Section):
    r: int = Field(default=16, gt=0, description="LoRA rank")
    alpha: int = Field(default=16, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    target_modules: Literal["all-linear", "mlp"] | list[str] = Field(
        default="all-linear",
        description="what to adapt: 'all-linear' (every linear layer but the output head; exists in every "
        "architecture), 'mlp' (the paper's choice: the feed-forward layers, found per architecture), or a list "
        "of module names (e.g. ['q_proj', 'v_proj']) that must exist in the model")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("target_modules is an empty list: use 'all-linear', 'mlp' or name some modules")
        return v


class Training(Section):
    learning_rate: float = Field(default=4e-4, gt=0, description="peak learning rate")
    epochs: float = Field(default=1.0, gt=0, description="passes over the materialized examples")
    micro_batch_size: int = Field(default=1, ge=1, description="records per forward pass")
    gradient_accumulation: int = Field(default=8, ge=1, description="micro-batches per optimizer step")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="learning-rate schedule")
    warmup_steps: int = Field(default=100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(default=42, description="random seed")
    gradient_checkpointing: bool = Field(default=False, description="trade compute for memory")
    save_steps: int = Field(default=500, ge=1, description="checkpoint every N optimizer steps")
    full_finetune: bool = Field(default=False, description="train all weights instead of a LoRA adapter")
    logging_steps: int = Field(default=10, ge=1, description="log loss parts every N steps")


class Launch(Section):
    """How the training subprocess is started: one process, or data-parallel / sharded processes
    through torchrun or `accelerate launch` (DDP, FSDP2, DeepSpeed ZeRO-2 configs ship in
    `pipelines/accelerate/`). The environment variable CUT_ALIGN_LAUNCHER, when set, replaces the
    launcher (needed per node for multi-node runs, whose node rank differs per machine)."""
    processes: int = Field(
        default=1, ge=1,
        description="training processes on this machine (one per GPU; on CPU each gets its share of the cores); "
        "records are split between them and gradients all-reduced")
    accelerate_config: str | None = Field(
        default=None,
        description="an `accelerate launch` config file (e.g. pipelines/accelerate/fsdp2.yaml); None launches with "
        "torchrun when processes > 1")
