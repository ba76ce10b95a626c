"""The training command line, and the check that a multi-process run really formed one group.

    launch_command(config_path, launch)   dsl.Launch -> argv of the training subprocess
    join_process_group(expected)          in the subprocess: form the group or stop, before any work

How a run is started (first match wins):
    CUT_ALIGN_LAUNCHER="torchrun --nnodes 2 --node-rank 0 ..."   this machine's launcher, verbatim
                           (multi-node runs need it: each node has its own rank and rendezvous)
    launch.accelerate_config=FILE    accelerate launch --config_file FILE --num_processes N -m cut_core.train.cli
    launch.processes > 1             python -m torch.distributed.run --standalone --nproc-per-node N -m ...
    otherwise                        python -m cut_core.train.cli CONFIG.json
We never write a distributed engine: torchrun and accelerate start the processes, the
Trainer (through accelerate) runs DDP / FSDP2 / DeepSpeed over them.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from cut_core.errors import UserError

LAUNCHER_ENV = "CUT_ALIGN_LAUNCHER"
MODULE = "cut_core.train.cli"


def launch_command(config_path: str | Path, launch: Any | None = None, *, python: str = sys.executable) -> list[str]:
    """argv that trains CONFIG_PATH as `launch` (a dsl.Launch, or None for one process) says."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher:
        return [*shlex.split(launcher), "-m", MODULE, str(config_path)]
    processes = getattr(launch, "processes", 1)  # launch=None: one process
    accelerate_config = getattr(launch, "accelerate_config", None)
    if accelerate_config:
        return [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                "--num_processes", str(processes), "-m", MODULE, str(config_path)]
    if processes > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                "-m", MODULE, str(config_path)]
    return [python, "-m", MODULE, str(config_path)]


def describe(launch: Any | None) -> str:
    """How training will be launched, for `cut-align check` and the train task's log."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher:
        return f"{LAUNCHER_ENV}={launcher!r} (overrides the declaration's launch section)"
    processes = getattr(launch, "processes", 1)
    if getattr(launch, "accelerate_config", None):
        return f"accelerate launch, {processes} process(es), config {launch.accelerate_config}"
    return f"torchrun, {processes} processes, data-parallel" if processes > 1 else "1 process"


class ProcessGroupError(UserError):
    """Several processes started but did not form one group: stop before any work."""


def world_from_env() -> int:
    """WORLD_SIZE as the launchers set it (torchrun, accelerate, mpirun), 1 when absent."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def join_process_group(expected: int | None = None, *, timeout_s: float = 600.0) -> int:
    """Form the process group the launcher asked for and check it; return the world size.

    `expected`: the processes the declaration asked for (None: whatever the launcher started).
    On CUDA the group uses NCCL, on CPU gloo (accelerate would otherwise treat each CPU process
    as a lone rank 0 and train N copies). Raises ProcessGroupError when more than one process
    was expected or started but no group of that size formed.
    """
    world = world_from_env()
    if expected is not None and expected > 1 and world == 1:
        raise ProcessGroupError(
            f"launch.processes={expected} but this process was started alone (no WORLD_SIZE from a launcher); "
            f"fix: start training through torchrun or accelerate launch ({LAUNCHER_ENV} or launch.accelerate_config), "
            "or set launch.processes=1")
    if world == 1:
        return 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise ProcessGroupError(
                    f"WORLD_SIZE={world} but {key} is not set: the launcher did not set up a rendezvous; "
                    "fix: launch with torchrun or accelerate launch")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except Exception as err:  # noqa: BLE001 — any failure to rendezvous is the same user-facing fact
            raise ProcessGroupError(f"{world} processes started but no process group formed ({err}); "
                                    "fix: check MASTER_ADDR/MASTER_PORT and that every process was started") from err
    if dist.get_world_size() != world:
        raise ProcessGroupError(f"the process group has {dist.get_world_size()} processes, the launcher "
                                f"announced {world}")
    return world
