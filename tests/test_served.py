"""Served deployments, the run lock and atomic outputs.

Proves that:
- a served deployment runs the declaration it was served with: a run started with a whole
  declaration as a parameter (one whose model.build is `os:system`) or with an override outside
  the typed set is refused by the Prefect API, and, when created past the API, by the flow
  itself; nothing of the evil declaration runs (its shell command leaves no file). The allowed
  overrides (iterations, prompts_per_iteration) reach the run; the deployment's concurrency
  limit is one;
- one run of a declaration at a time: while another process holds a run folder's lock, a
  second run of the same declaration is refused with "already running" before doing any work;
  a lock left by a dead process is taken over;
- a model folder appears whole or not at all (make_tiny_model), a marker write cut short leaves
  the old content, and models load from safetensors only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cut_core.dsl import FunctionJudge, Model, Online, Pipeline
from cut_core.files import RunLocked, lock_holder, run_lock, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def served_pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(name="served", workdir=str(tmp_path / "work"), model=Model(path=str(tmp_path / "model")),
                    judge=FunctionJudge(callable="cut_core.tasks.arithmetic:judge"),
                    online=Online(iterations=1, prompts=str(ROOT / "datasets/arithmetic/online.jsonl"),
                                  prompts_per_iteration=8))


def evil_declaration(pipeline: Pipeline, sentinel: Path) -> str:
    return pipeline.model_copy(update={"model": Model(path=f"touch {sentinel}", build="os:system")}).to_json()


# ---------------------------------------------------------------- served deployments

def test_the_evil_declaration_would_run_its_command(tmp_path):
    """The control for the test below: run as a declaration, model.build='os:system' runs a shell command."""
    from flows.align import prepare_model

    sentinel = tmp_path / "ran"
    prepare_model(Pipeline.from_json(evil_declaration(served_pipeline(tmp_path), sentinel)))
    assert sentinel.exists()


@pytest.mark.slow
def test_a_served_run_cannot_supply_a_declaration_or_code(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.flow_engine import run_flow

    from flows.serve import served_deployment, served_flow

    served = served_pipeline(tmp_path)
    sentinel = tmp_path / "PWNED"
    evil = evil_declaration(served, sentinel)
    deployment_id = served_deployment(served).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert deployment.global_concurrency_limit.limit == 1  # one run of the deployment at a time
        assert set(deployment.parameter_openapi_schema["properties"]) == {"overrides"}

        refused = [{"pipeline_json": evil, "pipeline_name": "served", "recurring": True},
                   {"overrides": {"model": {"path": f"touch {sentinel}", "build": "os:system"}}},
                   {"overrides": {"refiner": "os:system"}},
                   {"overrides": {"iterations": 0}}]
        for parameters in refused:
            with pytest.raises(PrefectHTTPStatusError, match="409"):
                client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        allowed = client.create_flow_run_from_deployment(deployment_id, parameters={"overrides": {"iterations": 2}})
        assert allowed.parameters == {"overrides": {"iterations": 2}}

        # Past the API (a flow run created without the deployment's schema), the flow refuses itself.
        flow = served_flow(served)
        for parameters in refused[:2]:
            flow_run = client.create_flow_run(flow, parameters=parameters)
            state = run_flow(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
            assert state.is_failed(), state
            assert "overrides" in state.message or "model" in state.message
    assert not sentinel.exists(), "the evil declaration ran"
    assert not (tmp_path / "work").exists(), "the served pipeline did work for a refused run"

    # The allowed run, started as the deployment's runner starts it (the flow object, sent by value
    # to a fresh process): it runs the served declaration with iterations=2. The model folder does
    # not exist, so it stops at generation, after it has opened its run folder.
    from prefect.flow_engine import run_flow_in_subprocess

    from flows.serve import apply_overrides
    from tasks.stages import run_key

    process = run_flow_in_subprocess(served_flow(served), flow_run=allowed, parameters=allowed.parameters)
    process.join(timeout=300)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(allowed.id).state
    assert state.is_failed(), state
    key = run_key(apply_overrides(served.to_json(), {"iterations": 2}).to_json())
    assert [p.name.startswith(key + "-") for p in (tmp_path / "work" / "runs").iterdir()] == [True]
    assert not sentinel.exists()


def test_the_schema_is_closed_when_serve_registers_the_deployment(tmp_path, prefect_harness):
    """`cut-align serve` registers through Prefect's runner (`prefect.serve`: Runner.add_deployment,
    the async `aapply`), not `apply`: the deployment it registers refuses unknown parameters too."""
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner

    from flows.serve import served_deployment

    served = served_pipeline(tmp_path).model_copy(update={"name": "served-by-runner"})
    deployment_id = Runner(limit=1).add_deployment(served_deployment(served, cron="0 3 * * *"))
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert deployment.parameter_openapi_schema["additionalProperties"] is False
    assert set(deployment.parameter_openapi_schema["properties"]) == {"overrides"}
    assert deployment.enforce_parameter_schema and deployment.global_concurrency_limit.limit == 1


def test_overrides_change_only_what_they_name(tmp_path, monkeypatch):
    import flows.serve as serve

    served = served_pipeline(tmp_path)
    calls = []
    monkeypatch.setattr(serve, "online_align", lambda *args, **kw: calls.append((args, kw)) or {"ran": True})
    flow = serve.served_flow(served)

    assert flow.fn() == {"ran": True} and flow.fn(serve.RunOverrides(iterations=3, prompts_per_iteration=5))
    (first, first_kw), (second, _) = calls
    assert first == (served.to_json(), "served") and first_kw == {"recurring": True}  # the served declaration as is
    changed = Pipeline.from_json(second[0])
    assert (changed.online.iterations, changed.online.prompts_per_iteration) == (3, 5)
    assert changed.model_copy(update={"online": served.online}) == served  # nothing else moved

    with pytest.raises(Exception, match="extra"):
        serve.RunOverrides.model_validate({"model": {"build": "os:system"}})
    offline = served.model_copy(update={"online": Online()})
    with pytest.raises(ValueError, match="online declarations only"):
        serve.apply_overrides(offline.to_json(), {"iterations": 2})


# ---------------------------------------------------------------- one run at a time

HOLDER = """
import sys, time
from cut_core.files import run_lock
with run_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def lock_holder_process():
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, lock_holder_process):
    folder = tmp_path / "run"
    holder = lock_holder_process(folder)
    with pytest.raises(RunLocked, match=f"already running: .* pid {holder.pid}"):
        with run_lock(folder, "second"):
            pytest.fail("entered a locked run")
    assert lock_holder(folder)["pid"] == holder.pid  # the refusal did not disturb the holder's lock

    os.kill(holder.pid, signal.SIGKILL)  # dies without releasing: the lock is stale
    holder.wait()
    with run_lock(folder, "third") as held:
        assert held["taken_over"]["pid"] == holder.pid
        assert lock_holder(folder)["pid"] == os.getpid()
    assert lock_holder(folder) is None  # released on exit
    assert sorted(p.name for p in folder.iterdir()) == []  # no temporary lock files left

    # a lock from another host is never taken over on this one, even if its pid is free here
    (folder / "LOCK").write_text(json.dumps({"pid": holder.pid, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunLocked, match="on elsewhere"):
        with run_lock(folder):
            pass


@pytest.mark.slow
def test_a_second_concurrent_run_of_a_declaration_is_refused(tmp_path, prefect_harness, lock_holder_process,
                                                             monkeypatch):
    from flows.align import offline_align, run_root

    monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
    pipeline = served_pipeline(tmp_path).model_copy(update={"online": Online()})
    pipeline_json = pipeline.to_json()
    root = run_root(pipeline, pipeline_json)
    first = lock_holder_process(root)  # the first run, in another process, holds the run folder

    with pytest.raises(RunLocked, match=f"already running.*pid {first.pid}"):
        offline_align(pipeline_json, pipeline.name)
    assert sorted(p.name for p in root.iterdir()) == ["LOCK"], "the refused run did work in the run folder"
    assert not (Path(pipeline.workdir) / "warehouse.duckdb").exists()
    assert not (tmp_path / "mlruns").exists()


# ---------------------------------------------------------------- whole or absent

def test_a_model_folder_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from cut_core.models.tiny import make_tiny_model

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "models" / "tiny"
    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)  # after the weights were saved
        with pytest.raises(OSError, match="disk full"):
            make_tiny_model(out)
    assert not out.exists(), "a half-built model folder was left where a complete one is expected"
    assert list((tmp_path / "models").iterdir()) == []  # and no temporary folder either

    make_tiny_model(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    make_tiny_model(out, seed=1)  # an existing model folder is replaced whole
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "notes")  # never overwrites a folder that is not a model
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_marker_write_cut_short_leaves_the_old_content(tmp_path, monkeypatch):
    marker = tmp_path / "COMPLETE"
    write_text_atomic(marker, '{"steps": 1}')

    def crash(fd):
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="power cut"):
        write_text_atomic(marker, '{"steps": 2, "merged": "..."}')
    assert marker.read_text() == '{"steps": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["COMPLETE"]


def test_models_load_from_safetensors_only(tmp_path):
    import shutil

    import torch

    from cut_core.infer.generate import load_model
    from cut_core.models.tiny import make_tiny_model

    safe = make_tiny_model(tmp_path / "safe")
    model, _ = load_model(str(safe))
    pickled = tmp_path / "pickled"  # the same model as a pickled checkpoint
    shutil.copytree(safe, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError):
        load_model(str(pickled))  # a pickle can run code when loaded: refused
