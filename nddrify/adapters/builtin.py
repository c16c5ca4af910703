"""The built-in adapters: segmentation_models_pytorch, Hugging Face transformers vision models
and torchvision detectors, a few declarative lines each. Neither smp nor transformers is
imported here: adapters match by module name and import their paths when used.

* **segmentation_models_pytorch** — ``SegmentationModel.forward`` checks the input size with
  Python control flow on the image's shape (``check_input_shape``): patched out while tracing.
  Linknet's ``DecoderBlock`` (``if skip.shape[1] != 0``), the Segformer decoder (iterates over
  ``features[0].shape``) and the Mix Transformer's ``LayerNorm`` (``if x.ndim == 4``) test
  shapes too: leaf modules (the rest, fusion points included, is traced node by node).
* **transformers** — models take the image as ``pixel_values=`` and their ``forward`` is wrapped
  by decorators with ``**kwargs`` that fx cannot trace as a root: the model is called with the
  keyword. Their code branches on metadata (``if pixel_values.dtype != ...``, ``(*shape[:-1],
  -1)``): traced with concrete metadata (:mod:`.concrete`, as transformers' own fx tracer did
  before version 5 removed it); ``torch_int`` / ``torch_float`` (``int()`` of a size) stay calls
  in the graph. The ``ModelOutput`` is rebuilt by the graph (:func:`~.outputs.keep_output_class`),
  so the fused model returns each task's own output class.
* **torchvision detectors** — take lists of images (and targets): not traceable whole; the
  ``backbone`` holds the trunk.

Example:
    >>> from nddrify.adapters import registered_adapters
    >>> sorted(a.name for a in registered_adapters())
    ['segmentation_models_pytorch', 'torchvision.detection', 'transformers']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .outputs import keep_output_class
from .registry import TraceAdapter, register_adapter

__all__ = ["SMP", "TRANSFORMERS", "TORCHVISION_DETECTION"]


def _pixel_values(model: nn.Module, image: Any, **kwargs: Any) -> Any:
    return model(pixel_values=image, **kwargs)


_SMP = "segmentation_models_pytorch"

SMP = TraceAdapter(
    name=_SMP,
    applies_to=(_SMP,),
    patches={f"{_SMP}.base.model.SegmentationModel.check_input_shape": None},
    leaf_modules=(
        f"{_SMP}.decoders.linknet.decoder:DecoderBlock",
        f"{_SMP}.decoders.segformer.decoder:SegformerDecoder",
        f"{_SMP}.encoders.mix_transformer:LayerNorm",
    ),
)

TRANSFORMERS = TraceAdapter(
    name="transformers",
    applies_to=("transformers",),
    call=_pixel_values,
    output=keep_output_class,
    concrete_metadata=True,
    autowrap_functions=(
        "transformers.utils.generic:torch_int",
        "transformers.utils.generic:torch_float",
    ),
)

_DETECTION = "torchvision.models.detection"

TORCHVISION_DETECTION = TraceAdapter(
    name="torchvision.detection",
    applies_to=(
        f"{_DETECTION}.generalized_rcnn:GeneralizedRCNN",
        f"{_DETECTION}.retinanet:RetinaNet",
        f"{_DETECTION}.fcos:FCOS",
        f"{_DETECTION}.ssd:SSD",
    ),
    trunk="backbone",
)

for _adapter in (SMP, TRANSFORMERS, TORCHVISION_DETECTION):
    register_adapter(_adapter)
