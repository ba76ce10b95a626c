"""Scheduled deployments: `cut-align serve PIPELINE.py --cron "0 3 * * *"`.

A served deployment runs the declaration it was served with. Serving builds a flow around that
declaration (`served_flow`): the declaration travels inside the flow object to each run's
process, never through run parameters. The one parameter a run may set is `overrides`, a typed
model of two bounded integers (`RunOverrides`). So a run started from the UI or the API with a
whole declaration as a parameter, or with any other override (say `model.build="os:system"`),
is refused by the Prefect API (the deployment enforces its parameter schema) and, should one get
through anyway, by the flow's own parameter validation, before anything is imported or run.
Code references (`Model.build`, `FunctionJudge.callable`, the ILF objectives' `refiner`) can only come
from the declaration file the operator served.

The deployment runs one flow run at a time (concurrency limit 1, and the runner takes one at a
time); each run also holds its run folder's lock (flows/align.py). Scheduling needs a Prefect
server (`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`): the
embedded ephemeral server runs flows but never creates scheduled runs. Each scheduled run of an
online declaration is a new round (recurring=True): it starts from the registered model's
champion and takes instructions no earlier round used. Each scheduled run of an offline
declaration is a new round too: it ingests the files that arrived since, trains from the champion
on the triplets no earlier round trained on, and ends without training when there are none.
"""

# No `from __future__ import annotations` here: the served flow travels to each run's process by
# value (cloudpickle), and its parameter annotation must be the RunOverrides class itself, not a
# string the other process cannot resolve.
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from cut_core.dsl import Pipeline
from flows.align import offline_align, online_align
from tasks.stages import digest_text


class RunOverrides(BaseModel):
    """What one run of a served deployment may change; nothing else can be set at run time."""

    model_config = ConfigDict(extra="forbid")

    iterations: int | None = Field(
        default=None, ge=1, le=1000, description="online iterations of this run (default: the served declaration's)")
    prompts_per_iteration: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="new instructions per iteration (default: the served declaration's)")


def apply_overrides(served_json: str, overrides: RunOverrides | dict | None) -> Pipeline:
    """The served declaration with a run's overrides applied (re-validated as a whole)."""
    overrides = RunOverrides.model_validate(overrides or {})
    data = Pipeline.from_json(served_json).model_dump(mode="json")
    changes = overrides.model_dump(exclude_none=True)
    if changes and data["online"]["iterations"] == 0:
        raise ValueError(f"overrides {sorted(changes)} apply to online declarations only; "
                         "this deployment serves an offline one")
    data["online"].update(changes)
    return Pipeline.model_validate(data)


def run_served(served_json: str, overrides: RunOverrides | dict | None) -> dict:
    """One run of a served declaration: a recurring round that starts from the champion (online:
    on instructions no round used; offline: on triplets no round trained on)."""
    pipeline = apply_overrides(served_json, overrides)
    if pipeline.online.iterations > 0:
        return online_align(pipeline.to_json(), pipeline.name, recurring=True)
    return offline_align(pipeline.to_json(), pipeline.name, recurring=True)


def served_flow(pipeline: Pipeline):
    """A flow that runs `pipeline` (fixed now) with, at most, a run's `RunOverrides`."""
    served_json = pipeline.to_json()
    digest = digest_text(served_json)

    @flow(name="served-align", flow_run_name=f"{pipeline.name}-{digest}", validate_parameters=True)
    def served_align(overrides: RunOverrides | None = None) -> dict:
        """Runs the declaration served by `cut-align serve` (its digest is in the run name);
        `overrides` may change the number of iterations and of prompts per iteration, nothing else."""
        return run_served(served_json, overrides)

    return served_align


def refuse_unknown_parameters(deployment):
    """Make the Prefect API refuse a run that sets any parameter but `overrides`.

    Prefect's generated schema checks the declared parameters (RunOverrides forbids extra
    fields) but lets unknown top-level ones through to the flow, which then refuses them itself
    (a signature mismatch). `additionalProperties: false` stops them at the API already.
    """
    from prefect.utilities.callables import ParameterSchema

    class ClosedParameterSchema(ParameterSchema):
        additionalProperties: bool = False

    schema = deployment._parameter_openapi_schema  # the schema apply() sends (a private field)
    deployment._parameter_openapi_schema = ClosedParameterSchema(**schema.model_dump(), additionalProperties=False)
    return deployment


def served_deployment(pipeline: Pipeline, *, cron: str | None = None):
    """The deployment `cut-align serve` registers: the served flow, one run at a time."""
    kind = "online" if pipeline.online.iterations > 0 else "offline"
    return refuse_unknown_parameters(served_flow(pipeline).to_deployment(
        name=pipeline.name, cron=cron, concurrency_limit=1, enforce_parameter_schema=True,
        tags=["cut-align", kind], version=digest_text(pipeline.to_json()),
        description=(f"{kind} CUT alignment of the declaration {pipeline.name} (digest "
                     f"{digest_text(pipeline.to_json())}), fixed when served; a run may override only "
                     "iterations and prompts_per_iteration")))


def serve(pipeline: Pipeline, *, cron: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(served_deployment(pipeline, cron=cron), limit=1)
