"""CUTTrainer: a `transformers.Trainer` that trains CUT (METHOD.md §4) and NLL baselines.

Read top to bottom: records (what one training item is), the length-grouped sampler, the
paired collator, the config, the trainer, then model loading / checkpoint markers / merging.

One *record* is one training item of the loss:
    cut  an Align-N row [x, j-] + y and its Misalign twin x + y (same response ids), scored
         in the same step, because L1 compares the two position by position;
    nll  an Align-P row, or a baseline's `mle` row: plain NLL of the response.
Every record weighs the same: its loss is a mean over its own response tokens, and the loss
of a step is the sum of record losses divided by the number of records in the *global* batch
(all micro-batches, all processes), so 1x8 and 8x1 (micro-batch x accumulation) are the
same optimisation.

Padding: the judged (Align-N) rows and the plain rows (Misalign, Align-P, mle) run as two
forward passes, each padded to its own longest row, so neither the judgment's extra tokens
nor a dummy twin for Align-P rows cost compute; records are grouped by length. Logits are
computed only at the positions that predict response tokens (`logits_to_keep` as a bool
mask). By default (`logprob_path='fused'`) the forward stops at the final hidden states of those
positions and `loss.fused_gold_logprobs` projects them through the output head chunk by chunk,
recomputing in backward, so no [tokens, vocab] logits tensor (or its gradient) ever exists whole;
'materialized' keeps the model's logits at those positions (sequences.gold_response_logprobs).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from cut_core.dsl import CUT, SelfDistill
from cut_core.files import write_text_atomic
from cut_core.train.loss import cut_objective
from cut_core.data.sequences import (gold_logprobs_of, gold_response_logprobs, left_aligned, pad_id,
                                    response_outputs, right_padded)

KINDS = ("align_p", "align_n", "misalign", "mle")
COMPLETE = "COMPLETE"


# ---------------------------------------------------------------- records

@dataclass
class Record:
    """One loss item. `judged_*` is set only for a CUT pair (kind 'cut')."""

    kind: str                       # "cut" | "nll"
    triplet_id: str
    plain_ids: list[int]            # Misalign (cut) or the Align-P / mle sequence (nll)
    plain_start: int                # first response token in plain_ids
    judged_ids: list[int] | None = None
    judged_start: int | None = None

    @property
    def length(self) -> int:
        """Tokens this record costs in forward passes (both sequences of a pair)."""
        return len(self.plain_ids) + (len(self.judged_ids) if self.judged_ids is not None else 0)

    @property
    def sort_length(self) -> int:
        """The length batches are grouped by: the plain sequence, which every record has; a judged
        row is its twin plus a judgment, so similar plain lengths pad well in both passes, and pairs
        mix with Align-P records (sorting by `length` would separate them: measured worse too)."""
        return len(self.plain_ids)


def _check_row(row: dict) -> None:
    ids, start = row["input_ids"], row["response_start"]
    # start >= 1: the first response token is predicted from the last prompt position.
    if not 1 <= start < len(ids):
        raise ValueError(f"example {row['triplet_id']!r} ({row['kind']}): response_start={start} "
                         f"must lie in [1, {len(ids)}) so that at least one prompt and one response token exist")


def records_from_rows(rows: list[dict]) -> list[Record]:
    """Group example rows (the examples-Parquet schema, docs/architecture.md) into records.

    align_n + misalign with the same triplet_id become one 'cut' record; every align_p and
    mle row is its own 'nll' record. Order follows the first row of each record.
    """
    pairs: dict[str, dict[str, dict]] = {}
    order: list[tuple[str, Any]] = []
    for row in rows:
        kind = row["kind"]
        if kind not in KINDS:
            raise ValueError(f"example {row['triplet_id']!r}: unknown kind {kind!r}; expected one of {KINDS}")
        _check_row(row)
        if kind in ("align_n", "misalign"):
            slot = pairs.setdefault(row["triplet_id"], {})
            if not slot:
                order.append(("pair", row["triplet_id"]))
            if kind in slot:
                raise ValueError(f"triplet {row['triplet_id']!r} has more than one {kind} row")
            slot[kind] = row
        else:
            order.append(("row", row))
    records = []
    for what, item in order:
        if what == "row":
            records.append(Record("nll", str(item["triplet_id"]), list(item["input_ids"]), int(item["response_start"])))
            continue
        slot = pairs[item]
        if set(slot) != {"align_n", "misalign"}:
            raise ValueError(f"triplet {item!r} has {sorted(slot)} but a CUT pair needs one align_n and one misalign row")
        n, m = slot["align_n"], slot["misalign"]
        if list(n["input_ids"][n["response_start"]:]) != list(m["input_ids"][m["response_start"]:]):
            raise ValueError(f"triplet {item!r}: align_n and misalign response ids differ; L1 pairs them token by token")
        records.append(Record("cut", str(item), list(m["input_ids"]), int(m["response_start"]),
                              list(n["input_ids"]), int(n["response_start"])))
    return records


def load_records(path: str | Path) -> list[Record]:
    """Read an examples Parquet file into records (see `records_from_rows`)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["triplet_id", "kind", "input_ids", "response_start"])
    records = records_from_rows(table.to_pylist())
    if not records:
        raise ValueError(f"{path} holds no examples")
    return records


# A record that weighs nothing. With N processes the last global batch is filled up with these
# so every process runs the same number of micro-batches (DDP all-reduces in every backward);
# accelerate would otherwise repeat real records there and change the loss.
PAD_RECORD = Record("pad", "", [0, 0], 1)


class RecordDataset(Dataset):
    """The records; index len(records) is PAD_RECORD (the sampler's filler)."""

    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return PAD_RECORD if i == len(self.records) else self.records[i]


# ---------------------------------------------------------------- length-grouped sampler

class LengthGroupedRecordSampler(Sampler[int]):
    """Shuffled order in which each global batch holds records of similar length.

    Records are shuffled (seed + epoch), cut into megabatches of `megabatch_groups` global
    batches, sorted by length inside each megabatch (longest first, so an out-of-memory shows
    up in the first steps), cut into global batches, and the global batches shuffled. Batch
    boundaries depend only on the global batch size, never on how it is split into micro-
    batches, so 1x8 and 8x1 see the same records in the same steps.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int, megabatch_groups: int = 64,
                 pad_multiple: int = 1):
        self.lengths, self.global_batch, self.seed = list(lengths), global_batch, seed
        self.megabatch_groups, self.epoch = megabatch_groups, 0
        # With N processes: the short last group is filled with the PAD index (len(lengths)) up to
        # a multiple of micro-batch x N, so each process gets whole micro-batches of it.
        self.pad_multiple = pad_multiple
        tail = len(self.lengths) % global_batch
        self._pads = (-tail) % pad_multiple if tail else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) + self._pads

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = self.global_batch * self.megabatch_groups
        groups: list[list[int]] = []
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s:s + mega], key=lambda i: self.lengths[i], reverse=True)
            groups += [chunk[k:k + self.global_batch] for k in range(0, len(chunk), self.global_batch)]
        # A short last group stays last: moving it would shift every later batch boundary.
        tail = [groups.pop()] if groups and len(groups[-1]) < self.global_batch else []
        shuffled = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()] + tail
        return iter([i for group in shuffled for i in group] + [len(self.lengths)] * self._pads)


# ---------------------------------------------------------------- the paired collator

def _pad(seqs: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (sequences.right_padded): input_ids, attention_mask,
    predict_mask (positions whose next token is a response token), response_lengths."""
    return right_padded(seqs, starts, pad_id)


def _pack(seqs: list[list[int]], starts: list[int]) -> dict[str, torch.Tensor]:
    """All sequences in one row, no padding. Positions restart at 0 for each sequence and no
    attention mask is passed: transformers then builds a block-diagonal causal mask (or
    flash-attention varlen), so sequences cannot see each other."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    predict = torch.zeros(ids.shape, dtype=torch.bool)
    offset = 0
    for s, start in zip(seqs, starts):
        predict[0, offset + start - 1:offset + len(s) - 1] = True
        offset += len(s)
    lengths = torch.tensor([len(s) - start for s, start in zip(seqs, starts)], dtype=torch.long)
    return {"input_ids": ids, "position_ids": positions, "predict_mask": predict, "response_lengths": lengths}


@dataclass
class CUTCollator:
    """Records -> two forward passes: plain rows (cut pairs' Misalign first, then nll records)
    and judged rows (the pairs' Align-N, in the same order, keys prefixed `judged_`). The
    i-th judged sequence is the twin of the i-th plain sequence. No dummy rows: an nll record
    has no judged row. padding_free packs each pass into one row instead of padding it."""

    pad_token_id: int = 0
    padding_free: bool = False

    def _pass(self, records: list[Record], judged: bool) -> dict[str, torch.Tensor]:
        seqs = [r.judged_ids if judged else r.plain_ids for r in records]
        starts = [r.judged_start if judged else r.plain_start for r in records]
        return _pack(seqs, starts) if self.padding_free else _pad(seqs, starts, self.pad_token_id)

    def __call__(self, records: list[Record]) -> dict[str, torch.Tensor]:
        cut = [r for r in records if r.kind == "cut"]
        nll = [r for r in records if r.kind == "nll"]
        pads = [r for r in records if r.kind == "pad"]
        batch = self._pass(cut + nll + pads, judged=False)  # pads last: compute_loss drops them
        batch["pad_records"] = torch.tensor(len(pads))
        if cut:
            batch.update({f"judged_{k}": v for k, v in self._pass(cut, judged=True).items()})
        return batch


def padding_efficiency(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, computed tokens) of one collated batch, both passes."""
    real = computed = 0
    for prefix in ("", "judged_"):
        if f"{prefix}input_ids" not in batch:
            continue
        ids = batch[f"{prefix}input_ids"]
        mask = batch.get(f"{prefix}attention_mask")
        real += int(mask.sum()) if mask is not None else ids.numel()
        computed += ids.numel()
    return real, computed


# ---------------------------------------------------------------- config

def _section_default(section: type, name: str) -> Any:
    """The default of a DSL section's field: CUTConfig's loss fields take theirs from the sections
    that own them (`dsl.CUT`, `dsl.SelfDistill`), so the two cannot drift apart."""
    return section.model_fields[name].default


# The objectives CUTTrainer trains, by the names of the DSL sections it trains them for.
TRAINED_OBJECTIVES = (_section_default(CUT, "name"), _section_default(SelfDistill, "name"))


@dataclass
class CUTConfig(TrainingArguments):
    """`TrainingArguments` plus the CUT objective. The objective's fields take their defaults and
    their rules from the DSL's `CUT` and `SelfDistill` sections (one owner: a value the DSL refuses
    is refused here too); the optimiser defaults follow METHOD.md §5 where the DSL passes them in."""

    threshold: float = field(default=_section_default(CUT, "threshold"), metadata={
        "help": "lambda of Eq. 5: flag token t when p(y_t|x,j-)/p(y_t|x) > lambda (>= 1; inf flags nothing)."})
    alpha: float = field(default=_section_default(CUT, "alpha"), metadata={"help": "unlikelihood weight alpha of Eq. 6, in (0, 1]."})
    gamma: float = field(default=_section_default(CUT, "gamma"), metadata={
        "help": "focal exponent: w_t = alpha * p(y_t|x,j-)**gamma (0 = the reference code)."})
    weighting: str = field(default=_section_default(CUT, "weighting"), metadata={
        "help": "'reference': a negative record's loss is 1/2 (NLL(Align-N) + L1); 'paper': L1 + NLL(Align-N)."})
    objective: str = field(default=TRAINED_OBJECTIVES[0], metadata={
        "help": "'cut' (and the NLL baselines, whose examples are all NLL records), or 'self_distill': each "
        "Misalign row is distilled from its Align-N twin (the same model with the judgment in context, no "
        "gradient) on the same response tokens (loss.self_distill_objective)."})
    distillation_alpha: float = field(default=_section_default(SelfDistill, "distillation_alpha"), metadata={
        "help": "self_distill: TRL's divergence mix: 0 forward KL(teacher||student), 1 reverse KL, 0.5 JSD."})
    logprob_chunk_size: int | None = field(default=None, metadata={
        "help": "rows of logits computed / upcast to fp32 at once (None: 2**24 elements' worth)."})
    logprob_path: str = field(default="fused", metadata={
        "help": "'fused': gold log-probs from the final hidden states and the output projection, chunk by chunk, "
        "recomputed in backward (no [tokens, vocab] logits; a head it cannot fuse falls back, logged); "
        "'materialized': the model's logits at the response positions, then gold_logprobs."})
    padding_free: bool = field(default=False, metadata={
        "help": "pack each forward pass into one unpadded row (position ids restart per sequence). Exact with "
        "any attention; efficient with flash-attention (varlen); with sdpa/eager the attention mask is dense over "
        "the packed row, so long packs cost more attention compute than padding would."})
    length_megabatch_groups: int = field(default=64, metadata={
        "help": "global batches per length-sorting megabatch (larger: less padding, less randomness)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "must stay False: the collator's keys are not model.forward arguments."})
    report_to: str | list[str] = field(default="none", metadata={"help": "integrations receiving logs."})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "checkpoints kept; >= 2 so a complete one survives while the next is written."})

    def __post_init__(self):
        _check_objective_fields(self)
        if self.objective not in TRAINED_OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(map(repr, TRAINED_OBJECTIVES))}, "
                             f"got {self.objective!r}")
        if self.logprob_path not in ("fused", "materialized"):
            raise ValueError(f"logprob_path must be 'fused' or 'materialized', got {self.logprob_path!r}")
        super().__post_init__()


def _check_objective_fields(args: CUTConfig) -> None:
    """The loss fields checked by the DSL sections that own their rules (`dsl.CUT`,
    `dsl.SelfDistill`); a value they refuse is a ValueError, one line naming the field and its value."""
    from pydantic import ValidationError

    try:
        CUT(threshold=args.threshold, alpha=args.alpha, gamma=args.gamma, weighting=args.weighting)
        SelfDistill(distillation_alpha=args.distillation_alpha)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(map(str, first["loc"]))
        raise ValueError(f"{name}: {first['msg']}, got {getattr(args, name, first['input'])!r}") from None


# ---------------------------------------------------------------- the trainer

class CUTTrainer(Trainer):
    """Trainer with the CUT loss; datasets are `RecordDataset`s, batches come from `CUTCollator`.

    Logs, beside `loss`: `nll` (mean NLL term per record: Align-N for pairs, the sequence for
    nll records), `ut` (mean L1 of Eq. 6 per pair), `flagged_fraction` (flagged / response
    tokens of the pairs) and `padding_efficiency` (real / computed tokens), each a ratio of
    sums over the logging window, so it does not depend on how steps are split.
    """

    # compute_loss divides by the global record count itself; training_step must not rescale.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args: CUTConfig | None = None, train_dataset: RecordDataset | None = None,
                 processing_class=None, data_collator=None, **kwargs):
        if args is None or not isinstance(args, CUTConfig):
            raise TypeError("CUTTrainer needs args=CUTConfig(...)")
        if data_collator is None:
            data_collator = CUTCollator(pad_token_id=pad_id(processing_class, model), padding_free=args.padding_free)
        super().__init__(model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
                         processing_class=processing_class, **kwargs)
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self.tokens_trained = 0

    # -- data

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = self._train_batch_size * self.args.gradient_accumulation_steps * max(1, self.args.world_size)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        world = max(1, self.args.world_size)
        return LengthGroupedRecordSampler([r.sort_length for r in dataset.records], global_batch, seed,
                                          self.args.length_megabatch_groups,
                                          pad_multiple=self._train_batch_size * world if world > 1 else 1)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Records in the global batch: every micro-batch of this step, on every process."""
        count = torch.tensor(sum(b["response_lengths"].shape[0] - int(b.get("pad_records", 0))
                                 for b in batch_samples), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    # -- loss

    def _response_logprobs(self, model, inputs: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of every response token of one pass, [sequences, N] left-aligned, with its mask."""
        flat = gold_response_logprobs(
            model, inputs[f"{prefix}input_ids"], inputs[f"{prefix}predict_mask"],
            attention_mask=inputs.get(f"{prefix}attention_mask"), position_ids=inputs.get(f"{prefix}position_ids"),
            fused=self.args.logprob_path == "fused", chunk_size=self.args.logprob_chunk_size)
        return left_aligned(flat, inputs[f"{prefix}response_lengths"])

    def _self_distill_parts(self, model, inputs: dict):
        """objective 'self_distill': the plain pass is the student (Misalign rows, then nll rows), the
        judged pass (Align-N) the teacher, run without gradient; one forward per pass, divergence and
        gold log-probs from the same response-position outputs (hidden states with a fusable head)."""
        from cut_core.train.loss import self_distill_objective, self_distill_token_loss

        def outputs(prefix: str):
            return response_outputs(model, inputs[f"{prefix}input_ids"], inputs[f"{prefix}predict_mask"],
                                    attention_mask=inputs.get(f"{prefix}attention_mask"),
                                    position_ids=inputs.get(f"{prefix}position_ids"),
                                    fused=self.args.logprob_path == "fused")

        lengths = inputs["response_lengths"]
        student, head, targets = outputs("")
        proj = dict(weight=head.weight, bias=head.bias, softcap=head.softcap) if head is not None else {}
        n_cut = inputs["judged_input_ids"].shape[0] if "judged_input_ids" in inputs else 0
        n_tok = int(lengths[:n_cut].sum())
        chunk = self.args.logprob_chunk_size
        logp_rest = gold_logprobs_of(student[n_tok:], head, targets[n_tok:], chunk_size=chunk)
        logp_pos, pos_mask = left_aligned(logp_rest, lengths[n_cut:])
        if n_cut:
            if not torch.equal(inputs["judged_response_lengths"], lengths[:n_cut]):
                raise ValueError("self_distill: Align-N and Misalign rows differ in response length")
            with torch.no_grad():
                teacher, _, _ = outputs("judged_")
            per_token = self_distill_token_loss(student[:n_tok], teacher, distillation_alpha=self.args.distillation_alpha,
                                                chunk_size=chunk, **proj)
            divergence, neg_mask = left_aligned(per_token, lengths[:n_cut])
        else:
            divergence, neg_mask = logp_pos[:0, :0], pos_mask[:0, :0]
        return self_distill_objective(divergence, neg_mask, logp_pos, pos_mask)

    def _both_passes(self, model, inputs: dict):
        """(log p, mask) of the plain pass and of the judged pass (empty [0, 0] when the batch
        holds no CUT pair); the i-th judged row is the twin of the i-th plain row."""
        logp_plain, mask_plain = self._response_logprobs(model, inputs, "")
        if "judged_input_ids" in inputs:
            logp_judged, mask_judged = self._response_logprobs(model, inputs, "judged_")
        else:
            logp_judged, mask_judged = logp_plain[:0, :0], mask_plain[:0, :0]
        return logp_plain, mask_plain, logp_judged, mask_judged

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.objective == "self_distill":
            parts = self._self_distill_parts(model, inputs)
        else:
            logp_plain, mask_plain, logp_judged, mask_judged = self._both_passes(model, inputs)
            n_cut, width = mask_judged.shape
            parts = cut_objective(
                logp_judged, logp_plain[:n_cut, :width], mask_plain[:n_cut, :width],
                logp_plain[n_cut:], mask_plain[n_cut:],
                threshold=self.args.threshold, alpha=self.args.alpha, gamma=self.args.gamma,
                weighting=self.args.weighting)
        n_pad = int(inputs.get("pad_records", 0))
        if n_pad:  # filler records (last global batch of a multi-process run): in the graph, weight 0
            parts = _drop_pads(parts, n_pad)
        if num_items_in_batch is None:  # outside the training loop (e.g. evaluate): this batch alone
            loss = parts.per_record.mean()
        else:
            loss = parts.per_record.sum() / num_items_in_batch
            if self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients over processes
        if model.training:
            self._accumulate(parts, inputs)
        return (loss, parts) if return_outputs else loss

    def _accumulate(self, parts, inputs) -> None:  # noqa: D401 — sums for the logged ratios
        real, computed = padding_efficiency(inputs)
        s = self._sums
        with torch.no_grad():
            s["nll_sum"] += parts.nll_judged.sum().double().cpu() + parts.nll_plain.sum().double().cpu()
            s["nll_n"] += parts.nll_judged.numel() + parts.nll_plain.numel()
            s["ut_sum"] += parts.l1.sum().double().cpu()
            s["ut_n"] += parts.l1.numel()
            s["flagged"] += parts.flagged.sum().cpu()
            s["cut_tokens"] += parts.neg_mask.sum().cpu()
            s["real_tokens"] += real
            s["computed_tokens"] += computed
        self.tokens_trained += real  # this process's real tokens so far (train_cli's progress.json)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            keys = sorted(self._sums)
            totals = torch.stack([self._sums[k] for k in keys])
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
            t = dict(zip(keys, totals.tolist()))
            logs["nll"] = t["nll_sum"] / max(t["nll_n"], 1)
            if t["ut_n"] and self.args.objective == "self_distill":
                logs["distill"] = t["ut_sum"] / t["ut_n"]  # mean per-record divergence to the teacher
            elif t["ut_n"]:
                logs["ut"] = t["ut_sum"] / t["ut_n"]
                logs["flagged_fraction"] = t["flagged"] / max(t["cut_tokens"], 1)
            logs["padding_efficiency"] = t["real_tokens"] / max(t["computed_tokens"], 1)
            self._sums.clear()
        super().log(logs, start_time)


def _drop_pads(parts, n_pad: int):
    """The loss parts without the last n_pad NLL records (PAD_RECORDs). Their losses stay in
    the graph times zero, so a process whose micro-batch is all filler still runs backward
    through every parameter, as DDP's all-reduce needs."""
    from dataclasses import replace

    zero = parts.nll_plain[-n_pad:].sum() * 0.0
    kept = parts.per_record[:-n_pad]
    if kept.numel():
        kept = kept + zero / kept.numel()
    else:
        kept = zero.reshape(1)[:0] + zero  # no real record: an empty-sized sum that still holds the graph
    return replace(parts, per_record=kept, nll_plain=parts.nll_plain[:-n_pad])


# ---------------------------------------------------------------- checkpoints with a completion marker

class CompleteMarkerCallback(TrainerCallback):
    """Writes COMPLETE into a checkpoint after the Trainer has written everything else.

    A HF checkpoint is a folder filled file by file; a crash mid-save leaves a folder that
    looks like a checkpoint. Only one with the marker is ever resumed from.
    """

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (e.g. its RNG state) before the marker
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_text_atomic(folder / COMPLETE, f"{state.global_step}\n")
        return control


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    complete = [p for p in _checkpoints(Path(folder)) if (p / COMPLETE).exists()]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """Delete checkpoint folders without the marker (a save cut short): never resumed from,
    and a later save to the same step must not mix with their leftover files."""
    removed = [p for p in _checkpoints(Path(folder)) if not (p / COMPLETE).exists()]
    for p in removed:
        shutil.rmtree(p)
    return removed


# ---------------------------------------------------------------- model: load, LoRA, merge

def training_dtype() -> torch.dtype:
    """bf16 weights for a frozen base on a bf16-capable GPU; fp32 on CPU (CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def training_arguments(training: Any, *, output_dir: str | Path, max_steps: int | None, report_to: str) -> dict:
    """The `TrainingArguments` fields a `dsl.Training` decides, shared by CUT's and TRL's configs:
    steps/checkpoints/logs as the DSL says, bf16 on a bf16-capable GPU, fp32 on CPU."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=training.learning_rate, num_train_epochs=training.epochs, max_steps=max_steps or -1,
        per_device_train_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation,
        lr_scheduler_type=training.scheduler, warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay, seed=training.seed,
        activation_checkpointing=training.gradient_checkpointing,
        save_strategy="steps", save_steps=training.save_steps,
        logging_strategy="steps", logging_steps=training.logging_steps,
        bf16=on_gpu and training_dtype() == torch.bfloat16,
        report_to=report_to, dataloader_pin_memory=on_gpu, disable_tqdm=True,
        # On CPU, accelerate treats torchrun's processes as lone rank-0 copies unless told it is a
        # CPU run; then they form a gloo group (cut_core/train/launch.py has already joined it).
        use_cpu=not on_gpu,
        # DDP: a CUT micro-batch runs one or two forward passes (the judged pass only when it holds
        # pairs), so ranks may run different numbers of forwards per backward. Nothing may be
        # collective in forward (no buffer broadcast: LM buffers are constants such as rotary
        # frequencies) and every parameter is used in every step (no unused-parameter search).
        ddp_broadcast_buffers=False, ddp_find_unused_parameters=False,
    )


def lora_config(lora: Any, model):
    """A peft LoraConfig for `model` from a `dsl.LoRA` (or anything with its fields): the
    target modules resolved for this architecture (models.lora_targets), so a spec that would
    adapt nothing fails here, before training, with the names that exist."""
    from peft import LoraConfig

    from cut_core.models import lora_targets

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_targets(model, lora.target_modules), task_type="CAUSAL_LM")


def load_model(model_path: str | Path, lora: Any | None, *, full_finetune: bool = False, wrap: bool = True,
               init_adapter: str | Path | None = None):
    """The model to train: a LoRA-wrapped base (frozen base in `training_dtype()`, adapter in
    fp32), or the whole model in fp32 for full fine-tuning (bf16 autocast on GPU).
    `lora` is a `dsl.LoRA` (or anything with r, alpha, dropout, target_modules). wrap=False
    returns the LoRA run's base unwrapped, for trainers that wrap it themselves (TRL's).

    `init_adapter`: a PEFT adapter folder trained on this same base with this same LoRA config;
    the LoRA starts from its weights instead of a fresh init (a version stays "base + ONE
    adapter"). A different config raises ValueError (one line); implies wrap=True."""
    from transformers import AutoModelForCausalLM

    if full_finetune or lora is None:
        if lora is None and not full_finetune:
            raise ValueError("no LoRA adapter given: set full_finetune=True to train every weight")
        if init_adapter is not None:
            raise ValueError("init_adapter continues a LoRA adapter: it needs a LoRA run, not full fine-tuning")
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=training_dtype(), use_safetensors=True)
    if init_adapter is None:
        return get_peft_model(base, lora_config(lora, base)) if wrap else base
    model = get_peft_model(base, lora_config(lora, base))
    continue_adapter(model, init_adapter)
    return model


def _lora_fields(config) -> dict:
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def continue_adapter(model, adapter_dir: str | Path) -> None:
    """Load a saved adapter's weights into `model`'s fresh LoRA ("default"), refusing (ValueError,
    one line) an adapter saved with another LoRA config (rank, alpha, dropout, target modules)."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"init_adapter {adapter_dir} is not a PEFT adapter folder (no adapter_config.json); "
                         "fix: point it at the adapter/ folder of a finished LoRA run")
    saved, fresh = _lora_fields(LoraConfig.from_pretrained(str(adapter_dir))), _lora_fields(model.peft_config["default"])
    if saved != fresh:
        diff = ", ".join(f"{k} {saved[k]!r} -> {fresh[k]!r}" for k in saved if saved[k] != fresh[k])
        raise ValueError(f"the adapter section differs from the one {adapter_dir} was trained with ({diff}): "
                         "a version continues its adapter with the same LoRA config; fix: declare the previous "
                         "adapter section, or start from the declared base")
    state = load_peft_weights(str(adapter_dir), device="cpu")
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"init_adapter {adapter_dir} does not fit this base: {len(missing)} LoRA weights missing, "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {(missing + list(result.unexpected_keys))[:2]})")


def save_final(model, tokenizer, output_dir: str | Path, *, base_model: str | Path | None = None,
               base_ref: str | None = None) -> dict[str, str]:
    """Write `adapter/` (LoRA only) and `merged/` (a standalone model + tokenizer) under output_dir.
    Merging changes the model in place: call this last.

    LoRA runs: `adapter/` also holds the tokenizer, and its adapter_config.json names the base by
    its absolute path (`base_model`), so `AutoModelForCausalLM.from_pretrained(adapter/)` loads
    base + adapter on this machine; `merged/` carries cut_align_lineage.json (cut_core.models.lineage)."""
    output_dir = Path(output_dir)
    written = {}
    adapter = None
    if hasattr(model, "merge_and_unload"):
        adapter = output_dir / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        if base_model is not None:
            config_path = adapter / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["base_model_name_or_path"] = str(Path(base_model).resolve())
            write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        written["adapter"] = str(adapter)
        model = model.merge_and_unload()
    merged = output_dir / "merged"
    if torch.cuda.is_available() and model.dtype == torch.float32:
        model = model.to(training_dtype())  # full fine-tuning trained fp32 masters; ship the compute dtype
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    if adapter is not None and base_model is not None:
        from cut_core.models.lineage import MERGED_CONFIG, Lineage, write_lineage
        from cut_core.models.weights import adapter_digest, weights_digest

        # the merged config (use_cache, pad id... as training left them) travels with the adapter,
        # so a merge rebuilt elsewhere is this folder, byte for byte (lineage.merge_adapter)
        shutil.copyfile(merged / "config.json", adapter / MERGED_CONFIG)
        write_lineage(merged, Lineage(base_model=str(Path(base_model).resolve()), base_digest=weights_digest(base_model),
                                      adapter=str(adapter.resolve()), base_ref=base_ref,
                                      adapter_digest=adapter_digest(adapter), merged_digest=weights_digest(merged)))
    written["merged"] = str(merged)
    return written
