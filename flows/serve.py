"""Scheduled deployments: `cut-align serve PIPELINE.py --cron "0 3 * * *"`.

Serving registers a deployment of the online-align flow with the declaration as its
parameters and then polls for scheduled runs. Scheduling needs a Prefect server
(`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`); the
embedded ephemeral server runs flows but never creates scheduled runs.
Each scheduled run is a new round (recurring=True): it starts from the registered model's
champion and takes instructions no earlier round used.
"""

from __future__ import annotations

from cut_core.dsl import Pipeline
from flows.align import offline_align, online_align


def serve(pipeline: Pipeline, *, cron: str) -> None:
    if pipeline.online.iterations > 0:
        online_align.serve(name=pipeline.name, cron=cron, tags=["cut-align", "online"],
                           parameters={"pipeline_json": pipeline.to_json(), "pipeline_name": pipeline.name,
                                       "recurring": True},
                           description=f"recurring online CUT alignment of {pipeline.model.path}")
    else:
        offline_align.serve(name=pipeline.name, cron=cron, tags=["cut-align", "offline"],
                             parameters={"pipeline_json": pipeline.to_json(), "pipeline_name": pipeline.name},
                             description="offline CUT alignment (a finished declaration reruns as a no-op)")
