"""The inference form of a fused model: ``nddrify.inference.optimize_for_inference(fused)``.

Folds what eval mode makes constant, so fewer passes run over the feature maps:

* in every NDDR layer (full, low-rank, grouped), each task's BatchNorm into its 1×1 weights and
  a bias (:meth:`~nddrify.layers.NDDRLayer.fold_norms`); eval-mode layers already fold it on
  the fly at every call, the inference form does it once;
* with ``backbones=True`` (default), every ``Conv2d → BatchNorm2d`` pair of the task models
  whose convolution feeds only that norm (found on the fused model's node-by-node eval graph),
  the norm becoming ``nn.Identity`` (``torch.nn.utils.fusion.fuse_conv_bn_eval``).

The result equals the eval-mode model up to float rounding (tested to 1e-5 relative to the
largest output) and is for inference only: ``.train()`` on it raises
:class:`~nddrify.errors.FusionConfigError` (its norms are gone). The original is untouched
unless ``inplace=True``. ``optimized.meta["nddrify_inference"]`` records what was folded.

Example:
    >>> import torch, torchvision, nddrify
    >>> fused = nddrify.fuse([torchvision.models.resnet18(), torchvision.models.resnet18()]).eval()
    >>> fast = nddrify.inference.optimize_for_inference(fused)
    >>> fast.meta["nddrify_inference"]
    InferenceForm(fusion_norms=10, conv_bn_pairs=40)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> with torch.no_grad():
    ...     bool(max((a - b).abs().max() for a, b in zip(fast(x), fused(x))) < 1e-4)
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layers.nddr import PerTaskOutputs
from .meta import INFERENCE_META_KEY
from .rewriting import FusedGraphModule

__all__ = ["optimize_for_inference", "InferenceForm", "INFERENCE_META_KEY", "conv_bn_pairs"]


@dataclass(frozen=True)
class InferenceForm:
    """What :func:`optimize_for_inference` folded.

    Attributes:
        fusion_norms: task norms of fusion layers folded into their 1×1 weights.
        conv_bn_pairs: ``Conv2d → BatchNorm2d`` pairs of the task models folded.
    """

    fusion_norms: int
    conv_bn_pairs: int


def conv_bn_pairs(graph: fx.Graph, root: nn.Module) -> list[tuple[str, str]]:
    """``(conv, norm)`` module paths of every ``nn.Conv2d`` call whose only user is a call of
    an ``nn.BatchNorm2d`` (exact classes: subclasses such as timm's ``BatchNormAct2d`` also
    activate), each module called once in ``graph``."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.args[0] is not node:
            continue
        conv, norm = str(node.target), str(user.target)
        if calls[conv] != 1 or calls[norm] != 1:
            continue
        conv_module, norm_module = root.get_submodule(conv), root.get_submodule(norm)
        if (
            type(conv_module) is nn.Conv2d
            and type(norm_module) is nn.BatchNorm2d
            and norm_module.running_mean is not None
        ):
            pairs.append((conv, norm))
    return pairs


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def optimize_for_inference(
    fused: FusedGraphModule, *, backbones: bool = True, inplace: bool = False
) -> FusedGraphModule:
    """The inference form of ``fused`` (see the module docstring): BatchNorms folded into the
    NDDR layers' 1×1 weights and, with ``backbones``, into the task models' convolutions.

    Args:
        fused: a fused model from :func:`nddrify.fuse` (any mode; the result is in eval mode).
        backbones: also fold ``Conv2d → BatchNorm2d`` pairs of the task models.
        inplace: modify ``fused`` itself instead of a deep copy (no second copy of the weights).

    Returns:
        The optimized model, in eval mode, with ``meta["nddrify_inference"]`` an
        :class:`InferenceForm`.
    """
    model = fused if inplace else copy.deepcopy(fused)
    model.eval()
    norms = sum(m.fold_norms() for m in model.modules() if isinstance(m, PerTaskOutputs))
    pairs = conv_bn_pairs(model.flat_graph(train=False), model) if backbones else []
    with torch.no_grad():
        for conv_path, norm_path in pairs:
            conv = model.get_submodule(conv_path)
            norm = model.get_submodule(norm_path)
            _set_submodule(model, conv_path, fuse_conv_bn_eval(conv, norm))
            _set_submodule(model, norm_path, nn.Identity())
    model.meta[INFERENCE_META_KEY] = InferenceForm(norms, len(pairs))
    return model
