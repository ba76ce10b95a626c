"""The CUT loss functions (cut_core/train/loss.py) compute METHOD.md §4's equations exactly.

Proves: gold_logprobs equals a naive log_softmax + gather (values and gradients, fp32 and
bf16, any chunking, ignored labels); the paper's Fig. 2 toy flags exactly the token "a" at
lambda = 1.1 and L1 has the hand-computed value; detection is strict and lambda = +inf flags
nothing, reducing the objective to plain MLE in both weightings; L1 sends no gradient to the
Align-N log-probs while the Misalign log-probs get gradient through both of its terms; the
focal weight is alpha * p^gamma; log(1 - p) stays finite at p -> 1; padding does not change a
record's loss.
"""

import math

import pytest
import torch

from cut_core.train.loss import cut_objective, cut_token_loss, gold_logprobs, log1m_exp, masked_nll

# ---------------------------------------------------------------- gold_logprobs


def _naive(logits, labels):
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels >= 0, logp, torch.zeros_like(logp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 64])
def test_gold_logprobs_matches_naive_log_softmax_gather(dtype, chunk_size):
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 7, 50)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 2] = labels[1, 6] = -100
    weights = torch.randn(2, 7)

    ours = gold_logprobs(logits, labels, chunk_size=chunk_size)
    (ours * weights).sum().backward()
    grad_ours, logits.grad = logits.grad.clone(), None
    ref = _naive(logits, labels)
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert grad_ours.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_ours.float(), logits.grad.float(), atol=tol, rtol=tol)
    assert ours[0, 2] == 0 and grad_ours[0, 2].abs().sum() == 0  # ignored label: no value, no gradient


def test_gold_logprobs_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="do not align"):
        gold_logprobs(torch.zeros(2, 5, 10), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- Fig. 2 toy

# The paper's Fig. 2: p(token | x, j-) vs p(token | x) for a response with a wrong article.
FIG2 = [("a", 0.82, 0.03), ("tok2", 0.94, 0.94), ("tok3", 0.76, 0.93),
        ("tok4", 0.99, 0.99), ("tok5", 0.02, 0.03), ("EOS", 0.89, 0.85)]


def _fig2():
    judged = torch.log(torch.tensor([[p_n for _, p_n, _ in FIG2]]))
    plain = torch.log(torch.tensor([[p_m for _, _, p_m in FIG2]]))
    return judged, plain, torch.ones_like(judged, dtype=torch.bool)


def test_fig2_toy_flags_only_the_inappropriate_token():
    judged, plain, mask = _fig2()
    loss, flagged = cut_token_loss(judged, plain, mask, threshold=1.1, alpha=1.0)
    assert flagged[0].tolist() == [True, False, False, False, False, False]

    # L1 by hand: -(1/6) [ sum over unflagged log p_M + alpha * log(1 - 0.03) ]
    expected = -(sum(math.log(p_m) for _, _, p_m in FIG2[1:]) + math.log(1 - 0.03)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_fig2_toy_with_alpha_half_weights_the_unlikelihood_term():
    judged, plain, mask = _fig2()
    loss, _ = cut_token_loss(judged, plain, mask, threshold=1.1, alpha=0.5)
    expected = -(sum(math.log(p_m) for _, _, p_m in FIG2[1:]) + 0.5 * math.log(1 - 0.03)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- detection edge cases


def test_detection_is_strict():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    mask = torch.ones_like(logp, dtype=torch.bool)
    _, flagged = cut_token_loss(logp, logp.clone(), mask, threshold=1.0, alpha=1.0)
    assert not flagged.any()  # ratio == lambda == 1: not flagged (strict >)
    _, flagged = cut_token_loss(logp + 1e-3, logp, mask, threshold=1.0, alpha=1.0)
    assert flagged.all()


@pytest.mark.parametrize("weighting", ["reference", "paper"])
def test_infinite_threshold_flags_nothing_and_reduces_to_mle(weighting):
    torch.manual_seed(1)
    judged = torch.log(torch.rand(3, 5) * 0.98 + 0.01)
    plain = judged - 5.0  # the judgment makes every token far likelier: any finite lambda would flag
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pos = torch.log(torch.rand(2, 4) * 0.98 + 0.01)
    pos_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)

    out = cut_objective(judged, plain, mask, pos, pos_mask, threshold=math.inf, alpha=1.0, weighting=weighting)
    assert not out.flagged.any()
    nll_n, nll_m, nll_p = masked_nll(judged, mask), masked_nll(plain, mask), masked_nll(pos, pos_mask)
    scale = 0.5 if weighting == "reference" else 1.0
    torch.testing.assert_close(out.per_record, torch.cat([scale * (nll_n + nll_m), nll_p]))
    assert torch.equal(cut_objective(judged, plain, mask, pos, pos_mask, threshold=1.1, alpha=1.0).flagged, mask)


def test_unknown_weighting_and_threshold_below_one_are_errors():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="weighting"):
        cut_objective(x, x, m, x, m, threshold=1.1, alpha=1.0, weighting="mean")
    with pytest.raises(ValueError, match="threshold"):
        cut_token_loss(x, x, m, threshold=0.9, alpha=1.0)


# ---------------------------------------------------------------- gradients


def test_l1_gives_no_gradient_to_judged_and_both_terms_reach_misalign():
    judged, plain, mask = _fig2()
    judged.requires_grad_(True)
    plain.requires_grad_(True)
    loss, flagged = cut_token_loss(judged, plain, mask, threshold=1.1, alpha=1.0)
    loss.sum().backward()
    assert judged.grad is None or judged.grad.abs().sum() == 0
    n = mask.sum().item()
    p = plain.exp().detach()
    # unflagged: d(-log p)/d log p / N = -1/N; flagged: d(-w log(1-p))/d log p / N = w p/(1-p) / N
    expected = torch.where(flagged, p / (1 - p) / n, torch.full_like(p, -1 / n))
    torch.testing.assert_close(plain.grad, expected)
    assert (plain.grad[flagged] > 0).all() and (plain.grad[~flagged] < 0).all()


@pytest.mark.parametrize("weighting,scale", [("reference", 0.5), ("paper", 1.0)])
def test_objective_reaches_align_n_only_through_its_nll(weighting, scale):
    judged, plain, mask = _fig2()
    judged.requires_grad_(True)
    pos = torch.log(torch.tensor([[0.3, 0.6, 0.9]])).requires_grad_(True)
    out = cut_objective(judged, plain, mask, pos, torch.ones(1, 3, dtype=torch.bool),
                        threshold=1.1, alpha=1.0, weighting=weighting)
    out.per_record.sum().backward()
    # only the NLL(Align-N) term: d(-scale * mean log p_N)/d log p_N = -scale / N, the same for every token
    torch.testing.assert_close(judged.grad, torch.full_like(judged, -scale / 6))
    torch.testing.assert_close(pos.grad, torch.full_like(pos, -1 / 3))


def test_focal_weight_is_alpha_times_p_judged_to_the_gamma():
    judged, plain, mask = _fig2()
    plain.requires_grad_(True)
    loss, flagged = cut_token_loss(judged, plain, mask, threshold=1.1, alpha=0.5, gamma=2.0)
    w = 0.5 * 0.82 ** 2
    expected = -(sum(math.log(p_m) for _, _, p_m in FIG2[1:]) + w * math.log(1 - 0.03)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_log_one_minus_p_is_finite_with_finite_gradient_at_p_one():
    logp = torch.tensor([0.0, -1e-9, -1e-6, -0.5, -30.0], requires_grad=True)
    out = log1m_exp(logp)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()
    assert out[3].item() == pytest.approx(math.log(1 - math.exp(-0.5)), rel=1e-6)
    # fp32 1 - exp(x) would be ~5% off here (exp(-1e-6) rounds near 1); expm1 keeps the digits
    assert out[2].item() == pytest.approx(math.log(-math.expm1(-1e-6)), abs=1e-4)


# ---------------------------------------------------------------- padding invariance


def test_padding_does_not_change_a_records_loss():
    torch.manual_seed(2)
    lengths = [5, 2, 4]
    records = [(torch.log(torch.rand(1, n) * 0.9 + 0.05), torch.log(torch.rand(1, n) * 0.9 + 0.05)) for n in lengths]
    singles = [cut_token_loss(j, p, torch.ones(1, j.shape[1], dtype=torch.bool), threshold=1.1, alpha=0.7)[0]
               for j, p in records]
    width = max(lengths)
    # Padding holds garbage on purpose: masked positions must not matter.
    judged = torch.full((3, width), -0.01)
    plain = torch.full((3, width), -9.0)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, (j, p) in enumerate(records):
        judged[i, :lengths[i]], plain[i, :lengths[i]], mask[i, :lengths[i]] = j[0], p[0], True
    batched, flagged = cut_token_loss(judged, plain, mask, threshold=1.1, alpha=0.7)
    torch.testing.assert_close(batched, torch.cat(singles))
    assert not flagged[~mask].any()
