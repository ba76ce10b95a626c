"""MLflow tracking: one SQLite store under mlruns/, one parent run per pipeline run, one
nested run per iteration, one registered model whose versions carry aliases.

Models are handed on through the registry: every version is tagged with the sha256 of its
weights (cut_core.models.weights), and `resolve_model` turns a version or an alias into a verified
local folder, downloading the version's artifacts when this machine lacks them.

Why SQLite: MLflow 3 refuses the plain file store. Why an explicit artifact location: with
SQLite, artifacts otherwise land relative to whatever the working directory was when the
experiment was created.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from cut_core.judge import score_refusal  # noqa: E402

from cut_core.errors import UserError  # noqa: E402
from cut_core.files import build_dir  # noqa: E402
from cut_core.models.lineage import merge_adapter, read_lineage  # noqa: E402
from cut_core.models.weights import adapter_digest, weights_digest  # noqa: E402

CANDIDATE, CHAMPION = "candidate", "champion"
DIGEST_TAG = "weights_sha256"   # cut_core.models.weights.weights_digest of the version's model folder
LOCAL_TAG = "local_model"       # where the version's folder was written: a cache hint, verified before use
# A LoRA version is registered as its adapter (adapter folder + tokenizer), not a merged copy:
KIND_TAG = "cut_align.kind"     # "adapter" (base + adapter) or "weights" (a full model folder)
ADAPTER_TAG = "adapter_sha256"  # cut_core.models.weights.adapter_digest of the registered adapter folder
BASE_DIGEST_TAG = "base_sha256"  # weights_digest of the base the adapter applies to
BASE_PATH_TAG = "base_model"    # the base's absolute path on the machine that trained it
BASE_REF_TAG = "base_ref"       # the base's registry reference (models:/NAME/V) when it is a registered version
MERGED_DTYPE_TAG = "merged_dtype"  # the dtype the merged folder was written in (a rebuild uses it)


def mlruns_dir() -> Path:
    """`$CUT_ALIGN_MLRUNS`, else ./mlruns (the repo's tracking folder when run from its root)."""
    return Path(os.environ.get("CUT_ALIGN_MLRUNS", "mlruns")).resolve()


def tracking_uri() -> str:
    """The user's MLFLOW_TRACKING_URI (e.g. a tracking server), else SQLite under mlruns_dir()."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def use_store() -> MlflowClient:
    """Point mlflow at the project store and return a client for it.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into this process's environment; that
    is put back as it was, so our choice never passes for the user's own later (it would pin the
    first store for a long-lived worker, a notebook or a test session)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        mlruns_dir().mkdir(parents=True, exist_ok=True)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return MlflowClient(uri)


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


def register_version(model_name: str, run_id: str, artifact_path: str, *, model_dir: str | Path, metric: str,
                     value: float | None, floor: float | None = None,
                     tags: dict[str, str] | None = None, judged: int | None = None, failed: int | None = None,
                     max_failed_rate: float = 0.05, min_judged: int = 1) -> dict:
    """Register a new version, alias it `candidate`, and move `champion` only on improvement.

    `judged`/`failed` (the evaluation's successful and failed judge calls), when given, gate the
    promotion: more than `max_failed_rate` failed, or fewer than `min_judged` succeeded, and the
    score is not trusted: `champion` stays where it is and the result's `refused` says why.

    `model_dir` is the model folder this version is: the version is tagged with the digest of its
    weights (DIGEST_TAG, checked by `resolve_model` wherever the version is used) and with the
    folder itself (LOCAL_TAG, a cache hint). A full model folder is what was logged at
    `artifact_path`. A LoRA run's merged folder (it carries cut_align_lineage.json) is registered
    as its adapter: `artifact_path` holds the adapter folder (+ tokenizer), and the version is
    tagged with the adapter's digest and the base's digest, path and registry reference, from
    which `resolve_model` rebuilds the merged folder anywhere.

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
    refused = (score_refusal(judged, failed or 0, max_failed_rate=max_failed_rate, min_judged=min_judged)
               if judged is not None else None)
    if refused is not None:
        value = None  # an untrusted score is neither recorded nor compared
    version_tags = dict(tags or {})
    version_tags[DIGEST_TAG] = weights_digest(model_dir)
    version_tags[LOCAL_TAG] = str(Path(model_dir).resolve())
    version_tags.update(_kind_tags(model_dir, version_tags[DIGEST_TAG]))
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
    return {"model": model_name, "version": int(version.version), "champion": improved, "refused": refused,
            "previous_champion_metric": previous, "digest": version_tags[DIGEST_TAG]}


def _kind_tags(model_dir: str | Path, digest: str) -> dict[str, str]:
    """KIND_TAG and, for a LoRA run's merged folder, what rebuilds it: adapter and base digests."""
    lineage = read_lineage(model_dir)
    if lineage is None:
        return {KIND_TAG: "weights"}
    if lineage.merged_digest and lineage.merged_digest != digest:
        raise RegistryError(f"{model_dir} changed after training (its lineage records sha256 "
                            f"{lineage.merged_digest[:12]}…, it holds {digest[:12]}…): train it again")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tags = {KIND_TAG: "adapter", ADAPTER_TAG: adapter_digest(lineage.adapter), BASE_DIGEST_TAG: lineage.base_digest,
            BASE_PATH_TAG: lineage.base_model,
            MERGED_DTYPE_TAG: str(config.get("dtype") or config.get("torch_dtype") or "")}
    if lineage.base_ref:
        tags[BASE_REF_TAG] = lineage.base_ref
    return tags


class RegistryError(UserError):
    """A registered model version that cannot be used: not registered, not fetchable, or not
    the weights it was registered with. Its message is one line: the cause and the fix
    (`cut-align run` prints it as such, without a traceback)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version, present on this machine and verified against its weights digest."""

    path: str                   # local folder holding exactly the registered weights
    name: str
    version: int
    digest: str                 # DIGEST_TAG of the version (sha256 hex)
    source: str                 # "local" (the folder it was trained into), "cache", "download", or
                                # "rebuilt" (an adapter version merged on this machine)
    skipped: str | None = None  # why a local folder was not used, when one was named and differed
                                # (or why a rebuilt merge differs bitwise from the training machine's)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def describe(self) -> str:
        return f"{self.uri} (sha256 {self.digest[:12]}…, {self.source} copy at {self.path})"

    def record(self) -> dict:
        return {"uri": self.uri, "name": self.name, "version": self.version, "digest": self.digest,
                "source": self.source, "path": self.path}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _holds(folder: str | Path, digest: str) -> bool:
    """Whether a folder exists and holds exactly the weights with this digest."""
    try:
        return weights_digest(folder) == digest
    except FileNotFoundError:
        return False


def champion_version(model_name: str) -> int | None:
    """The version the `champion` alias points at; None when the model or the alias does not exist."""
    client = use_store()
    try:
        registered = client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(f"cannot read registered model {model_name!r} at {tracking_uri()}: "
                            f"{_first_line(err)}") from None
    version = registered.aliases.get(CHAMPION)
    return int(version) if version is not None else None


def resolve_model(model_name: str, *, version: int | None = None, alias: str | None = None,
                  cache_dir: str | Path) -> ResolvedModel:
    """A local folder with one registered version's weights, verified against its digest tag.

    Exactly one of `version` or `alias` (e.g. "champion"). The folder named by the version's
    LOCAL_TAG is used when it holds the registered weights; otherwise a copy under
    `cache_dir/<name>/v<version>-<digest>` fetched earlier, otherwise the version's artifacts are
    downloaded (`models:/NAME/VERSION`) into a temporary folder beside it, verified, and renamed
    into place. Anything else (no such version, no digest tag, a failed download, downloaded
    weights that differ from the registered digest) raises RegistryError: never another model.
    """
    if (version is None) == (alias is None):
        raise ValueError("resolve_model takes exactly one of version= or alias=")
    client = use_store()
    ref = f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version}"
    try:
        found = (client.get_model_version_by_alias(model_name, alias) if alias
                 else client.get_model_version(model_name, str(version)))
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{ref} is not in the registry at {tracking_uri()} ({_first_line(err)}): "
                            "check the registered model name and version") from None
    number = int(found.version)
    digest = found.tags.get(DIGEST_TAG)
    if not digest:
        raise RegistryError(f"{ref} (version {number}) has no {DIGEST_TAG} tag, so its weights cannot be "
                            "verified: register a new version (cut-align tags every version it registers)")

    def resolved(path: Path | str, source: str, skipped: str | None = None) -> ResolvedModel:
        return ResolvedModel(str(path), model_name, number, digest, source, skipped)

    local = found.tags.get(LOCAL_TAG)
    skipped = None
    if local:
        if _holds(local, digest):
            return resolved(local, "local")
        skipped = (f"local folder {local} differs from the registered weights" if Path(local).exists()
                   else f"local folder {local} is absent")

    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    target = Path(cache_dir).resolve() / safe_name / f"v{number}-{digest[:16]}"
    if found.tags.get(KIND_TAG) == "adapter":
        return _rebuild(found, model_name, number, target, cache_dir, resolved, skipped)
    if _holds(target, digest):
        return resolved(target, "cache", skipped)

    uri = f"models:/{model_name}/{number}"
    # Downloaded into a folder built aside, verified, and renamed into place over a stale or
    # altered copy (files.build_dir); a failed check leaves `target` as it was.
    with build_dir(target) as tmp:
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri())
        except Exception as err:  # noqa: BLE001 - any store failure is the same error for the user
            raise RegistryError(f"cannot fetch {uri} from {found.source}: {_first_line(err)}") from None
        if not any(tmp.iterdir()):  # mlflow returns an empty folder when the artifacts are gone
            raise RegistryError(f"cannot fetch {uri}: the store holds no files at {found.source} "
                                "(its artifacts were deleted); register a new version")
        try:
            got = weights_digest(tmp)
        except FileNotFoundError:
            raise RegistryError(f"{uri} at {found.source} is not a model folder (it needs config.json and "
                                "*.safetensors weights); register a new version") from None
        if got != digest:
            raise RegistryError(f"{uri} fetched from {found.source} has weights sha256 {got[:12]}…, "
                                f"not the registered {digest[:12]}…: the stored artifacts were altered "
                                "after registration; register a new version")
    return resolved(target, "download", skipped)


def _cached_merge(target: Path, adapter_sha: str) -> bool:
    """Whether `target` is a merge built here earlier from this adapter and still unaltered."""
    lineage = read_lineage(target)
    return (lineage is not None and lineage.adapter_digest == adapter_sha and lineage.merged_digest is not None
            and _holds(target, lineage.merged_digest))


def _base_for(found, uri: str, cache_dir) -> tuple[str, str | None]:
    """(local folder holding the version's base, verified by digest; its registry ref or None)."""
    base_digest, path, ref = (found.tags.get(BASE_DIGEST_TAG), found.tags.get(BASE_PATH_TAG),
                              found.tags.get(BASE_REF_TAG))
    if path and _holds(path, base_digest):
        return path, ref
    if ref:
        name, _, version = ref.removeprefix("models:/").rpartition("/")
        base = resolve_model(name, version=int(version), cache_dir=cache_dir)
        if base.digest != base_digest:
            raise RegistryError(f"{uri} was trained on {ref} with sha256 {base_digest[:12]}…, but {ref} now holds "
                                f"{base.digest[:12]}…: the registry was altered; register a new version")
        return base.path, ref
    where = "differs from the one it was trained on" if path and Path(path).exists() else "is not on this machine"
    raise RegistryError(f"{uri} is an adapter on the base model {path} (sha256 {base_digest[:12]}…), which {where}: "
                        f"put that base model at {path} (or run where it is), then resolve again")


def _rebuild(found, model_name: str, number: int, target: Path, cache_dir, resolved, skipped) -> ResolvedModel:
    """An adapter version: the merge cached at `target`, else fetch the adapter (verified by its
    digest), find the base (verified by its digest), merge into a folder built aside and renamed."""
    uri = f"models:/{model_name}/{number}"
    adapter_sha = found.tags.get(ADAPTER_TAG)
    if not adapter_sha or not found.tags.get(BASE_DIGEST_TAG):
        raise RegistryError(f"{uri} is an adapter version without {ADAPTER_TAG}/{BASE_DIGEST_TAG} tags, so it "
                            "cannot be verified: register a new version")
    if _cached_merge(target, adapter_sha):
        return resolved(target, "cache", skipped)
    adapter = target.parent / f"{target.name}.adapter"
    if not (adapter.is_dir() and _adapter_holds(adapter, adapter_sha)):
        with build_dir(adapter) as tmp:
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri())
            except Exception as err:  # noqa: BLE001 - any store failure is the same error for the user
                raise RegistryError(f"cannot fetch {uri} from {found.source}: {_first_line(err)}") from None
            if not _adapter_holds(tmp, adapter_sha):
                raise RegistryError(f"{uri} fetched from {found.source} is not the registered adapter (sha256 "
                                    f"{adapter_sha[:12]}…): its artifacts were deleted or altered; register a new "
                                    "version")
    base, ref = _base_for(found, uri, cache_dir)
    dtype = found.tags.get(MERGED_DTYPE_TAG) or None
    with build_dir(target) as tmp:
        lineage = merge_adapter(base, adapter, tmp, dtype=dtype, base_ref=ref)
    if lineage.merged_digest != found.tags[DIGEST_TAG]:
        note = (f"rebuilt merge of the verified base and adapter has sha256 {lineage.merged_digest[:12]}…, not the "
                f"training machine's {found.tags[DIGEST_TAG][:12]}… (merge arithmetic differs across devices)")
        skipped = f"{skipped}; {note}" if skipped else note
    return resolved(target, "rebuilt", skipped)


def _adapter_holds(folder: Path, digest: str) -> bool:
    try:
        return adapter_digest(folder) == digest
    except FileNotFoundError:
        return False
