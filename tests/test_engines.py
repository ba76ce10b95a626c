"""Generation engines (cut_core/infer/engines.py) and the Generation section, without a serving engine.

Proves that:
- the old generation fields (Online.max_new_tokens/greedy/generation_batch_size) still load, from a
  declaration or an old JSON dump, and land in the Generation section; two different values are
  refused; engine-specific fields set for another engine are refused; the endpoint obeys the
  judges' URL rules; online rounds refuse n > 1;
- engine='transformers' greedy is exactly `generate` (today's behaviour), sampling is seeded;
- the stale-model rule: a server serving the model folder is used, one serving its lineage's base
  gets the adapter loaded, anything else (another model, no lineage, no `root`) is refused;
- a server that does not answer and an absent vLLM environment are one-line refusals;
- the warehouse records the engine, and an older warehouse file gains the column on open.
The same engines against a real vLLM server: tests/test_vllm.py.
"""

from __future__ import annotations

import json
import socket

import duckdb
import pyarrow as pa
import pytest
import torch

from cut_core.infer import engines
from cut_core.data import warehouse as wh
from cut_core.dsl import Evaluation, FunctionJudge, Generation, Model, Online, Pipeline
from cut_core.infer.engines import EngineRefused, ServedPlan, Sampling, plan_served_model
from cut_core.infer.generate import generate, load_model
from cut_core.models.lineage import Lineage, write_lineage
from cut_core.models.tiny import make_tiny_model

JUDGE = FunctionJudge(callable="cut_core.tasks.arithmetic:judge")


def online_pipeline(**online) -> Pipeline:
    return Pipeline(name="p", model=Model(path="m"), judge=JUDGE,
                    online=Online(iterations=1, prompts="p.jsonl", **online))


# ---------------------------------------------------------------- the section

def test_old_generation_fields_move_into_the_generation_section():
    p = online_pipeline(max_new_tokens=64, greedy=False, generation_batch_size=8)
    assert (p.generation.max_new_tokens, p.generation.temperature, p.generation.batch_size) == (64, 1.0, 8)
    assert (p.online.max_new_tokens, p.online.greedy, p.online.generation_batch_size) == (None, None, None)
    assert Pipeline.from_json(p.to_json()) == p  # round-trips as the new shape
    # An old JSON dump holds the three at their old defaults: it loads, as greedy 256 / 32.
    old = {"name": "p", "online": {"iterations": 0, "prompts": None, "prompts_per_iteration": 1000,
                                   "max_new_tokens": 256, "greedy": True, "generation_batch_size": 32},
           "evaluation": {"heldout": None, "max_prompts": 500, "max_new_tokens": 64}}
    loaded = Pipeline.from_json(json.dumps(old))
    assert loaded.generation == Generation() and loaded.evaluation.max_new_tokens == 64
    assert Pipeline(name="p").evaluation.max_new_tokens is None  # None: generation.max_new_tokens
    # The same value in both places is fine; two different ones are refused (which one was meant?).
    same = Pipeline(name="p", online=Online(max_new_tokens=64), generation=Generation(max_new_tokens=64))
    assert same.generation.max_new_tokens == 64
    with pytest.raises(ValueError, match="online.max_new_tokens and generation.max_new_tokens disagree"):
        Pipeline(name="p", online=Online(max_new_tokens=64), generation=Generation(max_new_tokens=32))


def test_engine_fields_belong_to_their_engine_and_the_endpoint_obeys_the_judges_rules():
    with pytest.raises(ValueError, match="base_url, model belong to engine='openai'"):
        Generation(base_url="http://127.0.0.1:8000/v1", model="m")
    with pytest.raises(ValueError, match="python belong to engine='vllm'"):
        Generation(engine="openai", base_url="http://127.0.0.1:8000/v1", python="/x/bin/python")
    with pytest.raises(ValueError, match="engine='openai' needs base_url"):
        Generation(engine="openai")
    with pytest.raises(ValueError, match="must be https unless the host is localhost"):
        Generation(engine="openai", base_url="http://gpu-box:8000/v1")
    with pytest.raises(ValueError, match="must not carry credentials"):
        Generation(engine="openai", base_url="https://u:secret@host/v1")
    assert Generation(engine="openai", base_url="https://api.openai.com/v1").key_env() == "OPENAI_API_KEY"
    assert Generation(engine="openai", base_url="http://127.0.0.1:8000/v1").key_env() is None
    with pytest.raises(ValueError, match="generation.n > 1"):
        Pipeline(name="p", model=Model(path="m"), judge=JUDGE, online=Online(iterations=1, prompts="p.jsonl"),
                 generation=Generation(n=4, temperature=1.0))


# ---------------------------------------------------------------- engine="transformers"

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=1)


def test_transformers_engine_greedy_is_generate_and_sampling_is_seeded(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    xs = ["What is 12 + 7?", "Hi", "List three fruits:"]
    spec = Generation(max_new_tokens=8, batch_size=2)
    greedy = engines.generate(spec, str(tiny_dir), xs, template="alpaca", model=model, tokenizer=tokenizer)
    assert greedy == [[t] for t in generate(model, tokenizer, xs, max_new_tokens=8, batch_size=2)]
    sampled = Generation(max_new_tokens=8, temperature=1.0, n=3, seed=7)
    a = engines.generate(sampled, str(tiny_dir), xs, template="alpaca", model=model, tokenizer=tokenizer)
    b = engines.generate(sampled, str(tiny_dir), xs, template="alpaca", model=model, tokenizer=tokenizer)
    assert a == b and all(len(r) == 3 for r in a)  # the same seed, the same samples
    assert len({t for r in a for t in r}) > 3       # and they are samples, not one greedy answer
    other = engines.generate(sampled.model_copy(update={"seed": 8}), str(tiny_dir), xs, template="alpaca",
                             model=model, tokenizer=tokenizer)
    assert other != a
    assert Sampling.of(sampled, temperature=0.0).greedy and not Sampling.of(sampled).greedy


# ---------------------------------------------------------------- the stale-model rule

def _entry(id_, root, parent=None):
    return {"id": id_, "object": "model", "root": str(root) if root else None, "parent": parent}


def test_a_server_answers_only_as_the_model_being_aligned(tmp_path):
    base, other, merged, adapter = (tmp_path / n for n in ("base", "other", "iter-1", "adapter"))
    for d in (base, other, merged, adapter):
        d.mkdir()
    # the served folder itself
    assert plan_served_model([_entry("smol", base)], base, None) == ServedPlan("smol")
    # base + adapter: the adapter is loaded under a stable name, once
    write_lineage(merged, Lineage(base_model=str(base), base_digest="d", adapter=str(adapter)))
    plan = plan_served_model([_entry("smol", base)], merged, None)
    assert plan == ServedPlan(engines.adapter_name(adapter), adapter=str(adapter))
    loaded = [_entry("smol", base), _entry(plan.name, adapter, parent="smol")]
    assert plan_served_model(loaded, merged, None) == ServedPlan(plan.name)
    # a server on another model: refused, for the folder and for base + adapter alike
    with pytest.raises(EngineRefused, match=r"serves .*/other, not .*/base \(no lineage"):
        plan_served_model([_entry("o", other)], base, None)
    with pytest.raises(EngineRefused, match="nor its base .*--enable-lora"):
        plan_served_model([_entry("o", other)], merged, None)
    # a server that does not say what it serves cannot be checked: refused
    with pytest.raises(EngineRefused, match="no 'root'"):
        plan_served_model([_entry("smol", None)], base, None)
    with pytest.raises(EngineRefused, match="no base model named 'x'"):
        plan_served_model([_entry("smol", base)], base, "x")


def test_a_server_that_does_not_answer_and_an_absent_vllm_are_one_line_refusals(tmp_path):
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = Generation(engine="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout_s=5)
    engine = engines.OpenAIEngine(spec.base_url, timeout_s=5, max_retries=0)
    with pytest.raises(EngineRefused, match=f"the server at http://127.0.0.1:{port}/v1 does not answer"):
        engine.generate(str(tmp_path), [[1, 2]], Sampling())
    with pytest.raises(EngineRefused, match="engine='vllm' needs vLLM's python at .*install_vllm_cpu.sh"):
        engines.VLLMEngine(str(tmp_path / "no-venv" / "bin" / "python")).generate(str(tmp_path), [[1]], Sampling())


def test_a_server_reply_quoted_in_a_refusal_has_the_key_scrubbed_as_judges_scrub_theirs():
    """One rule (cut_core/secrets.py) for what of a key may appear in a text: an engine's
    refusal quoting a reply that echoed the key says [redacted], as a judge's error does."""
    from types import SimpleNamespace

    from cut_core.judge import scrub

    key = "sk-test-0123456789"
    reply = SimpleNamespace(status_code=401, text=f"invalid key {key} for this model")
    client = SimpleNamespace(post=lambda url, json: reply)
    engine = engines.OpenAIEngine("http://127.0.0.1:8000/v1", api_key=key, max_retries=0)
    with pytest.raises(EngineRefused) as refused:
        engine._complete(client, {"model": "m", "prompt": [1]})
    assert key not in str(refused.value) and repr(scrub(reply.text, [key]))[:40] in str(refused.value)


# ---------------------------------------------------------------- the warehouse names the engine

def test_generations_record_the_engine_and_an_older_warehouse_gains_the_column(tmp_path):
    path = tmp_path / "w.duckdb"
    old = duckdb.connect(str(path))  # a generations table as an earlier release wrote it
    old.execute("CREATE TABLE generations (run VARCHAR NOT NULL, iteration INTEGER NOT NULL, prompt_index BIGINT "
                "NOT NULL, instruction VARCHAR NOT NULL, response VARCHAR NOT NULL, model_digest VARCHAR NOT NULL, "
                "generated_at TIMESTAMP DEFAULT current_timestamp, PRIMARY KEY (run, iteration, prompt_index))")
    old.execute("INSERT INTO generations (run, iteration, prompt_index, instruction, response, model_digest) "
                "VALUES ('r0', 1, 0, 'x', 'y', 'm')")
    old.close()
    con = wh.connect(path)
    try:
        frame = pa.table({"prompt_index": [0], "instruction": ["q"], "response": ["a"]})
        spec = Generation(engine="openai", base_url="http://127.0.0.1:8000/v1")
        wh.replace_generations(con, frame, run="r1", iteration=1, model="m", pipeline="p",
                               engine=engines.engine_name(spec))
        rows = con.execute("SELECT run, engine FROM generations ORDER BY run").fetchall()
        assert rows == [("r0", None), ("r1", "openai:http://127.0.0.1:8000/v1")]
    finally:
        con.close()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
