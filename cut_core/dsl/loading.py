"""Loading a declaration file: import_callable (module:function strings, old paths through cut_core.compat),
load_pipeline with one-line errors (field path, line, fix), relative paths resolved."""

from __future__ import annotations

import importlib
import runpy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from cut_core.dsl.judges import FunctionJudge, OpenAIJudge, TransformersJudge
from cut_core.dsl.objectives import OBJECTIVES, ObjectiveSection
from cut_core.dsl.pipeline import Pipeline

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


def _sections() -> dict[str, type[BaseModel]]:
    """Every section class by name (the title of a ValidationError raised while building it)."""
    from cut_core.dsl import base

    found: dict[str, type[BaseModel]] = {}
    todo = [base.Section]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


SECTIONS = _sections()


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
    root = SECTIONS.get(err.title, Pipeline)
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
