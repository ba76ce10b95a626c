"""The logger a task writes to: the Prefect run's, or the module's outside a run.

`task.fn(...)` (tests, notebooks, the benchmarks) runs without a Prefect run context, where
`get_run_logger()` raises; the work should still log somewhere.
"""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def task_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)
