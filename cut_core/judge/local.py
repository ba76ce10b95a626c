"""Judges that run here: FunctionJudge (a rule or a verifier) and TransformersJudge (a local causal LM)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cut_core import dsl
from cut_core.data.polarity import DEFAULT_FAILED_MARKERS, DEFAULT_POSITIVE_PREFIXES
from cut_core.judge.protocol import JudgeResult, _failed, _fill, _identity, _ok, _ok_text

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
