"""Any Hugging Face causal LM: four architectures built locally from configs, default settings.

Proves: with the default LoRA settings ('all-linear') a Llama, a GPT-2 (Conv1D layers, tied
head), a GPT-NeoX and a Phi (head with a bias) each go materialize -> CUT training steps ->
merge -> greedy generation, every LoRA weight changes and the merged model differs from the
base; 'mlp' (the paper's choice) finds each architecture's feed-forward layers; LoRA names that
exist nowhere and other unusable model folders are refused before any work, in one line that
names the field and the fix (`cut-align check` shows them).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch

from cut_core.train import cli as train_cli
from cut_core.data.contrast import materialize
from cut_core.dsl import CUT
from cut_core.models import inspect_model, lora_targets, meta_model
from cut_core.models.tiny import make_tiny_model

ARCHS = ["llama", "gpt2", "gpt_neox", "phi"]
MLP = {"llama": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"], "gpt2": ["mlp.c_fc", "mlp.c_proj"],
       "gpt_neox": ["mlp.dense_4h_to_h", "mlp.dense_h_to_4h"], "phi": ["mlp.fc1", "mlp.fc2"]}

TRIPLETS = pl.DataFrame(
    [("p1", "What is 2 + 2?", "2 + 2 = 4.", None, "positive"),
     ("n1", "What is 3 * 3?", "3 * 3 = 6.", "Wrong: 3 * 3 is 9, not 6.", "negative"),
     ("n2", "Say hello.", "Go away.", "The response is rude.", "negative"),
     ("n3", "Name a fruit.", "A chair.", "A chair is not a fruit.", "negative")],
    schema=["id", "instruction", "response", "judgment", "polarity"], orient="row")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "model"
    return request.param, make_tiny_model(out, architecture=request.param, max_position_embeddings=256)


def test_default_lora_trains_merges_and_generates(arch_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cut_core.infer.generate import generate

    arch, model_dir = arch_model
    assert inspect_model(model_dir, max_length=128) == []
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = materialize(TRIPLETS, tokenizer, objective=CUT(threshold=1.0, align_p_ratio=None),
                           max_length=128, out_dir=tmp_path / "examples")
    config = {"model_path": str(model_dir), "examples": str(examples), "output_dir": str(tmp_path / "out"),
              "objective": {"name": "cut", "threshold": 1.0, "alpha": 1.0},
              "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},  # target_modules: the default
              "training": {"learning_rate": 5e-2, "micro_batch_size": 2, "gradient_accumulation": 1,
                           "warmup_steps": 0, "logging_steps": 1, "save_steps": 100}, "max_steps": 2}
    summary = train_cli.run(config)
    assert summary["steps"] == 2

    adapter = load_file(tmp_path / "out/adapter/adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "every LoRA B matrix left zero moved"
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                             tmp_path / "out/adapter").eval()
    ids = torch.tensor([tokenizer("What is 3 * 3?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)
    texts = generate(merged, tokenizer, ["What is 3 * 3?", "Say hello."], max_new_tokens=4, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_mlp_targets_are_found_per_architecture(arch_model):
    from transformers import AutoConfig

    arch, model_dir = arch_model
    model = meta_model(AutoConfig.from_pretrained(model_dir))
    assert lora_targets(model, "mlp") == MLP[arch]
    with pytest.raises(ValueError, match=r"adapter.target_modules \['nonexistent_proj'\] match no linear layer"):
        lora_targets(model, ["nonexistent_proj"])


def test_unusable_model_folders_are_one_line_errors(tmp_path):
    model_dir = make_tiny_model(tmp_path / "gpt2", architecture="gpt2", max_position_embeddings=128)
    problems = inspect_model(model_dir, template="chat", max_length=512, lora_spec=["gate_proj", "up_proj"])
    assert len(problems) == 3, problems
    assert problems[0].startswith("model.template='chat'") and "fix:" in problems[0]
    assert problems[1].startswith("model.max_length=512 is beyond the 128 positions") and "fix:" in problems[1]
    assert problems[2].startswith("adapter.target_modules ['gate_proj', 'up_proj'] match no linear layer of "
                                  "GPT2LMHeadModel") and "fix:" in problems[2]
    assert all("\n" not in p for p in problems)
    assert inspect_model(tmp_path / "absent")[0].startswith(f"model.path {tmp_path / 'absent'} does not exist")
    assert inspect_model(tmp_path / "absent", can_build=True) == []


def test_cut_align_check_reports_model_problems_before_any_work(tmp_path, capsys):
    from flows.cli import main

    make_tiny_model(tmp_path / "gpt2", architecture="gpt2", max_position_embeddings=128)
    declaration = tmp_path / "p.py"
    declaration.write_text(textwrap.dedent("""
        from cut_core.dsl import *
        pipeline = Pipeline(name="arch-check", model=Model(path="gpt2", max_length=512),
                            adapter=LoRA(target_modules=["gate_proj"]))
    """))
    assert main(["check", str(declaration)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("error: model.max_length=512") for line in err), err
    assert any(line.startswith("error: adapter.target_modules ['gate_proj']") for line in err), err
    assert not any("Traceback" in line for line in err)
