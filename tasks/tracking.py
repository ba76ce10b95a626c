"""MLflow tracking: one SQLite store under mlruns/, one parent run per pipeline run, one
nested run per iteration, one registered model whose versions carry aliases.

Why SQLite: MLflow 3 refuses the plain file store. Why an explicit artifact location: with
SQLite, artifacts otherwise land relative to whatever the working directory was when the
experiment was created.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

CANDIDATE, CHAMPION = "candidate", "champion"


def mlruns_dir() -> Path:
    """`$CUT_ALIGN_MLRUNS`, else ./mlruns (the repo's tracking folder when run from its root)."""
    return Path(os.environ.get("CUT_ALIGN_MLRUNS", "mlruns")).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def use_store() -> MlflowClient:
    """Point mlflow at the project store and return a client for it."""
    mlruns_dir().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(tracking_uri())


def experiment_id(name: str) -> str:
    client = use_store()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (mlruns_dir() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def log_params(run_id: str, params: dict[str, str]) -> None:
    """Log many params; MLflow caps a batch at 100 and a value at 6000 characters."""
    client = use_store()
    items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    client = use_store()
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and value == value:  # skip NaN and non-numbers
            client.log_metric(run_id, key, float(value), step=step or 0)


def start_run(experiment: str, name: str, *, parent_run_id: str | None = None, tags: dict | None = None) -> str:
    client = use_store()
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(experiment), run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    use_store().set_terminated(run_id, status=status)


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    use_store().log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(run_id: str, local_file: str | Path, artifact_path: str | None = None) -> None:
    use_store().log_artifact(run_id, str(local_file), artifact_path)


def register_version(model_name: str, run_id: str, artifact_path: str, *, metric: str,
                     value: float | None, floor: float | None = None,
                     tags: dict[str, str] | None = None) -> dict:
    """Register a new version, alias it `candidate`, and move `champion` only on improvement.

    Improvement means beating both the metric stored as a tag on the current champion version
    and `floor` (the best score this run has seen, the base model's included); higher is better
    (the metrics used here are accuracies and positive rates).
    """
    client = use_store()
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{artifact_path}"
    version_tags = dict(tags or {})
    if value is not None:
        version_tags[metric] = repr(float(value))
    version = client.create_model_version(model_name, source, run_id=run_id, tags=version_tags)
    client.set_registered_model_alias(model_name, CANDIDATE, version.version)

    previous = None
    try:
        champion = client.get_model_version_by_alias(model_name, CHAMPION)
        previous = float(champion.tags.get(metric, "nan"))
    except mlflow.exceptions.MlflowException:
        champion = None
    bars = [b for b in (previous, floor) if b is not None and b == b]
    improved = value is not None and all(value > b for b in bars)
    if improved:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return {"model": model_name, "version": int(version.version), "champion": improved,
            "previous_champion_metric": previous}


def champion_model_path(model_name: str) -> str | None:
    """Local folder of the `champion` version's merged model, when there is one on this machine."""
    client = use_store()
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    path = version.tags.get("local_model")
    return path if path and Path(path, "config.json").exists() else None
