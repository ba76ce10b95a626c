"""Objective sections, one per method, chosen by `name` (CUT, SFT, Hindsight, ForwardPrediction, ILFMLE, DPO,
ILFDPO, SelfDistill); `parse_objective`; `Objective(name=...)` for declarations of the one-class era."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cut_core.dsl.base import Section

# ---------------------------------------------------------------- objectives: one section per method

# lambda of Eq. 5 when a declaration gives none; also the evaluation's flag report for methods
# that have no threshold of their own (ObjectiveSection.flag_threshold).
DEFAULT_THRESHOLD = 1.2

# Every field of the one-class Objective that preceded the sections, with its default. A dump of
# that class (Pipeline.to_json() before the sections) holds all of them; see _legacy_dump.
LEGACY_OBJECTIVE_DEFAULTS: dict[str, Any] = {
    "name": "cut", "threshold": DEFAULT_THRESHOLD, "alpha": 0.5, "gamma": 0.0, "weighting": "reference",
    "align_p_ratio": 0.25, "refined_column": True, "refiner": "model", "refine_max_new_tokens": 256,
    "beta": 0.1, "distillation_alpha": 0.5,
}


class ObjectiveSection(Section):
    """Base of the objective sections: each method declares only the fields it reads, chosen by
    `name` the way judges are chosen by `kind` (TRL keeps one config per trainer likewise).
    A field of another method is refused with the fields this one reads and the section to write."""

    name: str
    # The fields that decide which examples are built (contrast.py puts them in the file's digest);
    # the others (loss settings) leave the examples as they are, so a sweep reuses one file.
    data_fields: ClassVar[tuple[str, ...]] = ()
    # How the method trains, read wherever it matters (materialize, the training subprocess, the CLI):
    # preference_pairs: TRL's DPOTrainer on text pairs (preference.py, the 'dpo' extra), else
    # CUTTrainer on token examples (contrast.PLANS builds them, one entry per section class);
    # contrastive: the examples hold CUT's Align-N/Misalign pairs (the trainer's two passes).
    preference_pairs: ClassVar[bool] = False
    contrastive: ClassVar[bool] = False
    # What `cut-align check` says of the method besides its settings.
    note: ClassVar[str | None] = None

    @classmethod
    def reads(cls) -> tuple[str, ...]:
        """The settings this method reads (every field but `name`), in declaration order."""
        return tuple(f for f in cls.model_fields if f != "name")

    def data_settings(self) -> dict[str, Any]:
        """{field: value} of `data_fields`: what the examples file depends on besides the name."""
        return {f: getattr(self, f) for f in self.data_fields}

    def flag_threshold(self) -> float:
        """lambda of the evaluation's token-flag report (Eq. 5): CUT's own threshold; a method
        without one is shown the tokens CUT would flag at its default."""
        return DEFAULT_THRESHOLD

    @model_validator(mode="before")
    @classmethod
    def _only_own_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = set(cls.model_fields)
        foreign = [k for k in data if k not in own]
        if foreign and _legacy_dump(data):
            # A dump of the old one-class Objective carries every method's fields at their
            # defaults: those say nothing and are dropped; a value someone set is still refused.
            data = {k: v for k, v in data.items()
                    if k in own or k not in LEGACY_OBJECTIVE_DEFAULTS or v != LEGACY_OBJECTIVE_DEFAULTS[k]}
            foreign = [k for k in data if k not in own]
        if foreign:
            raise PydanticCustomError("objective_field", "{message}",
                                      {"message": _foreign_fields_message(cls, data, foreign)})
        return data


def _legacy_dump(data: dict) -> bool:
    return set(LEGACY_OBJECTIVE_DEFAULTS) <= set(data)


def _foreign_fields_message(cls: type[ObjectiveSection], data: dict, foreign: list[str]) -> str:
    """One line: the fields refused, what the method reads, where a foreign field belongs, and
    the declaration to write instead."""
    name = cls.model_fields["name"].default
    refused = ", ".join(repr(f) for f in foreign)
    reads = f"reads: {', '.join(cls.reads())}" if cls.reads() else "reads no settings"
    by_owner: dict[str, list[str]] = {}
    for f in foreign:
        owners = ", ".join(c.__name__ for c in OBJECTIVES.values() if f in c.model_fields)
        if owners:
            by_owner.setdefault(owners, []).append(repr(f))
    belongs = "".join(f"; {', '.join(fs)} {'belong' if len(fs) > 1 else 'belongs'} to {o}" for o, fs in by_owner.items())
    kept = ", ".join(f"{k}={v!r}" for k, v in data.items() if k in cls.model_fields and k != "name")
    return (f"objective {name!r} has no field{'s' * (len(foreign) > 1)} {refused} ({cls.__name__} {reads}"
            f"{belongs}): write {cls.__name__}({kept})")


def _align_p_ratio() -> Any:
    return Field(default=0.25, ge=0.0,
                 description="keep at most ratio x #negatives Align-P examples (None keeps all)")


def _beta() -> Any:
    return Field(default=0.1, gt=0.0, description="the DPO temperature beta")


class CUT(ObjectiveSection):
    """Contrastive unlikelihood training (METHOD.md): MLE on Align-P and Align-N, unlikelihood on
    the Misalign tokens the judgment flags."""
    name: Literal["cut"] = Field(default="cut", description="cut: contrastive unlikelihood training")
    contrastive: ClassVar[bool] = True
    threshold: float = Field(
        default=DEFAULT_THRESHOLD, ge=1.0,
        description="lambda of Eq. 5: a token is flagged when p(y|x,j-)/p(y|x) > threshold (>= 1; 1.1 online, 1.2 offline; inf disables)")
    alpha: float = Field(default=0.5, gt=0.0, le=1.0, description="unlikelihood weight alpha in (0, 1]")
    gamma: float = Field(default=0.0, ge=0.0, description="focal exponent gamma of w = alpha * p^gamma (0 = reference code)")
    weighting: Literal["reference", "paper"] = Field(
        default="reference", description="'reference': 1/2(NLL(Align-N)+L1) per negative; 'paper': L1 + L2")
    align_p_ratio: float | None = _align_p_ratio()
    data_fields: ClassVar[tuple[str, ...]] = ("align_p_ratio",)

    def flag_threshold(self) -> float:
        return self.threshold


class SelfDistill(ObjectiveSection):
    """Judgment-conditioned self-distillation on CUT's pairs: the model with the judgment in
    context (Align-N, no gradient) teaches the plain context (Misalign); Align-P is NLL."""
    name: Literal["self_distill"] = Field(
        default="self_distill", description="self_distill: the model with the judgment in context (Align-N) "
                                            "is the teacher of the plain context (Misalign)")
    contrastive: ClassVar[bool] = True
    note: ClassVar[str | None] = "teacher: Align-N, the judgment in context; student: Misalign"
    distillation_alpha: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="divergence as TRL's SDFT/SDPO mix it: 0 forward KL(teacher||student), "
                    "1 reverse KL(student||teacher), in between generalized JSD (0.5, SDFT's default)")
    align_p_ratio: float | None = _align_p_ratio()
    data_fields: ClassVar[tuple[str, ...]] = ("align_p_ratio",)


class SFT(ObjectiveSection):
    """Baseline: MLE of y given x on the positives only."""
    name: Literal["sft"] = Field(default="sft", description="sft: y given x, positives only")


class Hindsight(ObjectiveSection):
    """Baseline: MLE of y given [x, j] on every triplet."""
    name: Literal["hindsight"] = Field(default="hindsight", description="hindsight: y given [x, j], every triplet")


class ForwardPrediction(ObjectiveSection):
    """Baseline: MLE of y given x, then of j given [x, y], on every triplet."""
    name: Literal["forward_prediction"] = Field(
        default="forward_prediction", description="forward_prediction: y given x, then j given [x, y]")


class _Refinement(ObjectiveSection):
    """The settings ILF-MLE and ILF-DPO share: where a refinement of a negative comes from."""
    refined_column: bool = Field(
        default=True, description="use the data's 'refined' column when present, else ask the refiner")
    refiner: str | None = Field(
        default="model",
        description="who writes a refinement the data lacks: 'model' (the model being aligned, prompted with "
                    "the refine template), a 'module:function' taking a list of (instruction, response, "
                    "judgment) and returning one text or None each, or None (skip)")
    refine_max_new_tokens: int = Field(default=256, ge=1, description="refiner='model': refinement length cap")
    data_fields: ClassVar[tuple[str, ...]] = ("refined_column",)

    @field_validator("refiner")
    @classmethod
    def _refiner_spec(cls, v: str | None) -> str | None:
        if v is not None and v != "model" and ":" not in v:
            raise ValueError("refiner must be 'model', a 'module:function' spec, or None")
        return v


class ILFMLE(_Refinement):
    """Baseline: MLE of a refinement y_hat given x (imitation learning from language feedback)."""
    name: Literal["ilf_mle"] = Field(default="ilf_mle", description="ilf_mle: a refinement y_hat given x")


class DPO(ObjectiveSection):
    """Baseline (TRL's DPOTrainer, the 'dpo' extra: pip install 'cut-align[dpo]'): pairs from
    scalar rewards, the best-rewarded response of an instruction against each worse one; offline only."""
    name: Literal["dpo"] = Field(default="dpo", description="dpo: TRL's DPO on pairs from scores, else polarity")
    preference_pairs: ClassVar[bool] = True
    note: ClassVar[str | None] = "via TRL; pairs from scores, else polarity"
    beta: float = _beta()


class ILFDPO(_Refinement):
    """Baseline (TRL's DPOTrainer, the 'dpo' extra): the refinement y_hat preferred over y for
    every negative that has one."""
    name: Literal["ilf_dpo"] = Field(default="ilf_dpo", description="ilf_dpo: TRL's DPO, y_hat preferred over y")
    preference_pairs: ClassVar[bool] = True
    note: ClassVar[str | None] = "via TRL"
    beta: float = _beta()


# name -> section, in the order the docs list them.
OBJECTIVES: dict[str, type[ObjectiveSection]] = {
    "cut": CUT, "sft": SFT, "hindsight": Hindsight, "forward_prediction": ForwardPrediction, "ilf_mle": ILFMLE,
    "dpo": DPO, "ilf_dpo": ILFDPO, "self_distill": SelfDistill,
}
_UNKNOWN_OBJECTIVE = ("objective name must be one of: " + ", ".join(OBJECTIVES)
                      + " (cut, or a baseline; each has its own section: " + ", ".join(c.__name__ for c in OBJECTIVES.values()) + ")")


def _objective_tag(value: Any) -> str | None:
    # A declaration without a name is CUT's, as it was when Objective was one class.
    if isinstance(value, dict):
        return value.get("name", "cut")
    return getattr(value, "name", None)


AnyObjective = Annotated[
    Union[Annotated[CUT, Tag("cut")], Annotated[SFT, Tag("sft")], Annotated[Hindsight, Tag("hindsight")],
          Annotated[ForwardPrediction, Tag("forward_prediction")], Annotated[ILFMLE, Tag("ilf_mle")],
          Annotated[DPO, Tag("dpo")], Annotated[ILFDPO, Tag("ilf_dpo")], Annotated[SelfDistill, Tag("self_distill")]],
    Discriminator(_objective_tag, custom_error_type="objective_name", custom_error_message=_UNKNOWN_OBJECTIVE),
]
_OBJECTIVE_ADAPTER: TypeAdapter[ObjectiveSection] = TypeAdapter(AnyObjective)


def parse_objective(data: str | dict | ObjectiveSection | None) -> ObjectiveSection:
    """The section of a JSON text or dict (`{"name": "cut", "threshold": 1.1}`); no name means cut."""
    if isinstance(data, ObjectiveSection):
        return data
    if isinstance(data, str):
        return _OBJECTIVE_ADAPTER.validate_json(data)
    return _OBJECTIVE_ADAPTER.validate_python(data or {})


def Objective(name: str = "cut", **fields: Any) -> ObjectiveSection:  # noqa: N802 - the pre-sections class name
    """The pre-sections form, kept for old declarations: `Objective(name="cut", threshold=1.1)` is
    `CUT(threshold=1.1)`. A field the method does not read is refused with the section to write."""
    cls = OBJECTIVES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValidationError.from_exception_data("Objective", [{
            "type": PydanticCustomError("objective_name", _UNKNOWN_OBJECTIVE), "loc": ("name",), "input": name}])
    return cls(name=name, **fields)
