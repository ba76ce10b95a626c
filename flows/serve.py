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
import inspect
from uuid import UUID

from prefect import flow
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.deployments.runner import RunnerDeployment
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


def closed_schema(schema: dict) -> dict:
    """`schema` that refuses a parameter it does not declare (`additionalProperties: false`)."""
    return {**schema, "additionalProperties": False}


class ServedDeployment(RunnerDeployment):
    """A RunnerDeployment whose registered parameter schema refuses any parameter but `overrides`.

    Prefect's generated schema checks the declared parameters (RunOverrides forbids extra
    fields) but lets unknown top-level ones through to the flow, which then refuses them itself
    (validate_parameters: a signature mismatch, before any work). `additionalProperties: false`
    stops them at the API already. Prefect 3 has no public argument for the schema a deployment
    registers: `to_deployment`/`RunnerDeployment` generate it from the flow's signature into a
    private attribute, and its model (`ParameterSchema`) has no `additionalProperties`. So this
    deployment registers as usual (`apply`, or `aapply` when `prefect.serve` registers it) and
    then sets the closed schema through the public client API (`update_deployment`). For the
    instant between the two the flow's own check above is what refuses such a run.
    """

    def apply(self, *args, **kwargs) -> UUID:
        from prefect.client.orchestration import get_client

        deployment_id = super().apply(*args, **kwargs)
        if inspect.isawaitable(deployment_id):  # called from async code, where the Prefect API is async
            deployment_id.close()
            raise RuntimeError("in async code, register a served deployment with `await deployment.aapply()`")
        with get_client(sync_client=True) as client:
            schema = client.read_deployment(deployment_id).parameter_openapi_schema
            client.update_deployment(deployment_id, DeploymentUpdate(parameter_openapi_schema=closed_schema(schema)))
        return deployment_id

    async def aapply(self, *args, **kwargs) -> UUID:
        from prefect.client.orchestration import get_client

        deployment_id = await super().aapply(*args, **kwargs)
        async with get_client() as client:
            schema = (await client.read_deployment(deployment_id)).parameter_openapi_schema
            await client.update_deployment(deployment_id,
                                           DeploymentUpdate(parameter_openapi_schema=closed_schema(schema)))
        return deployment_id


def served_deployment(pipeline: Pipeline, *, cron: str | None = None) -> ServedDeployment:
    """The deployment `cut-align serve` registers: the served flow, one run at a time."""
    kind = "online" if pipeline.online.iterations > 0 else "offline"
    return ServedDeployment.from_flow(
        served_flow(pipeline), name=pipeline.name, cron=cron, concurrency_limit=1, enforce_parameter_schema=True,
        tags=["cut-align", kind], version=digest_text(pipeline.to_json()),
        description=(f"{kind} CUT alignment of the declaration {pipeline.name} (digest "
                     f"{digest_text(pipeline.to_json())}), fixed when served; a run may override only "
                     "iterations and prompts_per_iteration"))


def serve(pipeline: Pipeline, *, cron: str) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(served_deployment(pipeline, cron=cron), limit=1)
