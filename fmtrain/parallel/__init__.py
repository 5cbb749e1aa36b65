"""Process groups, device and seeds for one training process.

The layout (TP x CP x PP x DP, with virtual pipeline stages) lives in megatron-core's
``parallel_state``; this module starts ``torch.distributed`` from the environment torchrun
or SLURM leaves, picks NCCL on CUDA and gloo on CPU (installing the CPU stand-ins in
:mod:`fmtrain.parallel.cpu_backend`), and seeds every generator megatron uses.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fmtrain.config import Config, data_parallel_size, validate
from fmtrain.parallel import slurm


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the layout. All sizes are >= 1."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    vpp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    cp: int = 1
    cp_rank: int = 0

    @property
    def layout(self) -> dict[str, int]:
        """What a checkpoint records of the layout (RNG states are restored only under the same)."""
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "cp": self.cp, "dp": self.dp}

    def describe(self) -> str:
        """``TP=.. PP=.. VPP=.. [CP=..] DP=..`` for logs."""
        cp = f" CP={self.cp}" if self.cp > 1 else ""
        return f"TP={self.tp} PP={self.pp} VPP={self.vpp}{cp} DP={self.dp}"

    @property
    def is_writer(self) -> bool:
        """Rank 0 prints, logs and writes run-level files."""
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def process_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else srun's, else one process."""
    if "RANK" in os.environ:
        return (_env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1), _env_int("LOCAL_RANK", default=0))
    # A task of an srun step (not the batch script, which has SLURM_PROCID=0 but no step id):
    # rank 0's node and a port from the job id give every task the same rendezvous address.
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        master = slurm.srun_master()
        if master is not None:
            os.environ.setdefault("MASTER_ADDR", master[0])
            os.environ.setdefault("MASTER_PORT", str(master[1]))
        return (
            _env_int("SLURM_PROCID", default=0),
            _env_int("SLURM_NTASKS", default=1),
            _env_int("SLURM_LOCALID", default=0),
        )
    return 0, 1, 0


def initialize(cfg: Config, timeout_minutes: int = 30) -> Topology:
    """Start torch.distributed and megatron's process groups for ``cfg.parallel``.

    The config is validated against the world size before any process group exists, so a
    layout that does not fit fails with the numbers that disagree.
    """
    rank, world_size, local_rank = process_env()
    validate(cfg, world_size)
    dp = data_parallel_size(cfg, world_size)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # srun --gpus-per-task=1 leaves each task one visible GPU: local rank 1 is then cuda:0.
        local_device = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(local_device)
        device = torch.device("cuda", local_device)
        backend = "nccl"
    else:
        from fmtrain.parallel import cpu_backend

        cpu_backend.install()
        device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if use_cuda else None,
        )

    from megatron.core import parallel_state

    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
            context_parallel_size=p.cp,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=True,
        )
    topo = Topology(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
        cp=p.cp,
        cp_rank=parallel_state.get_context_parallel_rank(),
    )
    if p.cp > 1:
        from fmtrain.parallel import context

        context.init_deepspeed_comm(backend)
    set_seeds(cfg.run.seed)
    return topo


def set_seeds(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker.

    Weights do not depend on these (they come from the layout-invariant initialiser); these
    drive dropout and anything stochastic in a family's forward.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
