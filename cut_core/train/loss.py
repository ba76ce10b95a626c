"""The CUT loss (METHOD.md §4), as small pure functions on log-probabilities.

Notation (one record = one triplet):
    p_N,t = p(y_t | y<t, x, j-)   Align-N context (the judgment before the response)
    p_M,t = p(y_t | y<t, x)       Misalign context (the same response, judgment removed)
both from the *current* model, for the N response tokens t = 1..N (EOS included).

    flagged  U = { t : p_N,t / p_M,t > lambda }                                   (Eq. 5)
    L1 = -(1/N) [ sum_{t not in U} log p_M,t + sum_{t in U} w_t log(1 - p_M,t) ]  (Eq. 6)
         w_t = alpha * p_N,t ** gamma, detached
    L2 = NLL(y | x) for Align-P, NLL(y | x, j-) for Align-N                        (Eq. 7)

Every function takes per-token log-probabilities shaped [B, N] with a bool mask of real
tokens, so the same code scores one record or a padded batch, and returns *per-record*
values: the trainer sums them and divides by the number of records in the global batch,
which makes gradient accumulation exact (1x8 == 8x1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

# Rows of logits upcast to fp32 at once in `gold_logprobs` when no chunk size is given:
# 2**24 fp32 elements = 64 MiB per temporary, whatever the vocabulary size.
_CHUNK_ELEMENTS = 2**24
# Floor of 1 - p in log(1 - p). A flagged token has p_M < p_N / lambda <= 1/lambda, so for
# lambda > 1 the floor never binds on a flagged token; it only guards lambda = 1 and fp error.
_ONE_MINUS_P_FLOOR = 1e-6


# ---------------------------------------------------------------- log p of the gold token

class _GoldLogProb(torch.autograd.Function):
    """log softmax(logits)[label] for rows of logits, chunk by chunk in fp32.

    A plain `logits.float().log_softmax(-1).gather(...)` keeps a full-vocabulary fp32 copy
    (and its gradient) of the whole [tokens, V] tensor alive; autograd through a chunked
    version would still save every fp32 chunk for backward. Here forward keeps only the
    per-row logsumexp, and backward recomputes softmax chunk by chunk:
        d log p_label / d logits = onehot(label) - softmax(logits)
    so the extra memory is one fp32 chunk plus the gradient in the logits' own dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels >= 0
        safe_labels = labels.clamp(min=0)
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            rows = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(rows, dim=-1)
            out[s:s + chunk] = rows.gather(-1, safe_labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        out = torch.where(valid, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_labels, valid, lse = ctx.saved_tensors
        g = torch.where(valid, grad_out.float(), torch.zeros_like(lse))
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            probs = (logits[s:e].float() - lse[s:e, None]).exp_()
            probs.mul_(-g[s:e, None]).scatter_add_(-1, safe_labels[s:e, None], g[s:e, None])
            grad[s:e] = probs.to(grad.dtype)
        return grad, None, None


def gold_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """log p(label) under softmax(logits), without a full-vocabulary fp32 tensor.

        logp_t = logits_t[y_t] - logsumexp_v logits_t[v]

    `logits` [..., V] (any float dtype: bf16 on CUDA, fp32 on CPU) and `labels` [...] are
    already aligned (logits_t predicts labels_t; the caller shifts). A negative label (e.g.
    -100) gives 0 and no gradient. Returns fp32 [...]. `chunk_size` rows are upcast to fp32 at
    once (default: as many as fit 2**24 elements).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    vocab = logits.shape[-1]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // vocab)
    flat = _GoldLogProb.apply(logits.reshape(-1, vocab), labels.reshape(-1), chunk)
    return flat.view(labels.shape)


# ---------------------------------------------------------------- per-record terms

def masked_nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-record mean negative log-likelihood over real tokens: -(1/N) sum_t log p_t.  [B]"""
    mask = mask.to(logp.dtype)
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate near both ends and finite at p = 1.

    -expm1(logp) is exact where p is close to 1 (1 - p tiny), unlike 1 - exp(logp); the floor
    keeps the log finite when p rounds to 1.
    """
    return torch.log((-torch.expm1(logp.float())).clamp(min=_ONE_MINUS_P_FLOOR))


def cut_token_loss(
    logp_judged: torch.Tensor,
    logp_plain: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float,
    alpha: float,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 of Eq. 6, per record, with the detection of Eq. 5.

        U   = { t : log p_N,t - log p_M,t > log lambda }       (detached, strict >)
        L1  = -(1/N) [ sum_{t not in U} log p_M,t + sum_{t in U} w_t log(1 - p_M,t) ]
        w_t = alpha * p_N,t ** gamma                            (detached)

    logp_judged = log p_N [B, N] (Align-N context), logp_plain = log p_M [B, N] (Misalign
    context), `mask` [B, N] bool marks real response tokens (EOS included); N in 1/N counts
    real tokens only. threshold = inf flags nothing (L1 becomes the Misalign NLL).
    Returns (loss [B], flagged [B, N] bool). No gradient reaches `logp_judged` from here:
    it only decides which tokens are flagged and how much they weigh.
    """
    if threshold < 1.0:
        raise ValueError(f"threshold (lambda) must be >= 1, got {threshold}")
    mask = mask.bool()
    logp_judged = logp_judged.detach().float()
    logp_plain = logp_plain.float()
    log_ratio = logp_judged - logp_plain.detach()
    flagged = (log_ratio > math.log(threshold)) & mask
    weight = alpha * torch.exp(gamma * logp_judged) if gamma else torch.full_like(logp_judged, alpha)
    per_token = torch.where(flagged, weight * log1m_exp(logp_plain), logp_plain)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    n_real = mask.sum(-1).clamp(min=1).to(per_token.dtype)
    return -per_token.sum(-1) / n_real, flagged


# ---------------------------------------------------------------- the full objective

@dataclass
class CUTLoss:
    """Per-record losses of one (micro-)batch and the parts the trainer logs.

    per_record: [R_neg + R_pos], negatives first (each an Align-N/Misalign pair), then the
    NLL-only records (Align-P, and baselines' `mle` rows), in the order they were given.
    """

    per_record: torch.Tensor
    l1: torch.Tensor          # [R_neg] Eq. 6 per negative record
    nll_judged: torch.Tensor  # [R_neg] NLL(Align-N) per negative record (its L2 part)
    nll_plain: torch.Tensor   # [R_pos] NLL of each Align-P / mle record
    flagged: torch.Tensor     # [R_neg, N] bool
    neg_mask: torch.Tensor    # [R_neg, N] bool, real tokens of the negatives


def cut_objective(
    logp_judged: torch.Tensor,
    logp_misalign: torch.Tensor,
    neg_mask: torch.Tensor,
    logp_positive: torch.Tensor,
    pos_mask: torch.Tensor,
    *,
    threshold: float,
    alpha: float,
    gamma: float = 0.0,
    weighting: Literal["reference", "paper"] = "reference",
) -> CUTLoss:
    """The CUT objective per record, in one of two weightings.

    Negative record (Align-N [x, j-] and its Misalign twin x, same response tokens):
        reference:  1/2 * ( NLL(y | x, j-) + L1 )     the released code
        paper:      L1 + NLL(y | x, j-)               L_CUT = L1 + L2
    NLL record (Align-P, or a baseline's `mle` row):  NLL(y | x)   in both weightings.

    Each term is a mean over that record's response tokens, so every record weighs the
    same whatever its length; the caller averages records over the global batch.
    logp_judged / logp_misalign / neg_mask: [R_neg, N]; logp_positive / pos_mask: [R_pos, N'].
    Either group may be empty (R = 0).
    """
    if weighting not in ("reference", "paper"):
        raise ValueError(f"weighting must be 'reference' or 'paper', got {weighting!r}")
    l1, flagged = cut_token_loss(logp_judged, logp_misalign, neg_mask,
                                 threshold=threshold, alpha=alpha, gamma=gamma)
    nll_judged = masked_nll(logp_judged.float(), neg_mask)
    nll_plain = masked_nll(logp_positive.float(), pos_mask)
    negative = 0.5 * (nll_judged + l1) if weighting == "reference" else nll_judged + l1
    return CUTLoss(
        per_record=torch.cat([negative, nll_plain]),
        l1=l1, nll_judged=nll_judged, nll_plain=nll_plain,
        flagged=flagged, neg_mask=neg_mask.bool(),
    )


# ---------------------------------------------------------------- log p of the gold token from hidden states

class _FusedGoldLogProb(torch.autograd.Function):
    """log softmax(head(h))[label] from hidden states, the [rows, V] logits never whole.

        z   = h W^T (+ b)                       the output projection, one chunk of rows at a time
        s   = c * tanh(z / c)  (soft-cap c)     or s = z without a cap
        out = s[label] - logsumexp_v s[v]

    Forward keeps h, W, b and the per-row logsumexp; backward recomputes each chunk's logits:
        d out / d s = onehot(label) - softmax(s)
        d s / d z   = 1 - (s / c)^2             (with a cap)
        dh = dz W,  dW = dz^T h,  db = sum_rows dz
    so the extra memory is one chunk of logits (and its gradient) in fp32, whatever the number of
    rows. The weight gradient is computed only when the weight requires one; dW accumulates in
    fp32 over the chunks. With a frozen head (LoRA) forward computes d out_t / d h_t while each
    chunk's logits exist and backward only scales it by the incoming gradient: no recompute, the
    head costs the FLOPs of materialized logits (forward + dh), and no weight-gradient FLOPs.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, labels, chunk, softcap):
        valid = labels >= 0
        safe = labels.clamp(min=0)
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # A frozen head (LoRA) needs only dh. Row t's output depends on row t of h alone, so
        # dh_t = g_t * d out_t / d h_t: the per-row derivative is computed here from the chunk's
        # logits while they exist, and backward only scales it; no recompute, same FLOPs as
        # materialized logits, and it is [rows, H] like the hidden states it replaces.
        forward_grad = need_h and not need_w and not need_b
        jac = torch.empty_like(hidden) if forward_grad else None
        for s in range(0, hidden.shape[0], chunk):
            z = _head_logits(hidden[s:s + chunk], weight, bias, softcap)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(-1, safe[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if forward_grad:
                dz = _dlogp_dz(z, lse[s:s + chunk], safe[s:s + chunk], torch.ones_like(lse[s:s + chunk]), softcap)
                jac[s:s + chunk] = (dz.to(weight.dtype) @ weight).to(jac.dtype)
        out = torch.where(valid, out, torch.zeros_like(out))
        if forward_grad:
            ctx.save_for_backward(jac, valid)
        else:
            ctx.save_for_backward(hidden, weight, bias, safe, valid, lse)
        ctx.chunk, ctx.softcap, ctx.forward_grad = chunk, softcap, forward_grad
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")  # recompute under the forward's autocast state
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.forward_grad:
            jac, valid = ctx.saved_tensors
            g = torch.where(valid, grad_out.float(), torch.zeros_like(grad_out, dtype=torch.float32))
            return (jac.float() * g[:, None]).to(jac.dtype), None, None, None, None, None
        hidden, weight, bias, safe, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = torch.where(valid, grad_out.float(), torch.zeros_like(lse))
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = s + ctx.chunk
            h = hidden[s:e]
            dz = _dlogp_dz(_head_logits(h, weight, bias, ctx.softcap), lse[s:e], safe[s:e], g[s:e], ctx.softcap)
            if need_h:
                grad_h[s:e] = (dz.to(weight.dtype) @ weight).to(grad_h.dtype)
            if need_w:  # fp32 accumulation over chunks; the product in the hidden states' dtype
                grad_w.add_(dz.t().to(h.dtype) @ h)
            if need_b:
                grad_b.add_(dz.sum(0))
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None)


def _dlogp_dz(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
              softcap: float | None) -> torch.Tensor:
    """g * d log p_label / d z for one chunk, in place over z (capped logits s when softcap):
    g (onehot - softmax(s)), times 1 - (s / c)^2 under a cap."""
    cap_factor = 1.0 - (z / softcap).square_() if softcap else None
    dz = (z - lse[:, None]).exp_()
    dz.mul_(-g[:, None]).scatter_add_(-1, labels[:, None], g[:, None])
    if cap_factor is not None:
        dz.mul_(cap_factor)
    return dz


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | None) -> torch.Tensor:
    """fp32 logits of one chunk: the projection in the weights' dtype (bf16 on GPU), then upcast."""
    z = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def fused_gold_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        bias: torch.Tensor | None = None, softcap: float | None = None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """log p(label) under softmax(softcap(hidden W^T + b)), chunk by chunk, recomputed in backward.

    hidden [..., H] (the final hidden states at the positions that predict `labels`), weight
    [V, H] (the output projection: lm_head's, or the tied input embedding), bias [V] or None,
    softcap c: logits become c * tanh(z / c) (Gemma 2's final_logit_softcapping). A negative
    label gives 0 and no gradient. Returns fp32 [...], equal to
    `gold_logprobs(softcap(hidden @ weight.T + bias), labels)` in value and gradient (hidden,
    weight, bias), without a [rows, V] tensor alive whole in forward or backward.
    `chunk_size` rows at once (default: 2**24 logits' worth).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not project hidden size {hidden.shape[-1]}")
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // weight.shape[0])
    flat = _FusedGoldLogProb.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                   chunk, float(softcap) if softcap else None)
    return flat.view(labels.shape)


# ---------------------------------------------------------------- judgment-conditioned self-distillation

def self_distill_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                            distillation_alpha: float = 0.5) -> torch.Tensor:
    """Per-token divergence between the teacher's and the student's next-token distributions.

    The comparator of TRL's experimental SDFT/SDPO (`privileged_context`, "full_logits" mode),
    with its `distillation_alpha` convention (written beta below):

        s_t = log softmax(student_t),  q_t = log softmax(teacher_t)  (teacher detached)
        beta = 0:    KL(q || s) = sum_v e^q_t[v] (q_t[v] - s_t[v])        forward KL
        beta = 1:    KL(s || q) = sum_v e^s_t[v] (s_t[v] - q_t[v])        reverse KL
        0 < beta < 1: generalized Jensen-Shannon, m_t = (1 - beta) e^s_t + beta e^q_t,
                      D_t = beta KL(q || m) + (1 - beta) KL(s || m)     (beta = 0.5: JSD, SDFT's default)

    student_logits / teacher_logits [rows, V] (any float dtype; computed in fp32). Returns fp32
    [rows], >= 0, zero where the two distributions are equal. No gradient reaches the teacher.
    """
    beta = distillation_alpha
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"distillation_alpha must lie in [0, 1], got {beta}")
    s = torch.log_softmax(student_logits.float(), dim=-1)
    q = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    if beta == 0.0:
        return (q.exp() * (q - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - q)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1.0 - beta), q + math.log(beta)]), dim=0)
    return beta * (q.exp() * (q - m)).sum(-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(-1)


def _divergence_chunk(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, softcap: float | None, distillation_alpha: float) -> torch.Tensor:
    if weight is not None:  # hidden states: project this chunk only
        student = _head_logits(student, weight, bias, softcap)
        with torch.no_grad():
            teacher = _head_logits(teacher, weight, bias, softcap)
    return self_distill_divergence(student, teacher, distillation_alpha=distillation_alpha)


def self_distill_token_loss(student: torch.Tensor, teacher: torch.Tensor, *, distillation_alpha: float = 0.5,
                            weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            softcap: float | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """`self_distill_divergence` per response token, in chunks of rows, recomputed in backward.

    student / teacher [rows, D]: the two contexts' outputs at the same response positions (row i of
    both predicts the same response token): logits (D = V, weight None), or final hidden states
    (D = H) with the output head `weight` [V, H], `bias`, `softcap`, so that no [rows, V] tensor
    is alive whole. Each chunk runs under activation checkpointing: backward recomputes its logits
    instead of keeping every chunk's. Returns fp32 [rows]; the teacher gets no gradient.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} do not align")
    from torch.utils.checkpoint import checkpoint

    vocab = weight.shape[0] if weight is not None else student.shape[-1]
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // vocab)
    teacher = teacher.detach()
    pieces = []
    for s in range(0, student.shape[0], chunk):
        args = (student[s:s + chunk], teacher[s:s + chunk], weight, bias, softcap, distillation_alpha)
        pieces.append(checkpoint(_divergence_chunk, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else _divergence_chunk(*args))
    return torch.cat(pieces) if pieces else student.new_zeros((0,), dtype=torch.float32)


def self_distill_objective(
    divergence: torch.Tensor,
    neg_mask: torch.Tensor,
    logp_positive: torch.Tensor,
    pos_mask: torch.Tensor,
) -> CUTLoss:
    """Judgment-conditioned self-distillation per record, on CUT's own examples.

    Negative record (Align-N [x, j-] + y as the teacher, its Misalign twin x + y as the student,
    the same model, teacher detached, the same response tokens y_1..y_N):
        L_SD = (1/N) sum_t D(p(. | y<t, x, j-) , p(. | y<t, x))      D: `self_distill_divergence`
    NLL record (Align-P, or a baseline's `mle` row):  NLL(y | x), as in CUT.

    divergence / neg_mask: [R_neg, N] per-token D and the real-token mask; logp_positive /
    pos_mask: [R_pos, N']. Returns a `CUTLoss` whose `l1` holds L_SD per negative record
    (no token is flagged; `nll_judged` is empty: the teacher context is not trained).

    The teacher is the *live* model (TRL's teacher_model_kind="live"), prompted with CUT's judge
    template, which asks for a response that *matches* the judgment. That is the Align-N context
    CUT contrasts against; for a negative judgment it is also a teacher that may favour the very
    mistake the judgment names (CUT's detection relies on exactly that), unlike SDPO's reprompt,
    which asks the teacher to solve the task correctly given the feedback.
    """
    mask = neg_mask.bool()
    per_token = torch.where(mask, divergence.float(), torch.zeros_like(divergence, dtype=torch.float32))
    l_sd = per_token.sum(-1) / mask.sum(-1).clamp(min=1).to(per_token.dtype)
    nll_plain = masked_nll(logp_positive.float(), pos_mask)
    return CUTLoss(per_record=torch.cat([l_sd, nll_plain]), l1=l_sd, nll_judged=l_sd.new_zeros((0,)),
                   nll_plain=nll_plain, flagged=torch.zeros_like(mask), neg_mask=mask)
