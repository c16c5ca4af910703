"""The arithmetic of the NDDR layers, written to touch each feature map as few times as
possible: 1×1 convolutions as GEMMs that accumulate over the tasks (no concatenation is
built), per-channel mixing with in-place multiply-adds, and an eval-mode BatchNorm folded into
the weights on the fly (no separate normalisation pass).

* :func:`pointwise` — Σ_j W_j · x_j over channels (+ bias, + an accumulator), for N×C×H×W maps
  in the contiguous or the channels-last layout (a batched GEMM per input), other layouts
  through ``conv2d``;
* :func:`channel_mix` — Σ_j d_j ⊙ x_j (+ bias): the per-channel mixing of low-rank NDDR;
* :func:`eval_affine` — the ``(scale, shift)`` of a BatchNorm in eval mode, or None;
* :func:`activate` — the per-task activation, in place for ReLU (the map is the layer's own).

Each equals the plain computation (``conv2d`` of the concatenation, BatchNorm, activation) up
to float rounding; with an identity weight they are exact.

Example:
    >>> import torch
    >>> from nddrify.layers.kernels import pointwise
    >>> a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    >>> w = torch.randn(6, 8)
    >>> reference = torch.nn.functional.conv2d(torch.cat([a, b], 1), w[:, :, None, None])
    >>> bool(torch.allclose(pointwise([a, b], w.split([3, 5], dim=1)), reference, atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "pointwise",
    "prefers_gemms",
    "channel_mix",
    "eval_affine",
    "fold_affine",
    "activate",
    "memory_format_of",
    "GEMM_MIN_ELEMENTS",
    "GEMM_MIN_PIXELS",
]


def _count_inplace_gemms() -> None:
    """Teach ``torch.utils.flop_counter`` the in-place GEMMs used here (it counts ``baddbmm``
    and ``addmm`` but not ``baddbmm_`` / ``addmm_``), so FLOP counts of fused models stay right."""
    from torch.utils import flop_counter

    for op, formula in (
        (torch.ops.aten.baddbmm_, flop_counter.baddbmm_flop),
        (torch.ops.aten.addmm_, flop_counter.addmm_flop),
    ):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # already shape-wrapped


_count_inplace_gemms()


def _layout(x: torch.Tensor) -> str:
    """``"nchw"`` when every image is a C×(H·W) row-major matrix (contiguous maps and their
    channel slices), ``"nhwc"`` when the N·H·W pixels are rows of C channels at one row stride
    (channels-last maps and their channel slices), else ``"other"``."""
    if x.dim() != 4:
        return "other"
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    if (w == 1 or sw == 1) and (h == 1 or sh == w) and (c == 1 or sc == h * w):
        return "nchw"
    row = sw if w > 1 else (sh // h if h > 1 else sn)
    if (
        (c == 1 or sc == 1)
        and (w == 1 or sw == row)
        and (h == 1 or sh == w * row)
        and (n == 1 or sn == h * w * row)
    ):
        return "nhwc"
    return "other"


def pointwise(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    accumulate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j ``weights[j] @ inputs[j]`` over the channel dimension (+ ``bias``), added in place to
    ``accumulate`` when given: a 1×1 convolution of the channel concatenation of ``inputs``
    with the column blocks ``weights[j]`` (C_out × C_j), computed as GEMMs that accumulate into
    one output, so the concatenation is never built and each map is read once.

    Large contiguous N×C×H×W maps run as batched GEMMs (C_out × C_j) · (C_j × H·W) per image;
    large channels-last maps as one GEMM (N·H·W × C_j) · (C_j × C_out), and the output keeps
    that layout. Small maps (:func:`prefers_gemms`) and other layouts go through one
    ``conv2d`` of the concatenation.

    Example:
        >>> import torch
        >>> from nddrify.layers.kernels import pointwise
        >>> x = torch.randn(1, 2, 3, 3).to(memory_format=torch.channels_last)
        >>> y = pointwise([x], [torch.eye(2)])
        >>> torch.equal(y, x), y.is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """
    if accumulate is not None and bias is not None:
        accumulate.add_(bias.view(1, -1, 1, 1))
        bias = None
    layouts = {_layout(x) for x in inputs}
    if accumulate is not None:
        layouts.add(_layout(accumulate))
    layout = layouts.pop() if len(layouts) == 1 and prefers_gemms(inputs) else "other"
    out = accumulate
    if layout == "nchw":
        n, _, h, w = inputs[0].shape
        for x, weight in zip(inputs, weights):
            flat = x.reshape(n, x.shape[1], h * w)
            matrix = weight.expand(n, *weight.shape)
            if out is None:
                start = bias.view(1, -1, 1) if bias is not None else None
                out = (
                    torch.baddbmm(start, matrix, flat) if start is not None else matrix @ flat
                ).view(n, -1, h, w)
            else:
                out.view(n, -1, h * w).baddbmm_(matrix, flat)
        return out  # type: ignore[return-value]
    if layout == "nhwc":
        n, _, h, w = inputs[0].shape
        rows = None if out is None else out.permute(0, 2, 3, 1).reshape(n * h * w, -1)
        for x, weight in zip(inputs, weights):
            flat = x.permute(0, 2, 3, 1).reshape(n * h * w, x.shape[1])
            if rows is None:
                rows = (
                    torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
                )
            else:
                rows.addmm_(flat, weight.t())
        result = rows.view(n, h, w, -1).permute(0, 3, 1, 2)  # type: ignore[union-attr]
        return accumulate if accumulate is not None else result
    # small maps or other layouts: one convolution of the concatenation
    stacked = torch.cat(list(inputs), 1) if len(inputs) > 1 else inputs[0]
    matrix = torch.cat(list(weights), 1) if len(weights) > 1 else weights[0]
    total = F.conv2d(stacked, matrix[:, :, None, None], bias)
    return total if accumulate is None else accumulate.add_(total)


#: Below this many input elements (N·ΣC·H·W), or this many pixels per image, one ``conv2d``
#: of the concatenation beats per-input GEMMs: call overhead dominates small maps (measured on
#: a 2-core AVX-512 CPU, one thread: ``benchmarks/results/cheap_fusion.md``).
GEMM_MIN_ELEMENTS = 1 << 18
GEMM_MIN_PIXELS = 64


def prefers_gemms(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether maps this large run faster as per-input GEMMs than as one convolution of
    their concatenation (see :data:`GEMM_MIN_ELEMENTS`)."""
    first = inputs[0]
    if first.dim() != 4 or first.shape[-1] * first.shape[-2] < GEMM_MIN_PIXELS:
        return False
    return sum(x.numel() for x in inputs) >= GEMM_MIN_ELEMENTS


def channel_mix(
    inputs: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    channels: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_j ``scales[j] ⊙ inputs[j]`` per channel (+ ``bias``), with ``channels`` output
    channels: input j contributes to the first min(C_j, channels) channels (zero padding
    elsewhere), ``scales[j]`` holding one weight per output channel. The first map that covers
    every output channel starts the sum; the others are added in place.

    Example:
        >>> import torch
        >>> from nddrify.layers.kernels import channel_mix
        >>> a, b = torch.ones(1, 2, 1, 1), torch.ones(1, 3, 1, 1)
        >>> channel_mix([a, b], [torch.tensor([1.0, 2.0, 3.0])] * 2, 3).flatten().tolist()
        [2.0, 4.0, 3.0]
    """
    order = sorted(range(len(inputs)), key=lambda j: inputs[j].shape[1] < channels)
    out = None
    for j in order:
        x = inputs[j]
        width = min(channels, x.shape[1])
        scale = scales[j][:width].view(1, width, 1, 1)
        part = x if width == x.shape[1] else x[:, :width]
        if out is None:
            if width == channels:
                out = (
                    torch.addcmul(bias.view(1, -1, 1, 1), scale, part)
                    if bias is not None
                    else part * scale
                )
                continue
            shape = (x.shape[0], channels, *x.shape[2:])
            out = x.new_zeros(shape).to(memory_format=memory_format_of(x))
            if bias is not None:
                out.add_(bias.view(1, -1, 1, 1))
        target = out if width == channels else out[:, :width]
        target.addcmul_(scale, part)
    return out  # type: ignore[return-value]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for channels-last maps (and their channel slices), else
    ``torch.contiguous_format``."""
    return torch.channels_last if _layout(x) == "nhwc" else torch.contiguous_format


def eval_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` such that ``norm(y) == scale ⊙ y + shift`` per channel, for a
    BatchNorm in eval mode that normalises with its running statistics; None for any other
    norm or mode (training, no running statistics, or a norm that is not a BatchNorm).

    Example:
        >>> import torch
        >>> from nddrify.layers.kernels import eval_affine
        >>> bn = torch.nn.BatchNorm2d(2, eps=0.0).eval()
        >>> _ = bn.running_var.fill_(4.0), bn.running_mean.fill_(1.0)
        >>> [t.tolist() for t in eval_affine(bn)]
        [[0.5, 0.5], [-0.5, -0.5]]
        >>> eval_affine(bn.train()) is None
        True
    """
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.training:
        return None
    if norm.running_mean is None or norm.running_var is None:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def fold_affine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affine: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``affine ∘ (weight · x + bias)``: each output row scaled by
    ``scale``, the bias ``bias · scale + shift`` (``affine`` from :func:`eval_affine`; None
    leaves both as they are).

    Example:
        >>> import torch
        >>> from nddrify.layers.kernels import fold_affine
        >>> w, b = fold_affine(torch.ones(2, 3), None, (torch.tensor([2.0, 3.0]), torch.ones(2)))
        >>> w[:, 0].tolist(), b.tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """
    if affine is None:
        return weight, bias
    scale, shift = affine
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    return weight, shift if bias is None else bias * scale + shift


def activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)``; a plain ReLU runs in place (``x`` is the layer's own new map)."""
    if type(activation) is nn.ReLU:
        return torch.relu_(x)
    return activation(x)
