"""Shared test set-up: quiet, offline libraries; one Prefect test server; the real data folder.

The environment variables are set at import, before any test module imports prefect, mlflow
or transformers, so no test reaches the network or prints telemetry noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ[_key] = _value

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for the whole session (never nest another).

    Starting it takes 10-15 s on a loaded 2-core machine, hence the 90 s start-up timeout.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public judgment data, see its README); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repository, not in it)")
    return SHARED_DATA


def mlflow_runs_by_nesting(client, experiment_name: str) -> tuple[list, list]:
    """(parent runs, nested runs) of one MLflow experiment, told apart by mlflow.parentRunId."""
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])
