"""Stage bookkeeping: every stage of a pipeline run writes its result last, atomically.

A run lives in `<workdir>/runs/<run_key>/`, where the run key is a digest of the resolved
declaration. Each stage owns a folder; its `RESULT.json` is written only after everything
else in the folder is complete. A crashed run therefore restarts from its last finished stage,
and a finished pipeline rerun finds every result and does no work.

Prefect task caching cannot give this guarantee on its own: a crash between a task's side
effect (a trained model on disk) and its persisted result would redo hours of training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, TypeVar

from cut_core.files import write_json_atomic  # noqa: F401 - the flows write their records with it
from tasks.results import Record

RESULT = "RESULT.json"
R = TypeVar("R", bound=Record)


def digest_text(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def run_key(pipeline_json: str) -> str:
    """A run is identified by its full resolved declaration."""
    name = json.loads(pipeline_json)["name"]
    return f"{name}-{digest_text(pipeline_json)}"


def finished(stage_dir: Path) -> dict | None:
    """The stored result of a finished stage, or None when the stage has not finished."""
    marker = Path(stage_dir) / RESULT
    if not marker.exists():
        return None
    return json.loads(marker.read_text())


def read_record(path: Path, record_type: type[R]) -> R | None:
    """A JSON record stored at `path` (written with write_json_atomic), or None when absent."""
    path = Path(path)
    return record_type.from_dict(json.loads(path.read_text())) if path.exists() else None


def run_stage(stage_dir: Path, work: Callable[..., Any], /, *args: Any, result_type: type[R],
              log: Callable[[str], None] = print, **kwargs: Any) -> R:
    """The stage's stored result, or run `work(*args, **kwargs)` and store what it returns.

    `work` is a task (or any function) returning a dict or a `result_type`; the stage stores it
    as JSON in `<stage_dir>/RESULT.json` and returns it as a `result_type` (tasks/results.py),
    the same record a rerun reads back from the marker. The arguments are evaluated by the
    caller, whether or not the stage has finished: anything costly or with side effects belongs
    inside `work`.
    """
    stage_dir = Path(stage_dir)
    done = finished(stage_dir)
    if done is not None:
        log(f"[skip] {stage_dir.name}: finished earlier")
        return result_type.from_dict(done)
    stage_dir.mkdir(parents=True, exist_ok=True)
    returned = work(*args, **kwargs)
    result = returned if isinstance(returned, result_type) else result_type.from_dict(returned)
    write_json_atomic(stage_dir / RESULT, result.to_dict())
    return result
