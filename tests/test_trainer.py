"""CUTTrainer and the training subprocess (cut_core/train/trainer.py, cut_core/train/cli.py) on a tiny Llama.

Proves: example rows group into records and malformed ones are refused; the collator pairs
each Align-N row with its Misalign twin and adds no dummy rows; the sampler's batches do not
depend on how a global batch is split; a record's loss is the same scored alone or in a padded
(or packed) batch; 1x8, 2x4 and 8x1 (micro-batch x accumulation) give the same loss
trajectory; every trainable LoRA parameter changes and the base does not; gradient
checkpointing does not change the losses; a run interrupted after a checkpoint (exception
injected, or the subprocess SIGKILLed) resumes to the uninterrupted run's losses, ignoring an
incomplete checkpoint; the run writes adapter/, a merged model equal to base + adapter,
log_history.jsonl and COMPLETE, and a rerun does nothing; full fine-tuning and NLL-only
(baseline `mle`) data train too.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cut_core.train import cli as train_cli
from cut_core.train.trainer import (COMPLETE, CUTCollator, CUTConfig, CUTTrainer, LengthGroupedRecordSampler,
                              RecordDataset, load_model, padding_efficiency, records_from_rows)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
PAD, BOS, EOS = 0, 1, 2


# ---------------------------------------------------------------- fixtures: tiny model, synthetic examples

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with random weights and a word-level tokenizer over VOCAB ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny")
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def make_rows(n: int, seed: int = 0, kinds=("align_p", "cut", "cut", "cut")) -> list[dict]:
    """n triplets of random ids: 'cut' gives an align_n + misalign pair sharing the response."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        prompt = [BOS] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 12))]
        response = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 16))] + [EOS]
        if kind == "cut":
            judged = prompt + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 10))]
            rows.append({"triplet_id": f"t{i}", "kind": "align_n", "input_ids": judged + response,
                         "response_start": len(judged)})
            kind = "misalign"
        rows.append({"triplet_id": f"t{i}", "kind": kind, "input_ids": prompt + response,
                     "response_start": len(prompt)})
    return rows


def write_examples(path: Path, rows: list[dict]) -> Path:
    """The examples Parquet of docs/architecture.md."""
    schema = pa.schema([("triplet_id", pa.string()), ("kind", pa.string()),
                        ("input_ids", pa.list_(pa.int32())), ("response_start", pa.int32())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def config_for(model_dir, examples, out, **training) -> dict:
    base = {"learning_rate": 1e-2, "micro_batch_size": 2, "gradient_accumulation": 2, "warmup_steps": 0,
            "logging_steps": 1, "save_steps": 2, "scheduler": "linear"}
    return {"model_path": str(model_dir), "examples": str(examples), "output_dir": str(out),
            "objective": {"name": "cut", "threshold": 1.1, "alpha": 1.0},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.1}, "training": {**base, **training}, "max_steps": 6}


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


def assert_same_history(a: list[dict], b: list[dict], keys=("loss", "nll", "ut", "flagged_fraction", "learning_rate")):
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for ea, eb in zip(a, b):
        for k in keys:
            assert (k in ea) == (k in eb), (ea["step"], k)  # ut, flagged_fraction: only for windows with pairs
            if k in ea:
                assert ea[k] == pytest.approx(eb[k], rel=1e-5, abs=1e-7), (ea["step"], k)


# ---------------------------------------------------------------- records, collator, sampler

@pytest.mark.parametrize("mutate,message", [
    (lambda rows: rows.pop(1), "needs one align_n and one misalign"),
    (lambda rows: rows[1]["input_ids"].__setitem__(-2, 5 if rows[1]["input_ids"][-2] != 5 else 6), "response ids differ"),
    (lambda rows: rows[0].__setitem__("response_start", 0), "response_start"),
    (lambda rows: rows[0].__setitem__("kind", "align_x"), "unknown kind"),
    (lambda rows: rows.append(dict(rows[1])), "more than one misalign"),
])
def test_malformed_examples_are_refused(mutate, message):
    rows = make_rows(2, kinds=("cut", "align_p"))
    mutate(rows)
    with pytest.raises(ValueError, match=message):
        records_from_rows(rows)


@pytest.mark.parametrize("padding_free", [False, True])
def test_collator_pairs_twins_and_adds_no_dummy_rows(padding_free):
    records = records_from_rows(make_rows(6, kinds=("align_p", "cut", "mle")))
    batch = CUTCollator(pad_token_id=PAD, padding_free=padding_free)(records)
    n_cut = sum(r.kind == "cut" for r in records)
    assert batch["judged_response_lengths"].shape[0] == n_cut == 2
    assert batch["response_lengths"].shape[0] == len(records)  # one plain sequence per record, no dummy twin
    # the gold tokens each pass predicts: pairs first, identical between twins
    targets = lambda p: (batch[f"{p}input_ids"][:, 1:][batch[f"{p}predict_mask"][:, :-1]]).tolist()
    plain, judged = targets(""), targets("judged_")
    cut_tokens = int(batch["judged_response_lengths"].sum())
    assert judged == plain[:cut_tokens]
    expected = [t for r in sorted(records, key=lambda r: r.kind != "cut") for t in r.plain_ids[r.plain_start:]]
    assert plain == expected
    real, computed = padding_efficiency(batch)
    assert real == sum(r.length for r in records)
    assert (computed == real) if padding_free else (computed > real)


def test_sampler_batches_are_independent_of_the_micro_batch_split():
    lengths = [random.Random(i).randrange(5, 500) for i in range(100)]
    order = list(LengthGroupedRecordSampler(lengths, global_batch=8, seed=3, megabatch_groups=4))
    assert sorted(order) == list(range(100))
    assert order == list(LengthGroupedRecordSampler(lengths, global_batch=8, seed=3, megabatch_groups=4))
    again = LengthGroupedRecordSampler(lengths, global_batch=8, seed=3, megabatch_groups=4)
    again.set_epoch(1)
    assert list(again) != order
    # inside each global batch, records run longest first (micro-batches of similar length)
    for s in range(0, 96, 8):
        group = [lengths[i] for i in order[s:s + 8]]
        assert group == sorted(group, reverse=True)


# ---------------------------------------------------------------- the loss inside the trainer

@pytest.mark.parametrize("padding_free", [False, True])
def test_record_loss_is_the_same_alone_or_batched(model_dir, tmp_path, padding_free):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = records_from_rows(make_rows(10, kinds=("align_p", "cut", "cut", "mle")))
    args = CUTConfig(output_dir=str(tmp_path), threshold=1.1, alpha=1.0, padding_free=padding_free)
    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records))
    with torch.no_grad():
        _, batched = trainer.compute_loss(model, trainer.data_collator(records), return_outputs=True)
        alone = {id(r): trainer.compute_loss(model, trainer.data_collator([r]), return_outputs=True)[1]
                 for r in records}
    ordered = [r for r in records if r.kind == "cut"] + [r for r in records if r.kind != "cut"]
    torch.testing.assert_close(batched.per_record, torch.cat([alone[id(r)].per_record for r in ordered]),
                               atol=2e-6, rtol=2e-6)
    assert batched.flagged.sum() == sum(alone[id(r)].flagged.sum() for r in ordered) > 0


def _train(model_dir, records, out, *, micro, accum, steps=3, lora_dropout=0.0, **config):
    from cut_core.dsl import LoRA

    torch.manual_seed(0)
    model = load_model(model_dir, LoRA(r=4, alpha=8, dropout=lora_dropout))
    args = CUTConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                     max_steps=steps, learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_strategy="no",
                     threshold=1.1, alpha=1.0, disable_tqdm=True, dataloader_pin_memory=False, **config)
    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records))
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e]


def test_gradient_accumulation_is_exact(model_dir, tmp_path):
    # 21 records: the last step holds 5, split unevenly (2+2+1 at 2x4), so only a division by
    # the global record count (not per micro-batch means) gives equal losses.
    # LoRA dropout 0: different micro-batch shapes draw dropout masks differently.
    records = records_from_rows(make_rows(21, seed=1, kinds=("align_p", "cut", "cut", "mle")))
    _, one_big = _train(model_dir, records, tmp_path / "8x1", micro=8, accum=1)
    assert len(one_big) == 3
    for micro, accum in [(1, 8), (2, 4)]:
        _, split = _train(model_dir, records, tmp_path / f"{micro}x{accum}", micro=micro, accum=accum)
        assert_same_history(split, one_big)
    assert any(e.get("flagged_fraction", 0) > 0 for e in one_big) and one_big[-1]["loss"] != one_big[0]["loss"]


def test_every_trainable_lora_parameter_changes_and_the_base_does_not(model_dir, tmp_path):
    records = records_from_rows(make_rows(16, seed=2))
    from cut_core.dsl import LoRA

    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in load_model(model_dir, LoRA(r=4, alpha=8, dropout=0.0)).named_parameters()}
    trainer, _ = _train(model_dir, records, tmp_path, micro=2, accum=2, steps=3)
    params = dict(trainer.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("gate_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    unchanged = [n for n in trainable if torch.equal(params[n].detach(), before[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged}"
    frozen_moved = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert not frozen_moved


def test_gradient_checkpointing_gives_the_same_losses(model_dir, tmp_path):
    records = records_from_rows(make_rows(16, seed=3))
    _, plain = _train(model_dir, records, tmp_path / "a", micro=4, accum=1, steps=2)
    trainer, checkpointed = _train(model_dir, records, tmp_path / "b", micro=4, accum=1, steps=2,
                                   activation_checkpointing=True)
    assert trainer.model.get_base_model().is_activation_checkpointing
    assert_same_history(checkpointed, plain)


# ---------------------------------------------------------------- train_cli: outputs, resume, rerun

class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from peft import PeftModel

    examples = write_examples(tmp_path / "examples.parquet", make_rows(20, seed=4))
    reference = train_cli.run(config_for(model_dir, examples, tmp_path / "ref"))
    assert reference["steps"] == 6 and reference["resumed_from"] is None

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash("injected after checkpoint-4")

    out = tmp_path / "run"
    with pytest.raises(_Crash):
        train_cli.run(config_for(model_dir, examples, out), callbacks=[CrashAtStep5()])
    assert (out / "checkpoints/checkpoint-4" / COMPLETE).exists() and not (out / "COMPLETE").exists()
    # A checkpoint cut short mid-save: it must be ignored and removed, never resumed from.
    (out / "checkpoints/checkpoint-5").mkdir()
    (out / "checkpoints/checkpoint-5/trainer_state.json").write_text("{}")
    resumed = train_cli.run(config_for(model_dir, examples, out))
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert_same_history(history(out), history(tmp_path / "ref"))
    assert all("padding_efficiency" in e for e in history(out))

    # outputs: adapter, a merged model equal to base + adapter, tokenizer alongside
    assert (out / "COMPLETE").exists() and (out / "adapter/adapter_config.json").exists()
    ids = torch.tensor([[BOS, 17, 42, 99, 5, EOS]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out / "merged").eos_token == "</s>"

    # a rerun of a finished output_dir does nothing
    again = train_cli.run(config_for(model_dir, examples, out))
    assert again["skipped"] is True and again["steps"] == 6


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_uninterrupted_losses(model_dir, tmp_path):
    examples = write_examples(tmp_path / "examples.parquet", make_rows(40, seed=5))
    steps = 8
    reference = tmp_path / "ref"
    cfg = config_for(model_dir, examples, reference, micro_batch_size=4)
    train_cli.run({**cfg, "max_steps": steps})

    out = tmp_path / "run"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**cfg, "output_dir": str(out), "max_steps": steps}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "cut_core.train.cli", str(config_path)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints/checkpoint-2" / COMPLETE
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    assert not (out / "COMPLETE").exists()

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] is not None and summary["steps"] == steps
    assert_same_history(history(out), history(reference))

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and json.loads(rerun.stdout.strip().splitlines()[-1])["skipped"] is True


def test_full_finetune_writes_a_merged_model_and_no_adapter(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    examples = write_examples(tmp_path / "examples.parquet", make_rows(8, seed=6))
    cfg = config_for(model_dir, examples, tmp_path / "out", full_finetune=True, learning_rate=1e-3)
    summary = train_cli.run({**cfg, "adapter": None, "max_steps": 2})
    assert "adapter" not in summary and not (tmp_path / "out/adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_baseline_mle_rows_train_as_plain_nll_and_mismatched_objectives_are_refused(model_dir, tmp_path):
    mle = write_examples(tmp_path / "mle.parquet", make_rows(8, seed=7, kinds=("mle",)))
    cfg = config_for(model_dir, mle, tmp_path / "sft")
    cfg["objective"] = {"name": "sft"}
    train_cli.run({**cfg, "max_steps": 2})
    logged = history(tmp_path / "sft")
    assert len(logged) == 2 and all("ut" not in e and math.isclose(e["loss"], e["nll"], rel_tol=1e-6) for e in logged)

    pairs = write_examples(tmp_path / "pairs.parquet", make_rows(4, seed=8))
    with pytest.raises(ValueError, match="baseline"):
        train_cli.run({**cfg, "examples": str(pairs), "output_dir": str(tmp_path / "bad")})
    from cut_core.errors import UserError

    with pytest.raises(UserError, match="unknown config keys"):  # the user's to fix: exit 3, never retried
        train_cli.run({**cfg, "output_dir": str(tmp_path / "bad2"), "epochs": 3})


def test_cut_config_takes_its_objective_defaults_and_rules_from_the_dsl_sections(tmp_path):
    """CUTConfig's loss fields are owned by dsl.CUT / dsl.SelfDistill: the same defaults, and a
    value a section refuses is refused by CUTConfig too (one line naming the field)."""
    from pydantic import ValidationError

    from cut_core.dsl import CUT, SelfDistill

    args = CUTConfig(output_dir=str(tmp_path), use_cpu=True)
    cut, distill = CUT(), SelfDistill()
    assert (args.threshold, args.alpha, args.gamma, args.weighting) == (cut.threshold, cut.alpha, cut.gamma,
                                                                        cut.weighting)
    assert (args.objective, args.distillation_alpha) == (cut.name, distill.distillation_alpha)
    for section, field, bad in [(CUT, "threshold", 0.99), (CUT, "alpha", 0.0), (CUT, "alpha", 1.5),
                                (CUT, "gamma", -1.0), (CUT, "weighting", "mean"),
                                (SelfDistill, "distillation_alpha", 1.5)]:
        with pytest.raises(ValidationError):
            section(**{field: bad})
        with pytest.raises(ValueError, match=f"^{field}: .*got {bad!r}"):
            CUTConfig(output_dir=str(tmp_path), use_cpu=True, **{field: bad})
    assert CUTConfig(output_dir=str(tmp_path), use_cpu=True, threshold=float("inf")).threshold == float("inf")
    with pytest.raises(ValueError, match="objective must be one of 'cut', 'self_distill'"):
        CUTConfig(output_dir=str(tmp_path), use_cpu=True, objective="dpo")
