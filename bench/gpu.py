"""GPU check in one go (not a test): speed of CUT training and of generation on one GPU.

    .venv/bin/python bench/gpu.py              # full mode: CUDA, a Qwen2-1.5B-like model, < 5 min on one H100/H200
    .venv/bin/python bench/gpu.py --cpu-smoke  # reduced mode (automatic without CUDA): a tiny model, < 1 min

Last printed line: one JSON object.

What it measures, on a model built from a config (random weights: speed does not depend on them):
  steps      a CUT step (both passes: Align-N [x, j-] + y and Misalign x + y, forward and backward,
             CUTTrainer.compute_loss, then AdamW) for LoRA (frozen bf16 base, all-linear r=16) and
             full fine-tuning (fp32 master weights, bf16 autocast), each with fused log-probs
             (logprob_path='fused') and materialized logits, with and without gradient
             checkpointing: tokens/s (real tokens of both passes), MFU, peak memory.
  generation one online iteration's generation: greedy answers to a batch of prompts through
             cut_core.infer.generate (the path online iterations use): new tokens/s.

FLOPs are counted honestly, per step, useful work only (recomputation is not counted):
  linear layers  forward 2 N_body per token of both passes; the output head 2 V H per *response*
                 token only (the others are never projected); backward: full fine-tuning 4 N
                 (activation + weight gradients), LoRA 2 N for the frozen weights (activation
                 gradients only) + 6 N_lora for the adapters
  attention      forward 4 L T^2 H per sequence (QK^T and AV, full square, the usual MFU
                 convention), backward twice that
MFU = FLOPs / time / peak bf16 dense FLOP/s of the device (H100/H200 989e12, A100 312e12, else
$GPU_PEAK_TFLOPS; null when unknown, e.g. on CPU). Goal when run: MFU >= 0.40 for full
fine-tuning of the 1.5B model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {"model": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096),
        "pairs": 4, "length": 2048, "response": 1024, "judgment": 64, "warmup": 2, "steps": 4,
        "gen_prompts": 64, "gen_prompt_len": 256, "gen_new_tokens": 128, "lora_r": 16}
SMOKE = {"model": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=512),
         "pairs": 1, "length": 128, "response": 64, "judgment": 8, "warmup": 1, "steps": 1,
         "gen_prompts": 4, "gen_prompt_len": 16, "gen_new_tokens": 8, "lora_r": 4}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops(device) -> float | None:
    import torch

    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def build(cfg: dict, device, *, lora: bool):
    """A Qwen2-like CausalLM from a config, random weights, built on the device."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**cfg["model"], attn_implementation="sdpa")
    dtype = torch.bfloat16 if (lora and device.type == "cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def counts(model, cfg: dict) -> dict:
    """N_body (decoder linear weights), N_lora, head V x H."""
    import torch

    m = cfg["model"]
    body = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            n = module.weight.numel()
            if "lora_" in name:
                lora += n
            elif ".layers." in name:
                body += n
    return {"n_body": body, "n_lora": lora, "head": m["vocab_size"] * m["hidden_size"]}


def batch_for(cfg: dict, vocab: int):
    """`pairs` CUT pairs: Align-N of `length` tokens, Misalign 64 shorter, `response` response tokens."""
    import torch

    from cut_core.train.trainer import CUTCollator, Record

    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(cfg["pairs"]):
        ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
        prompt = ids(cfg["length"] - cfg["response"] - cfg["judgment"])
        judgment, response = ids(cfg["judgment"]), ids(cfg["response"])
        records.append(Record("cut", f"r{i}", prompt + response, len(prompt),
                              prompt + judgment + response, len(prompt) + len(judgment)))
    return records, CUTCollator(pad_token_id=0)(records)


def step_flops(c: dict, cfg: dict, batch, *, lora: bool) -> float:
    m = cfg["model"]
    tokens = sum(int(batch[f"{p}attention_mask"].sum()) for p in ("", "judged_"))
    predicted = sum(int(batch[f"{p}response_lengths"].sum()) for p in ("", "judged_"))
    seq_lens = [int(x) for p in ("", "judged_") for x in batch[f"{p}attention_mask"].sum(-1)]
    linear_fwd = 2 * c["n_body"] * tokens + 2 * c["head"] * predicted
    attention_fwd = sum(4 * m["num_hidden_layers"] * t * t * m["hidden_size"] for t in seq_lens)
    if lora:  # frozen weights: activation gradients only; adapters: forward + both gradients
        backward = linear_fwd + 2 * attention_fwd + 6 * c["n_lora"] * tokens
    else:
        backward = 2 * linear_fwd + 2 * attention_fwd
    return linear_fwd + attention_fwd + backward


def time_steps(model, batch, records, cfg: dict, device, *, lora: bool, path: str, checkpointing: bool) -> dict:
    import torch

    from cut_core.train.trainer import CUTConfig, CUTTrainer, RecordDataset

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    args = CUTConfig(output_dir=tempfile.mkdtemp(), logprob_path=path, threshold=1.1, alpha=1.0,
                     report_to="none", dataloader_pin_memory=False)
    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and not lora)
                else contextlib.nullcontext())
    on_device = {k: v.to(device) for k, v in batch.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step():
        with autocast:
            loss = trainer.compute_loss(model, on_device)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    del optim
    return {"seconds": statistics.median(times),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def generation(cfg: dict, device) -> dict:
    """Greedy generation through cut_core.infer.generate (the online iterations' path), bf16 on CUDA."""
    import torch

    from cut_core.infer.generate import generate_from_ids

    model = build(cfg, device, lora=False)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, time every token

    class Tok:  # generate_from_ids needs ids in, text out; a stand-in decoder keeps the timing to the model
        eos_token_id = None
        pad_token_id = 0

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg["model"]["vocab_size"], (cfg["gen_prompt_len"],), generator=g).tolist()
               for _ in range(cfg["gen_prompts"])]
    kwargs = dict(max_new_tokens=cfg["gen_new_tokens"], batch_size=cfg["gen_prompts"], greedy=True)
    generate_from_ids(model, Tok, prompts[:2], **{**kwargs, "max_new_tokens": 2})  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    outputs = generate_from_ids(model, Tok, prompts, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(o.split()) for o in outputs)
    del model
    return {"generation_tokens_per_s": round(new_tokens / seconds, 1), "generated_tokens": new_tokens,
            "generation_seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="reduced mode on a tiny model (automatic without CUDA)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not opts.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    cfg = FULL if cuda else SMOKE
    if not cuda:
        torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))
    peak = peak_flops(device)
    records, batch = batch_for(cfg, cfg["model"]["vocab_size"])
    tokens = sum(int(batch[f"{p}attention_mask"].sum()) for p in ("", "judged_"))
    results = {}
    for kind in ("lora", "full"):
        lora = kind == "lora"
        model = build(cfg, device, lora=lora)
        flops = step_flops(counts(model, cfg), cfg, batch, lora=lora)
        for path in ("fused", "materialized"):
            for checkpointing in (False, True):
                key = f"{kind}_{path}_{'gc' if checkpointing else 'nogc'}"
                try:
                    r = time_steps(model, batch, records, cfg, device, lora=lora, path=path,
                                   checkpointing=checkpointing)
                except torch.OutOfMemoryError:
                    results[key] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                    continue
                results[key] = {"tokens_per_s": round(tokens / r["seconds"], 1),
                                "step_s": round(r["seconds"], 4),
                                "tflops_per_s": float(f"{flops / r['seconds'] / 1e12:.4g}"),
                                "mfu": round(flops / r["seconds"] / peak, 4) if peak else None,
                                "peak_gib": r["peak_gib"]}
                print(key, json.dumps(results[key]), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    gen = generation(cfg, device)
    print("generation", json.dumps(gen), flush=True)
    best_full = max((v.get("mfu") or 0 for k, v in results.items() if k.startswith("full")), default=0)
    summary = {"mode": "full" if cuda else "cpu_smoke",
               "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "model": {**cfg["model"], "params_b": float("%.4g" % (sum(counts(build(cfg, torch.device("meta"), lora=False), cfg)[k]
                                                               for k in ("n_body", "head")) / 1e9))},
               "tokens_per_step": tokens, "peak_flops": peak,
               "steps": results, **gen,
               "full_ft_best_mfu": best_full if peak else None,
               "goal": {"full_ft_best_mfu": ">= 0.40 (1.5B, full mode)"},
               "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
