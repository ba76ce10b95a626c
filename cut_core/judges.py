"""Judges: who turns (instruction, response) into a natural-language judgment.

The protocol (docs/architecture.md) is deliberately small: a judge has a `name` (its identity
in the warehouse cache) and `judge_batch(items) -> list[JudgeResult]`, one result per item, in
order. Three implementations cover the cases the paper and its users need:

  FunctionJudge      a Python function (a rule or a verifier): f(instruction, response) -> text
  TransformersJudge  a local causal LM prompted with a judge template (greedy decoding)
  OpenAIJudge        any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, Ollama, TGI)

The one rule every judge obeys: a failed or unparseable call is a *failure* (status 'failed',
polarity None, judgment None), never a negative judgment. The paper's released online data stored
failed GPT-4 calls as the text `$ERROR$` and trained on them as negatives (METHOD.md §6); here a
failure leaves the row unlabeled, so it is never trained on.

The bottom of the file is labeling against the warehouse: `label_pending` judges what is not yet
judged and caches the results in `judgments`; `apply_judgments` copies them onto unlabeled
`triplets`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import httpx

from cut_core import dsl
from cut_core.warehouse import content_key

log = logging.getLogger(__name__)

POSITIVE = "positive"
NEGATIVE = "negative"
DEFAULT_POSITIVE_PREFIXES = ("Perfect",)
# Stripped from the front of a judgment before the prefix test: LLM judges often quote or
# embolden their one-word verdict ("'Perfect.'", "**Perfect**").
_LEADING_NOISE = " \t\r\n\"'`*_“”‘’«»"


# ---------------------------------------------------------------- the protocol

@dataclass
class JudgeResult:
    judgment: str | None      # the text; None when failed (or a text-less positive of a function judge)
    polarity: str | None      # "positive" | "negative" | None when failed
    status: str               # "ok" | "failed"
    error: str | None = None
    attempts: int = 1


class Judge(Protocol):
    name: str                 # identity used as the cache key in the warehouse

    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]: ...


def polarity_of(judgment: str | None, positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES) -> str:
    """'positive' when the judgment starts with a positive prefix (case-insensitive), else 'negative'.

    A missing or empty judgment is positive: a function judge says "nothing wrong" by returning
    None. LLM judges never get here with an empty text; that is a failed call (see `_ok_text`).
    """
    text = (judgment or "").lstrip(_LEADING_NOISE).casefold()
    if not text:
        return POSITIVE
    return POSITIVE if any(text.startswith(p.casefold()) for p in positive_prefixes) else NEGATIVE


def _ok(judgment: str | None, prefixes: Sequence[str], attempts: int = 1) -> JudgeResult:
    judgment = judgment.strip() if judgment is not None else None
    return JudgeResult(judgment=judgment or None, polarity=polarity_of(judgment, prefixes),
                       status="ok", attempts=attempts)


def _failed(error: str, attempts: int = 1) -> JudgeResult:
    return JudgeResult(judgment=None, polarity=None, status="failed", error=error, attempts=attempts)


def _ok_text(text: str | None, prefixes: Sequence[str], attempts: int, what: str) -> JudgeResult:
    """A language-model judge's output: empty or missing text is unparseable, hence a failure."""
    if not isinstance(text, str) or not text.strip():
        return _failed(f"{what} returned an empty judgment", attempts)
    return _ok(text, prefixes, attempts)


def _fill(template: str, instruction: str, response: str) -> str:
    # str.replace, not str.format: instructions, responses and user templates may contain braces.
    return template.replace("{instruction}", instruction).replace("{response}", response)


def _identity(*parts: Any) -> str:
    """A short digest of the settings that change what a judge says (prompts, decoding)."""
    return content_key(*(str(p) for p in parts))[:10]


# ---------------------------------------------------------------- FunctionJudge

class FunctionJudge:
    """A Python function f(instruction, response) -> judgment text, or None/'' for "positive".

    An exception inside f is a failed result (the verifier broke), not a negative judgment.
    """

    def __init__(self, fn: Callable[[str, str], str | None] | str, *, name: str | None = None,
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES):
        if isinstance(fn, str):
            name = name or fn
            fn = dsl.import_callable(fn)
        self.fn = fn
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)  # callable objects have none
        self.name = name or f"function:{getattr(fn, '__module__', '?')}:{qualname}"
        self.positive_prefixes = tuple(positive_prefixes)

    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]:
        results = []
        for instruction, response in items:
            try:
                out = self.fn(instruction, response)
            except Exception as err:  # noqa: BLE001 - any failure of user code is a failed judgment
                results.append(_failed(f"{type(err).__name__}: {err}"))
                continue
            if out is not None and not isinstance(out, str):
                results.append(_failed(f"judge function returned {type(out).__name__}, expected str or None"))
                continue
            results.append(_ok(out, self.positive_prefixes))
        return results


# ---------------------------------------------------------------- TransformersJudge

class TransformersJudge:
    """A local causal LM that writes the judgment after a prompt template (greedy, batched).

    The model loads on first use, so building a judge (e.g. to read its name) costs nothing.
    Pass `model` and `tokenizer` to reuse ones already in memory.
    """

    def __init__(self, model_path: str | None = None, *, prompt: str, max_new_tokens: int = 128,
                 batch_size: int = 8, name: str | None = None, model: Any = None, tokenizer: Any = None,
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES):
        if model_path is None and (model is None or tokenizer is None):
            raise ValueError("TransformersJudge needs model_path, or both model and tokenizer")
        self.model_path, self.prompt = model_path, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.model, self.tokenizer = model, tokenizer
        self.positive_prefixes = tuple(positive_prefixes)
        self.name = name or f"transformers:{model_path or type(model).__name__}#{_identity(prompt, max_new_tokens)}"

    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]:
        if not items:
            return []
        from cut_core.generate import generate_texts, load_model  # torch only when a model judges

        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_path)
        prompts = [_fill(self.prompt, i, r) for i, r in items]
        try:
            texts = generate_texts(self.model, self.tokenizer, prompts,
                                   max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        except Exception as err:  # noqa: BLE001 - e.g. CUDA OOM: a failed batch, not negatives
            return [_failed(f"{type(err).__name__}: {err}") for _ in items]
        return [_ok_text(t, self.positive_prefixes, 1, "judge model") for t in texts]


# ---------------------------------------------------------------- OpenAIJudge

class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that another attempt would not fix (4xx other than 429, a malformed body)."""


class OpenAIJudge:
    """Any OpenAI-compatible /chat/completions endpoint, called with bounded concurrency.

    Retries with exponential backoff and jitter on 429, 5xx, timeouts and connection errors,
    honouring a Retry-After header; no retry on other 4xx (a bad key or request stays bad) or on
    a malformed body. Every failure ends as a failed JudgeResult carrying the attempt count.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 system_prompt: str = dsl.PAPER_JUDGE_SYSTEM_PROMPT,
                 user_prompt: str = dsl.PAPER_JUDGE_USER_PROMPT,
                 concurrency: int = 8, max_retries: int = 5, timeout_s: float = 60.0,
                 temperature: float = 0.0, max_tokens: int | None = None, name: str | None = None,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 retry_after_max_s: float = 300.0,
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.system_prompt, self.user_prompt = system_prompt, user_prompt
        self.concurrency, self.max_retries, self.timeout_s = concurrency, max_retries, timeout_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.positive_prefixes = tuple(positive_prefixes)
        # The prompts and temperature are part of the identity: changing them must re-label
        # rather than reuse judgments written under another prompt.
        self.name = name or (f"openai:{base_url.rstrip('/')}|{model}"
                             f"#{_identity(system_prompt, user_prompt, temperature, max_tokens)}")

    # -- sync entry point (the protocol is synchronous; the fan-out inside is asyncio)
    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]:
        if not items:
            return []
        coro_factory = lambda: self._judge_all(items)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        # Called from inside a running event loop (an async Prefect task, a notebook):
        # asyncio.run would refuse, so run our loop in a worker thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(coro_factory())).result()

    async def _judge_all(self, items: list[tuple[str, str]]) -> list[JudgeResult]:
        semaphore = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout_s),
                                     limits=limits) as client:
            async def one(item: tuple[str, str]) -> JudgeResult:
                async with semaphore:
                    return await self._judge_one(client, *item)

            return list(await asyncio.gather(*(one(item) for item in items)))

    def _payload(self, instruction: str, response: str) -> dict:
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.system_prompt},
                         {"role": "user", "content": _fill(self.user_prompt, instruction, response)}],
            "temperature": self.temperature,
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        return payload

    async def _judge_one(self, client: httpx.AsyncClient, instruction: str, response: str) -> JudgeResult:
        payload = self._payload(instruction, response)
        attempts = 0
        while True:
            attempts += 1
            try:
                text = await self._call(client, payload)
                return _ok_text(text, self.positive_prefixes, attempts, "endpoint")
            except _Fatal as err:
                return _failed(str(err), attempts)
            except _Retryable as err:
                if attempts > self.max_retries:
                    return _failed(f"{err} (gave up after {attempts} attempts)", attempts)
                await asyncio.sleep(self._delay(attempts, err.retry_after))

    async def _call(self, client: httpx.AsyncClient, payload: dict) -> str | None:
        """One HTTP attempt: the judgment text, or _Retryable / _Fatal."""
        try:
            resp = await client.post(self.url, json=payload)
        except httpx.TimeoutException as err:
            raise _Retryable(f"timeout after {self.timeout_s}s ({type(err).__name__})") from None
        except httpx.TransportError as err:  # connection refused/reset, protocol errors
            raise _Retryable(f"connection error: {type(err).__name__}: {err}") from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}",
                             _retry_after(resp.headers.get("retry-after")))
        if resp.status_code >= 400:
            raise _Fatal(f"HTTP {resp.status_code} (not retried): {resp.text[:200]}")
        try:
            body = resp.json()
            return body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise _Fatal(f"malformed response body ({type(err).__name__}): {resp.text[:200]!r}") from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best when it can take us again
            return min(retry_after, self.retry_after_max_s)
        # Exponential backoff with "equal jitter": spreads out clients that failed together.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


def _retry_after(value: str | None) -> float | None:
    """Retry-After is either delay-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------- building from the DSL

def build_judge(spec: dsl.FunctionJudge | dsl.TransformersJudge | dsl.OpenAIJudge, *,
                secret_resolver: Callable[[str], str] | None = None,
                positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES, **overrides: Any) -> Judge:
    """Build a judge from a DSL judge section.

    `secret_resolver(name) -> value` resolves `api_key_secret` (the tasks layer passes one that
    loads a Prefect Secret block; cut_core itself never imports prefect). `overrides` reach the
    implementation's constructor (e.g. `backoff_base_s` for fast tests, `batch_size`).
    """
    if isinstance(spec, dsl.FunctionJudge):
        return FunctionJudge(spec.callable, name=spec.name, positive_prefixes=positive_prefixes, **overrides)
    if isinstance(spec, dsl.TransformersJudge):
        return TransformersJudge(spec.model_path, prompt=spec.prompt, max_new_tokens=spec.max_new_tokens,
                                 name=spec.name, positive_prefixes=positive_prefixes, **overrides)
    if isinstance(spec, dsl.OpenAIJudge):
        api_key = None
        if spec.api_key_secret:
            if secret_resolver is None:
                raise ValueError(f"judge.api_key_secret={spec.api_key_secret!r} needs a secret_resolver "
                                 "(run through the Prefect tasks, or set judge.api_key_env instead)")
            api_key = secret_resolver(spec.api_key_secret)
        elif spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                # Local servers (vLLM, Ollama) need no key; a hosted API will answer 401,
                # which is recorded as failed judgments, so say why up front.
                log.warning("environment variable %s is not set; calling %s without an API key",
                            spec.api_key_env, spec.base_url)
        return OpenAIJudge(spec.base_url, spec.model, api_key=api_key, system_prompt=spec.system_prompt,
                           user_prompt=spec.user_prompt, concurrency=spec.concurrency,
                           max_retries=spec.max_retries, timeout_s=spec.timeout_s,
                           temperature=spec.temperature, name=spec.name,
                           positive_prefixes=positive_prefixes, **overrides)
    raise TypeError(f"not a judge section: {type(spec).__name__}")


# ---------------------------------------------------------------- labeling against the warehouse

def _pairs(rows: Iterable[tuple[str, str] | Mapping[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        if isinstance(row, Mapping):
            out.append((row["instruction"], row["response"]))
        else:
            instruction, response = row
            out.append((instruction, response))
    return out


def label_pending(con, judge: Judge, rows: Iterable[tuple[str, str] | Mapping[str, Any]], *,
                  chunk_size: int = 256, retry_failed: bool = True) -> dict[str, int]:
    """Judge every (instruction, response) not yet judged OK by this judge; cache in `judgments`.

    The cache key is (judge.name, content_key(instruction, response)), so a rerun judges nothing
    that already has an OK judgment. Rows whose earlier call *failed* are sent again when
    `retry_failed` (the default): a failure is a missing judgment, not an answer. Results are
    written after every chunk, so an interrupted run keeps what it paid for.

    Counts (distinct pairs): requested, cached (already OK), retried (previously failed, sent
    again), judged (sent to the judge now) = ok + failed; positives + negatives = ok.
    """
    pairs = list(dict.fromkeys(_pairs(rows)))  # distinct, first-seen order
    keyed = {content_key(i, r): (i, r) for i, r in pairs}
    counts = dict(requested=len(keyed), cached=0, retried=0, judged=0, ok=0, failed=0,
                  positives=0, negatives=0)
    if not keyed:
        return counts

    status = _existing_status(con, judge.name, list(keyed))
    counts["cached"] = sum(1 for s in status.values() if s == "ok")
    todo = [k for k in keyed if status.get(k) != "ok" and (retry_failed or k not in status)]
    counts["retried"] = sum(1 for k in todo if status.get(k) == "failed")

    for start in range(0, len(todo), chunk_size):
        keys = todo[start:start + chunk_size]
        results = judge.judge_batch([keyed[k] for k in keys])
        if len(results) != len(keys):
            raise RuntimeError(f"judge {judge.name} returned {len(results)} results for {len(keys)} items")
        _store(con, judge.name, [(k, *keyed[k], res) for k, res in zip(keys, results)])
        counts["judged"] += len(keys)
        for res in results:
            counts["ok" if res.status == "ok" else "failed"] += 1
            if res.status == "ok":
                counts["positives" if res.polarity == POSITIVE else "negatives"] += 1
    return counts


def _existing_status(con, judge_name: str, keys: list[str]) -> dict[str, str]:
    import pyarrow as pa

    con.register("_label_keys", pa.table({"key": keys}))
    try:
        found = con.execute(
            "SELECT j.key, j.status FROM judgments j JOIN _label_keys k ON j.key = k.key WHERE j.judge = ?",
            [judge_name]).fetchall()
    finally:
        con.unregister("_label_keys")
    return dict(found)


def _store(con, judge_name: str, rows: list[tuple[str, str, str, JudgeResult]]) -> None:
    import pyarrow as pa

    table = pa.table({
        "judge": [judge_name] * len(rows),
        "key": [r[0] for r in rows],
        "instruction": [r[1] for r in rows],
        "response": [r[2] for r in rows],
        # A failed result never carries a judgment or polarity into the table, whatever it holds.
        "judgment": [r[3].judgment if r[3].status == "ok" else None for r in rows],
        "polarity": [r[3].polarity if r[3].status == "ok" else None for r in rows],
        "status": ["ok" if r[3].status == "ok" else "failed" for r in rows],
        "error": [r[3].error for r in rows],
        "attempts": pa.array([r[3].attempts for r in rows], pa.int32()),
    })
    con.register("_label_batch", table)
    try:
        # Replacing is safe: only keys without an OK judgment are ever judged, so this overwrites
        # at most an earlier failure.
        con.execute("""
            INSERT OR REPLACE INTO judgments
                (judge, key, instruction, response, judgment, polarity, status, error, attempts, judged_at)
            SELECT judge, key, instruction, response, judgment, polarity, status, error, attempts,
                   current_timestamp
            FROM _label_batch""")
    finally:
        con.unregister("_label_batch")


def unlabeled_triplets(con, *, sources: Sequence[str] | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """(instruction, response) of the triplets that await a judge (polarity NULL).

    sources: only triplets ingested from these files (the `source` column), when given.
    """
    sql, params = "SELECT DISTINCT instruction, response FROM triplets WHERE polarity IS NULL", []
    if sources is not None:
        sql, params = sql + " AND list_contains(?, source)", [list(sources)]
    sql += " ORDER BY instruction, response"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [tuple(r) for r in con.execute(sql, params).fetchall()]


def apply_judgments(con, judge_name: str) -> int:
    """Copy OK judgments of `judge_name` onto unlabeled triplets; returns how many were labeled.

    Joined on the text itself (the judgments table keeps instruction and response), so no hash has
    to be recomputed in SQL. A failed judgment matches nothing here: its triplet stays unlabeled
    (polarity NULL) and is not trained on until a later run judges it.
    """
    rows = con.execute("""
        UPDATE triplets AS t
        SET judgment = j.judgment, polarity = j.polarity
        FROM judgments AS j
        WHERE t.polarity IS NULL
          AND j.judge = ? AND j.status = 'ok'
          AND j.instruction = t.instruction AND j.response = t.response""", [judge_name]).fetchall()
    return int(rows[0][0]) if rows else 0
