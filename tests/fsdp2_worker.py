"""Worker for tests/test_fsdp2.py, started by torchrun: one CUT step of CUTTrainer.compute_loss on a
model sharded with FSDP2's fully_shard (gloo, CPU), each rank scoring its share of the records,
against the same step unsharded on all records. Prints one JSON line per log-prob path on rank 0.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/fsdp2_worker.py MODEL_DIR
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer import make_rows  # noqa: E402

from cut_core.train.trainer import CUTCollator, CUTConfig, CUTTrainer, records_from_rows  # noqa: E402


def loss_of(model, records, n_global: int, args: CUTConfig) -> torch.Tensor:
    trainer = CUTTrainer.__new__(CUTTrainer)  # compute_loss only: no Trainer machinery, no accelerate
    trainer.args = args
    trainer._sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    return trainer.compute_loss(model, CUTCollator()(records), num_items_in_batch=torch.tensor(n_global))


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    records = records_from_rows(make_rows(8, seed=3))
    for path in ("materialized", "fused"):
        args = CUTConfig(output_dir="unused", threshold=1.1, alpha=1.0, logprob_path=path, use_cpu=True,
                         report_to="none")
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        loss_of(reference, records, len(records), args).backward()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        # Two forward passes (plain, judged) before one backward, on this rank's records.
        loss = loss_of(model, records[rank::world], len(records), args)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        # FSDP2 averages gradients over ranks; each rank's loss is already over the global count.
        diff = max((p.grad.full_tensor() * world - q.grad).abs().max().item()
                   for p, q in zip(model.parameters(), reference.parameters()))
        if rank == 0:
            print(json.dumps({"path": path, "loss": total.item(), "reference_loss": loss_of(
                reference, records, len(records), args).item(), "grad_max_abs_diff": diff}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
