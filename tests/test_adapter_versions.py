"""Registered versions as adapters: a LoRA version is "declared base + ONE adapter".

The next iteration continues the previous version's adapter on the same base (train_cli's
`init_adapter`, the same function at the start, a different LoRA config refused in one line,
resumable like any run); the registry stores the adapter, not a merged copy, and
`tracking.resolve_model` rebuilds the merged folder anywhere the base can be found (cached,
verified by digest); the README's one-line load of a version still loads it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_trainer import _Crash, assert_same_history, config_for, history, make_rows, model_dir, write_examples  # noqa: F401

from cut_core.train import cli as train_cli
from cut_core.dsl import LoRA
from cut_core.errors import UserError
from cut_core.models.lineage import read_lineage
from cut_core.train.trainer import load_model
from cut_core.models.weights import adapter_digest, weights_digest

ROOT = Path(__file__).resolve().parents[1]


def logits(model, ids=((1, 5, 9, 14, 22, 2),)) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.fixture(scope="module")
def base_copy(model_dir, tmp_path_factory) -> Path:
    """The tiny base in a folder of its own (registry tests move it away)."""
    return Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("declared") / "base"))


@pytest.fixture(scope="module")
def first_version(base_copy, tmp_path_factory) -> Path:
    """One finished LoRA run on the base: its output folder (adapter/, merged/)."""
    tmp = tmp_path_factory.mktemp("v1")
    examples = write_examples(tmp / "examples.parquet", make_rows(12, seed=7))
    config = config_for(base_copy, examples, tmp / "out")
    config["max_steps"] = 2
    train_cli.run(config)
    return tmp / "out"


# ----------------------------------------------------------------------------- training: one adapter, continued

def test_a_lora_run_writes_its_lineage_and_a_loadable_adapter(first_version, base_copy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, adapter = first_version / "merged", first_version / "adapter"
    lineage = read_lineage(merged)
    assert lineage.base_model == str(base_copy.resolve()) and lineage.base_digest == weights_digest(base_copy)
    assert lineage.adapter == str(adapter.resolve()) and lineage.adapter_digest == adapter_digest(adapter)
    assert lineage.merged_digest == weights_digest(merged) and lineage.base_ref is None
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_copy.resolve())
    # transformers loads the adapter folder as base + adapter: the same function as the merged folder
    via_adapter = AutoModelForCausalLM.from_pretrained(str(adapter))
    assert torch.allclose(logits(via_adapter), logits(AutoModelForCausalLM.from_pretrained(str(merged))), atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(str(adapter))) == len(AutoTokenizer.from_pretrained(str(merged)))


def test_the_next_version_continues_the_adapter_on_the_same_base(first_version, base_copy, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = first_version / "adapter"
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(str(first_version / "merged")))
    # at the start, base + continued adapter is the previous version's function
    continued = load_model(base_copy, LoRA(r=4, alpha=8, dropout=0.1), init_adapter=adapter)
    assert torch.allclose(logits(continued), merged_logits, atol=1e-5)

    examples = write_examples(tmp_path / "examples.parquet", make_rows(12, seed=8))
    config = {**config_for(base_copy, examples, tmp_path / "v2"), "max_steps": 2, "init_adapter": str(adapter)}
    train_cli.run(config)
    lineage = read_lineage(tmp_path / "v2" / "merged")
    assert lineage.base_model == str(base_copy.resolve())  # still the declared base, not v1's merge
    assert lineage.adapter_digest != adapter_digest(adapter)  # it trained on


def test_a_different_lora_config_is_refused_in_one_line(first_version, base_copy, tmp_path):
    examples = write_examples(tmp_path / "examples.parquet", make_rows(4, seed=9))
    config = {**config_for(base_copy, examples, tmp_path / "v2"), "init_adapter": str(first_version / "adapter")}
    config["adapter"] = {"r": 8, "alpha": 8, "dropout": 0.1}
    with pytest.raises(UserError) as err:
        train_cli.run(config)
    message = str(err.value)
    assert "\n" not in message and "r 4 -> 8" in message and "fix:" in message
    assert not (tmp_path / "v2" / "COMPLETE").exists()


def test_a_continued_run_resumes_after_a_crash_to_the_uninterrupted_losses(first_version, base_copy, tmp_path):
    from transformers import TrainerCallback

    examples = write_examples(tmp_path / "examples.parquet", make_rows(20, seed=4))

    def config(out):
        return {**config_for(base_copy, examples, out), "init_adapter": str(first_version / "adapter")}

    reference = train_cli.run(config(tmp_path / "ref"))

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash("injected after checkpoint-4")

    with pytest.raises(_Crash):
        train_cli.run(config(tmp_path / "run"), callbacks=[CrashAtStep5()])
    resumed = train_cli.run(config(tmp_path / "run"))
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == reference["steps"]
    assert_same_history(history(tmp_path / "run"), history(tmp_path / "ref"))
    assert adapter_digest(tmp_path / "run" / "adapter") != adapter_digest(first_version / "adapter")


# ----------------------------------------------------------------------------- the registry: adapters, rebuilt merges

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path_factory.mktemp("store") / "mlruns"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from tasks import tracking
        yield tracking


def register_run(tracking, name: str, out: Path) -> dict:
    """Log a LoRA run's adapter and register the run, as flows/align.py does."""
    run_id = tracking.start_run("adapter-test", "iteration-1")
    tracking.log_artifacts(run_id, out / "adapter", "adapter")
    return tracking.register_version(name, run_id, "adapter", model_dir=out / "merged", metric="acc", value=1.0)


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def test_an_adapter_version_is_stored_as_its_adapter_and_rebuilt_on_demand(first_version, base_copy, store, tmp_path):
    out = Path(shutil.copytree(first_version, tmp_path / "run"))
    # the copied merged folder's lineage points at the original adapter: point it at the copy
    from dataclasses import replace

    from cut_core.models.lineage import write_lineage
    write_lineage(out / "merged", replace(read_lineage(out / "merged"), adapter=str((out / "adapter").resolve())))
    registered = register_run(store, "adapter-model", out)
    tags = store.use_store().get_model_version("adapter-model", str(registered["version"])).tags
    assert tags[store.KIND_TAG] == "adapter" and tags[store.ADAPTER_TAG] == adapter_digest(out / "adapter")
    assert tags[store.BASE_DIGEST_TAG] == weights_digest(base_copy) and tags[store.BASE_PATH_TAG] == str(base_copy.resolve())
    version_files = list((store.mlruns_dir() / "artifacts").rglob("adapter_model.safetensors"))
    assert len(version_files) == 1 and not list((store.mlruns_dir() / "artifacts").rglob("model.safetensors"))

    cache = tmp_path / "cache"
    assert store.resolve_model("adapter-model", alias="champion", cache_dir=cache).source == "local"
    shutil.rmtree(out)  # the training machine's folders are gone
    rebuilt = store.resolve_model("adapter-model", alias="champion", cache_dir=cache)
    assert rebuilt.source == "rebuilt" and rebuilt.skipped.startswith("local folder")
    assert weights_digest(rebuilt.path) == tags[store.DIGEST_TAG]  # CPU merge: bit-identical to training's
    assert read_lineage(rebuilt.path).base_model == str(base_copy.resolve())
    stamp = (Path(rebuilt.path) / "model.safetensors").stat().st_mtime_ns
    again = store.resolve_model("adapter-model", version=registered["version"], cache_dir=cache)
    assert (again.source, again.path) == ("cache", rebuilt.path)
    assert (Path(again.path) / "model.safetensors").stat().st_mtime_ns == stamp  # not merged again


def test_adapter_version_errors_are_one_line_with_the_fix(first_version, base_copy, store, tmp_path):
    out = Path(shutil.copytree(first_version, tmp_path / "run"))
    from dataclasses import replace

    from cut_core.models.lineage import write_lineage
    write_lineage(out / "merged", replace(read_lineage(out / "merged"), adapter=str((out / "adapter").resolve())))
    registered = register_run(store, "adapter-errors", out)
    shutil.rmtree(out)
    moved = base_copy.parent / "moved-away"
    base_copy.rename(moved)
    try:
        with pytest.raises(store.RegistryError) as err:
            store.resolve_model("adapter-errors", version=registered["version"], cache_dir=tmp_path / "cache")
    finally:
        moved.rename(base_copy)
    message = str(err.value)
    assert "\n" not in message and "is not on this machine" in message and f"put that base model at {base_copy.resolve()}" in message

    # an altered adapter in the store is never merged (a fresh cache: the first try fetched it)
    from urllib.parse import urlparse
    source = store.use_store().get_model_version("adapter-errors", str(registered["version"])).source
    stored = Path(urlparse(source).path) / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(store.RegistryError) as err:
        store.resolve_model("adapter-errors", version=registered["version"], cache_dir=tmp_path / "cache2")
    assert "\n" not in str(err.value) and "not the registered adapter" in str(err.value)


def test_readme_one_liner_loads_an_adapter_version(first_version, base_copy, store, tmp_path, monkeypatch):
    """README "Models in the registry": download_artifacts + from_pretrained loads base + adapter
    (the base is found by the absolute path in adapter_config.json: present on this machine)."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(shutil.copytree(first_version, tmp_path / "run"))
    from dataclasses import replace

    from cut_core.models.lineage import write_lineage
    write_lineage(out / "merged", replace(read_lineage(out / "merged"), adapter=str((out / "adapter").resolve())))
    register_run(store, "readme-adapter", out)
    expected = logits(AutoModelForCausalLM.from_pretrained(str(out / "merged")))
    shutil.rmtree(out)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.mlruns_dir() / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{store.mlruns_dir() / 'mlflow.db'}")
    path = mlflow.artifacts.download_artifacts("models:/readme-adapter@champion")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert torch.allclose(logits(model), expected, atol=1e-5) and len(tokenizer) > 4


# ----------------------------------------------------------------------------- through the flow: the store's size

@pytest.fixture(scope="module")
def demo_tiny(tmp_path_factory):
    from cut_core.tasks.arithmetic import tokenizer_corpus
    from cut_core.models.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("demo") / "base", tokenizer_corpus(n=300), vocab_size=256)


@pytest.mark.slow
def test_a_three_iteration_lora_run_stores_three_adapters_and_no_merged_copy(tmp_path, demo_tiny, prefect_harness,
                                                                              monkeypatch):
    """bench/adapter_store.py's run: the store holds one adapter per iteration, no merged copy
    (main's code stored a merged copy per iteration too), and every version is the declared base
    + ONE adapter, continued from the previous version's."""
    sys_path = str(ROOT / "bench")
    monkeypatch.syspath_prepend(sys_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import adapter_store

    from flows.align import train_config
    from tasks import tracking

    figures = adapter_store.measure(demo_tiny, tmp_path)
    assert figures["versions"] == [1, 2, 3] and figures["adapters_stored"] == 3
    assert figures["merged_copies_stored"] == 0
    assert figures["adapter_bytes"] < 0.25 * 3 * figures["model_bytes"]  # 3 adapters, far below 3 models
    artifacts = adapter_store.du(tmp_path / "mlruns" / "artifacts")
    assert artifacts < 1.5 * figures["model_bytes"]  # every artifact of the run, below 1.5 models

    run = tmp_path / "work" / "runs" / figures["run_key"]
    configs = [json.loads((run / f"iter-{k}" / "train" / "out" / "train_config.json").read_text()) for k in (1, 2, 3)]
    assert {c["model_path"] for c in configs} == {str(demo_tiny)}  # every iteration trains on the declared base
    assert [c.get("init_adapter") for c in configs] == [
        None, str((run / "iter-1/train/out/adapter").resolve()), str((run / "iter-2/train/out/adapter").resolve())]
    client = tracking.use_store()
    assert {client.get_model_version("adapter-store", str(v)).tags[tracking.KIND_TAG] for v in (1, 2, 3)} == {"adapter"}
    assert not any(a.path == "model" for v in (1, 2, 3)
                   for a in client.list_artifacts(client.get_model_version("adapter-store", str(v)).run_id))

    # the training folders gone, version 3 is rebuilt from the store's adapter and the local base,
    # and a round starting from it continues its adapter on that base
    shutil.rmtree(tmp_path / "work" / "runs")
    resolved = tracking.resolve_model("adapter-store", version=3, cache_dir=tmp_path / "cache")
    assert resolved.source == "rebuilt" and weights_digest(resolved.path) == resolved.digest
    pipeline = adapter_store.pipeline_for(tmp_path / "work", demo_tiny, "alpaca")
    config = train_config(pipeline, resolved.path, "examples.parquet", resolved.uri)
    assert config["model_path"] == str(demo_tiny.resolve()) and config["init_adapter"] == read_lineage(resolved.path).adapter
    assert "base_ref" not in config  # the base is the declared base, a path
