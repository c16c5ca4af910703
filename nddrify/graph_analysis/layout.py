"""Layout inference: which values are image maps, NCHW or NHWC (channels last).

Convolutions, norms and pools produce NCHW; constant ``permute`` calls are followed exactly (the
NHWC maps of ConvNeXt blocks, Swin or MambaOut stages). Token values derived from an image map are
tracked too (``x.flatten(2).transpose(1, 2)``, Swin windows, NesT blocks), so a reshape back to the
map's exact (N, H, W, C) or (N, C, H, W) recovers the layout (PVT-v2, CAFormer, Swin stage ends);
patch merging through higher-rank reshapes is recognised as space-to-depth.

:func:`infer_layout` gives one node's layout from those of the nodes before it, as one of three
small values:

* :class:`ImageLayout`: a 4-D image map, by the logical (N, C, H, W) index of each actual dim
  (:data:`NCHW`, :data:`NHWC`, or another permutation of an image map, which is known but not
  offered as a layout);
* :class:`ChannelsLastTokens` and :class:`ChannelsFirstTokens`: token values derived from an
  H×W image map. They never reach ``node.meta``; they only let a reshape back to 4-D recover NCHW
  or NHWC when the sizes make it unambiguous.

    >>> NHWC
    ImageLayout(NHWC)
    >>> NCHW.permuted((0, 2, 3, 1)) == NHWC, NHWC.name, NHWC.channel_dim
    (True, 'NHWC', 3)
    >>> ChannelsLastTokens(positions=2 * 7 * 7, height=7, width=7)
    ChannelsLastTokens(positions=98, height=7, width=7)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .nodes import is_op, module_of, shape_of, tensor_inputs

__all__ = [
    "ImageLayout",
    "ChannelsLastTokens",
    "ChannelsFirstTokens",
    "Layout",
    "Layouts",
    "NCHW",
    "NHWC",
    "infer_layout",
]


@dataclass(frozen=True)
class ImageLayout:
    """A 4-D image map: ``dims[i]`` is the logical (N, C, H, W) index of the value's dim ``i``."""

    dims: tuple[int, ...]

    @property
    def name(self) -> str | None:
        """``"NCHW"`` or ``"NHWC"``; None for any other permutation."""
        return _LAYOUT_NAMES.get(self.dims)

    @property
    def channel_dim(self) -> int:
        """The actual dim that holds the channels."""
        return self.dims.index(1)

    def permuted(self, dims: Sequence[int]) -> ImageLayout:
        """The layout of this map after ``permute(*dims)``."""
        return ImageLayout(tuple(self.dims[d] for d in dims))

    def __repr__(self) -> str:
        name = self.name
        return f"ImageLayout({name})" if name is not None else f"ImageLayout(dims={self.dims})"


@dataclass(frozen=True)
class ChannelsLastTokens:
    """Channels-last tokens of an ``height``×``width`` image map: the last dim holds the channels
    and the leading dims enumerate the N·H·W ``positions`` in some order (Swin windows, NesT
    blocks, (B, H·W, C) sequences)."""

    positions: int
    height: int
    width: int


@dataclass(frozen=True)
class ChannelsFirstTokens:
    """A (B, C, H·W) sequence of an ``height``×``width`` image map (``x.flatten(2)``)."""

    height: int
    width: int


#: What :func:`infer_layout` knows about a value (None: nothing).
Layout = ImageLayout | ChannelsLastTokens | ChannelsFirstTokens

_LAYOUT_NAMES = {(0, 1, 2, 3): "NCHW", (0, 2, 3, 1): "NHWC"}
#: An NCHW image map.
NCHW = ImageLayout((0, 1, 2, 3))
#: A channels-last image map: its actual dims are the logical (N, H, W, C).
NHWC = ImageLayout((0, 2, 3, 1))

_NCHW_MODULES: tuple[type, ...] = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Upsample,
    nn.UpsamplingBilinear2d,
    nn.UpsamplingNearest2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_NCHW_FUNCTIONS = {
    F.conv2d,
    torch.conv2d,
    F.conv_transpose2d,
    F.batch_norm,
    F.group_norm,
    F.instance_norm,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.pixel_shuffle,
    F.pixel_unshuffle,
}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "transpose", "swapaxes", "movedim"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.movedim}
_MOVES = {"permute", "contiguous"}

#: The layout of every node seen so far, as :func:`infer_layout` reads it.
Layouts = Mapping[fx.Node, Layout | None]


def _leads_with_nchw_op(module: nn.Module | None) -> bool:
    """A leaf container (torchvision's ``Conv2dNormActivation``, say) whose first op is a conv,
    norm or pool and that holds nothing that could leave N×C×H×W (linear layers, layer norms,
    permutes): it maps an N×C×H×W input to an N×C×H×W output."""
    if module is None:
        return False
    leaves = [m for m in module.modules() if m is not module and not any(m.children())]
    if not leaves or not isinstance(leaves[0], _NCHW_MODULES):
        return False
    return not any(
        isinstance(m, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)) or hasattr(m, "dims")
        for m in leaves
    )


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def _is_movement(node: fx.Node) -> bool:
    """Ops that only rearrange the values (reshape, permute, transpose, contiguous)."""
    return (
        _is_reshape(node)
        or (node.op == "call_method" and node.target in _MOVES)
        or (node.op == "call_function" and node.target is torch.permute)
    )


def _moved_dims(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The dims a constant ``permute``/``transpose`` applies to a ``rank``-D value, else None."""
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif (node.op == "call_method" and node.target in {"transpose", "swapaxes"}) or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        pair = node.args[1:3]
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return None
        order = list(range(rank))
        i, j = (d % rank for d in pair)
        order[i], order[j] = order[j], order[i]
        return tuple(order)
    else:
        return None
    if dims is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % rank for d in dims)


def _channels_last_tokens(
    layout: Layout | None, shape: tuple[int, ...]
) -> ChannelsLastTokens | None:
    if layout == NHWC:
        return ChannelsLastTokens(shape[0] * shape[1] * shape[2], shape[1], shape[2])
    if isinstance(layout, ChannelsLastTokens):
        return layout
    return None


def _token_layout(node: fx.Node, shape: tuple[int, ...], layouts: Layouts) -> Layout | None:
    """Layout of a value that is not an image map: tokens of a known image map, else None."""
    inputs = tensor_inputs(node)
    if not inputs:
        return None
    src = shape_of(inputs[0])
    # A helper fx could not see into (NesT's ``deblockify``) that only rearranges one tensor.
    opaque = node.op == "call_function" and len(inputs) == 1 and math.prod(src) == math.prod(shape)
    if _is_movement(node) or opaque:
        source = layouts.get(inputs[0])
        if source == NCHW and shape == (src[0], src[1], src[2] * src[3]):
            return ChannelsFirstTokens(src[2], src[3])
        if isinstance(source, ChannelsFirstTokens):
            if src == shape and _moved_dims(node, len(src)) is None:
                return source
            if len(src) == 3 and shape == (src[0], src[1], source.height, source.width):
                return source  # (B, C, H, W) again: _from_tokens makes it NCHW
            if len(src) == 3 and _moved_dims(node, 3) == (0, 2, 1):
                return ChannelsLastTokens(src[0] * src[2], source.height, source.width)
            return None
        tokens = _channels_last_tokens(source, src)
        if tokens is not None and len(src) == 3 and _moved_dims(node, 3) == (0, 2, 1):
            h, w = tokens.height, tokens.width
            if src[1] == h * w and tokens.positions == src[0] * h * w:
                return ChannelsFirstTokens(h, w)
            return None
        if tokens is None or shape[-1] != src[-1] or math.prod(shape[:-1]) != tokens.positions:
            return None
        dims = _moved_dims(node, len(src))
        keeps_last = dims is None or dims[-1] == len(src) - 1
        return tokens if keeps_last else None
    for source in inputs:
        layout, src = layouts.get(source), shape_of(source)
        if len(src) != len(shape):
            continue
        tokens = _channels_last_tokens(layout, src)
        # A channel-mixing op (linear, norm, activation, sum) keeps the positions.
        if tokens is not None and src[:-1] == shape[:-1]:
            return tokens
        if isinstance(layout, ChannelsFirstTokens) and src[0] == shape[0] and src[2] == shape[2]:
            return layout
    return None


def _from_tokens(shape: tuple[int, ...], layout: Layout | None) -> ImageLayout | None:
    """NCHW/NHWC of a value whose token layout matches its image map's sizes exactly."""
    if isinstance(layout, ChannelsLastTokens):
        h, w = layout.height, layout.width
        if shape[1:3] == (h, w) and shape[0] * h * w == layout.positions:
            return NHWC
    if isinstance(layout, ChannelsFirstTokens) and shape[2:] == (layout.height, layout.width):
        return NCHW
    return None


def _space_to_depth(node: fx.Node, shape: tuple[int, ...], layouts: Layouts) -> Layout | None:
    """NCHW/NHWC of patch merging done through higher-rank reshapes and permutes: walking back
    through data-movement ops reaches an image map with the same values per sample, whose spatial
    area is traded for channels by the same factor."""
    current = node
    for _ in range(6):
        inputs = tensor_inputs(current)
        if not _is_movement(current) or len(inputs) != 1:
            return None
        current = inputs[0]
        layout = layouts.get(current)
        if layout in (NCHW, NHWC):
            src = shape_of(current)
            if src[0] != shape[0] or math.prod(src) != math.prod(shape):
                return None
            c_in, c_out = src[layout.channel_dim], shape[layout.channel_dim]
            return layout if c_out > c_in and c_out % c_in == 0 else None
    return None


def infer_layout(node: fx.Node, layouts: Layouts) -> Layout | None:
    """The layout of ``node``'s value given ``layouts`` of every node before it in the graph."""
    shape = shape_of(node)
    if shape is None or not shape:
        return None
    if len(shape) != 4:
        return _token_layout(node, shape, layouts)
    image = _image_layout(node, shape, layouts)
    if image is not None:
        return image
    tokens = _token_layout(node, shape, layouts)
    return _from_tokens(shape, tokens) or tokens


def _image_layout(node: fx.Node, shape: tuple[int, ...], layouts: Layouts) -> Layout | None:
    if node.op == "placeholder":
        return NCHW
    if is_op(node, _NCHW_MODULES, _NCHW_FUNCTIONS):
        return NCHW
    inputs = [n for n in tensor_inputs(node) if len(shape_of(n)) == 4]
    dims = _moved_dims(node, 4)  # a constant permute or transpose of a 4-D value
    if dims is not None:
        source = layouts.get(inputs[0]) if inputs else None
        return source.permuted(dims) if source in (NCHW, NHWC) else None
    for source in inputs:
        if shape_of(source) == shape and layouts.get(source) in (NCHW, NHWC):
            return layouts[source]
    if _is_reshape(node):
        return _space_to_depth(node, shape, layouts)
    if node.op == "call_module":
        module = module_of(node)
        dims = getattr(module, "dims", None)  # torchvision.ops.Permute
        if isinstance(dims, (list, tuple)) and len(dims) == 4 and inputs:
            source = layouts.get(inputs[0])
            return source.permuted(dims) if source in (NCHW, NHWC) else None
        if _leads_with_nchw_op(module) and any(layouts.get(n) == NCHW for n in inputs):
            return NCHW
    for source in inputs:
        src = shape_of(source)
        # A channel-mixing op keeps H×W; a spatial op (pool, slice, pad) keeps C. Anything else
        # is unknown.
        if src[0] != shape[0]:
            continue
        if layouts.get(source) == NCHW and (src[2:] == shape[2:] or src[1] == shape[1]):
            return NCHW
        if layouts.get(source) == NHWC and (src[1:3] == shape[1:3] or src[3] == shape[3]):
            return NHWC
        # Space-to-depth (patch merging): the same values per sample, spatial area traded for
        # channels by the same factor.
        layout = layouts.get(source)
        if layout in (NCHW, NHWC) and math.prod(src) == math.prod(shape):
            c_in, c_out = src[layout.channel_dim], shape[layout.channel_dim]
            if c_out > c_in and c_out % c_in == 0:
                return layout
    return None
