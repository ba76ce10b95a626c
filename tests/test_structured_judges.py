"""Judge replies capped, structured, counted and reported, against a real HTTP server on 127.0.0.1.

Proves that:
- the DSL's OpenAIJudge sends max_tokens (512 unless declared) and a declaration that did not
  change keeps the judge name it had before max_tokens existed, so a workdir's cached judgments
  are reused (no call is made), while a changed cap or format judges again;
- response_format="json" asks for the verdict schema with a json_schema response_format; a
  'good' verdict is a positive (stored without text), a 'bad' one a negative with its text, and a
  reply that does not parse, lacks a field, has another verdict or contradicts itself is a failed
  call with its reason, stored as failed and never applied to a triplet;
- the usage of every reply is summed per call and per batch, a reply without usage is counted
  as unknown (never zero), and a reply cut by max_tokens still counts its tokens;
- label_pending reports "judge: k/n done (f failed), r calls/s, ETA ..." lines while a slow batch
  is being judged, not only at its end;
- through the online flow: the iteration's judge usage lands in MLflow (judge.prompt_tokens,
  judge.completion_tokens; eval.judge_* for evaluation) and the label task logs its progress.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cut_core import dsl, judge as judges
from cut_core.data import warehouse
from cut_core.judge import OpenAIJudge, build_judge


def reply(content, *, usage=None, finish="stop") -> bytes:
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def verdict(v, j) -> str:
    return json.dumps({"verdict": v, "judgment": j})


class Server:
    """/chat/completions answered by `answer(instruction, request_body) -> (status, body, delay)`,
    keyed on the instruction inside the user message (deterministic under concurrency)."""

    def __init__(self, answer):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                instruction = user.split("### Instruction: ", 1)[1].split("\n\n", 1)[0]
                with server.lock:
                    server.requests.append(body)
                status, payload, delay = answer(instruction, body)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


USAGE = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
# Structured replies by instruction; every one reports USAGE unless said otherwise.
STRUCTURED = {
    "good": verdict("good", "perfect"),
    "bad": verdict("bad", "The sum is wrong: 2 + 2 is 4."),
    "not-json": "verdict: good",
    "truncated-json": '{"verdict": "good", "judgm',
    "no-judgment": json.dumps({"verdict": "good"}),
    "no-verdict": json.dumps({"judgment": "fine"}),
    "other-verdict": verdict("perfect", "fine"),
    "capitalised": verdict("Good", "fine"),
    "array": json.dumps(["good", "fine"]),
    "judgment-not-text": json.dumps({"verdict": "bad", "judgment": 3}),
    "bad-without-text": verdict("bad", "  "),
    "bad-says-perfect": verdict("bad", "Perfect, except for the sign."),
}


def structured_answer(instruction, body):
    if instruction == "no-usage":
        return 200, reply(verdict("bad", "Missing the units.")), 0.0
    if instruction == "cut-by-cap":  # the server stopped at max_tokens: tokens spent, no label
        return 200, reply('{"verdict": "bad", "judgment": "The', usage={"prompt_tokens": 40, "completion_tokens": 7},
                          finish="length"), 0.0
    if instruction == "server-error":
        return 500, b'{"error": "boom"}', 0.0
    if instruction.startswith("text-"):  # the prefix protocol
        return 200, reply("Perfect." if instruction == "text-good" else "Wrong.", usage=USAGE), 0.0
    return 200, reply(STRUCTURED[instruction], usage=USAGE), 0.0


@pytest.fixture
def server():
    s = Server(structured_answer)
    yield s
    s.close()


BACKOFF = {"backoff_base_s": 0.01, "backoff_max_s": 0.02}


def fast(**kw):
    return {"max_retries": 1, "timeout_s": 5.0, "backoff_base_s": 0.01, "backoff_max_s": 0.02, **kw}


# ---------------------------------------------------------------- max_tokens and the cache identity

# The name build_judge gave this declaration before max_tokens and response_format existed (the
# code at commit 40b79ef printed it): the key of every judgment cached by such a workdir.
PRE_CAP_NAME = "openai:http://127.0.0.1:8000/v1|m#2f80b5895c"


def test_an_unchanged_declaration_keeps_its_judge_name():
    spec = dsl.OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="m")
    assert spec.max_tokens == judges.DEFAULT_JUDGE_MAX_TOKENS == 512
    assert build_judge(spec).name == PRE_CAP_NAME
    changed = {build_judge(spec.model_copy(update=u)).name
               for u in ({"max_tokens": 64}, {"response_format": "json"}, {"temperature": 0.5})}
    assert len(changed) == 3 and PRE_CAP_NAME not in changed


def test_max_tokens_is_sent_and_cached_judgments_of_the_same_declaration_are_reused(tmp_path, server):
    con = warehouse.connect(tmp_path / "w.duckdb")
    pairs = [("text-good", "4"), ("text-bad", "5")]
    # A workdir labeled by the judge as it was built before the cap: no max_tokens in the request.
    old = OpenAIJudge(server.base_url, "m", max_tokens=None, **fast())
    assert judges.label_pending(con, old, pairs)["judged"] == 2
    assert all("max_tokens" not in r for r in server.requests)

    # The same declaration now: same name, every judgment cached, no call.
    spec = dsl.OpenAIJudge(base_url=server.base_url, model="m")
    new = build_judge(spec, **BACKOFF)
    assert new.name == old.name
    counts = judges.label_pending(con, new, pairs)
    assert (counts["cached"], counts["judged"], len(server.requests)) == (2, 0, 2)

    # A changed cap is another judge: it judges again and sends its cap.
    capped = build_judge(spec.model_copy(update={"max_tokens": 64}), **BACKOFF)
    assert judges.label_pending(con, capped, pairs)["judged"] == 2
    assert [r["max_tokens"] for r in server.requests[2:]] == [64, 64]
    # and the default cap is what an undeclared one sends
    new.judge_batch([("text-good", "again")])
    assert server.requests[-1]["max_tokens"] == 512
    con.close()


def test_max_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        dsl.OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="m", max_tokens=0)


# ---------------------------------------------------------------- structured verdicts

def test_structured_judge_asks_for_the_schema_and_labels_by_verdict(server):
    judge = build_judge(dsl.OpenAIJudge(base_url=server.base_url, model="m", response_format="json"), **BACKOFF)
    good, bad = judge.judge_batch([("good", "4"), ("bad", "5")])

    assert (good.status, good.polarity, good.judgment) == ("ok", "positive", None)
    assert (bad.status, bad.polarity, bad.judgment) == ("ok", "negative", "The sum is wrong: 2 + 2 is 4.")
    request = server.requests[0]
    assert request["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "judgment", "strict": True, "schema": {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": ["good", "bad"]}, "judgment": {"type": "string"}},
            "required": ["verdict", "judgment"], "additionalProperties": False}}}
    assert request["messages"][0]["content"] == dsl.JSON_JUDGE_SYSTEM_PROMPT
    assert request["max_tokens"] == 512


def test_a_declared_system_prompt_is_kept_for_a_structured_judge():
    spec = dsl.OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="m", response_format="json",
                           system_prompt="Judge it.")
    assert spec.system_prompt == "Judge it." and build_judge(spec).system_prompt == "Judge it."
    # round trip through the pipeline's JSON keeps the prompt the judge was built with
    assert dsl.OpenAIJudge.model_validate_json(
        dsl.OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="m", response_format="json")
        .model_dump_json()).system_prompt == dsl.JSON_JUDGE_SYSTEM_PROMPT


@pytest.mark.parametrize("case, reason", [
    ("not-json", "not JSON"),
    ("truncated-json", "not JSON"),
    ("no-judgment", "lacks judgment"),
    ("no-verdict", "lacks verdict"),
    ("other-verdict", "verdict 'perfect' is not one of"),
    ("capitalised", "verdict 'Good' is not one of"),
    ("array", "expected an object"),
    ("judgment-not-text", "judgment is int"),
    ("bad-without-text", "blank judgment"),
    ("bad-says-perfect", "reads as positive"),
])
def test_a_structured_reply_that_is_no_verdict_is_a_failure_never_a_label(server, case, reason):
    judge = OpenAIJudge(server.base_url, "m", response_format="json", **fast())
    (result,) = judge.judge_batch([(case, "r")])
    assert (result.status, result.polarity, result.judgment) == ("failed", None, None)
    assert reason in result.error
    assert result.attempts == 1  # a malformed reply is not retried: the same request gets the same reply
    assert result.prompt_tokens == 40  # the call still cost its tokens


def test_structured_failures_are_stored_as_failed_and_leave_triplets_unlabeled(tmp_path, server):
    con = warehouse.connect(tmp_path / "w.duckdb")
    pairs = [("good", "4"), ("bad", "5"), ("not-json", "6"), ("other-verdict", "7")]
    for k, (i, r) in enumerate(pairs):
        con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, batch, source, row_number) "
                    "VALUES (?, ?, ?, NULL, NULL, 'b0', 'test', ?)", [warehouse.content_key(i, r, None), i, r, k])
    judge = OpenAIJudge(server.base_url, "m", response_format="json", **fast())
    counts = judges.label_pending(con, judge, judges.unlabeled_triplets(con))
    assert (counts["ok"], counts["failed"], counts["positives"], counts["negatives"]) == (2, 2, 1, 1)
    assert judges.apply_judgments(con, judge.name) == 2
    rows = dict(con.execute("SELECT instruction, polarity FROM triplets").fetchall())
    assert rows == {"good": "positive", "bad": "negative", "not-json": None, "other-verdict": None}
    # the stored label reads the same by the one polarity rule (cut_core.data.polarity)
    for judgment, polarity in con.execute("SELECT judgment, polarity FROM judgments WHERE status = 'ok'").fetchall():
        assert judges.polarity_of(judgment) == polarity
    con.close()


# ---------------------------------------------------------------- token usage

def test_usage_is_summed_per_batch_and_missing_usage_is_unknown_not_zero(tmp_path, server):
    con = warehouse.connect(tmp_path / "w.duckdb")
    judge = OpenAIJudge(server.base_url, "m", response_format="json", **fast())
    pairs = [("good", "a"), ("bad", "b"), ("no-usage", "c"), ("cut-by-cap", "d"), ("server-error", "e")]
    counts = judges.label_pending(con, judge, pairs)
    # good, bad: 40 + 9 each; cut-by-cap: 40 + 7 (failed, but paid); no-usage: unknown;
    # server-error: two 500s, no reply body with usage (not counted either way)
    assert (counts["prompt_tokens"], counts["completion_tokens"], counts["usage_unknown"]) == (120, 25, 1)
    assert (counts["ok"], counts["failed"]) == (3, 2)
    # cached judgments cost nothing
    again = judges.label_pending(con, judge, pairs[:3])
    assert (again["judged"], again["prompt_tokens"], again["completion_tokens"], again["usage_unknown"]) == \
        (0, None, None, 0)
    con.close()


def test_a_server_that_never_reports_usage_gives_unknown_sums(tmp_path, server):
    con = warehouse.connect(tmp_path / "w.duckdb")
    counts = judges.label_pending(con, OpenAIJudge(server.base_url, "m", **fast()), [("no-usage", "x")])
    assert (counts["prompt_tokens"], counts["completion_tokens"], counts["usage_unknown"]) == (None, None, 1)
    con.close()


# ---------------------------------------------------------------- progress

LINE = re.compile(r"^judge: (\d+)/(\d+) done \((\d+) failed\), [\d.]+ calls/s, ETA (\S+)$")


def test_progress_lines_appear_while_a_slow_batch_is_judged(tmp_path):
    slow = Server(lambda instruction, body: (200, reply("Perfect." if instruction.startswith("ok") else "",
                                                        usage=USAGE), 0.15))
    try:
        con = warehouse.connect(tmp_path / "w.duckdb")
        lines: list[tuple[float, str]] = []
        pairs = [(f"ok {k}", "r") for k in range(14)] + [("empty", "r"), ("empty 2", "r")]
        judge = OpenAIJudge(slow.base_url, "m", concurrency=2, **fast(max_retries=0))
        start = time.monotonic()
        counts = judges.label_pending(con, judge, pairs, progress=lambda s: lines.append((time.monotonic(), s)),
                                      progress_every_s=0.25)
        end = time.monotonic()
        con.close()
    finally:
        slow.close()

    assert counts["judged"] == 16 and counts["failed"] == 2
    parsed = [(t, LINE.match(s)) for t, s in lines]
    assert all(m for _, m in parsed), lines
    during = [(t, m) for t, m in parsed[:-1] if 0 < int(m[1]) < 16]
    assert during, f"no line while the calls ran: {lines}"
    assert all(int(m[2]) == 16 and start < t < end for t, m in during)
    assert [int(m[1]) for _, m in parsed] == sorted(int(m[1]) for _, m in parsed)  # counts only grow
    last = parsed[-1][1]
    assert (int(last[1]), int(last[2]), int(last[3]), last[4]) == (16, 16, 2, "0s")


def test_progress_of_a_judge_without_per_call_results_counts_by_chunk(tmp_path):
    con = warehouse.connect(tmp_path / "w.duckdb")
    lines: list[str] = []
    judge = judges.FunctionJudge(lambda i, r: None if r == "4" else "Wrong.", name="f")
    judges.label_pending(con, judge, [("a", "4"), ("b", "5"), ("c", "6")], chunk_size=2, progress=lines.append,
                         progress_every_s=60)
    con.close()
    assert lines[-1].startswith("judge: 3/3 done (0 failed), ") and len(lines) == 1


# ---------------------------------------------------------------- through the online flow

def flow_answer(instruction, body):
    """Every generation is judged bad, every held-out answer good, each reply with usage."""
    v = verdict("good", "perfect") if instruction.startswith("held") else verdict("bad", "It is wrong.")
    return 200, reply(v, usage={"prompt_tokens": 30, "completion_tokens": 5}), 0.0


@pytest.mark.slow
def test_online_iteration_logs_judge_usage_to_mlflow(tmp_path, prefect_harness, monkeypatch):
    from mlflow import MlflowClient

    from cut_core.dsl import CUT, Evaluation, LoRA, Model, Online, Pipeline, Training
    from cut_core.models.tiny import make_tiny_model
    from flows.align import online_align
    from tasks import tracking

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    collector = Collect()
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(collector)
    server = Server(flow_answer)
    try:
        monkeypatch.setenv("CUT_ALIGN_MLRUNS", str(tmp_path / "mlruns"))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"instruction": f"gen {k}"}) + "\n"
                                                        for k in range(6)))
        (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"instruction": f"held {k}"}) + "\n"
                                                        for k in range(4)))
        pipeline = Pipeline(
            name="judge-usage", workdir=str(tmp_path / "work"),
            model=Model(path=str(make_tiny_model(tmp_path / "tiny")), max_length=96),
            judge=dsl.OpenAIJudge(base_url=server.base_url, model="judge", response_format="json",
                                  max_retries=0, concurrency=4),
            objective=CUT(threshold=1.1, alpha=1.0), adapter=LoRA(r=4, alpha=8),
            training=Training(learning_rate=1e-3, micro_batch_size=4, gradient_accumulation=1, warmup_steps=0,
                              save_steps=1000, logging_steps=1),
            online=Online(iterations=1, prompts=str(tmp_path / "prompts.jsonl"), prompts_per_iteration=6,
                          max_new_tokens=4, generation_batch_size=6),
            evaluation=Evaluation(heldout=str(tmp_path / "heldout.jsonl"), max_prompts=4, max_new_tokens=4,
                                  samples=2, min_judged=2),
        )
        online_align(pipeline.to_json(), pipeline.name)
    finally:
        server.close()
        for logger in loggers:
            logger.removeHandler(collector)

    assert all(r["response_format"]["type"] == "json_schema" and r["max_tokens"] == 512 for r in server.requests)
    client = MlflowClient(tracking.tracking_uri())
    (iteration,) = [r for r in client.search_runs([client.get_experiment_by_name("judge-usage").experiment_id])
                    if r.data.tags.get("cut_align.iteration") == "1"]
    m = iteration.data.metrics
    judged = int(m["judge.judged"])
    assert judged >= 1  # distinct generations (a tiny model may repeat itself)
    assert (m["judge.prompt_tokens"], m["judge.completion_tokens"], m["judge.usage_unknown"]) == \
        (30 * judged, 5 * judged, 0)
    assert (m["eval.judge_prompt_tokens"], m["eval.judge_completion_tokens"], m["eval.judge_usage_unknown"]) == \
        (120, 20, 0)
    assert any(LINE.match(line) and line.startswith(f"judge: {judged}/{judged} done") for line in collector.lines), \
        [line for line in collector.lines if line.startswith("judge")]
