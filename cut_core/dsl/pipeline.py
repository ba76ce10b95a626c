"""The Pipeline: every section of one declaration, serialised to JSON and back unchanged."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from cut_core.dsl.base import Section
from cut_core.dsl.data import Ingestion, Source
from cut_core.dsl.judges import Judge
from cut_core.dsl.objectives import AnyObjective, CUT, DPO, OBJECTIVES
from cut_core.dsl.runs import Evaluation, Generation, Online, legacy_generation
from cut_core.dsl.training import Launch, LoRA, Model, Training

class Pipeline(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="pipeline name (letters, digits, . _ -)")
    workdir: str = Field(default="work", description="folder for the warehouse, examples and checkpoints (relative to the pipeline file)")
    sources: list[Source] = Field(default_factory=list, description="triplet sources to ingest")
    ingestion: Ingestion = Field(default_factory=Ingestion, description="ingestion limits")
    model: Model | None = Field(default=None, description="the model to align")
    judge: Judge | None = Field(default=None, description="who labels unlabeled rows and online generations")
    objective: AnyObjective = Field(
        default_factory=CUT,
        description="training objective, chosen by name, with only the settings it reads: " + ", ".join(
            f"{c.__name__} ({n})" for n, c in OBJECTIVES.items()))
    adapter: LoRA | None = Field(default_factory=LoRA, description="LoRA settings; None with training.full_finetune")
    training: Training = Field(default_factory=Training, description="optimizer and schedule")
    launch: Launch = Field(default_factory=Launch, description="training processes and launcher")
    online: Online = Field(default_factory=Online, description="online-iteration settings")
    evaluation: Evaluation = Field(default_factory=Evaluation, description="held-out evaluation settings")
    generation: Generation = Field(default_factory=Generation,
                                   description="generation engine and sampling (online responses, evaluation answers)")
    registered_model: str | None = Field(default=None, description="MLflow registered model name (defaults to the pipeline name)")

    @model_validator(mode="before")
    @classmethod
    def _legacy_generation(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("online") is not None:
            online, generation = legacy_generation(data["online"], data.get("generation"))
            if online is not data["online"]:
                data = {**data, "online": online, "generation": generation}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Pipeline":
        if self.online.iterations > 0 and self.judge is None:
            raise ValueError("online.iterations > 0 needs a judge to label the generations")
        if self.adapter is None and not self.training.full_finetune:
            raise ValueError("adapter=None needs training.full_finetune=True (or give a LoRA adapter)")
        if self.online.iterations > 0 and isinstance(self.objective, DPO):
            raise ValueError("objective 'dpo' pairs several scored responses of one instruction, and online "
                             "iterations generate one response per instruction: use 'ilf_dpo' or 'cut' online")
        if self.online.iterations > 0 and self.generation.n > 1:
            raise ValueError("generation.n > 1: online iterations store and judge one response per instruction; "
                             "set generation.n=1 (n > 1 is for cut_core.infer.engines.generate, e.g. rejection sampling)")
        return self

    # -- serialisation: JSON is the interchange format (Prefect parameters, MLflow params)
    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "Pipeline":
        return cls.model_validate_json(text)

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> value strings, the shape MLflow params want."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = json.dumps(value) if not isinstance(value, str) else value

        walk("", self.model_dump(mode="json"))
        return out
