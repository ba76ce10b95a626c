"""Trust boundaries of the judged path, against a real HTTP server on 127.0.0.1.

Proves that:
- credentials go only where the declaration says: the default config sends no Authorization
  header to a non-OpenAI host even with OPENAI_API_KEY set (OPENAI_API_KEY is the default for
  https://api.openai.com alone); plain http is refused off localhost; URLs with credentials or a
  query, and api_key_env values that are not variable names, are refused, and the error never
  repeats the offending value (an inline `api_key=` included);
- a server that echoes the key in a 401 body leaves no trace of it in the judge's result;
- judge output becomes a label only from a 2xx reply that finished with "stop": "length",
  "content_filter", tool calls, a missing finish_reason, a refusal and a failure marker ($ERROR$)
  are failures with their reason, not labels; a redirect is a failure and is not followed;
  a reply over the byte cap is a failure; a server that trickles bytes cannot hold a call
  past timeout_s;
- a score over too few successful judge calls is refused (score_refusal, the evaluation).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cut_core import dsl
from cut_core.dsl import PipelineError, load_pipeline
from cut_core.judge import OpenAIJudge, build_judge, score_refusal

KEY = "sk-trust-4f9c2e7a1b3d5f6e8a0c"


def completion(content, finish="stop", **message) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": content, **message}}
    if finish is not None:
        choice["finish_reason"] = finish
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode()


class EchoServer:
    """An OpenAI-compatible endpoint that answers by the instruction in the user message and
    records every request (path, headers, body). 'echo' answers 401 with everything it
    received, headers included, as a careless gateway does."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                instruction = body["messages"][1]["content"].split("### Instruction: ", 1)[1].split("\n\n", 1)[0]
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    server.answer(self, instruction, raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @staticmethod
    def send(handler, status: int, payload: bytes, headers: dict | None = None) -> None:
        handler.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **(headers or {})}.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(payload)

    def answer(self, h, instruction: str, raw: bytes) -> None:
        if instruction == "echo":
            echoed = json.dumps({"error": "invalid api key: " + h.headers.get("Authorization", "none"),
                                 "received_headers": dict(h.headers), "received_body": raw.decode()}).encode()
            return self.send(h, 401, echoed)
        if instruction == "good":
            return self.send(h, 200, completion("Perfect."))
        if instruction == "length":
            return self.send(h, 200, completion("Perfect answer? No: the", finish="length"))
        if instruction == "content_filter":
            return self.send(h, 200, completion("I cannot judge this.", finish="content_filter"))
        if instruction == "tool_calls":
            return self.send(h, 200, completion(None, finish="tool_calls", tool_calls=[
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]))
        if instruction == "no-finish":
            return self.send(h, 200, completion("Perfect.", finish=None))
        if instruction == "refusal":
            return self.send(h, 200, completion("Perfect.", refusal="I won't."))
        if instruction == "marker":
            return self.send(h, 200, completion(" $ERROR$ "))
        if instruction == "redirect":
            return self.send(h, 307, completion("Perfect."), {"Location": "/v1/elsewhere/chat/completions"})
        if instruction == "huge":
            return self.send(h, 200, completion("Wrong. " + "x" * 300_000))
        if instruction == "trickle":  # a valid reply, one byte every 50 ms (~10 s in all)
            payload = completion("Perfect.")
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            for i in range(len(payload)):
                h.wfile.write(payload[i:i + 1])
                h.wfile.flush()
                time.sleep(0.05)
            return None
        raise AssertionError(f"unscripted instruction {instruction!r}")


@pytest.fixture
def server():
    s = EchoServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def fast(spec: dsl.OpenAIJudge, **kw) -> OpenAIJudge:
    return build_judge(spec, backoff_base_s=0.01, backoff_max_s=0.02, **kw)


# ---------------------------------------------------------------- where a key is sent

def test_default_config_sends_no_key_to_a_non_openai_host(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m"))
    [res] = judge.judge_batch([("good", "r")])
    assert res.status == "ok"
    assert "Authorization" not in server.requests[0]["headers"]
    assert KEY not in json.dumps(server.requests)

    # OPENAI_API_KEY is the default for OpenAI's own https endpoint only (no call is made here)
    assert dsl.OpenAIJudge(base_url="https://api.openai.com/v1", model="m").key_env() == "OPENAI_API_KEY"
    assert build_judge(dsl.OpenAIJudge(base_url="https://api.openai.com/v1", model="m")).api_key == KEY
    for elsewhere in ("https://api.openai.com.evil.example/v1", "https://openai-proxy.example/v1"):
        assert build_judge(dsl.OpenAIJudge(base_url=elsewhere, model="m")).api_key is None


def test_a_named_key_goes_to_its_endpoint_and_an_echo_of_it_is_scrubbed(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m", api_key_env="MY_JUDGE_KEY"))
    [res] = judge.judge_batch([("echo", "r")])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the server did get it...
    assert res.status == "failed" and res.attempts == 1 and "HTTP 401" in res.error
    assert KEY not in res.error and "[redacted]" in res.error  # ...and echoed it back: scrubbed


@pytest.mark.parametrize("field, value", [
    ("base_url", "https://user:sk-pass-123456@api.example.com/v1"),
    ("base_url", "https://api.example.com/v1?api-key=sk-query-123456"),
    ("base_url", "https://api.example.com/v1?key=sk-query-123456"),
    ("base_url", "https://api.example.com/v1?access_token=sk-query-123456"),
    ("base_url", "http://judge.example.com/v1"),   # plain http off localhost
    ("api_key_env", "sk-pasted-key-123456"),       # a key where a variable name belongs
    ("api_key_env", "openai_api_key"),
    ("api_key", "sk-inline-key-123456"),           # inline keys are not a field at all
])
def test_unsafe_endpoints_and_keys_are_refused_without_repeating_them(tmp_path, field, value):
    spec = {"base_url": "https://api.example.com/v1", "model": "m", field: value}
    (tmp_path / "p.py").write_text(
        "from cut_core.dsl import *\n"
        f"pipeline = Pipeline(name='p', judge=OpenAIJudge(**{spec!r}))\n")
    with pytest.raises(PipelineError) as refused:
        load_pipeline(tmp_path / "p.py")
    message = str(refused.value)
    assert f"judge.{field}" in message
    secret = value.split("//")[-1].split("@")[0].split("=")[-1]
    assert secret not in message and value not in message
    with pytest.raises(Exception) as direct:  # the pydantic error's own text does not repeat it either
        dsl.OpenAIJudge(**spec)
    assert value not in str(direct.value) and secret not in str(direct.value)


def test_local_http_and_https_endpoints_are_accepted():
    for url in ("http://localhost:8000/v1", "http://127.0.0.1:8000/v1", "http://[::1]:8000/v1",
                "https://api.openai.com/v1", "https://my-vllm.example.com:8443/v1"):
        dsl.OpenAIJudge(base_url=url, model="m")
    with pytest.raises(ValueError, match="not both"):
        dsl.OpenAIJudge(base_url="https://x.example/v1", model="m", api_key_env="K", api_key_secret="k")


# ---------------------------------------------------------------- what a reply is trusted for

@pytest.mark.parametrize("case, reason", [
    ("length", "finish_reason='length'"),
    ("content_filter", "finish_reason='content_filter'"),
    ("tool_calls", "finish_reason='tool_calls'"),
    ("no-finish", "finish_reason=None"),
    ("refusal", "refused"),
    ("marker", "failure marker"),
])
def test_replies_that_did_not_finish_normally_are_failures_not_labels(server, case, reason):
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m"))
    good, res = judge.judge_batch([("good", "r"), (case, "r")])
    assert good.status == "ok" and good.polarity == "positive"  # the control: a normal reply is a label
    assert (res.status, res.polarity, res.judgment) == ("failed", None, None)
    assert reason in res.error and res.attempts == 1


def test_a_redirect_is_a_failure_and_is_not_followed(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m", api_key_env="MY_JUDGE_KEY"))
    [res] = judge.judge_batch([("redirect", "r")])
    assert res.status == "failed" and "HTTP 307" in res.error and "not followed" in res.error
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"]  # the key went nowhere else


def test_a_reply_over_the_byte_cap_is_a_failure(server):
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m", max_response_bytes=64_000))
    [res] = judge.judge_batch([("huge", "r")])
    assert res.status == "failed" and "max_response_bytes=64000" in res.error
    roomy = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m", max_response_bytes=1_000_000))
    assert roomy.judge_batch([("huge", "r")])[0].status == "ok"  # the same reply fits a larger cap


def test_a_trickling_server_cannot_hold_a_call_past_its_deadline(server):
    judge = fast(dsl.OpenAIJudge(base_url=server.base_url, model="m", timeout_s=0.6, max_retries=1))
    start = time.monotonic()
    [res] = judge.judge_batch([("trickle", "r")])
    elapsed = time.monotonic() - start
    # every read arrives within 50 ms, so a per-read timeout would wait the whole ~10 s reply out
    assert res.status == "failed" and "timeout" in res.error and res.attempts == 2
    assert elapsed < 3.0, f"two 0.6 s attempts took {elapsed:.1f} s"


# ---------------------------------------------------------------- a score needs enough judgments

@pytest.mark.parametrize("judged, failed, refused", [
    (12, 0, None), (95, 5, None), (94, 6, "6 of 100 judge calls failed"), (2, 10, "10 of 12 judge calls failed"),
    (9, 0, "only 9 of 9 judge calls succeeded"), (0, 0, "only 0 of 0"),
])
def test_score_refusal(judged, failed, refused):
    got = score_refusal(judged, failed, max_failed_rate=0.05, min_judged=10)
    assert got is None if refused is None else refused in got


# ---------------------------------------------------------------- end to end: no trace of the key, no promotion

class FlowJudgeServer(EchoServer):
    """The judge of a whole offline run. Labeling: 'label-good-*' is perfect, 'label-bad-*' wrong,
    'label-echo' answers 401 echoing the key. Held-out 'held-K': the base model's evaluation (each
    instruction's first call) is all wrong; the trained model's (later calls) fails for K < 10
    with the key echoed, and is perfect for the 2 others: a 100% positive rate over 2 of 12."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, int] = {}

    def answer(self, h, instruction: str, raw: bytes) -> None:
        with self.lock:
            n = self.seen[instruction] = self.seen.get(instruction, 0) + 1
        if instruction.startswith("held-"):
            k = int(instruction.split("-")[1])
            if n == 1:
                return self.send(h, 200, completion("Wrong: the answer is off."))
            instruction = "echo" if k < 10 else "good"
        elif instruction.startswith("label-"):
            instruction = {"good": "good", "bad": "bad", "echo": "echo"}[instruction.split("-")[1]]
        if instruction == "bad":
            return self.send(h, 200, completion("Wrong: this does not answer the question."))
        return super().answer(h, instruction, raw)


def _stored_files(*roots) -> list:
    out = []
    for root in roots:
        root = Path(root)
        out += [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return out


@pytest.mark.slow
def test_an_echoed_key_leaves_no_trace_and_a_poorly_judged_model_is_not_promoted(
        tmp_path, prefect_harness, monkeypatch, caplog):
    import duckdb
    from mlflow import MlflowClient
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import get_current_settings

    from cut_core.dsl import CUT, Evaluation, LoRA, Model, Pipeline, Source, Training
    from cut_core.infer.evaluate import EvaluationRefused
    from cut_core.models.tiny import make_tiny_model
    from flows.align import offline_align
    from tasks import tracking

    class Collect(logging.Handler):  # every record Prefect and the libraries log, tracebacks included
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(logging.Formatter("%(name)s %(message)s").format(record))

    collector = Collect(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(collector)
    server = FlowJudgeServer()
    server.thread.start()
    try:
        monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # this test's store, whatever ran before
        monkeypatch.setenv("TRUST_E2E_KEY", KEY)
        rows = ([{"instruction": f"label-good-{i}", "response": f"a fine answer {i}"} for i in range(8)]
                + [{"instruction": f"label-bad-{i}", "response": f"a poor answer {i}"} for i in range(8)]
                + [{"instruction": "label-echo", "response": "anything"}])
        (tmp_path / "unlabeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"instruction": f"held-{k}"}) + "\n"
                                                        for k in range(12)))
        tiny = make_tiny_model(tmp_path / "tiny")
        pipeline = Pipeline(
            name="trust-e2e", workdir=str(tmp_path / "work"),
            sources=[Source(paths=[str(tmp_path / "unlabeled.jsonl")], labeled=False)],
            model=Model(path=str(tiny), max_length=128),
            judge=dsl.OpenAIJudge(base_url=server.base_url, model="judge", api_key_env="TRUST_E2E_KEY",
                                  max_retries=0, concurrency=4),
            objective=CUT(threshold=1.1, alpha=1.0), adapter=LoRA(r=4, alpha=8),
            training=Training(learning_rate=1e-3, micro_batch_size=4, gradient_accumulation=1, warmup_steps=0,
                              save_steps=1000, logging_steps=1),
            evaluation=Evaluation(heldout=str(tmp_path / "heldout.jsonl"), max_prompts=12, max_new_tokens=4,
                                  samples=12),
        )
        # A champion already exists (score 0.0): an unguarded 2-of-12 score of 100% would replace it.
        seed_run = tracking.start_run("trust-e2e", "seed")
        tracking.log_artifacts(seed_run, tiny, "model")
        seed = tracking.register_version("trust-e2e", seed_run, "model", model_dir=tiny, metric="positive_rate",
                                         value=0.0)
        assert seed["champion"] and seed["version"] == 1

        with pytest.raises(EvaluationRefused, match="10 of 12 judge calls failed") as refused:
            offline_align(pipeline.to_json(), pipeline.name)
        assert "No score and no promotion" in str(refused.value)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        for logger in loggers:
            logger.removeHandler(collector)

    # the key did reach the judge, and the judge did echo it back (else this test proves nothing)
    assert any(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.requests)
    assert server.seen["label-echo"] == 1 and sum(server.seen[f"held-{k}"] for k in range(10)) == 20

    # no promotion: the champion has not moved, and no version was registered for the refused model
    client = MlflowClient(tracking.tracking_uri())
    assert int(client.get_model_version_by_alias("trust-e2e", "champion").version) == 1
    assert [int(v.version) for v in client.search_model_versions("name='trust-e2e'")] == [1]
    (iteration,) = [r for r in client.search_runs([client.get_experiment_by_name("trust-e2e").experiment_id])
                    if r.data.tags.get("cut_align.iteration") == "1"]
    assert (iteration.data.metrics["eval.judged"], iteration.data.metrics["eval.failed_judgments"]) == (2, 10)
    assert "eval.positive_rate" not in iteration.data.metrics
    assert "10 of 12" in iteration.data.tags["cut_align.eval_refused"]

    # the echoed key reached what the project stores, scrubbed
    warehouse = tmp_path / "work" / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        errors = [e for (e,) in con.execute("SELECT error FROM judgments WHERE status = 'failed'").fetchall()]
        dump = repr([con.execute(f'SELECT * FROM "{t}"').fetchall() for (t,) in con.execute("SHOW TABLES").fetchall()])
    finally:
        con.close()
    assert len(errors) == 1 and "[redacted]" in errors[0]
    samples = next((tmp_path / "work" / "runs").glob("*/iter-1/evaluate/samples.json")).read_text()
    assert samples.count("[redacted]") == 10
    assert KEY not in dump

    # and nowhere in the bytes: warehouse, MLflow store (database and artifacts), run folders, logs
    APILogHandler().flush()  # the flow's logs are in the Prefect database before it is read
    db_url = get_current_settings().server.database.connection_url.get_secret_value()
    prefect_db = Path(db_url.split("///", 1)[1])
    prefect_files = list(prefect_db.parent.glob(prefect_db.name + "*"))
    stored = _stored_files(tmp_path / "work", tmp_path / "mlruns") + prefect_files
    assert warehouse in stored, stored
    assert prefect_db in stored, (prefect_db, prefect_files)
    assert (tmp_path / "mlruns" / "mlflow.db") in stored, stored
    assert any("artifacts" in p.parts and "adapter" in p.parts for p in stored)  # the iteration's artifacts
    assert any(b"10 of 12 judge calls failed" in p.read_bytes() for p in prefect_files)  # the run's logs are there
    leaks = [str(p) for p in stored if KEY.encode() in p.read_bytes()]
    assert leaks == []
    logs = "\n".join(collector.lines) + caplog.text
    assert "EvaluationRefused" in logs and "judge calls failed" in logs  # the logs hold the failures...
    assert KEY not in logs                                       # ...and not the key
