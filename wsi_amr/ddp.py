"""Data-parallel training under ``torchrun``: the same training script, one process per GPU (NCCL)
or per share of the CPUs (gloo).

``torchrun --nproc-per-node N --no-python wsi-amr train segment ...`` starts N copies; each one
joins the process group here (from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that torchrun sets),
computes its share of every step's *global* batch (``--batch-size`` is the batch of the whole
step, as in one process), and the gradients are summed over the processes in one flat all-reduce
before the optimizer steps, so every process keeps the same weights. Losses pooled over the batch
(cross-entropy normalised by the labelled area, soft Dice) are pooled over all processes with
:meth:`Group.global_sum`, so N processes give one process's result for the same global batch,
within floating-point rounding. Rank 0 alone writes checkpoints, logs and progress.

The gradient sum is done by hand rather than by ``DistributedDataParallel``: an IPS step runs
no-grad selection passes and one forward and backward per bag, which DDP's per-forward hooks fit
badly, and one all-reduce per step costs the same for the small models trained here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from wsi_amr.params import naming


class GroupError(Exception):
    """This process cannot take its place in the group (device or launch problem); one line."""


@dataclass(frozen=True)
class Group:
    """This process's place among ``world`` training processes (``world`` 1: training alone,
    every collective is a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and talks to the user."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """The indices of ``n`` items (a step's crops or bags) this process computes: a
        contiguous block, the blocks of all processes covering 0..n-1 once."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes, in place (no gradient flows through)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def global_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes, differentiable towards this process's own
        term only: a loss computed from global sums then gives each process the gradient of its
        own share, and the summed gradients are the gradient of the whole batch's loss."""
        if self.world == 1:
            return tensor
        others = self.all_sum(tensor.detach().clone()) - tensor.detach()
        return tensor + others

    def sum_values(self, *values: float) -> list[float]:
        """Python numbers summed over the processes (float64)."""
        if self.world == 1:
            return list(values)
        return self.all_sum(torch.tensor(values, dtype=torch.float64, device=self._comm_device())).tolist()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true in any process (a stop request seen by one of them)."""
        return bool(self.sum_values(float(flag))[0]) if self.world > 1 else flag

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes, in one flat all-reduce (a missing
        gradient counts as zeros, so every process sends the same layout)."""
        if self.world == 1:
            return
        params = list(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_sum(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's weights and buffers in every process."""
        if self.world > 1:
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def broadcast_error(self, message: str | None) -> str | None:
        """Rank 0's error message (or None) in every process."""
        if self.world == 1:
            return message
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def group_from_env(env: Mapping[str, str] | None = None) -> Group:
    """This process's place as torchrun's environment says; alone without it."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
        local = int(env.get("LOCAL_RANK") or 0)
    except ValueError:
        raise GroupError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (start with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise GroupError(f"RANK {rank} is not one of WORLD_SIZE {world} processes (start with torchrun)")
    return Group(rank, world, local)


def process_device(device: torch.device, name: str, group: Group) -> torch.device:
    """The device of this process: with several processes, ``cuda`` (or ``auto`` on a GPU
    machine) becomes ``cuda:LOCAL_RANK``, one GPU each; a fixed ``cuda:N`` would put every process
    on one GPU and is refused, as is MPS."""
    if group.world == 1:
        return device
    if device.type == "cuda":
        if name.startswith("cuda:"):
            raise naming(GroupError(f"device {name} under torchrun would put every process on one GPU; give cuda "
                                    "(each process takes cuda:LOCAL_RANK) or set CUDA_VISIBLE_DEVICES"), "device")
        if group.local_rank >= torch.cuda.device_count():
            raise GroupError(f"LOCAL_RANK {group.local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                             "start at most one process per GPU (--nproc-per-node)")
        return torch.device("cuda", group.local_rank)
    if device.type != "cpu":
        raise naming(GroupError(f"device {name}: training over several processes runs on CUDA (NCCL) or the CPU (gloo)"),
                     "device")
    return device


@contextlib.contextmanager
def process_group(group: Group, device: torch.device, timeout_s: float = 1800) -> Iterator[None]:
    """Join torchrun's process group for the block (NCCL on a GPU, gloo on the CPU); nothing to
    do for one process."""
    if group.world == 1:
        yield
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=group.rank, world_size=group.world,
                            timeout=_dt.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
