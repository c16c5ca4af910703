"""Batched execution: run the K tasks of a fused model as one computation.

A fused model runs its K task graphs one after another, so at batch size 1 every layer is K small
kernels. When the tasks share an architecture, :func:`batch_tasks` rewrites the fused graph so
that each layer runs **once for all tasks**: the K tasks' feature maps are kept side by side along
the channel axis (the *task-stacked* layout, ``N × K·C × H × W``; task k owns channels
``k·C … (k+1)·C − 1``), every convolution becomes one grouped convolution with the K weights
stacked (``groups = K·g``), every batch norm one batch norm over ``K·C`` channels, every linear
layer one batched matmul, and channel-independent operations (activations, pools, residual adds,
flatten, resize) run unchanged on the stacked tensor. An NDDR layer is then a single 1×1
convolution: the concatenation of the tasks' maps *is* the stacked tensor.

The decision is taken per operation, by comparing the K tasks' nodes at the same position of each
segment (the stretch of a task's graph between two fusion levels): an operation is batched when
the K nodes have the same module type, hyper-parameters, parameter shapes and input/output shapes,
and a batched form exists; otherwise it runs per task on views of the stacked tensor. So two
models that differ only in their last layer (40 segmentation classes vs 3 normal channels) run
everything batched except that layer. :func:`batching_report` says what runs how, and why.
Which layer types have a batched form is a registry: :func:`register_batched_form` adds a
project's own types (e.g. a subclass of ``nn.Conv2d`` that keeps Conv2d's forward).

The batched model is a snapshot: it copies the fused model's weights when it is built. It trains
like any module (gradients, batch-norm running statistics, dropout with independent masks per
task); :meth:`BatchedFusedModel.sync` writes its weights back into the fused model, and
:meth:`BatchedFusedModel.fused_state_dict` gives them under the fused model's keys.

Where it pays: on a GPU at small batch sizes, where K small kernels cost K launches and leave the
device idle, the batched model launches one (``torch.compile(batched, mode="reduce-overhead")``
adds CUDA graphs). On a CPU the work is compute-bound and the same either way: expect the fused
model's latency (measured 0.94–1.0× at batch 1 on 2 × VGG-16 and 2 × ResNet-50 at 224², 1.1–1.2×
faster on small mobile networks, where fewer Python calls matter).

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.batching import batch_tasks
    >>> def cnn(classes):
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                          nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
    ...                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))
    >>> fused = nddrify.fuse({"seg": cnn(40), "normal": cnn(3)}, points=["2"]).eval()
    >>> batched = batch_tasks(fused)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> expected, out = fused(x), batched(x)
    >>> all(bool((out[t] - expected[t]).abs().max() < 1e-5) for t in ("seg", "normal"))
    True
    >>> print(batched.report)
    BatchingReport(2 tasks: seg, normal; 8 of 9 operations batched, 1 of 1 fusion layers)
      stage 0  x → nddr1           3/3 batched
      nddr1    batched
      stage 1  nddr1 → output      5/6 batched; per task: 8 (Linear: out_features 40 in seg vs 3 in normal)
"""

from __future__ import annotations

from ..errors import BatchingError
from .fusion_modules import TaskBatchedCrossStitch, TaskBatchedNDDR, TaskBatchedShortcut
from .model import BATCHED_META_KEY, BatchedFusedModel, batch_tasks, batching_report
from .modules import (
    CONV_MODES,
    TaskBatchedBatchNorm1d,
    TaskBatchedBatchNorm2d,
    TaskBatchedBatchNorm3d,
    TaskBatchedBatchNormAct2d,
    TaskBatchedConv1d,
    TaskBatchedConv2d,
    TaskBatchedConv3d,
    TaskBatchedConvTranspose1d,
    TaskBatchedConvTranspose2d,
    TaskBatchedConvTranspose3d,
    TaskBatchedLinear,
    cat_task_channels,
)
from .registry import register_batched_form
from .report import BatchingReport, FusionReport, PerTaskOperation, StageReport

__all__ = [
    "batch_tasks",
    "batching_report",
    "register_batched_form",
    "BatchedFusedModel",
    "BatchingReport",
    "StageReport",
    "PerTaskOperation",
    "FusionReport",
    "BatchingError",
    "TaskBatchedConv1d",
    "TaskBatchedConv2d",
    "TaskBatchedConv3d",
    "TaskBatchedConvTranspose1d",
    "TaskBatchedConvTranspose2d",
    "TaskBatchedConvTranspose3d",
    "TaskBatchedBatchNorm1d",
    "TaskBatchedBatchNorm2d",
    "TaskBatchedBatchNorm3d",
    "TaskBatchedBatchNormAct2d",
    "TaskBatchedLinear",
    "TaskBatchedNDDR",
    "TaskBatchedCrossStitch",
    "TaskBatchedShortcut",
    "cat_task_channels",
    "BATCHED_META_KEY",
    "CONV_MODES",
]
