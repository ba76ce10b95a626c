"""What the stages of a pipeline run return, as typed records.

Each record is what one stage stores in its `RESULT.json` (tasks/stages.py run_stage): `to_dict()`
is the JSON written, `from_dict()` reads it back, so a rerun that skips a finished stage gets the
same typed object the first run got. The field names are the keys the markers have always had:
a workdir written before these records existed (plain dicts with those keys) resumes as is.
A key a record does not declare (a count a later judge adds, say) is kept in `extra` and written
back with the others: nothing read from a marker is lost.

    stage                   record            written by
    <run>/start             StartChoice       flows/align.py choose_start
    <run>/select            RoundSelection    tasks/rounds.py select_round_triplets
    iter-k/sample           Sampled           tasks/generate.py sample_prompts
    iter-k/generate         Generated         tasks/generate.py generate_responses
    iter-k/judge            Judged            tasks/label.py judge_pairs
    iter-k/materialize      Examples          tasks/materialize.py materialize_examples
    iter-k/train            Trained           tasks/train.py train
    iter-k/evaluate         Evaluated         tasks/evaluate.py evaluate_model
    iter-k/register         Registered        tasks/tracking.py register_version
    <run>/final             RunSummary        flows/align.py summarize (IterationSummary each)

and the MLflow run ids kept beside them: `<run>/mlflow.json` (ParentRun), `iter-k/mlflow.json`
(IterationRun).

The tasks themselves return plain dicts (their Prefect results, and what their callers outside
a flow read); the flows receive these records from `run_stage`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """A stage result: the declared fields, plus `extra` for any other key its marker holds."""

    # Keys written only when their value is not None (a marker that never had them stays so).
    omit_none: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: the declared fields in order (nested records as dicts), then `extra`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.omit_none:
                continue
            out[f.name] = _plain(value)
        out.update(getattr(self, "extra", {}))
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """The record of a stored (or just returned) result; unknown keys go to `extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: cls._field_value(k, v) for k, v in data.items() if k in names}
        rest = {k: v for k, v in data.items() if k not in names}
        if rest and "extra" not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(rest)}")
        return cls(**known, **({"extra": rest} if rest else {}))

    @classmethod
    def _field_value(cls, name: str, value: Any) -> Any:
        """A nested record's dict turned into its record (overridden where a field holds one)."""
        return value

    def numbers(self) -> dict[str, int | float]:
        """The numeric entries (what the flows log as MLflow metrics)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float))}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- stages of a run

@dataclass
class StartChoice(Record):
    """The model a run's first iteration starts from, fixed once: a registered version (a
    recurring round with a champion) or the declared base."""

    omit_none: ClassVar[tuple[str, ...]] = ("version", "via", "base")
    version: int | None = None
    via: str | None = None
    base: str | None = None


@dataclass
class RoundSelection(Record):
    """The triplets fixed for one recurring offline round (warehouse.select_round's counts)."""

    triplets: int
    positives: int = 0
    negatives: int = 0
    round: str | None = None
    files: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParentRun(Record):
    """`<run>/mlflow.json`: the run's parent MLflow run, created once, reused on a resume."""

    parent_run_id: str


@dataclass
class IterationRun(Record):
    """`iter-k/mlflow.json`: the iteration's nested MLflow run."""

    run_id: str


# ----------------------------------------------------------------------------- stages of an iteration

@dataclass
class Sampled(Record):
    """This iteration's new instructions (a Parquet of prompt_index, instruction)."""

    path: str
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generated(Record):
    """The current model's answers to the sampled instructions."""

    path: str
    n: int
    engine: str | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Judged(Record):
    """The judge's counts over this iteration's generations (cut_core.judge.label_pending), the
    triplets they became, and the Parquet of judgments."""

    requested: int = 0
    cached: int = 0
    retried: int = 0
    judged: int = 0
    ok: int = 0
    failed: int = 0
    positives: int = 0
    negatives: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_unknown: int = 0
    triplets_added: int = 0
    labeled: int = 0
    unlabeled: int = 0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Examples(Record):
    """The materialized training examples: `<workdir>/examples/<digest>.parquet` and its stats."""

    path: str
    digest: str
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained(Record):
    """A finished training run: its folder, the merged model, a LoRA run's adapter, the loss log."""

    output_dir: str
    merged: str
    adapter: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluated(Record):
    """Held-out metrics of one model, and the folder with its samples and token report."""

    metrics: dict[str, Any]
    dir: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Registered(Record):
    """The registered model version of an iteration (tracking.register_version)."""

    model: str
    version: int
    champion: bool
    refused: str | None = None
    previous_champion_metric: float | None = None
    digest: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IterationResult(Record):
    """One iteration's outcome: the model it trained, its metrics, its registered version, and
    the model it started from (set by the flow that ran it)."""

    iteration: int
    model: str
    metrics: dict[str, Any]
    registered: Registered
    start_model: dict[str, Any] | None = None

    @classmethod
    def _field_value(cls, name: str, value: Any) -> Any:
        return Registered.from_dict(value) if name == "registered" and isinstance(value, Mapping) else value

    def summary(self) -> IterationSummary:
        return IterationSummary(iteration=self.iteration, model=self.model, start_model=self.start_model,
                                version=self.registered.version, champion=self.registered.champion,
                                metrics=self.metrics)


# ----------------------------------------------------------------------------- a whole run

@dataclass
class IterationSummary(Record):
    """One iteration as the run's final record lists it."""

    iteration: int
    model: str
    start_model: dict[str, Any] | None
    version: int
    champion: bool
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary(Record):
    """A pipeline run's final record (`<run>/final/RESULT.json`), and what its flow returns.

    `round`/`trained`: set for a recurring offline round; `reason`: why a round ended without
    training. Unset, they are not written (an online run's record has neither)."""

    pipeline: str
    run_key: str
    metric: str
    start_model: dict[str, Any] | None
    base: dict[str, Any]
    iterations: list[IterationSummary]
    round: RoundSelection | None = None
    trained: bool | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _field_value(cls, name: str, value: Any) -> Any:
        if name == "iterations":
            return [IterationSummary.from_dict(v) if isinstance(v, Mapping) else v for v in value]
        if name == "round" and isinstance(value, Mapping):
            return RoundSelection.from_dict(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The keys in the order the flows have always returned them (the CLI prints this dict)."""
        core = {"pipeline": self.pipeline, "run_key": self.run_key, "metric": self.metric,
                "start_model": self.start_model, "base": self.base,
                "iterations": [_plain(it) for it in self.iterations]}
        round_ = _plain(self.round)
        if self.reason is not None:  # a round that ended without training
            out = {"pipeline": self.pipeline, "run_key": self.run_key, "round": round_, "metric": self.metric,
                   "start_model": self.start_model, "base": self.base, "iterations": core["iterations"],
                   "trained": self.trained, "reason": self.reason}
        elif self.trained is not None:  # a recurring offline round that trained
            out = {"round": round_, "trained": self.trained, **core}
        else:
            out = core
        out.update(self.extra)
        return out
