"""Benchmark of the CUT training step (not a test): speed, padding, loss memory.

    .venv/bin/python bench/train_step.py            # last printed line: one JSON object

(a) cut_vs_mle_time_ratio — CUT's cost over plain MLE on the *same token sequences*.
    CUT trains a record from two sequences, Align-N [x, j-] + y and Misalign x + y, scored in
    two forward passes with different contexts. The honest MLE comparison trains on exactly
    those sequences too: MLE over the Align-N *and* the Misalign sequences (same padded
    batches, same LoRA model, same optimizer), so both sides do the same forward/backward work
    on the same response tokens and the ratio of step times is the ratio per response token.
    Two MLE baselines are timed:
      mle_hf:   the model's own causal-LM loss (labels = -100 on prompt/pad), what a plain SFT
                trainer runs; it computes logits at every position;
      mle_same: CUTTrainer's own path with lambda = inf (gold log-probs at response positions,
                no flagged token): isolates what detection + unlikelihood add.
    The headline divides by the faster of the two. Steps are interleaved and the median kept,
    because the CPU is shared; time is the process CPU time of single-threaded steps (wall
    time on a shared 2-core box measures the neighbours). Bar: <= 1.10.
(b) padding_efficiency — real tokens / computed tokens on the real cut-online iter1 data
    (../shared/data/cut-online/iter1.json, read directly: $ERROR$ judgments dropped, null
    judgment = positive, Align-P downsampled to 0.25 x negatives as contrast.py does), tokenized
    with a tiny BPE tokenizer trained on the same texts, Alpaca templates of METHOD.md §3,
    max length 2048. Ours: judged and plain passes padded separately, length-grouped batches.
    reference_padding_efficiency: the reference code's way, random batches padded to their
    longest row with a dummy all-pad twin per Align-P. The headline is at the DSL's default
    split (Training(): micro-batch 1 x 8); every micro-batch size and padding_free are listed.
    Bar: >= 0.90.
(c) loss_memory_ratio — extra peak memory of the loss (forward + backward, gradient of the
    logits included) at vocab 32k, length 2048, batch 4, bf16 logits: `gold_logprobs` vs the
    reference's full-vocabulary fp32 log-softmax + gather. Each variant runs in its own
    subprocess; the peak is the kernel's resident-set high-water mark (VmHWM, reset through
    /proc/self/clear_refs after the logits exist), so the figure is what the process really
    held, allocator included. With CUDA, torch.cuda.max_memory_allocated is used instead.
    Bar: <= 0.5.
(d) fused_peak_memory_ratio / fused_time_ratio — a whole CUT LoRA step (both passes, forward and
    backward, CUTTrainer.compute_loss) with gold log-probs from hidden states (logprob_path='fused')
    over the same step with materialized logits, on a Qwen2-like model with a real vocabulary
    (V = 152,064 as Qwen2, and 49,152 as SmolLM2; hidden 256, 2 layers, tied embeddings, random
    weights), T = 2048, 1024 response tokens per pass. Memory: VmHWM above the resident set once
    model and batch exist, each variant in a fresh subprocess (CUDA: max_memory_allocated is not
    used here; this is the CPU figure). Time: single-threaded process CPU time, variants
    interleaved, median of 3 steps. The memory headline is at V = 152k; the time headline is the
    worse of the two vocabularies. Bars: <= 0.5 and <= 1.15.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared/data/cut-online/iter1.json"


# ---------------------------------------------------------------- real data -> records

def real_records(tokenizer, max_length: int = 2048, seed: int = 42):
    from cut_core.data import templates
    from cut_core.train.trainer import Record

    rows = [r for r in json.loads(DATA.read_text()) if r["judgment"] != "$ERROR$"]
    negatives = [r for r in rows if r["judgment"]]
    positives = [r for r in rows if not r["judgment"]]
    random.Random(seed).shuffle(positives)
    positives = positives[: len(negatives) // 4]

    from cut_core.data import sequences

    bos = sequences.bos_to_add(tokenizer)

    def encode(prompt: str, response: str, reserve: int | None = None):
        """As contrast.py builds examples (sequences.fit: prompt cut from the left, BOS kept; an
        over-long response cut so that the prompt keeps its reserve)."""
        fitted = sequences.fit(sequences.prompt_ids(tokenizer, [prompt])[0], sequences.response_ids(tokenizer, [response])[0],
                               max_length, bos, reserve_prompt_length=reserve)
        return fitted.input_ids, fitted.response_start

    records = []
    for r in negatives + positives:
        instruction = templates.format_instruction(r["instruction"], r["input"])
        plain_prompt = templates.plain_prompt(instruction)
        if r["judgment"]:
            judge_prompt = templates.judge_prompt(instruction, r["judgment"])
            reserve = len(sequences.prompt_ids(tokenizer, [judge_prompt])[0])  # the twins cut y alike
            plain, plain_start = encode(plain_prompt, r["output"], reserve)
            judged, judged_start = encode(judge_prompt, r["output"], reserve)
            records.append(Record("cut", str(r["id"]), plain, plain_start, judged, judged_start))
        else:
            plain, plain_start = encode(plain_prompt, r["output"])
            records.append(Record("nll", str(r["id"]), plain, plain_start))
    return records, rows


# ---------------------------------------------------------------- (b) padding

def padding(records, micro: int, accum: int, padding_free: bool = False, seed: int = 42) -> float:
    from cut_core.train.trainer import CUTCollator, LengthGroupedRecordSampler, padding_efficiency

    order = list(LengthGroupedRecordSampler([r.sort_length for r in records], micro * accum, seed))
    collate = CUTCollator(padding_free=padding_free)
    real = computed = 0
    for s in range(0, len(order), micro):
        r, c = padding_efficiency(collate([records[i] for i in order[s:s + micro]]))
        real, computed = real + r, computed + c
    return real / computed


def reference_padding(records, micro: int, seed: int = 42) -> float:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    real = computed = 0
    for s in range(0, len(order), micro):
        rows = []
        for r in (records[i] for i in order[s:s + micro]):
            rows += [len(r.judged_ids), len(r.plain_ids)] if r.kind == "cut" else [len(r.plain_ids), 0]
        real, computed = real + sum(rows), computed + len(rows) * max(rows)
    return real / computed


# ---------------------------------------------------------------- (a) step time

def step_times(model_dir: Path, records, *, micro: int = 4, batches: int = 6, repeats: int = 3,
               max_len: int = 512) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from cut_core.dsl import LoRA
    from cut_core.train.trainer import CUTCollator, CUTConfig, CUTTrainer, RecordDataset, load_model

    # Short records only: CPU time. The same batches feed every method.
    short = sorted((r for r in records if len(r.judged_ids or r.plain_ids) <= max_len), key=lambda r: r.sort_length)
    step = max(1, len(short) // (micro * batches))
    chosen = short[::step][: micro * batches]
    collate = CUTCollator()
    batch_list = [collate(chosen[i:i + micro]) for i in range(0, len(chosen), micro)]
    response_tokens = sum(int(b["response_lengths"].sum() + b.get("judged_response_lengths", torch.zeros(1)).sum())
                          for b in batch_list)

    torch.manual_seed(0)
    model = load_model(model_dir, LoRA())
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tmp = tempfile.mkdtemp()
    trainers = {name: CUTTrainer(model=model, args=CUTConfig(output_dir=tmp, threshold=threshold, alpha=1.0,
                                                             report_to="none", dataloader_pin_memory=False),
                                 train_dataset=RecordDataset(chosen))
                for name, threshold in (("cut", 1.1), ("mle_same", math.inf))}

    def hf_mle(batch):
        losses = []
        for prefix in ("", "judged_"):
            if f"{prefix}input_ids" not in batch:
                continue
            ids, predict = batch[f"{prefix}input_ids"], batch[f"{prefix}predict_mask"]
            labels = torch.full_like(ids, -100)
            labels[:, 1:][predict[:, :-1]] = ids[:, 1:][predict[:, :-1]]
            losses.append(model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"], labels=labels).loss)
        return sum(losses) / len(losses)

    methods = {"cut": lambda b: trainers["cut"].compute_loss(model, b),
               "mle_same": lambda b: trainers["mle_same"].compute_loss(model, b),
               "mle_hf": hf_mle}
    model.train()
    # One thread and process CPU time: the 2 cores are shared with other jobs, so wall-clock
    # time measures the neighbours; CPU time of a single-threaded step measures the step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {name: [] for name in methods}
    for name in methods:  # warm-up
        methods[name](batch_list[0]).backward()
        optim.zero_grad()
    for _ in range(repeats):
        total = dict.fromkeys(methods, 0.0)
        for b in batch_list:  # methods interleaved batch by batch
            for name, fn in methods.items():
                start = time.process_time()
                fn(b).backward()
                optim.step()
                optim.zero_grad()
                total[name] += time.process_time() - start
        for name in methods:
            times[name].append(total[name])
    torch.set_num_threads(threads)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"seconds_per_1k_response_tokens": {k: 1000 * v / response_tokens for k, v in med.items()},
            "cut_vs_mle_time_ratio": med["cut"] / min(med["mle_hf"], med["mle_same"]),
            "cut_vs_mle_hf_ratio": med["cut"] / med["mle_hf"],
            "cut_vs_mle_same_path_ratio": med["cut"] / med["mle_same"],
            "timed": {"records": len(chosen), "micro_batch": micro, "response_tokens": response_tokens,
                      "repeats": repeats}}


# ---------------------------------------------------------------- (c) loss memory

MEMORY_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from cut_core.train.loss import gold_logprobs
method = sys.argv[1]
B, T, V = 4, 2048, 32000
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
logits = torch.randn(B, T, V, dtype=torch.bfloat16, device=device).requires_grad_(True)
labels = torch.randint(0, V, (B, T), device=device)

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:
    base = rss_kb("VmRSS:") * 1024
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM to the current RSS
if method == "chunked":
    logp = gold_logprobs(logits, labels)
else:  # the reference: full-vocabulary fp32 log-softmax, then gather
    logp = logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
(-logp.mean()).backward()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
else:
    peak = rss_kb("VmHWM:") * 1024
print(json.dumps({"extra_bytes": peak - base, "device": device, "logits_bytes": logits.numel() * 2}))
"""


def loss_memory() -> dict:
    out = {}
    for method in ("chunked", "full_fp32"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, method, str(REPO)],
                              capture_output=True, text=True, check=True)
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"loss_memory_ratio": out["chunked"]["extra_bytes"] / out["full_fp32"]["extra_bytes"],
            "loss_extra_peak_mib": {k: round(v["extra_bytes"] / 2**20) for k, v in out.items()},
            "logits_mib": round(out["chunked"]["logits_bytes"] / 2**20),
            "memory_device": out["chunked"]["device"]}


# ---------------------------------------------------------------- (d) fused log-probs on a real vocabulary

FUSED_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[5])
import torch
mode, vocab, path, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from cut_core.train.trainer import CUTCollator, CUTConfig, CUTTrainer, Record, RecordDataset

T, RESPONSE, JUDGMENT = 2048, 1024, 64
torch.manual_seed(0)
config = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                     max_position_embeddings=T, attn_implementation="sdpa")
model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                       target_modules="all-linear", task_type="CAUSAL_LM")).train()
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
prompt, judgment, response = ids(T - RESPONSE - JUDGMENT), ids(JUDGMENT), ids(RESPONSE)
# One CUT pair: Align-N [x, j-] + y (T tokens) and Misalign x + y (T - 64), 1024 response tokens each.
record = Record("cut", "r", prompt + response, len(prompt), prompt + judgment + response, len(prompt) + JUDGMENT)
batch = CUTCollator(pad_token_id=0)([record])
trainers = {p: CUTTrainer(model=model, args=CUTConfig(output_dir="/tmp/fused-bench", logprob_path=p, threshold=1.1,
                                                      alpha=1.0, report_to="none", dataloader_pin_memory=False),
                          train_dataset=RecordDataset([record]))
            for p in (["fused", "materialized"] if mode == "time" else [path])}

def step(p):
    trainers[p].compute_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

if mode == "memory":
    base = rss_kb("VmRSS:") * 1024
    open("/proc/self/clear_refs", "w").write("5")   # reset VmHWM to the current RSS
    step(path)
    print(json.dumps({"extra_bytes": rss_kb("VmHWM:") * 1024 - base, "base_bytes": base}))
else:
    for p in trainers:   # warm-up (and the fused head's one-time check)
        step(p)
    times = {p: [] for p in trainers}
    for _ in range(int(os.environ.get("FUSED_REPEATS", "3"))):
        for p in trainers:   # interleaved
            t0 = time.process_time()
            step(p)
            times[p].append(time.process_time() - t0)
    print(json.dumps(times))
"""


def fused_vs_materialized(vocabs=(152064, 49152), repeats: int = 3) -> dict:
    """A CUT LoRA step (both passes, forward + backward) on a Qwen2-like model with a real
    vocabulary (hidden 256, 2 layers, tied embeddings, random weights), T = 2048, 1024 response
    tokens per pass: fused log-probs vs materialized logits.

    Memory: each variant in a fresh subprocess (2 threads); the figure is the kernel's resident-set
    high-water mark (VmHWM, reset through /proc/self/clear_refs once the model and batch exist)
    above the resident set at that moment: what the step itself added, allocator included.
    Time: one subprocess, single thread, the variants interleaved step by step after a warm-up,
    median process CPU time of `repeats` steps each (wall time on the shared box measures the
    neighbours)."""
    out = {}
    for vocab in vocabs:
        memory = {}
        for path in ("fused", "materialized"):
            proc = subprocess.run([sys.executable, "-c", FUSED_CHILD, "memory", str(vocab), path, "2", str(REPO)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"fused memory child failed:\n{proc.stderr[-3000:]}")
            memory[path] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]
        proc = subprocess.run([sys.executable, "-c", FUSED_CHILD, "time", str(vocab), "-", "1", str(REPO)],
                              capture_output=True, text=True, env={**os.environ, "FUSED_REPEATS": str(repeats)})
        if proc.returncode:
            raise RuntimeError(f"fused time child failed:\n{proc.stderr[-3000:]}")
        times = {k: statistics.median(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        out[vocab] = {"peak_memory_ratio": round(memory["fused"] / memory["materialized"], 3),
                      "extra_peak_mib": {k: round(v / 2**20) for k, v in memory.items()},
                      "time_ratio": round(times["fused"] / times["materialized"], 3),
                      "step_cpu_s": {k: round(v, 2) for k, v in times.items()}}
    return out


# ---------------------------------------------------------------- main

def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from cut_core.dsl import Training
    from cut_core.models.tiny import make_tiny_model

    if not DATA.exists():
        sys.exit(f"missing {DATA}: the benchmark reads the real cut-online data")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.time()
    rows = [r for r in json.loads(DATA.read_text()) if r["judgment"] != "$ERROR$"]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}\n{r['judgment'] or ''}" for r in rows]
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", texts, vocab_size=4000, hidden_size=128,
                                num_layers=2, num_heads=4, intermediate_size=344)
    from transformers import AutoTokenizer

    records, _ = real_records(AutoTokenizer.from_pretrained(model_dir))
    n_cut = sum(r.kind == "cut" for r in records)
    print(f"data: {n_cut} negatives, {len(records) - n_cut} positives (after $ERROR$ drop and 0.25 downsampling)")

    default = Training()
    split = (default.micro_batch_size, default.gradient_accumulation)
    by_micro = {m: round(padding(records, m, 8 // m), 4) for m in (1, 2, 4, 8)}
    reference_by_micro = {m: round(reference_padding(records, m), 4) for m in (1, 2, 4, 8)}
    pad = {"padding_efficiency": round(padding(records, *split), 4),
           "reference_padding_efficiency": round(reference_padding(records, split[0]), 4),
           "padding_split": f"{split[0]}x{split[1]}",
           "padding_efficiency_by_micro_batch": by_micro,
           "reference_padding_efficiency_by_micro_batch": reference_by_micro,
           "padding_free_efficiency_by_micro_batch": {m: round(padding(records, m, 8 // m, True), 4) for m in (1, 8)}}
    print("padding:", json.dumps(pad))

    speed = step_times(model_dir, records)
    print("speed:", json.dumps(speed))
    memory = loss_memory()
    print("memory:", json.dumps(memory))
    fused = fused_vs_materialized()
    print("fused:", json.dumps(fused))
    big = fused[max(fused)]

    result = {"cut_vs_mle_time_ratio": round(speed["cut_vs_mle_time_ratio"], 3),
              "padding_efficiency": pad["padding_efficiency"],
              "reference_padding_efficiency": pad["reference_padding_efficiency"],
              "loss_memory_ratio": round(memory["loss_memory_ratio"], 3),
              "fused_peak_memory_ratio": big["peak_memory_ratio"],
              "fused_time_ratio": max(v["time_ratio"] for v in fused.values()),
              "fused_by_vocab": {str(k): v for k, v in fused.items()},
              **{k: v for k, v in pad.items() if k not in ("padding_efficiency", "reference_padding_efficiency")},
              **{k: v for k, v in speed.items() if k != "cut_vs_mle_time_ratio"},
              **{k: v for k, v in memory.items() if k != "loss_memory_ratio"},
              "bars": {"cut_vs_mle_time_ratio": "<= 1.10", "padding_efficiency": ">= 0.90", "loss_memory_ratio": "<= 0.5",
                       "fused_peak_memory_ratio": "<= 0.5 (V=152k)", "fused_time_ratio": "<= 1.15"},
              "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
