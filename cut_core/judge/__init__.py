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

Modules: protocol.py (JudgeResult, Judge, the shared reply rules), local.py (FunctionJudge,
TransformersJudge), openai.py (OpenAIJudge), labeling.py (`label_pending`: judges what is not yet
judged and caches the results in `judgments`; `apply_judgments` copies them onto unlabeled
`triplets`); this file builds a judge from its DSL section (`build_judge`, `resolve_api_key`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from cut_core import dsl
# The package's face: the protocol, the three judges, labeling, and the rules they share.
from cut_core.data.polarity import (DEFAULT_FAILED_MARKERS, DEFAULT_POSITIVE_PREFIXES, NEGATIVE,  # noqa: F401
                                    POSITIVE, polarity_of)
from cut_core.data.warehouse import apply_judgments, unlabeled_triplets  # noqa: F401
from cut_core.judge.labeling import JudgeProgress, label_pending  # noqa: F401
from cut_core.judge.local import FunctionJudge, TransformersJudge
from cut_core.judge.openai import OpenAIJudge
from cut_core.judge.protocol import (DEFAULT_JUDGE_MAX_TOKENS, JUDGMENT_SCHEMA, NORMAL_FINISH, REDACTED,  # noqa: F401
                                     RESPONSE_FORMATS, Judge, JudgeResult, log, public_url, score_refusal, scrub,
                                     scrub_result, usage_totals)

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
