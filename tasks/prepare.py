"""The prepare-model task: build the base model a declaration names when its folder is missing.

A declaration's `model.build` ("module:function") makes the model to align in `model.path`
(the demo's warm start, cut_core.tasks.arithmetic.build_base_model, takes most of the demo's wall
time). As a task it shows in Prefect with its own state and logs: a builder that takes a
`log` argument gets the task's logger and reports its progress there.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

from prefect import task

from cut_core.dsl import import_callable
from tasks.logs import task_logger


@task(name="prepare-model")
def build_model(builder: str, path: str) -> str:
    """Run `builder(path)` (with log=the task's logger when it takes one); returns the folder."""
    logger = task_logger(__name__)
    fn = import_callable(builder)
    started = time.perf_counter()
    logger.info(f"building the base model with {builder} in {path}")
    try:
        takes_log = "log" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        takes_log = False
    fn(Path(path), log=logger.info) if takes_log else fn(Path(path))
    logger.info(f"base model ready in {path} ({time.perf_counter() - started:.0f} s)")
    return path
