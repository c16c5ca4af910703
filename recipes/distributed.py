"""Multi-process training helpers: process-group setup under ``torchrun``, reductions, and a
BatchNorm that synchronises its batch statistics across processes on any device.

``torch.nn.SyncBatchNorm`` only runs on GPUs; :class:`CrossProcessBatchNorm2d` does the same on
CPU (gloo) with two differentiable all-reduces (sum and count, then the centred sum of squares),
so a 2-process CPU run computes the same batch statistics, losses and gradients as one process
with the whole batch. :func:`convert_sync_batchnorm` picks torch's own on CUDA.

Example:
    >>> import torch
    >>> context = setup_distributed("cpu")  # without torchrun: one process, nothing initialised
    >>> context.rank, context.world_size, context.is_main, context.device
    (0, 1, True, device(type='cpu'))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "DistContext",
    "setup_distributed",
    "teardown_distributed",
    "all_reduce_sum",
    "gather_objects",
    "broadcast_object",
    "barrier",
    "CrossProcessBatchNorm2d",
    "convert_sync_batchnorm",
]


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes checkpoints, logs and plots."""
        return self.rank == 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA device is available; use device=cpu.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the
    environment): NCCL on CUDA, gloo on CPU. Otherwise a one-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank, world_size, local_rank, chosen, initialized=True)


def teardown_distributed(context: DistContext) -> None:
    """Leave the process group (if this context joined one)."""
    if context.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    """Wait for every process (no-op in one process)."""
    if context.initialized:
        dist.barrier()


def all_reduce_sum(values: Mapping[str, float], context: DistContext) -> dict[str, float]:
    """Sum each value over the processes (float64, one all-reduce)."""
    if not context.initialized:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if context.device.type == "cuda":
        tensor = tensor.to(context.device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


def gather_objects(obj: Any, context: DistContext) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in one process)."""
    if not context.initialized:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, context: DistContext) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not context.initialized:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every process's input is the sum of
    every process's output gradient, as for one process holding the whole batch."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the batches of all processes.

    Two differentiable all-reduces (sums over the processes): the
    per-channel sums and counts give the global mean; the centred sums of squares give the
    global (biased) variance, as one process would compute on the whole batch. Running statistics
    are updated with the unbiased variance like ``nn.BatchNorm2d``. Outside a process group, in
    eval mode, or without batch statistics it is exactly ``nn.BatchNorm2d``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if dist.get_world_size() == 1:
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        x = input.float()
        channels = x.shape[1]
        local_count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        first = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), local_count]))
        total = first[-1]
        mean = first[:channels] / total
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                factor = (
                    1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)  # type: ignore[union-attr]
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` in place by a synchronised one: torch's
    ``SyncBatchNorm`` on CUDA, :class:`CrossProcessBatchNorm2d` elsewhere (weights, buffers and
    train/eval flags are kept). Returns ``module``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        >>> type(convert_sync_batchnorm(net, torch.device("cpu"))[1]).__name__
        'CrossProcessBatchNorm2d'
    """
    if device.type == "cuda":
        replaced = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        if replaced is not module:
            raise ConfigError("sync_bn: the network itself is a BatchNorm layer.")
        return module
    for name, child in list(module.named_modules()):
        if type(child) is not nn.BatchNorm2d:
            continue
        synced = CrossProcessBatchNorm2d(
            child.num_features,
            eps=child.eps,
            momentum=child.momentum,
            affine=child.affine,
            track_running_stats=child.track_running_stats,
        )
        synced.load_state_dict(child.state_dict())
        synced.train(child.training)
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, synced)
    return module
