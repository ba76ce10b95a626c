"""Judgment-conditioned self-distillation (objective "self_distill", loss.self_distill_*).

Proves: the divergence is TRL's (forward KL, reverse KL, generalized JSD by distillation_alpha),
zero for equal distributions and positive otherwise, with no gradient into the teacher; the
chunked form from hidden states equals the plain form on logits in value and gradient; inside
the trainer a record's loss is zero when the teacher's context equals the student's and positive
when the judgment is in it; 1x8, 2x4 and 8x1 give the same losses; a run interrupted after a
checkpoint resumes to the uninterrupted losses; the DSL, the CLI summary and the contrast step
route the objective to CUT's pairs.
"""

import pytest
import torch
from test_trainer import (BOS, EOS, VOCAB, _Crash, assert_same_history, config_for, history,  # noqa: F401
                          make_rows, model_dir, write_examples)

from cut_core.train import cli as train_cli
from cut_core.train.loss import self_distill_divergence, self_distill_token_loss
from cut_core.train.trainer import COMPLETE, CUTConfig, CUTTrainer, RecordDataset, load_model, records_from_rows

KEYS = ("loss", "nll", "distill", "learning_rate")


# ---------------------------------------------------------------- the pure loss

@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0, 0.2])
def test_divergence_is_trl_s_zero_iff_equal_and_never_trains_the_teacher(mix):
    torch.manual_seed(0)
    student = torch.randn(6, 11, requires_grad=True)
    teacher = torch.randn(6, 11, requires_grad=True)
    d = self_distill_divergence(student, teacher, distillation_alpha=mix)
    assert d.shape == (6,) and (d > 1e-4).all()
    assert self_distill_divergence(student, student.detach().clone(), distillation_alpha=mix).abs().max() < 1e-6
    s, q = student.log_softmax(-1), teacher.log_softmax(-1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # KL(a || b) on log-probs
    m = ((1 - mix) * s.exp() + mix * q.exp()).log()
    want = {0.0: kl(q, s), 1.0: kl(s, q)}.get(mix, mix * kl(q, m) + (1 - mix) * kl(s, m))
    torch.testing.assert_close(d, want, atol=1e-5, rtol=1e-5)
    d.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_chunked_from_hidden_states_equals_the_plain_form_on_logits():
    torch.manual_seed(1)
    weight = torch.randn(50, 8, requires_grad=True)
    h_student = torch.randn(13, 8, requires_grad=True)
    h_teacher = torch.randn(13, 8)
    chunked = self_distill_token_loss(h_student, h_teacher, weight=weight, chunk_size=4, distillation_alpha=0.5)
    (chunked * torch.arange(13.0)).sum().backward()
    grads = h_student.grad.clone(), weight.grad.clone()
    h_student.grad = weight.grad = None
    plain = self_distill_divergence(h_student @ weight.T, h_teacher @ weight.T, distillation_alpha=0.5)
    (plain * torch.arange(13.0)).sum().backward()
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], h_student.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- inside the trainer

def _pairs(judged_prefix: bool) -> list[dict]:
    """CUT pairs whose Align-N context is the Misalign one (judged_prefix=False) or adds a judgment."""
    rows = make_rows(6, seed=11, kinds=("cut",))
    if not judged_prefix:
        for n, m in zip(rows[0::2], rows[1::2]):
            n["input_ids"], n["response_start"] = list(m["input_ids"]), m["response_start"]
    return rows


@pytest.mark.parametrize("logprob_path", ["fused", "materialized"])
def test_loss_is_zero_with_the_same_context_and_positive_with_the_judgment(model_dir, tmp_path, logprob_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    args = CUTConfig(output_dir=str(tmp_path), objective="self_distill", logprob_path=logprob_path)
    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset([]))
    with torch.no_grad():
        same = trainer.compute_loss(model, trainer.data_collator(records_from_rows(_pairs(False))), return_outputs=True)[1]
        judged = trainer.compute_loss(model, trainer.data_collator(records_from_rows(_pairs(True))), return_outputs=True)[1]
        # mixed with Align-P / mle records: those are plain NLL, as in CUT
        mixed_records = records_from_rows(make_rows(6, seed=12, kinds=("align_p", "cut", "mle")))
        mixed = trainer.compute_loss(model, trainer.data_collator(mixed_records), return_outputs=True)[1]
    # (a random model's distributions are near uniform: the divergences are small but far from 0)
    assert same.per_record.shape == (6,) and same.per_record.abs().max() < 1e-7
    assert (judged.per_record > 1e-4).all()
    assert mixed.per_record.shape == (6,) and mixed.l1.shape == (2,) and (mixed.nll_plain > 1.0).all()


def _train(model_dir, records, out, *, micro, accum, steps=3):
    from cut_core.dsl import LoRA

    torch.manual_seed(0)
    model = load_model(model_dir, LoRA(r=4, alpha=8, dropout=0.0))
    args = CUTConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                     max_steps=steps, learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_strategy="no",
                     objective="self_distill", disable_tqdm=True, dataloader_pin_memory=False)
    trainer = CUTTrainer(model=model, args=args, train_dataset=RecordDataset(records))
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e]


def test_gradient_accumulation_is_exact(model_dir, tmp_path):
    records = records_from_rows(make_rows(21, seed=1, kinds=("align_p", "cut", "cut", "mle")))
    one_big = _train(model_dir, records, tmp_path / "8x1", micro=8, accum=1)
    assert len(one_big) == 3 and all(e["distill"] > 0 for e in one_big)
    assert one_big[-1]["loss"] != one_big[0]["loss"]
    for micro, accum in [(1, 8), (2, 4)]:
        assert_same_history(_train(model_dir, records, tmp_path / f"{micro}x{accum}", micro=micro, accum=accum),
                            one_big, keys=KEYS)


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    from transformers import TrainerCallback

    examples = write_examples(tmp_path / "examples.parquet", make_rows(20, seed=4))

    def config(out):
        cfg = config_for(model_dir, examples, out)
        return {**cfg, "objective": {"name": "self_distill", "distillation_alpha": 0.5}}

    reference = train_cli.run(config(tmp_path / "ref"))
    assert reference["steps"] == 6
    assert all("distill" in e and "ut" not in e for e in history(tmp_path / "ref"))

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash("injected after checkpoint-4")

    out = tmp_path / "run"
    with pytest.raises(_Crash):
        train_cli.run(config(out), callbacks=[CrashAtStep5()])
    assert (out / "checkpoints/checkpoint-4" / COMPLETE).exists() and not (out / "COMPLETE").exists()
    resumed = train_cli.run(config(out))
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert_same_history(history(out), history(tmp_path / "ref"), keys=KEYS)


# ---------------------------------------------------------------- the pipeline's routing

def test_dsl_cli_and_contrast_route_self_distill_to_cut_pairs(tmp_path):
    import polars as pl
    from transformers import AutoTokenizer

    from cut_core.data.contrast import materialize
    from cut_core.dsl import CUT, SelfDistill
    from cut_core.models.tiny import make_tiny_model
    from flows.cli import objective_summary

    tok = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "tiny"))
    triplets = pl.DataFrame([("p1", "Name a fruit.", "Apple.", "Perfect.", "positive"),
                             ("n1", "What is 3 * 3?", "6.", "Wrong: 3 * 3 is 9.", "negative"),
                             ("n2", "Say hello.", "Go away.", "The response is rude.", "negative")],
                            schema=["id", "instruction", "response", "judgment", "polarity"], orient="row")
    built = {section: pl.read_parquet(materialize(triplets, tok, objective=section(align_p_ratio=None),
                                               max_length=128, out_dir=tmp_path / section.__name__))
             .sort("triplet_id", "kind") for section in (CUT, SelfDistill)}
    assert built[SelfDistill].to_dicts() == built[CUT].to_dicts()
    assert sorted(built[SelfDistill]["kind"]) == ["align_n", "align_n", "align_p", "misalign", "misalign"]

    assert "SelfDistill(distillation_alpha=1.0, align_p_ratio=0.25)" in objective_summary(SelfDistill(distillation_alpha=1.0))
    with pytest.raises(Exception, match="distillation_alpha"):
        SelfDistill(distillation_alpha=1.5)
