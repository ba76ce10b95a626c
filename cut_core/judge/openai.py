"""OpenAIJudge: any OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, SGLang, Ollama, TGI):
concurrency, retries, deadlines, capped replies, keys sent only to their own URL, free-text or
json_schema verdicts, token usage."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import json
import random
import time
from typing import Any, Callable, Sequence

import httpx

from cut_core import dsl
from cut_core.data.polarity import DEFAULT_FAILED_MARKERS, DEFAULT_POSITIVE_PREFIXES, verdict_label
from cut_core.judge.protocol import DEFAULT_JUDGE_MAX_TOKENS, JUDGMENT_SCHEMA, JudgeResult, NORMAL_FINISH, RESPONSE_FORMATS, _failed, _fill, _identity, _ok_text, public_url, scrub, scrub_result

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
