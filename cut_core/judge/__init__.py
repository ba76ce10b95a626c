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

An OpenAIJudge caps replies at max_tokens (DEFAULT_JUDGE_MAX_TOKENS), reads the free-text reply
by the prefix rule (the paper's protocol, the default) or, with response_format="json", asks for
JUDGMENT_SCHEMA and labels by its verdict (polarity.verdict_label); every result carries the
token usage its replies reported (None: unknown).

The bottom of the file is labeling against the warehouse: `label_pending` judges what is not yet
judged and caches the results in `judgments`; `apply_judgments` copies them onto unlabeled
`triplets`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import inspect
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import httpx

from cut_core import dsl
from cut_core.data.warehouse import (apply_judgments, content_key, judgment_status, store_judgments,  # noqa: F401
                                unlabeled_triplets)

log = logging.getLogger(__name__)

# The one polarity rule, shared with ingest (cut_core/data/polarity.py): a quoted '"Perfect."' is
# positive from a judge and from a file alike.
# A judge that answers with a failure marker (`$ERROR$`, whole text) reports its own failure: the
# same rule as ingest's (polarity.is_failed_marker).
from cut_core.data.polarity import (DEFAULT_FAILED_MARKERS, DEFAULT_POSITIVE_PREFIXES, NEGATIVE,  # noqa: E402,F401
                               POSITIVE, is_failed_marker, polarity_of, verdict_label)
# The one finish_reason of an OpenAI-compatible reply that is a whole judgment. "length" is a
# judgment cut mid-sentence ("Perfect answer? No: the" reads as positive), "content_filter" a
# refusal, "tool_calls"/"function_call" no judgment at all; a missing finish_reason cannot rule
# out truncation. All of them are failed calls.
NORMAL_FINISH = "stop"
REDACTED = "[redacted]"
# The cap on a judge reply's length sent as max_tokens. Without one a reply runs to the server's
# own cap (`transformers serve` ran for minutes per reply and timed out). A reply cut by the cap
# finishes with "length": a failed call, never a label.
DEFAULT_JUDGE_MAX_TOKENS = dsl.DEFAULT_JUDGE_MAX_TOKENS
# What a structured judge (response_format="json") is asked for, as an OpenAI / vLLM
# `response_format={"type": "json_schema", "json_schema": {...}}` (strict: every field required,
# no others). polarity.verdict_label turns a reply into a label.
JUDGMENT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["good", "bad"]},
                   "judgment": {"type": "string"}},
    "required": ["verdict", "judgment"],
    "additionalProperties": False,
}
RESPONSE_FORMATS = ("text", "json")


# ---------------------------------------------------------------- the protocol

@dataclass
class JudgeResult:
    judgment: str | None      # the text; None when failed (or a text-less positive of a function judge)
    polarity: str | None      # "positive" | "negative" | None when failed
    status: str               # "ok" | "failed"
    error: str | None = None
    attempts: int = 1
    # Tokens the endpoint reported in `usage`, summed over this call's attempts; None when no
    # reply reported them. usage_unknown counts the replies (2xx bodies) that did not say: their
    # tokens were spent but are not in the sums (unknown, not zero).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_unknown: int = 0


class Judge(Protocol):
    name: str                 # identity used as the cache key in the warehouse

    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]: ...


def _ok(judgment: str | None, prefixes: Sequence[str], attempts: int = 1,
        failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS) -> JudgeResult:
    judgment = judgment.strip() if judgment is not None else None
    if is_failed_marker(judgment, failed_markers):
        return _failed(f"judge output is the failure marker {judgment!r}", attempts)
    return JudgeResult(judgment=judgment or None, polarity=polarity_of(judgment, prefixes),
                       status="ok", attempts=attempts)


def _failed(error: str, attempts: int = 1) -> JudgeResult:
    return JudgeResult(judgment=None, polarity=None, status="failed", error=error, attempts=attempts)


def _ok_text(text: str | None, prefixes: Sequence[str], attempts: int, what: str,
             failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS) -> JudgeResult:
    """A language-model judge's output: empty or missing text is unparseable, hence a failure."""
    if not isinstance(text, str) or not text.strip():
        return _failed(f"{what} returned an empty judgment", attempts)
    return _ok(text, prefixes, attempts, failed_markers)


def scrub(text: str | None, secrets: Iterable[str]) -> str | None:
    """`text` with every occurrence of a known secret (an API key) replaced by [redacted]."""
    if text is None:
        return None
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def scrub_result(result: JudgeResult, secrets: Sequence[str]) -> JudgeResult:
    """The result with its judgment and error text scrubbed of `secrets` (stored texts never hold a key)."""
    if not secrets:
        return result
    return dataclasses.replace(result, judgment=scrub(result.judgment, secrets), error=scrub(result.error, secrets))


def usage_totals(results: Iterable[JudgeResult]) -> dict[str, int | None]:
    """prompt_tokens / completion_tokens summed over results (None when no reply reported usage,
    so that an endpoint that never reports it is logged as unknown, not as zero) and
    usage_unknown, the number of replies that did not report it."""
    results = list(results)
    def total(field: str) -> int | None:
        known = [getattr(r, field) for r in results if getattr(r, field) is not None]
        return sum(known) if known else None
    return {"prompt_tokens": total("prompt_tokens"), "completion_tokens": total("completion_tokens"),
            "usage_unknown": sum(r.usage_unknown for r in results)}


def public_url(url: str) -> str:
    """The URL without user:password@, query or fragment: what may appear in a name or a log."""
    from urllib.parse import urlsplit, urlunsplit
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:  # IPv6
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def score_refusal(judged: int, failed: int, *, max_failed_rate: float, min_judged: int) -> str | None:
    """Why a score over `judged` successful judge calls (with `failed` failed ones) must not be
    given, or None when it may. A rate over the few calls that worked can swing on one answer:
    with 499 of 500 calls failed, one positive would read as 100%."""
    total = judged + failed
    if total and failed / total > max_failed_rate:
        return (f"{failed} of {total} judge calls failed ({failed / total:.0%} > max_failed_rate "
                f"{max_failed_rate:.0%})")
    if judged < min_judged:
        return f"only {judged} of {total} judge calls succeeded (min_judged is {min_judged})"
    return None


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
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES,
                 failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS):
        if isinstance(fn, str):
            # Named by the function's current path: a declaration written with a path of the flat
            # layout (cut_core.compat) shares its judge, and its cached judgments, with today's.
            from cut_core.compat import current_callable

            name = name or current_callable(fn)
            fn = dsl.import_callable(fn)
        self.fn = fn
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)  # callable objects have none
        self.name = name or f"function:{getattr(fn, '__module__', '?')}:{qualname}"
        self.positive_prefixes = tuple(positive_prefixes)
        self.failed_markers = tuple(failed_markers)

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
            results.append(_ok(out, self.positive_prefixes, failed_markers=self.failed_markers))
        return results


# ---------------------------------------------------------------- TransformersJudge

class TransformersJudge:
    """A local causal LM that writes the judgment after a prompt template (greedy, batched).

    The model loads on first use, so building a judge (e.g. to read its name) costs nothing.
    Pass `model` and `tokenizer` to reuse ones already in memory.
    """

    def __init__(self, model_path: str | None = None, *, prompt: str, max_new_tokens: int = 128,
                 batch_size: int = 8, name: str | None = None, model: Any = None, tokenizer: Any = None,
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES,
                 failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS):
        if model_path is None and (model is None or tokenizer is None):
            raise ValueError("TransformersJudge needs model_path, or both model and tokenizer")
        self.model_path, self.prompt = model_path, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.model, self.tokenizer = model, tokenizer
        self.positive_prefixes = tuple(positive_prefixes)
        self.failed_markers = tuple(failed_markers)
        self.name = name or f"transformers:{model_path or type(model).__name__}#{_identity(prompt, max_new_tokens)}"

    def judge_batch(self, items: list[tuple[str, str]]) -> list[JudgeResult]:
        if not items:
            return []
        from cut_core.infer.generate import generate_texts, load_model  # torch only when a model judges

        if self.model is None:
            self.model, self.tokenizer = load_model(self.model_path)
        prompts = [_fill(self.prompt, i, r) for i, r in items]
        try:
            texts = generate_texts(self.model, self.tokenizer, prompts,
                                   max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        except Exception as err:  # noqa: BLE001 - e.g. CUDA OOM: a failed batch, not negatives
            return [_failed(f"{type(err).__name__}: {err}") for _ in items]
        return [_ok_text(t, self.positive_prefixes, 1, "judge model", self.failed_markers) for t in texts]


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

    What it trusts of a reply: a label comes only from a 2xx reply whose first choice finished
    with finish_reason "stop" and whose text is not a failure marker. Redirects are not followed
    (a failure: the key would go wherever the redirect points), a reply over
    `max_response_bytes` is a failure, and `timeout_s` is a deadline for the whole call, so a
    server that trickles bytes cannot hold it longer. The API key is sent only as the Bearer
    header of this one URL, and every text this judge returns (judgment, error) has the key
    replaced by [redacted], whatever the server echoed.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 system_prompt: str | None = None,
                 user_prompt: str = dsl.PAPER_JUDGE_USER_PROMPT,
                 concurrency: int = 8, max_retries: int = 5, timeout_s: float = 60.0,
                 temperature: float = 0.0, max_tokens: int | None = DEFAULT_JUDGE_MAX_TOKENS,
                 response_format: str = "text", name: str | None = None,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 retry_after_max_s: float = 300.0, max_response_bytes: int = 262_144,
                 positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES,
                 failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS):
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, got {response_format!r}")
        if system_prompt is None:  # the paper's prompt, or its JSON form for a structured judge
            system_prompt = (dsl.JSON_JUDGE_SYSTEM_PROMPT if response_format == "json"
                             else dsl.PAPER_JUDGE_SYSTEM_PROMPT)
        self.response_format = response_format
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.system_prompt, self.user_prompt = system_prompt, user_prompt
        self.concurrency, self.max_retries, self.timeout_s = concurrency, max_retries, timeout_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.max_response_bytes = max_response_bytes
        self.positive_prefixes = tuple(positive_prefixes)
        self.failed_markers = tuple(failed_markers)
        self.secrets: tuple[str, ...] = (api_key,) if api_key else ()  # scrubbed from every text we return
        # The prompts, temperature, max_tokens and response format are part of the identity:
        # changing them must re-label rather than reuse judgments written under other settings.
        # The default cap (DEFAULT_JUDGE_MAX_TOKENS) keeps the identity of "no cap" (None), which
        # every judge declared before the cap existed was built with, so their cached judgments
        # stay in use: a cap changes no judgment that finished within it (greedy or sampled, the
        # tokens before the cap are the same), it only turns a longer reply into a failed call.
        # The text format adds nothing to the identity (the names of existing caches); json adds
        # itself and its schema. The name is stored in the warehouse: it holds the URL without
        # any credentials or query.
        cap = None if max_tokens == DEFAULT_JUDGE_MAX_TOKENS else max_tokens
        structured = ("json", json.dumps(JUDGMENT_SCHEMA, sort_keys=True)) if response_format == "json" else ()
        self.name = name or (f"openai:{public_url(base_url)}|{model}"
                             f"#{_identity(system_prompt, user_prompt, temperature, cap, *structured)}")

    # -- sync entry point (the protocol is synchronous; the fan-out inside is asyncio)
    def judge_batch(self, items: list[tuple[str, str]], *,
                    on_result: Callable[[JudgeResult], None] | None = None) -> list[JudgeResult]:
        """One result per item, in order; `on_result(result)` is called as each call finishes
        (in completion order, from the thread that runs the calls): progress reporting."""
        if not items:
            return []
        coro_factory = lambda: self._judge_all(items, on_result)  # noqa: E731
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_factory())
        # Called from inside a running event loop (an async Prefect task, a notebook):
        # asyncio.run would refuse, so run our loop in a worker thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(coro_factory())).result()

    async def _judge_all(self, items: list[tuple[str, str]],
                         on_result: Callable[[JudgeResult], None] | None = None) -> list[JudgeResult]:
        semaphore = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout_s),
                                     limits=limits, follow_redirects=False) as client:
            async def one(item: tuple[str, str]) -> JudgeResult:
                async with semaphore:
                    result = await self._judge_one(client, *item)
                if on_result is not None:
                    on_result(result)
                return result

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
        if self.response_format == "json":
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "judgment", "strict": True, "schema": JUDGMENT_SCHEMA}}
        return payload

    def _result(self, text: str | None, attempts: int) -> JudgeResult:
        """The label a reply's text gives: by the prefix rule, or (json) by its verdict."""
        if self.response_format != "json":
            return _ok_text(text, self.positive_prefixes, attempts, "endpoint", self.failed_markers)
        if not isinstance(text, str) or not text.strip():
            return _failed("endpoint returned an empty judgment", attempts)
        try:
            reply = json.loads(text)
        except ValueError as err:
            return _failed(f"structured reply is not JSON ({err}): {scrub(text, self.secrets)[:200]!r}", attempts)
        if not isinstance(reply, dict):
            return _failed(f"structured reply is {type(reply).__name__}, expected an object with verdict and "
                           "judgment", attempts)
        missing = [k for k in ("verdict", "judgment") if k not in reply]
        if missing:
            return _failed(f"structured reply lacks {', '.join(missing)}: {scrub(text, self.secrets)[:200]!r}",
                           attempts)
        try:
            judgment, polarity = verdict_label(reply["verdict"], reply["judgment"], self.positive_prefixes)
        except ValueError as err:
            return _failed(f"structured reply is no label: {err}", attempts)
        if judgment is not None and judgment in {m.strip() for m in self.failed_markers}:
            return _failed(f"judge output is the failure marker {judgment!r}", attempts)
        return JudgeResult(judgment=judgment, polarity=polarity, status="ok", attempts=attempts)

    async def _judge_one(self, client: httpx.AsyncClient, instruction: str, response: str) -> JudgeResult:
        payload = self._payload(instruction, response)
        usage = _Usage()
        attempts = 0
        while True:
            attempts += 1
            try:
                text = await self._call(client, payload, usage)
                result = self._result(text, attempts)
            except _Fatal as err:
                result = _failed(str(err), attempts)
            except _Retryable as err:
                if attempts <= self.max_retries:
                    await asyncio.sleep(self._delay(attempts, err.retry_after))
                    continue
                result = _failed(f"{err} (gave up after {attempts} attempts)", attempts)
            result = dataclasses.replace(result, prompt_tokens=usage.prompt_tokens,
                                         completion_tokens=usage.completion_tokens, usage_unknown=usage.unknown)
            return scrub_result(result, self.secrets)

    async def _call(self, client: httpx.AsyncClient, payload: dict, usage: "_Usage | None" = None) -> str | None:
        """One HTTP attempt, all of it within `timeout_s`: the judgment text, or _Retryable / _Fatal.
        The token usage of a 2xx reply is added to `usage` (whatever the reply is worth as a label:
        a reply cut by max_tokens still cost its tokens)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with client.stream("POST", self.url, json=payload) as resp:
                    status, headers = resp.status_code, resp.headers
                    body = await self._read_capped(resp)
        except httpx.TimeoutException as err:
            raise _Retryable(f"timeout after {self.timeout_s}s ({type(err).__name__})") from None
        except TimeoutError:  # asyncio.timeout: the whole call outlived its deadline
            raise _Retryable(f"timeout: no complete reply within {self.timeout_s}s") from None
        except httpx.TransportError as err:  # connection refused/reset, protocol errors
            raise _Retryable(f"connection error: {type(err).__name__}: {err}") from None
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {self._snippet(body)}", _retry_after(headers.get("retry-after")))
        if 300 <= status < 400:
            raise _Fatal(f"HTTP {status} redirect not followed (a key must not follow a redirect): "
                         "set base_url to the final address")
        if not 200 <= status < 300:
            raise _Fatal(f"HTTP {status} (not retried): {self._snippet(body)}")
        parsed: Any = None
        try:
            parsed = json.loads(body)
        except ValueError as err:
            not_json: ValueError | None = err
        else:
            not_json = None
        if usage is not None:
            usage.add(parsed.get("usage") if isinstance(parsed, dict) else None)
        try:
            if not_json is not None:
                raise not_json
            choice = parsed["choices"][0]
            message, finish = choice["message"], choice.get("finish_reason")
            text = message["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise _Fatal(f"malformed response body ({type(err).__name__}): {self._snippet(body)!r}") from None
        if finish != NORMAL_FINISH:
            raise _Fatal(f"reply did not finish normally (finish_reason={finish!r}, expected 'stop'): "
                         "not a whole judgment")
        if isinstance(message, dict) and message.get("refusal"):
            raise _Fatal("the judge refused to answer (message.refusal is set)")
        return text

    def _snippet(self, body: bytes, limit: int = 200) -> str:
        """The start of a reply body as text for an error message, scrubbed *before* it is cut
        (a cut could leave part of an echoed key that a later scrub would not recognise)."""
        return scrub(body.decode("utf-8", "replace"), self.secrets)[:limit]

    async def _read_capped(self, resp: httpx.Response) -> bytes:
        """The body, refused as soon as it grows past max_response_bytes (decoded size)."""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise _Fatal(f"reply of {int(declared)} bytes exceeds max_response_bytes={self.max_response_bytes}")
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > self.max_response_bytes:
                raise _Fatal(f"reply exceeds max_response_bytes={self.max_response_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best when it can take us again
            return min(retry_after, self.retry_after_max_s)
        # Exponential backoff with "equal jitter": spreads out clients that failed together.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


class _Usage:
    """The `usage` of one judge call's replies: token sums, and how many replies did not say."""

    def __init__(self):
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.unknown = 0

    def add(self, usage: Any) -> None:
        def count(key: str) -> int | None:
            value = usage.get(key) if isinstance(usage, dict) else None
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
        prompt, completion = count("prompt_tokens"), count("completion_tokens")
        if prompt is None or completion is None:
            self.unknown += 1
            return
        self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        self.completion_tokens = (self.completion_tokens or 0) + completion


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

def resolve_api_key(spec: Any, secret_resolver: Callable[[str], str] | None = None, *,
                    section: str = "judge") -> str | None:
    """The API key of an OpenAI-compatible endpoint section (a judge, or a generation engine):
    from the Prefect Secret `api_key_secret`, else from the variable `spec.key_env()` names (the
    declared api_key_env, or OPENAI_API_KEY for https://api.openai.com alone), else None."""
    if spec.api_key_secret:
        if secret_resolver is None:
            raise ValueError(f"{section}.api_key_secret={spec.api_key_secret!r} needs a secret_resolver "
                             f"(run through the Prefect tasks, or set {section}.api_key_env instead)")
        return secret_resolver(spec.api_key_secret) or None
    key_env = spec.key_env()
    if not key_env:
        return None
    api_key = os.environ.get(key_env)
    if not api_key:
        # A hosted API will answer 401: say why up front.
        log.warning("environment variable %s is not set; calling %s without an API key",
                    key_env, public_url(spec.base_url))
    return api_key or None


def build_judge(spec: dsl.FunctionJudge | dsl.TransformersJudge | dsl.OpenAIJudge, *,
                secret_resolver: Callable[[str], str] | None = None,
                positive_prefixes: Sequence[str] = DEFAULT_POSITIVE_PREFIXES,
                failed_markers: Sequence[str] = DEFAULT_FAILED_MARKERS, **overrides: Any) -> Judge:
    """Build a judge from a DSL judge section.

    `secret_resolver(name) -> value` resolves `api_key_secret` (the tasks layer passes one that
    loads a Prefect Secret block; cut_core itself never imports prefect). `overrides` reach the
    implementation's constructor (e.g. `backoff_base_s` for fast tests, `batch_size`).
    An OpenAI judge gets a key only from the variable `spec.key_env()` names: the declared
    api_key_env, or OPENAI_API_KEY for https://api.openai.com alone (never for another host).
    """
    common = dict(positive_prefixes=positive_prefixes, failed_markers=failed_markers)
    if isinstance(spec, dsl.FunctionJudge):
        return FunctionJudge(spec.callable, name=spec.name, **common, **overrides)
    if isinstance(spec, dsl.TransformersJudge):
        return TransformersJudge(spec.model_path, prompt=spec.prompt, max_new_tokens=spec.max_new_tokens,
                                 name=spec.name, **common, **overrides)
    if isinstance(spec, dsl.OpenAIJudge):
        api_key = resolve_api_key(spec, secret_resolver)
        return OpenAIJudge(spec.base_url, spec.model, api_key=api_key or None, system_prompt=spec.system_prompt,
                           user_prompt=spec.user_prompt, concurrency=spec.concurrency,
                           max_retries=spec.max_retries, timeout_s=spec.timeout_s,
                           max_response_bytes=spec.max_response_bytes, max_tokens=spec.max_tokens,
                           response_format=spec.response_format,
                           temperature=spec.temperature, name=spec.name, **common, **overrides)
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JudgeProgress:
    """Counts judge calls as they finish and reports a line every `every_s` seconds while they run:
    "judge: 120/500 done (3 failed), 4.1 calls/s, ETA 1m32s". Used as a context manager around
    the calls: a daemon thread writes the periodic lines (so a batch whose calls take minutes
    still reports), and leaving the block writes the final line. `report` is any
    callable taking one string (the tasks pass their Prefect logger's info)."""

    def __init__(self, total: int, report: Callable[[str], None], *, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.report, self.every_s, self.clock = total, report, every_s, clock
        self.done = self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start = clock()

    def add(self, result: JudgeResult) -> None:
        with self._lock:
            self.done += 1
            self.failed += result.status != "ok"

    def line(self) -> str:
        with self._lock:
            done, failed = self.done, self.failed
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = _duration((self.total - done) / rate) if rate > 0 else "unknown"
        return f"judge: {done}/{self.total} done ({failed} failed), {rate:.1f} calls/s, ETA {eta}"

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.report(self.line())
            except Exception:  # noqa: BLE001 - a broken log handler must not stop the judging
                log.exception("judge progress report failed")

    def __enter__(self) -> "JudgeProgress":
        self.start = self.clock()
        self._thread = threading.Thread(target=self._run, name="judge-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.report(self.line())


def _takes_on_result(judge: Judge) -> bool:
    try:
        return "on_result" in inspect.signature(judge.judge_batch).parameters
    except (TypeError, ValueError):
        return False


def label_pending(con, judge: Judge, rows: Iterable[tuple[str, str] | Mapping[str, Any]], *,
                  chunk_size: int = 256, retry_failed: bool = True,
                  progress: Callable[[str], None] | None = None,
                  progress_every_s: float = 10.0) -> dict[str, int | None]:
    """Judge every (instruction, response) not yet judged OK by this judge; cache in `judgments`.

    The cache key is (judge.name, content_key(instruction, response)), so a rerun judges nothing
    that already has an OK judgment. Rows whose earlier call *failed* are sent again when
    `retry_failed` (the default): a failure is a missing judgment, not an answer. Results are
    written after every chunk, so an interrupted run keeps what it paid for.

    Counts (distinct pairs): requested, cached (already OK), retried (previously failed, sent
    again), judged (sent to the judge now) = ok + failed; positives + negatives = ok. Token usage
    of the calls made now (cached judgments cost nothing): prompt_tokens and completion_tokens,
    summed over the replies that reported `usage` (None when none did), and usage_unknown, the
    replies that did not (judges that make no HTTP calls report None, None, 0).

    `progress(line)` receives a line every `progress_every_s` seconds while calls run, and one at
    the end (JudgeProgress); a judge whose judge_batch takes `on_result` is counted call by call,
    any other chunk by chunk.
    """
    pairs = list(dict.fromkeys(_pairs(rows)))  # distinct, first-seen order
    keyed = {content_key(i, r): (i, r) for i, r in pairs}
    counts: dict[str, int | None] = dict(requested=len(keyed), cached=0, retried=0, judged=0, ok=0, failed=0,
                                         positives=0, negatives=0, prompt_tokens=None, completion_tokens=None,
                                         usage_unknown=0)
    if not keyed:
        return counts

    status = judgment_status(con, judge.name, list(keyed))
    counts["cached"] = sum(1 for s in status.values() if s == "ok")
    todo = [k for k in keyed if status.get(k) != "ok" and (retry_failed or k not in status)]
    counts["retried"] = sum(1 for k in todo if status.get(k) == "failed")
    if not todo:
        return counts

    tracker = JudgeProgress(len(todo), progress, every_s=progress_every_s) if progress else None
    per_call = tracker is not None and _takes_on_result(judge)
    with tracker if tracker is not None else contextlib.nullcontext():
        _judge_chunks(con, judge, keyed, todo, chunk_size, counts, tracker, per_call)
    return counts


def _judge_chunks(con, judge: Judge, keyed: dict, todo: list[str], chunk_size: int, counts: dict,
                  tracker: JudgeProgress | None, per_call: bool) -> None:
    for start in range(0, len(todo), chunk_size):
        keys = todo[start:start + chunk_size]
        items = [keyed[k] for k in keys]
        results = (judge.judge_batch(items, on_result=tracker.add) if per_call
                   else judge.judge_batch(items))
        if tracker is not None and not per_call:
            for res in results:
                tracker.add(res)
        if len(results) != len(keys):
            raise RuntimeError(f"judge {judge.name} returned {len(results)} results for {len(keys)} items")
        # Judges scrub their own texts; again here, because these are stored.
        results = [scrub_result(r, getattr(judge, "secrets", ())) for r in results]
        _store(con, judge.name, [(k, *keyed[k], res) for k, res in zip(keys, results)])
        counts["judged"] += len(keys)
        for res in results:
            counts["ok" if res.status == "ok" else "failed"] += 1
            if res.status == "ok":
                counts["positives" if res.polarity == POSITIVE else "negatives"] += 1
        usage = usage_totals(results)
        for key in ("prompt_tokens", "completion_tokens"):
            if usage[key] is not None:
                counts[key] = (counts[key] or 0) + usage[key]
        counts["usage_unknown"] += usage["usage_unknown"]


def _store(con, judge_name: str, rows: list[tuple[str, str, str, JudgeResult]]) -> None:
    # A failed result never carries a judgment or polarity into the table, whatever it holds.
    store_judgments(con, judge_name, [
        {"key": key, "instruction": instruction, "response": response,
         "judgment": res.judgment if res.status == "ok" else None,
         "polarity": res.polarity if res.status == "ok" else None,
         "status": "ok" if res.status == "ok" else "failed", "error": res.error, "attempts": res.attempts}
        for key, instruction, response, res in rows])
