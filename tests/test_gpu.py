"""The CUDA path (skipped on machines without a CUDA GPU, as in CI).

Proves, on one GPU: gold-token log-probs from bf16 logits match the fp32 computation; CUT trains
with a bf16 frozen base and fp32 LoRA weights, logs finite losses and ships a merged model in
bf16; full fine-tuning trains fp32 master weights under bf16 autocast; DPO trains through TRL on
the GPU; batched generation in bf16 on the GPU returns one text per prompt, in order.
"""

import json

import pytest
import torch

from cut_core.train import cli as train_cli
from cut_core.train.loss import gold_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The tiny Llama, the synthetic CUT examples and the training config of test_trainer.py.
from test_trainer import config_for, make_rows, model_dir, write_examples  # noqa: E402,F401


def test_gold_logprobs_in_bf16_match_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 32000, device="cuda") * 3
    labels = torch.randint(0, 32000, (2, 64), device="cuda")
    exact = gold_logprobs(logits.double(), labels)
    got = gold_logprobs(logits.to(torch.bfloat16), labels, chunk_size=16)
    # bf16 keeps 8 bits of mantissa: logits of magnitude ~10 round by up to ~0.03
    torch.testing.assert_close(got.double(), exact, atol=0.1, rtol=0.0)


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_cut_trains_on_cuda_in_bf16(model_dir, tmp_path, full_finetune):  # noqa: F811
    from transformers import AutoModelForCausalLM

    examples = write_examples(tmp_path / "examples.parquet", make_rows(16, seed=3))
    config = config_for(model_dir, examples, tmp_path / "out", full_finetune=full_finetune)
    if full_finetune:
        config["adapter"] = None
        config["training"]["learning_rate"] = 1e-3
    summary = train_cli.run(config)
    assert summary["steps"] == 6
    history = [json.loads(line) for line in (tmp_path / "out" / "log_history.jsonl").read_text().splitlines()]
    assert history and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert any("flagged_fraction" in h for h in history)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert merged.config.dtype in (torch.bfloat16, "bfloat16")


def test_dpo_trains_on_cuda(model_dir, tmp_path):  # noqa: F811
    import polars as pl

    pairs = pl.DataFrame({"triplet_id": [f"t{i}" for i in range(8)], "chosen_id": [None] * 8,
                          "prompt": [f"t{10 + i} t11 t12 " for i in range(8)], "chosen": ["t20 t21"] * 8,
                          "rejected": ["t30 t31"] * 8, "chosen_reward": [None] * 8, "rejected_reward": [None] * 8},
                         schema_overrides={"chosen_id": pl.String, "chosen_reward": pl.Float64,
                                           "rejected_reward": pl.Float64})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    config = {"model_path": str(model_dir), "examples": str(tmp_path / "pairs.parquet"),
              "output_dir": str(tmp_path / "out"), "objective": {"name": "dpo"}, "adapter": {"r": 4},
              "training": {"learning_rate": 1e-3, "micro_batch_size": 4, "gradient_accumulation": 1,
                           "warmup_steps": 0, "logging_steps": 1}, "max_length": 32}
    assert train_cli.run(config)["steps"] == 2
    assert (tmp_path / "out" / "merged" / "config.json").exists()


def test_generation_on_cuda_in_bf16(model_dir):  # noqa: F811
    from cut_core.infer.generate import generate_texts, load_model

    model, tokenizer = load_model(str(model_dir))
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    prompts = ["t5 t6", "t7 t8 t9 t10 t11", "t12"]
    out = generate_texts(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
