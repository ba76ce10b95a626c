"""Run by the python of vLLM's own environment (cut_core.infer.engines.VLLMEngine): never imports
cut_core, whose dependencies (transformers 5.23) that environment does not have.

    python vllm_worker.py REQUEST.json ANSWER.json

REQUEST: {model, prompt_ids: [[int]], dtype, max_model_len, temperature, top_p, n, seed, max_tokens}
ANSWER:  {texts: [[str] * n per prompt], tokens: total new tokens, generate_s: seconds in generate}
"""

import json
import sys
import time


def main(request_path: str, answer_path: str) -> None:
    from vllm import LLM, SamplingParams

    req = json.load(open(request_path))
    kwargs = {"model": req["model"], "dtype": req.get("dtype") or "auto", "seed": req.get("seed") or 0}
    if req.get("max_model_len"):
        kwargs["max_model_len"] = req["max_model_len"]
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=req["temperature"], top_p=req["top_p"], n=req["n"], seed=req.get("seed"),
                            max_tokens=req["max_tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in req["prompt_ids"]]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - started
    texts = [[c.text.strip() for c in sorted(o.outputs, key=lambda c: c.index)] for o in outputs]
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    with open(answer_path, "w") as f:
        json.dump({"texts": texts, "tokens": tokens, "generate_s": generate_s}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
