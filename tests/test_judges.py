"""Judges and labeling, against real components.

Proves that:
- the real OpenAIJudge (httpx) talking to a real HTTP server on 127.0.0.1 parses positive and
  negative judgments, sends the paper's prompt and the API key (as Bearer, from the env var);
  retries 429 (honouring Retry-After), 5xx, timeouts and refused connections with backoff, gives up
  after max_retries and records a *failure*; does not retry a 400 or a malformed body; never runs
  more requests at once than `concurrency`;
- polarity follows the "starts with Perfect" rule (case-insensitive, quotes stripped);
- a FunctionJudge that raises gives a failed result, not a negative; 'module:function' imports;
- build_judge reads the DSL, the API key env var, and a secret resolver for api_key_secret;
- labeling through a real DuckDB warehouse file labels exactly what it judged, a rerun judges
  nothing, failures are stored as 'failed' (never negatives), leave their triplet unlabeled, and
  are retried by the next run; the Prefect tasks `label_unlabeled` (offline) and `judge_pairs`
  (online generations -> triplets) do the same end to end and stop loudly when most calls fail.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cut_core import dsl, judge as judges
from cut_core.data import warehouse
from cut_core.judge import FunctionJudge, JudgeResult, OpenAIJudge, build_judge, polarity_of


# ---------------------------------------------------------------- a scripted OpenAI-compatible server

def _completion(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


class ScriptedServer:
    """Answers /chat/completions according to the instruction text inside the user message.

    Keying the behaviour on the request content (not on arrival order) keeps the script
    deterministic when requests run concurrently.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                instruction = body["messages"][1]["content"].split("### Instruction: ", 1)[1].split("\n\n", 1)[0]
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    n = server.calls[instruction] = server.calls.get(instruction, 0) + 1
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    status, headers, payload, delay = server.script(instruction, n)
                    time.sleep(delay)
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @staticmethod
    def script(instruction: str, n: int):
        """(status, headers, body, delay) for the n-th request carrying this instruction."""
        if instruction == "rate-limited":
            if n == 1:
                return 429, {"Retry-After": "0.3"}, b'{"error": "slow down"}', 0.0
            return 200, {}, _completion("Perfect"), 0.0
        if instruction == "server-error":
            return 500, {}, b'{"error": "boom"}', 0.0
        if instruction == "bad-request":
            return 400, {}, b'{"error": "context length exceeded"}', 0.0
        if instruction == "slow":
            return 200, {}, _completion("Perfect"), 1.0
        if instruction == "busy":
            return 200, {}, _completion("Perfect"), 0.1
        if instruction == "not-json":
            return 200, {}, b"<html>gateway says hi</html>", 0.0
        if instruction == "no-choices":
            return 200, {}, b'{"choices": []}', 0.0
        if instruction == "no-message":
            return 200, {}, b'{"choices": [{"index": 0}]}', 0.0
        if instruction == "empty-content":
            return 200, {}, _completion(""), 0.0
        if instruction == "null-content":
            return 200, {}, _completion(None), 0.0
        if instruction.startswith("good"):
            return 200, {}, _completion('"Perfect."'), 0.0
        if instruction.startswith("bad"):
            return 200, {}, _completion("The answer is wrong: 2 + 2 is 4, not 5."), 0.0
        raise AssertionError(f"unscripted instruction {instruction!r}")


@pytest.fixture
def server():
    s = ScriptedServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _judge(server, **kw) -> OpenAIJudge:
    kw = {"api_key": "sk-test", "max_retries": 3, "timeout_s": 5.0, "backoff_base_s": 0.01,
          "backoff_max_s": 0.05, **kw}
    return OpenAIJudge(server.base_url, "judge-model", **kw)


# ---------------------------------------------------------------- OpenAIJudge over HTTP

def test_positive_and_negative_judgments_with_the_papers_prompt(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-from-env")
    judge = build_judge(dsl.OpenAIJudge(base_url=server.base_url, model="judge-model",
                                        api_key_env="MY_JUDGE_KEY"))
    good, bad = judge.judge_batch([("good: add 2 and 2", "4"), ("bad: add 2 and 2", "5")])

    # This server reports no `usage`: the reply's tokens are unknown (counted), not zero.
    assert good == JudgeResult(judgment='"Perfect."', polarity="positive", status="ok", attempts=1,
                               prompt_tokens=None, completion_tokens=None, usage_unknown=1)
    assert bad.status == "ok" and bad.polarity == "negative" and bad.attempts == 1
    assert bad.judgment == "The answer is wrong: 2 + 2 is 4, not 5."

    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-from-env"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    system, user = req["body"]["messages"]
    assert system == {"role": "system", "content": dsl.PAPER_JUDGE_SYSTEM_PROMPT}
    assert user["role"] == "user"
    assert user["content"] in ("### Instruction: good: add 2 and 2\n\n### Response: 4",
                               "### Instruction: bad: add 2 and 2\n\n### Response: 5")


def test_429_is_retried_honouring_retry_after(server):
    start = time.monotonic()
    [res] = _judge(server).judge_batch([("rate-limited", "r")])
    assert res.status == "ok" and res.polarity == "positive" and res.attempts == 2
    assert time.monotonic() - start >= 0.3  # waited the server's Retry-After, not the 10 ms backoff
    assert server.calls["rate-limited"] == 2


def test_5xx_until_retries_run_out_is_a_counted_failure(server):
    results = _judge(server, max_retries=2).judge_batch([("server-error", "r"), ("good", "r")])
    failed, ok = results
    assert failed.status == "failed" and failed.polarity is None and failed.judgment is None
    assert failed.attempts == 3 and "HTTP 500" in failed.error
    assert server.calls["server-error"] == 3
    assert ok.status == "ok"  # one failing item does not poison the batch


def test_400_is_not_retried(server):
    [res] = _judge(server, max_retries=5).judge_batch([("bad-request", "r")])
    assert res.status == "failed" and res.attempts == 1 and "HTTP 400" in res.error
    assert server.calls["bad-request"] == 1


@pytest.mark.parametrize("case", ["not-json", "no-choices", "no-message", "empty-content", "null-content"])
def test_malformed_body_is_a_failure_not_a_negative(server, case):
    [res] = _judge(server).judge_batch([(case, "r")])
    assert (res.status, res.polarity, res.judgment, res.attempts) == ("failed", None, None, 1)
    assert server.calls[case] == 1


def test_timeout_is_retried_then_fails(server):
    start = time.monotonic()
    [res] = _judge(server, timeout_s=0.2, max_retries=1).judge_batch([("slow", "r")])
    assert res.status == "failed" and res.attempts == 2 and "timeout" in res.error
    assert time.monotonic() - start < 1.5  # two attempts, neither waited for the 1 s answer
    assert server.calls["slow"] == 2


def test_refused_connection_is_retried_then_fails(server):
    server.httpd.shutdown()
    server.httpd.server_close()  # nothing listens on the port any more
    [res] = _judge(server, max_retries=2).judge_batch([("good", "r")])
    assert res.status == "failed" and res.attempts == 3 and "connection error" in res.error


def test_concurrency_bound_is_respected(server):
    items = [("busy", f"response {i}") for i in range(7)]
    results = _judge(server, concurrency=3).judge_batch(items)
    assert all(r.status == "ok" for r in results)
    assert 2 <= server.max_in_flight <= 3  # overlapped, but never beyond the bound


def test_judge_batch_works_inside_a_running_event_loop(server):
    import asyncio

    async def from_async_code():  # e.g. an async Prefect task or a notebook cell
        return _judge(server).judge_batch([("good", "r")])

    assert asyncio.run(from_async_code())[0].status == "ok"


def test_no_key_sends_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("UNSET_KEY_VAR", raising=False)
    judge = build_judge(dsl.OpenAIJudge(base_url=server.base_url, model="m", api_key_env="UNSET_KEY_VAR"))
    assert judge.judge_batch([("good", "r")])[0].status == "ok"
    assert "Authorization" not in server.requests[0]["headers"]


# ---------------------------------------------------------------- polarity, FunctionJudge, build_judge

@pytest.mark.parametrize("text, expected", [
    ("Perfect", "positive"), ("perfect.", "positive"), ('  "Perfect."  ', "positive"),
    ("'perfect'", "positive"), ("**Perfect**", "positive"), ("PERFECT!", "positive"),
    (None, "positive"), ("", "positive"),
    ("The response is perfect", "negative"), ("Not perfect: the sum is wrong", "negative"),
])
def test_polarity_rule(text, expected):
    assert polarity_of(text) == expected


def test_polarity_prefixes_are_configurable():
    assert polarity_of("Correct.", ["Correct", "Perfect"]) == "positive"
    assert polarity_of("Perfect", ["Correct"]) == "negative"


def test_function_judge_failures_are_not_negatives():
    def verifier(instruction: str, response: str) -> str | None:
        if instruction == "crash":
            raise ZeroDivisionError("verifier bug")
        if instruction == "wrong-type":
            return 42  # type: ignore[return-value]
        return None if response == "4" else f"Wrong: expected 4, got {response}."

    judge = FunctionJudge(verifier)
    assert judge.name.endswith("verifier")
    assert FunctionJudge(CountingVerifier()).name.endswith(":CountingVerifier")  # a callable object
    ok, neg, crash, wrong_type = judge.judge_batch(
        [("2+2", "4"), ("2+2", "5"), ("crash", "x"), ("wrong-type", "x")])
    assert (ok.status, ok.polarity, ok.judgment) == ("ok", "positive", None)
    assert (neg.status, neg.polarity, neg.judgment) == ("ok", "negative", "Wrong: expected 4, got 5.")
    assert (crash.status, crash.polarity, crash.judgment) == ("failed", None, None)
    assert "ZeroDivisionError" in crash.error
    assert wrong_type.status == "failed"


def test_function_judge_from_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(
        "def check(instruction, response):\n    return 'Perfect' if response == 'yes' else 'No.'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = build_judge(dsl.FunctionJudge(callable="my_verifier:check"))
    assert judge.name == "my_verifier:check"
    assert [r.polarity for r in judge.judge_batch([("q", "yes"), ("q", "no")])] == ["positive", "negative"]
    with pytest.raises(ValueError, match="no callable"):
        build_judge(dsl.FunctionJudge(callable="my_verifier:missing"))


def test_build_judge_resolves_secret_and_names_by_prompt():
    spec = dsl.OpenAIJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key_secret="judge-key")
    with pytest.raises(ValueError, match="secret_resolver"):
        build_judge(spec)
    judge = build_judge(spec, secret_resolver={"judge-key": "sk-secret"}.__getitem__)
    assert judge.api_key == "sk-secret"
    other_prompt = build_judge(spec.model_copy(update={"system_prompt": "Grade it."}),
                               secret_resolver=lambda name: "k")
    assert judge.name != other_prompt.name  # a new prompt must not reuse cached judgments
    assert build_judge(spec.model_copy(update={"name": "gpt4"}), secret_resolver=lambda n: "k").name == "gpt4"


# ---------------------------------------------------------------- labeling through a DuckDB file

def _insert_triplets(con, pairs, polarity=None):
    for n, (instruction, response) in enumerate(pairs):
        con.execute("INSERT INTO triplets (id, instruction, response, judgment, polarity, batch, source, row_number) "
                    "VALUES (?, ?, ?, NULL, ?, 'b0', 'test', ?)",
                    [warehouse.content_key(instruction, response, None), instruction, response, polarity, n])


class CountingVerifier:
    """Verifier judge: says 'Perfect' when the response is the sum; fails on instructions in `broken`."""

    def __init__(self, broken=()):
        self.seen: list[tuple[str, str]] = []
        self.broken = set(broken)

    def __call__(self, instruction, response):
        self.seen.append((instruction, response))
        if instruction in self.broken:
            raise TimeoutError("verifier backend down")
        a, b = map(int, instruction.split("+"))
        return "Perfect" if response == str(a + b) else f"Wrong: {a}+{b} is {a + b}."


def test_labeling_caches_and_never_stores_failures_as_negatives(tmp_path):
    db = tmp_path / "warehouse.duckdb"
    pairs = [("1+1", "2"), ("2+2", "5"), ("3+3", "6"), ("4+4", "9"), ("5+5", "10")]
    con = warehouse.connect(db)
    _insert_triplets(con, pairs)
    _insert_triplets(con, [("9+9", "18")], polarity="positive")  # already labeled: not pending

    verifier = CountingVerifier(broken={"3+3"})
    judge = FunctionJudge(verifier, name="verifier")
    pending = judges.unlabeled_triplets(con)
    assert sorted(pending) == sorted(pairs)

    counts = judges.label_pending(con, judge, pending + pending[:2], chunk_size=2)  # duplicates collapse
    assert counts == dict(requested=5, cached=0, retried=0, judged=5, ok=4, failed=1, positives=2, negatives=2, prompt_tokens=None, completion_tokens=None, usage_unknown=0)
    labeled = judges.apply_judgments(con, judge.name)
    assert labeled == counts["ok"] == 4
    con.close()

    con = warehouse.connect(db)  # reopen: everything went through the file
    stored = dict(((i, s), (p, st)) for i, s, p, st in con.execute(
        "SELECT instruction, response, polarity, status FROM judgments WHERE judge = 'verifier'").fetchall())
    assert stored[("3+3", "6")] == (None, "failed")
    assert con.execute("SELECT count(*) FROM judgments WHERE status = 'failed' AND (polarity IS NOT NULL "
                       "OR judgment IS NOT NULL)").fetchall() == [(0,)]
    triplets = dict(((i, r), p) for i, r, p in con.execute(
        "SELECT instruction, response, polarity FROM triplets").fetchall())
    assert triplets[("3+3", "6")] is None  # failed: stays unlabeled, so it is not trained on
    assert triplets[("2+2", "5")] == "negative" and triplets[("1+1", "2")] == "positive"
    neg = con.execute("SELECT judgment FROM triplets WHERE instruction = '4+4'").fetchall()
    assert neg == [("Wrong: 4+4 is 8.",)]

    # Rerun with the backend healthy: only the failed row is judged again.
    verifier.broken.clear()
    verifier.seen.clear()
    counts = judges.label_pending(con, judge, judges.unlabeled_triplets(con) + pairs)
    assert verifier.seen == [("3+3", "6")]
    assert counts == dict(requested=5, cached=4, retried=1, judged=1, ok=1, failed=0, positives=1, negatives=0, prompt_tokens=None, completion_tokens=None, usage_unknown=0)
    assert judges.apply_judgments(con, judge.name) == 1
    assert judges.unlabeled_triplets(con) == []

    # A third run has nothing to do.
    verifier.seen.clear()
    counts = judges.label_pending(con, judge, pairs)
    assert verifier.seen == [] and counts["judged"] == 0 and counts["cached"] == 5
    assert judges.apply_judgments(con, judge.name) == 0
    con.close()


def test_labeling_over_http_counts_failures(tmp_path, server):
    con = warehouse.connect(tmp_path / "w.duckdb")
    pairs = [("good 1", "r"), ("bad 1", "r"), ("server-error", "r"), ("not-json", "r")]
    _insert_triplets(con, pairs)
    judge = _judge(server, max_retries=1)
    counts = judges.label_pending(con, judge, judges.unlabeled_triplets(con))
    # Three 2xx replies without `usage` (good, bad, not-json); the 500s are no reply at all.
    assert counts == dict(requested=4, cached=0, retried=0, judged=4, ok=2, failed=2, positives=1, negatives=1,
                          prompt_tokens=None, completion_tokens=None, usage_unknown=3)
    assert judges.apply_judgments(con, judge.name) == 2
    attempts = dict(con.execute("SELECT instruction, attempts FROM judgments WHERE status = 'failed'").fetchall())
    assert attempts == {"server-error": 2, "not-json": 1}
    con.close()


def _pipeline(tmp_path, callable_path: str) -> dsl.Pipeline:
    return dsl.Pipeline(name="label-test", workdir=str(tmp_path), judge=dsl.FunctionJudge(callable=callable_path))


@pytest.fixture
def sum_verifier(tmp_path, monkeypatch):
    (tmp_path / "sum_verifier.py").write_text(
        "def check(instruction, response):\n"
        "    if instruction == 'crash':\n"
        "        raise RuntimeError('verifier down')\n"
        "    a, b = map(int, instruction.split('+'))\n"
        "    return None if response == str(a + b) else 'Wrong.'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "sum_verifier:check"


def test_label_unlabeled_task(tmp_path, sum_verifier):
    from tasks.label import TooManyFailedJudgments, label_unlabeled

    db = str(tmp_path / "w.duckdb")
    con = warehouse.connect(db)
    _insert_triplets(con, [("1+1", "2"), ("2+2", "5"), ("crash", "x")])
    con.execute("UPDATE triplets SET source = 'other.jsonl' WHERE instruction = '2+2'")
    con.close()

    pipeline = _pipeline(tmp_path, sum_verifier)
    counts = label_unlabeled.fn(pipeline, db, ["test"])  # only the rows from source 'test'
    assert (counts["judged"], counts["ok"], counts["failed"], counts["labeled"]) == (2, 1, 1, 1)
    again = label_unlabeled.fn(pipeline, db, ["test"], max_failed_rate=1.0)  # the failed one, retried
    assert (again["requested"], again["cached"], again["retried"], again["judged"]) == (1, 0, 1, 1)
    with pytest.raises(TooManyFailedJudgments, match="1 of 1 judge calls failed"):
        label_unlabeled.fn(pipeline, db, ["test"])  # most calls failed: the flow must stop
    counts = label_unlabeled.fn(pipeline, db)  # all sources: now the other file's row too
    assert counts["labeled"] == 1 and counts["negatives"] == 1


def test_judge_pairs_task_adds_triplets_failures_unlabeled(tmp_path, sum_verifier):
    import polars as pl

    from tasks.label import judge_pairs

    db = str(tmp_path / "w.duckdb")
    warehouse.connect(db).close()
    generations = tmp_path / "generations.parquet"
    pl.DataFrame({"prompt_index": [7, 8, 9], "instruction": ["1+1", "2+2", "crash"],
                  "response": ["2", "5", "x"]}).write_parquet(generations)

    counts = judge_pairs.fn(_pipeline(tmp_path, sum_verifier), db, str(generations), "run/iter-1",
                            str(tmp_path / "stage"))
    assert (counts["judged"], counts["labeled"], counts["unlabeled"], counts["triplets_added"]) == (3, 2, 1, 3)
    con = warehouse.connect(db)
    rows = con.execute("SELECT instruction, polarity, judgment, batch, row_number FROM triplets "
                       "ORDER BY row_number").fetchall()
    assert rows == [("1+1", "positive", None, "run/iter-1", 7), ("2+2", "negative", "Wrong.", "run/iter-1", 8),
                    ("crash", None, None, "run/iter-1", 9)]
    con.close()
    stored = pl.read_parquet(counts["path"])
    assert stored["status"].to_list() == ["ok", "ok", "failed"]
