"""Facts about a traced graph that the planner reads: layouts, the spine, stage ends.

Everything here is derived from the graph alone (node ops, module types, shapes from ShapeProp and
torchvision-style node names); no model-specific metadata is consulted.

* **Layout** (:mod:`.layout`, recorded by :func:`annotate`): which 4-D values are image maps, NCHW
  or NHWC (channels last). Convolutions, norms and pools produce NCHW; constant ``permute`` calls
  are followed exactly (the NHWC maps of ConvNeXt blocks, Swin or MambaOut stages). Token values
  derived from an image map are tracked internally (``x.flatten(2).transpose(1, 2)``, Swin
  windows, NesT blocks), so a reshape back to the map's exact (N, H, W, C) or (N, C, H, W)
  recovers the layout (PVT-v2, CAFormer, Swin stage ends); patch merging through higher-rank
  reshapes is recognised as space-to-depth.
* **Spine** (:mod:`.spine`): the nodes every path from the input to the deepest feature map passes
  through (dominators, via networkx). Skip connections that bypass later stages on their way to
  the output do not remove a node from the spine.
* **Stage ends** (:mod:`.stages`): where one stage of the backbone hands over to the next: before a
  block that reduces the resolution, after a pooling op, and before a projection block that widens
  the network without striding (dilated ResNets).

Example:
    >>> import torchvision
    >>> from nddrify.graph_analysis import stage_ends
    >>> from nddrify.tracing import trace_model
    >>> traced = trace_model(torchvision.models.resnet18())
    >>> [n.meta["qualname"] for n in stage_ends(traced.graph)]
    ['maxpool', 'layer1.1.relu_1', 'layer2.1.relu_1', 'layer3.1.relu_1', 'layer4.1.relu_1']
"""

from __future__ import annotations

from .annotation import LAYOUT, NONNEGATIVE, annotate
from .blocks import enclosing_block
from .nodes import shape_of
from .points import auto_points, is_fusable, point_shape, spatial_size, token_grid
from .spine import feature_shape, is_feature_map, spine
from .stages import stage_ends, stage_module
from .tokens import TokenGrid, is_token_sequence, token_shape, token_spine, token_stage_ends

__all__ = [
    "LAYOUT",
    "NONNEGATIVE",
    "annotate",
    "shape_of",
    "is_feature_map",
    "feature_shape",
    "spine",
    "stage_ends",
    "stage_module",
    "enclosing_block",
    "TokenGrid",
    "is_token_sequence",
    "token_shape",
    "token_spine",
    "token_stage_ends",
    "auto_points",
    "is_fusable",
    "point_shape",
    "spatial_size",
    "token_grid",
]
