"""Models handed on through the MLflow registry: every version carries the sha256 of its
weights; `tracking.resolve_model` gives a local folder with exactly those weights (the folder
it was trained into, a verified cached copy, or a fresh verified download) or one clear error;
a recurring round starts from the champion even when no local model folder is left."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cut_core.models.tiny import make_tiny_model
from cut_core.models.weights import digested_files, weights_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_tiny(tmp_path_factory):
    """One tiny model for the module (the demo's tokenizer, so the flow test can train it too)."""
    from cut_core.tasks.arithmetic import tokenizer_corpus
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model", tokenizer_corpus(n=300), vocab_size=256)


@pytest.fixture
def tiny(tmp_path, demo_tiny):
    """A fresh copy of the tiny model, as a run's merged folder."""
    return Path(shutil.copytree(demo_tiny, tmp_path / "run" / "merged"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow SQLite store for the module (creating one costs seconds); returns the
    tracking module. Each test registers its own model name."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path_factory.mktemp("store") / "mlruns"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from tasks import tracking
        yield tracking


def register(tracking, name: str, model_dir: Path, value: float = 1.0) -> dict:
    """Log a model folder in a run and register it, as the flows do."""
    run_id = tracking.start_run("registry-test", "iteration-1")
    tracking.log_artifacts(run_id, model_dir, "model")
    return tracking.register_version(name, run_id, "model", model_dir=model_dir, metric="acc", value=value)


def tensors(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_weights_digest_covers_config_and_weights_only(tmp_path, tiny):
    model = tiny
    digest = weights_digest(model)
    assert [p.name for p in digested_files(model)] == ["config.json", "model.safetensors"]
    (model / "tokenizer_config.json").write_text("{}")          # not part of the weights
    assert weights_digest(model) == digest
    copy = shutil.copytree(model, tmp_path / "copy")
    assert weights_digest(copy) == digest                         # content, not location
    flip_a_byte(copy / "model.safetensors")
    assert weights_digest(copy) != digest
    (model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        weights_digest(model)


def test_champion_is_downloaded_and_verified_when_its_local_folder_is_gone(tmp_path, store, tiny):
    merged = tiny
    original = tensors(merged)
    registered = register(store, "reg-model", merged)
    assert registered["champion"] and registered["digest"] == weights_digest(merged)
    version = store.use_store().get_model_version("reg-model", "1")
    assert version.tags[store.DIGEST_TAG] == registered["digest"]
    assert version.tags[store.LOCAL_TAG] == str(merged.resolve())

    here = store.resolve_model("reg-model", alias="champion", cache_dir=tmp_path / "cache")
    assert (here.source, here.path, here.version) == ("local", str(merged.resolve()), 1)

    shutil.rmtree(merged)
    fetched = store.resolve_model("reg-model", alias="champion", cache_dir=tmp_path / "cache")
    assert fetched.source == "download" and "absent" in fetched.skipped
    assert Path(fetched.path).is_relative_to(tmp_path / "cache")
    assert fetched.digest == registered["digest"] == weights_digest(fetched.path)
    got = tensors(fetched.path)
    assert got.keys() == original.keys() and all(torch.equal(got[k], original[k]) for k in got)
    assert [p.name for p in Path(fetched.path).parent.iterdir()] == [Path(fetched.path).name]  # no temp left

    again = store.resolve_model("reg-model", version=1, cache_dir=tmp_path / "cache")
    assert (again.source, again.path) == ("cache", fetched.path)


def test_altered_weights_are_never_used(tmp_path, store, tiny):
    merged = tiny
    pristine = shutil.copytree(merged, tmp_path / "pristine")
    register(store, "alt-model", merged)
    cache = tmp_path / "cache"

    # an altered local folder is passed over: the registered weights are fetched instead
    flip_a_byte(merged / "model.safetensors")
    resolved = store.resolve_model("alt-model", alias="champion", cache_dir=cache)
    assert resolved.source == "download" and "differs" in resolved.skipped
    assert_same_weights(resolved.path, pristine)

    # an altered cached copy is replaced by a verified download
    flip_a_byte(Path(resolved.path) / "model.safetensors")
    again = store.resolve_model("alt-model", alias="champion", cache_dir=cache)
    assert (again.source, again.path) == ("download", resolved.path)
    assert_same_weights(again.path, pristine)

    # altered artifacts in the store: a one-line error, nothing left in the cache
    shutil.rmtree(cache)
    source = store.use_store().get_model_version("alt-model", "1").source
    stored = Path(source.removeprefix("file://")) / "model.safetensors"
    assert stored.is_file()
    flip_a_byte(stored)
    with pytest.raises(store.RegistryError, match="not the registered") as err:
        store.resolve_model("alt-model", alias="champion", cache_dir=cache)
    assert "\n" not in str(err.value) and "models:/alt-model/1" in str(err.value)
    assert not any(p.is_dir() and any(p.iterdir()) for p in cache.rglob("*"))

    # artifacts gone from the store: a failed download is an error too, never another model
    shutil.rmtree(stored.parent)
    with pytest.raises(store.RegistryError, match="cannot fetch models:/alt-model/1"):
        store.resolve_model("alt-model", version=1, cache_dir=cache)


def test_unknown_and_unverifiable_versions_are_errors(tmp_path, store, tiny):
    assert store.champion_version("nothing-yet") is None
    with pytest.raises(store.RegistryError, match="models:/nothing-yet@champion is not in the registry"):
        store.resolve_model("nothing-yet", alias="champion", cache_dir=tmp_path)

    register(store, "some-model", tiny, value=None)             # no score: no champion
    assert store.champion_version("some-model") is None
    with pytest.raises(store.RegistryError, match="models:/some-model/7 is not in the registry"):
        store.resolve_model("some-model", version=7, cache_dir=tmp_path)

    client = store.use_store()                                    # a version registered without a digest
    run_id = store.start_run("registry-test", "legacy")
    client.create_model_version("some-model", f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    with pytest.raises(store.RegistryError, match="no weights_sha256 tag"):
        store.resolve_model("some-model", version=2, cache_dir=tmp_path)


def test_readme_one_liner_loads_a_registered_version(tmp_path, store, tiny, monkeypatch):
    """The README's snippet for MLflow users: any version by alias or number, loadable as is."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register(store, "readme-model", tiny)
    shutil.rmtree(tiny)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: undone after the test, or it would
    # point every later test's store here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.mlruns_dir() / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{store.mlruns_dir() / 'mlflow.db'}")
    for uri in ("models:/readme-model@champion", "models:/readme-model/1"):
        path = mlflow.artifacts.download_artifacts(uri)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size
        assert weights_digest(path) == store.use_store().get_model_version("readme-model", "1").tags["weights_sha256"]


# ----------------------------------------------------------------------------- through the flow

@pytest.fixture
def flow_log():
    """Messages of the flow runs' loggers (prefect.flow_runs) while the test runs."""
    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

        @property
        def text(self) -> str:
            return "\n".join(self.lines)

    import flows.align  # noqa: F401 - its imports (re)configure logging: attach after them
    handler, logger = Lines(), logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def recurring_pipeline(workdir: Path, model: Path):
    from cut_core.dsl import CUT, FunctionJudge, Model, Online, Pipeline, Training
    return Pipeline(
        name="recurring-test", workdir=str(workdir),
        model=Model(path=str(model), max_length=64),
        judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
        objective=CUT(threshold=1.1, alpha=1.0),
        adapter=None,
        training=Training(full_finetune=True, learning_rate=1e-3, micro_batch_size=8, gradient_accumulation=1,
                          scheduler="constant", warmup_steps=0, save_steps=1000, logging_steps=1),
        online=Online(iterations=2, prompts=str(ROOT / "datasets/arithmetic/online.jsonl"),
                      prompts_per_iteration=8, max_new_tokens=4, generation_batch_size=8),
    )


@pytest.mark.slow
def test_recurring_round_starts_from_the_champion_after_local_models_are_deleted(
        tmp_path, store, demo_tiny, prefect_harness, monkeypatch, flow_log):
    import flows.align as align

    pipeline = recurring_pipeline(tmp_path / "work", demo_tiny)

    # round 1: nothing registered yet, so the declared base, and the log says so
    monkeypatch.setattr(align, "scheduled_round", lambda: "round1")
    first = align.online_align(pipeline.to_json(), pipeline.name, recurring=True)
    assert first["start_model"] == {"base": str(demo_tiny)}
    assert f"no champion for recurring-test yet: starting from the declared base {demo_tiny}" in flow_log.text
    # iteration 2 started from iteration 1's registered version, verified
    assert [it["version"] for it in first["iterations"]] == [1, 2]
    assert first["iterations"][1]["start_model"]["uri"] == "models:/recurring-test/1"
    assert "recurring-test: iteration 2 starts from models:/recurring-test/1 (sha256 " in flow_log.text

    # without an evaluation nothing was promoted: promote version 1 (not the latest) by hand
    client = store.use_store()
    assert store.champion_version("recurring-test") is None
    client.set_registered_model_alias("recurring-test", "champion", "1")
    champion_digest = client.get_model_version("recurring-test", "1").tags[store.DIGEST_TAG]

    merged = list((tmp_path / "work" / "runs").glob("*/iter-*/train/out/merged"))
    assert len(merged) == 2
    for folder in merged:
        shutil.rmtree(folder)

    # round 2: starts from the champion's registered weights, fetched from the store
    flow_log.lines.clear()
    monkeypatch.setattr(align, "scheduled_round", lambda: "round2")
    second = align.online_align(pipeline.to_json(), pipeline.name, recurring=True)
    start = second["start_model"]
    assert (start["uri"], start["source"], start["digest"]) == ("models:/recurring-test/1", "download",
                                                                 champion_digest)
    assert weights_digest(start["path"]) == champion_digest
    assert "no champion" not in flow_log.text
    assert f"starts from models:/recurring-test/1 (sha256 {champion_digest[:12]}" in flow_log.text
    round2 = tmp_path / "work" / "runs" / second["run_key"]
    trained_from = json.loads((round2 / "iter-1" / "train" / "out" / "train_config.json").read_text())
    assert trained_from["model_path"] == start["path"]
    assert second["iterations"][0]["start_model"] == start
    assert [it["version"] for it in second["iterations"]] == [3, 4]
    assert second["iterations"][1]["start_model"]["uri"] == "models:/recurring-test/3"


def test_the_store_follows_cut_align_mlruns_after_mlflow_wrote_its_env_var(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the environment; our own value must
    not pin the first store (a long-lived worker, a notebook, a test session), a user's must win."""
    from tasks import tracking as store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "a"))
    store.use_store()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # what mlflow wrote there is put back
    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "b"))
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    store.use_store()
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'server.db'}"
