"""The alignment flows: offline_align and online_align.

    offline_align:  ingest -> label what is unlabeled -> [materialize -> train -> evaluate -> register]
                    recurring=True (a served deployment, `cut-align run --round NAME`): each round
                    ingests the files it has not seen, fixes the triplets no earlier round trained
                    on (select), and trains them from the champion; none new: the round ends there
    online_align:   evaluate base, then K times:
                    [sample -> generate -> judge -> materialize -> train(+merge) -> evaluate -> register]

Each bracket is one iteration: a Prefect subflow and one nested MLflow run under the
pipeline run's parent MLflow run. Every stage stores its result last (tasks/stages.py), so a
crashed run restarts from its last finished stage and a finished pipeline rerun does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cut_core.data import warehouse as wh
from cut_core.models import lineage
from cut_core.dsl import Pipeline
from cut_core.errors import UserError
from cut_core.infer.evaluate import EvaluationRefused
from cut_core.files import run_lock
from tasks import tracking
from tasks.evaluate import evaluate_model
from tasks.generate import generate_responses, sample_prompts
from tasks.ingest import ingest_source
from tasks.label import judge_pairs, label_unlabeled
from tasks.materialize import materialize_examples
from tasks.prepare import build_model
from tasks.report import loss_curve_png
from tasks.rounds import mark_round_trained, select_round_triplets
from tasks.results import (Evaluated, Examples, Generated, IterationResult, IterationRun, Judged, ParentRun,
                           Registered, RoundSelection, RunSummary, Sampled, StartChoice, Trained)
from tasks.stages import RESULT, finished, read_record, run_key, run_stage, write_json_atomic
from tasks.train import train


# ----------------------------------------------------------------------------- shared pieces

def run_root(pipeline: Pipeline, pipeline_json: str, round_label: str | None = None) -> Path:
    """A run's folder: one per declaration, or per scheduled round of a recurring deployment."""
    key = run_key(pipeline_json) + (f"-{round_label}" if round_label else "")
    return Path(pipeline.workdir) / "runs" / key


ROUND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def round_label(recurring: bool, round_name: str | None) -> str | None:
    """The label of a recurring round: the one given (`cut-align run --round NAME`), else the
    flow run's scheduled start (scheduled_round); None for a plain run."""
    if round_name is not None:
        if not ROUND_NAME.match(round_name):
            raise UserError(f"round name {round_name!r} is not a folder-safe name; use letters, digits, "
                            "'.', '_' or '-' (at most 64 characters), e.g. --round 2026-12-05")
        return round_name
    return scheduled_round() if recurring else None


@contextlib.contextmanager
def one_run_at_a_time(pipeline: Pipeline, root: Path):
    """Hold the run folder's lock (cut_core.files.run_lock) for the whole flow run: a second run of
    the same declaration, or of the same scheduled round, is refused ("already running") while
    this one runs; a lock left by a dead process on this host is taken over."""
    with run_lock(root, f"pipeline {pipeline.name} (run {root.name})") as held:
        if held["taken_over"]:
            get_run_logger().warning(f"took over the stale lock of {root}: {held['taken_over']}")
        yield


@dataclasses.dataclass
class FlowRun:
    """What every alignment flow run starts from (start_run)."""

    pipeline: Pipeline          # the declaration, parsed once per flow run
    root: Path                  # the run's folder (run_root)
    recurring: bool             # a recurring round (served, or `--round NAME`)
    logger: Any
    finished: dict | None       # the record of a run that finished before (marked `skipped`)
    parent: str | None          # the run's MLflow parent run id (None when finished)


@contextlib.contextmanager
def start_run(pipeline_json: str, recurring: bool, round_name: str | None):
    """The start every alignment flow shares: parse the declaration (once: everything after takes
    the object), find the run's folder, hold its lock for the block, and give either the record
    of a run that finished before or the run's MLflow parent run."""
    pipeline = Pipeline.from_json(pipeline_json)
    recurring = recurring or round_name is not None
    root = run_root(pipeline, pipeline_json, round_label(recurring, round_name))
    with one_run_at_a_time(pipeline, root):
        logger = get_run_logger()
        done = finished_run(pipeline, root, logger)
        yield FlowRun(pipeline=pipeline, root=root, recurring=recurring, logger=logger, finished=done,
                      parent=None if done is not None else mlflow_runs(root, pipeline))


def refused_evaluation(run_id: str, prefix: str, err: EvaluationRefused) -> None:
    """Record a refused evaluation in MLflow (its counts, why) before the flow stops on it."""
    tracking.log_metrics(run_id, {f"{prefix}.{k}": v for k, v in err.metrics.items()})
    tracking.use_store().set_tag(run_id, f"cut_align.{prefix}_refused", str(err)[:5000])


def warehouse_path(pipeline: Pipeline) -> str:
    return str(Path(pipeline.workdir) / "warehouse.duckdb")


def prepare_model(pipeline: Pipeline) -> str:
    """The model to align; built first when the declaration names a builder and it is missing,
    by the prepare-model task (tasks/prepare.py: its own Prefect task run, progress in its logs)."""
    from prefect.context import FlowRunContext

    path = Path(pipeline.model.path)
    if pipeline.model.build and not (path / "config.json").exists():
        run = build_model if FlowRunContext.get() is not None else build_model.fn  # a task only inside a flow
        run(pipeline.model.build, str(path))
    return str(path)


def registered_name(pipeline: Pipeline) -> str:
    return pipeline.registered_model or pipeline.name


def registry_cache(pipeline: Pipeline) -> Path:
    """Where registered versions fetched from the MLflow store are kept on this machine."""
    return Path(pipeline.workdir) / "registry"


def registered_start(pipeline: Pipeline, version: int, logger, what: str) -> tuple[str, dict]:
    """(folder, record) of a registered version some work starts from, fetched and verified."""
    resolved = tracking.resolve_model(registered_name(pipeline), version=version,
                                      cache_dir=registry_cache(pipeline))
    if resolved.skipped:
        logger.warning(f"{resolved.uri}: {resolved.skipped}; using the verified {resolved.source} copy")
    logger.info(f"{what} starts from {resolved.describe()}")
    return resolved.path, resolved.record()


def choose_start(pipeline: Pipeline, recurring: bool) -> StartChoice:
    """The start stage's work: the registered `champion` for a recurring round, when there is
    one; else the declared base."""
    name = registered_name(pipeline)
    version = tracking.champion_version(name) if recurring else None
    if version is not None:
        return StartChoice(version=version, via=f"models:/{name}@{tracking.CHAMPION}")
    return StartChoice(base=pipeline.model.path)


def round_start(pipeline: Pipeline, root: Path, recurring: bool, logger) -> tuple[str, dict]:
    """(folder, record) of the model a run's first iteration starts from.

    A recurring round starts from the registered model's `champion`, a plain run (and a round
    when there is no champion yet) from the declared base. The choice is stored as a stage, so
    a resumed round starts from the same version even if the champion has moved since.
    """
    name = registered_name(pipeline)
    start = run_stage(root / "start", choose_start, pipeline, recurring, result_type=StartChoice, log=logger.info)
    if start.version is not None:
        return registered_start(pipeline, start.version, logger, f"{pipeline.name}: round {root.name} "
                                f"(from {start.via})")
    path = prepare_model(pipeline)
    if recurring:
        logger.warning(f"no champion for {name} yet: starting from the declared base {path}")
    else:
        logger.info(f"{pipeline.name}: run {root.name} starts from the declared base {path}")
    return path, {"base": path}


def mlflow_runs(root: Path, pipeline: Pipeline) -> str:
    """The parent MLflow run of this pipeline run: created once, reused when a crashed run resumes."""
    record = root / "mlflow.json"
    stored = read_record(record, ParentRun)
    if stored is not None:
        tracking.use_store().update_run(stored.parent_run_id, status="RUNNING")
        return stored.parent_run_id
    run_id = tracking.start_run(pipeline.name, root.name, tags={"cut_align.run_key": root.name})
    tracking.log_params(run_id, pipeline.flat_params())
    write_json_atomic(record, ParentRun(parent_run_id=run_id).to_dict())
    return run_id


def iteration_run(root: Path, pipeline: Pipeline, parent: str, iteration: int) -> str:
    record = root / f"iter-{iteration}" / "mlflow.json"
    stored = read_record(record, IterationRun)
    if stored is not None:
        return stored.run_id
    run_id = tracking.start_run(pipeline.name, f"iteration-{iteration}", parent_run_id=parent,
                                tags={"cut_align.iteration": str(iteration)})
    tracking.log_params(run_id, {"iteration": str(iteration), "objective": pipeline.objective.name})
    write_json_atomic(record, IterationRun(run_id=run_id).to_dict())
    return run_id


def train_config(pipeline: Pipeline, model_path: str, examples: str, start_ref: str | None = None) -> dict:
    """The training subprocess's config. A LoRA run whose start is a LoRA version (its folder
    carries cut_align_lineage.json) continues that version's adapter on the same base
    (`init_adapter`): every LoRA version is "base + ONE adapter", never a chain of merges.
    `start_ref`: the registry reference of `model_path` when it is a registered full-weight version."""
    from cut_core.models.lineage import read_lineage
    from cut_core.models.weights import weights_digest

    lineage = read_lineage(model_path) if not pipeline.training.full_finetune else None
    extra: dict = {"base_ref": start_ref} if start_ref else {}
    if lineage is not None:
        if weights_digest(lineage.base_model) != lineage.base_digest:
            raise UserError(f"{model_path} is {lineage.base_model} + an adapter, but that base changed since "
                            "(its weights digest differs): restore the base model, or start from the declared base")
        model_path = lineage.base_model
        extra = {"init_adapter": lineage.adapter, **({"base_ref": lineage.base_ref} if lineage.base_ref else {})}
    return {"model_path": model_path, "examples": examples, **extra,
            "objective": pipeline.objective.model_dump(mode="json"),
            "adapter": None if pipeline.training.full_finetune else pipeline.adapter.model_dump(mode="json"),
            "training": pipeline.training.model_dump(mode="json"),
            "max_length": pipeline.model.max_length,  # read by dpo/ilf_dpo (TRL tokenizes the pairs)
            "report_to": "none"}


# ----------------------------------------------------------------------------- one iteration

def train_iteration(pipeline: Pipeline, model_path: str, examples: Examples, out_dir: Path, *, run_id: str,
                    start_ref: str | None) -> dict:
    """The train stage's work: the subprocess config (built only when the stage runs: it reads,
    and checks, the start model's lineage), then the train task. Training metrics stream into
    the iteration's MLflow run while the subprocess trains (tasks/train.py), each logged step
    once, also across a retry or a resumed run."""
    return train(train_config(pipeline, model_path, examples.path, start_ref), str(out_dir), mlflow_run_id=run_id,
                 launch_json=pipeline.launch.model_dump_json())


def register_iteration(pipeline: Pipeline, trained: Trained, metrics: dict, *, run_id: str, iteration: int,
                       run_key: str, floor: float | None) -> dict:
    """The register stage's work: a new version of the registered model (a LoRA run's adapter,
    else the full weights, logged here), promoted to champion only if it beats `floor` and the
    current champion (tracking.register_version)."""
    artifact = "adapter" if trained.adapter else "model"
    if artifact == "model":  # full fine-tuning registers its weights
        tracking.log_artifacts(run_id, trained.merged, "model")
    metric = pipeline.evaluation.champion_metric
    return tracking.register_version(
        registered_name(pipeline), run_id, artifact, metric=metric,
        value=metrics.get(metric), floor=floor, model_dir=trained.merged,
        judged=metrics.get("judged"), failed=metrics.get("failed_judgments"),
        max_failed_rate=pipeline.evaluation.max_failed_rate, min_judged=pipeline.evaluation.min_judged,
        tags={"iteration": str(iteration), "run_key": run_key})


def train_evaluate_register(pipeline: Pipeline, root: Path, *, iteration: int, model_path: str, run_id: str,
                            best_so_far: float | None, batch: str | None = None, sources: list[str] | None = None,
                            digests: list[str] | None = None, round_key: str | None = None,
                            start_ref: str | None = None) -> IterationResult:
    """materialize -> train -> evaluate -> register, each a stage that stores its result.
    The training data: one `batch`, the files with these `digests`/`sources`, or the triplets
    selected for one recurring offline round (`round_key`, tasks/rounds.py). `start_ref`: the
    registry reference of the start model, recorded as an adapter version's base."""
    it = root / f"iter-{iteration}"

    examples = run_stage(
        it / "materialize", materialize_examples, warehouse=warehouse_path(pipeline), batch=batch,
        model_path=model_path, objective_json=pipeline.objective.model_dump_json(), template=pipeline.model.template,
        max_length=pipeline.model.max_length, workdir=pipeline.workdir, seed=pipeline.training.seed,
        sources=sources, digests=digests, round_key=round_key, result_type=Examples)
    tracking.log_metrics(run_id, {f"data.{k}": v for k, v in examples.stats.items() if isinstance(v, (int, float))})

    trained = run_stage(it / "train", train_iteration, pipeline, model_path, examples, it / "train" / "out",
                        run_id=run_id, start_ref=start_ref, result_type=Trained)
    if trained.history:
        plot = Path(trained.output_dir) / "loss_curve.png"
        loss_curve_png(trained.history, plot, title=f"{pipeline.name} iteration {iteration}")
        tracking.log_artifact(run_id, plot)
    # A LoRA run's adapter (+ tokenizer) is logged once, here; it is also what the version registers
    # (no merged copy in the store: tracking.resolve_model rebuilds it on demand).
    if trained.adapter:
        tracking.log_artifacts(run_id, trained.adapter, "adapter")
        # A serving engine generates from this iteration by loading its adapter on the base it
        # serves (cut_core.infer.engines): the merged folder says which base + adapter it is.
        lineage.ensure_lineage(trained.merged, model_path, trained.adapter)

    metrics: dict = {}
    if pipeline.evaluation.heldout and pipeline.judge is not None:
        try:
            evaluated = run_stage(it / "evaluate", evaluate_model, pipeline, trained.merged, str(it / "evaluate"),
                                  f"iteration-{iteration}", result_type=Evaluated)
        except EvaluationRefused as err:  # no score, so no registration: a rerun evaluates again
            refused_evaluation(run_id, "eval", err)
            tracking.end_run(run_id, status="FAILED")
            raise
        metrics = evaluated.metrics
        tracking.log_metrics(run_id, {f"eval.{k}": v for k, v in metrics.items()})
        tracking.log_artifacts(run_id, evaluated.dir, "evaluation")

    registered = run_stage(it / "register", register_iteration, pipeline, trained, metrics, run_id=run_id,
                           iteration=iteration, run_key=root.name, floor=best_so_far, result_type=Registered)
    tracking.end_run(run_id)
    create_table_artifact(
        key=f"{pipeline.name}-iteration-{iteration}".lower().replace("_", "-").replace(".", "-"),
        table=[{"metric": k, "value": v} for k, v in metrics.items()],
        description=f"iteration {iteration}: model version {registered.version}")
    return IterationResult(iteration=iteration, model=trained.merged, metrics=metrics, registered=registered)


@flow(name="online-iteration", flow_run_name="{pipeline_name}-iteration-{iteration}")
def online_iteration(pipeline: Pipeline, pipeline_name: str, run_dir: str, iteration: int, model_path: str,
                     parent_run_id: str, best_so_far: float | None, start_ref: str | None = None) -> IterationResult:
    """sample -> generate -> judge -> materialize -> train -> evaluate -> register.
    `pipeline_name` (= pipeline.name) names the subflow run."""
    root = Path(run_dir)
    it = root / f"iter-{iteration}"
    run_id = iteration_run(root, pipeline, parent_run_id, iteration)
    online = pipeline.online
    warehouse = warehouse_path(pipeline)

    sampled = run_stage(it / "sample", sample_prompts, prompts_path=online.prompts, warehouse=warehouse,
                        pipeline_name=pipeline.name, n=online.prompts_per_iteration,
                        out_file=str(it / "sample" / "prompts.parquet"), result_type=Sampled)
    generated = run_stage(it / "generate", generate_responses, model_path=model_path, sampled_path=sampled.path,
                          warehouse=warehouse, run=root.name, iteration=iteration,
                          generation_json=pipeline.generation.model_dump_json(),
                          out_file=str(it / "generate" / "generations.parquet"), template=pipeline.model.template,
                          pipeline_name=pipeline.name, result_type=Generated)

    batch = f"{root.name}/iter-{iteration}"
    judged = run_stage(it / "judge", judge_pairs, pipeline, warehouse, generated.path, batch, str(it / "judge"),
                       result_type=Judged)
    tracking.log_metrics(run_id, {f"judge.{k}": v for k, v in judged.numbers().items()})

    return train_evaluate_register(pipeline, root, iteration=iteration, model_path=model_path, run_id=run_id,
                                   best_so_far=best_so_far, batch=batch, start_ref=start_ref)


# ----------------------------------------------------------------------------- the two flows

def scheduled_round() -> str:
    """The scheduled start of this flow run, e.g. 20261122T0300, naming one recurring round."""
    from prefect.runtime import flow_run
    start = flow_run.scheduled_start_time
    return start.strftime("%Y%m%dT%H%M") if start else "adhoc"


def evaluate_base(pipeline: Pipeline, root: Path, model_path: str, parent: str) -> dict:
    """The base model's held-out metrics ({} when the declaration evaluates nothing)."""
    if not (pipeline.evaluation.heldout and pipeline.judge is not None):
        return {}
    try:
        base = run_stage(root / "iter-0" / "evaluate", evaluate_model, pipeline, model_path,
                         str(root / "iter-0" / "evaluate"), "base", result_type=Evaluated)
    except EvaluationRefused as err:
        refused_evaluation(parent, "base", err)
        raise
    tracking.log_metrics(parent, {f"base.{k}": v for k, v in base.metrics.items()})
    return base.metrics


def summarize(pipeline: Pipeline, root: Path, base: dict, iterations: list[IterationResult], parent: str,
              start_model: dict, *, round: RoundSelection | None = None) -> RunSummary:
    """The run's final record, stored last (a rerun finds it and does nothing); `round`: the
    selection of a recurring offline round."""
    metric = pipeline.evaluation.champion_metric
    summary = RunSummary(pipeline=pipeline.name, run_key=root.name, metric=metric, start_model=start_model,
                         base=base, iterations=[r.summary() for r in iterations],
                         round=round, trained=True if round is not None else None)
    rows = [{"model": "base", metric: base.get(metric)}] + [
        {"model": f"iteration {r.iteration} (v{r.registered.version})", metric: r.metrics.get(metric)}
        for r in iterations]
    create_table_artifact(key=f"{pipeline.name}-summary".lower().replace("_", "-").replace(".", "-"),
                          table=rows, description=f"{metric} of the base and each iteration")
    tracking.end_run(parent)
    write_json_atomic(root / "final" / RESULT, summary.to_dict())
    return summary


def best(base: dict, results: list[IterationResult], metric: str) -> float | None:
    values = [base.get(metric)] + [r.metrics.get(metric) for r in results]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def finished_run(pipeline: Pipeline, root: Path, logger) -> dict | None:
    """The record a finished run stored (marked `skipped`), or None when it has not finished."""
    done = finished(root / "final")
    if done is None:
        return None
    logger.info(f"{pipeline.name}: run {root.name} already finished; nothing to do")
    return {**done, "skipped": True}


@flow(name="online-align", flow_run_name="{pipeline_name}")
def online_align(pipeline_json: str, pipeline_name: str = "pipeline", recurring: bool = False,
                 round_name: str | None = None) -> dict:
    """K online iterations; each iteration's registered version generates and trains the next.

    recurring=True (scheduled deployments): every scheduled run is a new round that starts
    from the registered model's current champion and takes instructions no round used before.
    round_name names the round (`cut-align run --round NAME`); default: the scheduled start.
    Every model started from after the declared base is resolved through the MLflow registry
    (tracking.resolve_model): fetched when this machine lacks it, verified against its digest.
    Returns the run's final record (RunSummary.to_dict(), `skipped` when it had finished before).
    """
    with start_run(pipeline_json, recurring, round_name) as run:
        if run.finished is not None:
            return run.finished
        pipeline, root, recurring, logger, parent = run.pipeline, run.root, run.recurring, run.logger, run.parent
        model_path, start_model = round_start(pipeline, root, recurring, logger)
        base = evaluate_base(pipeline, root, model_path, parent)
        results: list[IterationResult] = []
        iteration_start = start_model
        for k in range(1, pipeline.online.iterations + 1):
            result = online_iteration(
                pipeline=pipeline, pipeline_name=pipeline.name, run_dir=str(root), iteration=k,
                model_path=model_path, parent_run_id=parent,
                best_so_far=best(base, results, pipeline.evaluation.champion_metric),
                start_ref=iteration_start.get("uri"))
            results.append(dataclasses.replace(result, start_model=iteration_start))
            create_markdown_artifact(
                key=f"{pipeline.name}-iteration-{k}-summary".lower().replace("_", "-").replace(".", "-"),
                markdown=f"### Iteration {k}\n\nmodel: `{result.model}` "
                         f"(models:/{registered_name(pipeline)}/{result.registered.version})\n\n"
                         + json.dumps(result.metrics, indent=2))
            if k < pipeline.online.iterations:  # the next iteration starts from this one's registered version
                model_path, iteration_start = registered_start(
                    pipeline, result.registered.version, logger, f"{pipeline.name}: iteration {k + 1}")
        return summarize(pipeline, root, base, results, parent, start_model).to_dict()


@flow(name="offline-align", flow_run_name="{pipeline_name}")
def offline_align(pipeline_json: str, pipeline_name: str = "pipeline", recurring: bool = False,
                  round_name: str | None = None) -> dict:
    """Ingest the declared sources, label what is unlabeled, then one training iteration.

    recurring=True (served deployments; `round_name` from `cut-align run --round NAME`, else the
    scheduled start): the run is one round over sources that grow. It ingests the files not seen
    before (ingest skips a file whose digest is recorded), fixes the labeled triplets no finished
    round of this pipeline (its name) trained on as a stage, and trains them from the registered
    champion (round_start); the champion moves only on improvement (tracking.register_version).
    A round with no such triplets ends there: a RESULT with the reason, no iteration, no version.
    Returns the run's final record (RunSummary.to_dict(), `skipped` when it had finished before).
    """
    with start_run(pipeline_json, recurring, round_name) as run:
        if run.finished is not None:
            return run.finished
        pipeline, root, recurring, logger, parent = run.pipeline, run.root, run.recurring, run.logger, run.parent
        warehouse = warehouse_path(pipeline)

        # The files the ingest step reports (read now or already ingested, under any name), by content
        # digest: training and labeling read their triplets, never a second glob of the paths.
        digests: list[str] = []
        for i, source in enumerate(pipeline.sources):
            report = ingest_source(source.model_dump_json(), warehouse, pipeline.ingestion.max_reject_rate,
                                   root.name, max_record_bytes=pipeline.ingestion.max_record_bytes)
            tracking.log_metrics(parent, {f"ingest.{i}.{k}": v for k, v in report.items()
                                          if isinstance(v, (int, float))})
            digests += [f["digest"] for f in report["files"]]
        if pipeline.judge is not None:
            # Only rows without a label are sent (and a judgment already stored is reused): in a
            # recurring round these are the new files' rows, plus any whose judge call failed before.
            labeled = label_unlabeled(pipeline, warehouse, digests=digests)
            tracking.log_metrics(parent, {f"label.{k}": v for k, v in labeled.items() if isinstance(v, (int, float))})

        selection = None
        if recurring:
            # Fixed once per round: a resumed round trains on the same triplets, whatever arrived since.
            selection = run_stage(root / "select", select_round_triplets, pipeline_name=pipeline.name,
                                  round_key=root.name, warehouse=warehouse, digests=digests,
                                  result_type=RoundSelection, log=logger.info)
            tracking.log_metrics(parent, {f"round.{k}": v for k, v in selection.numbers().items()})
            if selection.triplets == 0:
                reason = (f"no new triplets: every labeled triplet of the {len(digests)} declared file(s) was "
                          f"trained on by an earlier round of {pipeline.name}")
                logger.info(f"{pipeline.name}: round {root.name} ends without training: {reason}")
                tracking.use_store().set_tag(parent, "cut_align.round_result", reason)
                tracking.end_run(parent)
                summary = RunSummary(pipeline=pipeline.name, run_key=root.name, round=selection,
                                     metric=pipeline.evaluation.champion_metric, start_model=None, base={},
                                     iterations=[], trained=False, reason=reason)
                write_json_atomic(root / "final" / RESULT, summary.to_dict())
                return summary.to_dict()

        model_path, start_model = round_start(pipeline, root, recurring, logger)
        base = evaluate_base(pipeline, root, model_path, parent)
        run_id = iteration_run(root, pipeline, parent, 1)
        # The training data: a round's selection (round_key), else the files the ingest step reported.
        result = train_evaluate_register(pipeline, root, iteration=1, model_path=model_path, run_id=run_id,
                                         best_so_far=best(base, [], pipeline.evaluation.champion_metric),
                                         round_key=root.name if recurring else None,
                                         digests=None if recurring else digests, start_ref=start_model.get("uri"))
        if recurring:  # from now on no later round of this pipeline trains on these triplets
            mark_round_trained(root.name, warehouse, result.registered.version)
        result = dataclasses.replace(result, start_model=start_model)
        return summarize(pipeline, root, base, [result], parent, start_model, round=selection).to_dict()


def run_pipeline(pipeline: Pipeline, round_name: str | None = None) -> dict:
    """Run the flow a declaration asks for: online when it has iterations, offline otherwise.
    With `round_name`, one recurring round of that name (from the champion, new data only).
    The flow takes the declaration as JSON (a flow parameter; its digest is the run key)."""
    pipeline_json = pipeline.to_json()
    flow_fn = online_align if pipeline.online.iterations > 0 else offline_align
    if round_name is None:
        return flow_fn(pipeline_json, pipeline.name)
    round_label(True, round_name)  # a bad name is refused before any flow run starts
    return flow_fn(pipeline_json, pipeline.name, recurring=True, round_name=round_name)
