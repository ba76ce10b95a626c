"""The judge protocol (JudgeResult, Judge) and the reply rules every judge shares: failure markers,
scrubbing keys out of texts, token usage, and when a score over too few judgments is refused."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

from cut_core import dsl
from cut_core.data.warehouse import content_key
# What of a key may appear in a text: one rule for judges and engines (cut_core/secrets.py).
from cut_core.secrets import REDACTED, public_url, scrub  # noqa: F401

log = logging.getLogger(__name__)

# The one polarity rule, shared with ingest (cut_core/data/polarity.py): a quoted '"Perfect."' is
# positive from a judge and from a file alike.
# A judge that answers with a failure marker (`$ERROR$`, whole text) reports its own failure: the
# same rule as ingest's (polarity.is_failed_marker).
from cut_core.data.polarity import DEFAULT_FAILED_MARKERS, is_failed_marker, polarity_of  # noqa: E402
# The one finish_reason of an OpenAI-compatible reply that is a whole judgment. "length" is a
# judgment cut mid-sentence ("Perfect answer? No: the" reads as positive), "content_filter" a
# refusal, "tool_calls"/"function_call" no judgment at all; a missing finish_reason cannot rule
# out truncation. All of them are failed calls.
NORMAL_FINISH = "stop"
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
