"""Tracing adapters (nddrify.adapters): the registry, and smp / Hugging Face / torchvision
detection models fused out of the box, exact at identity init.

The default run keeps a few representative cases; ``pytest -m slow tests/test_adapters.py`` runs
every smp architecture × encoder and the Hugging Face set.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import nddrify
from nddrify.adapters import (
    TraceAdapter,
    UntraceableModelError,
    find_adapter,
    register_adapter,
    trunk_of,
    unregister_adapter,
)

IDENTITY = nddrify.NDDR(init=(1.0, 0.0), norm=None, activation=None)


def _fuse_identity(make, x, main=None, call=None):
    """Fuse two models from ``make`` at identity init; assert each task's output equals its
    model's (relative 1e-5) and keeps the model's output class; return the plan's points."""
    torch.manual_seed(0)
    models = [make().eval(), make().eval()]
    fused = nddrify.fuse(models, points="auto", fusion=IDENTITY, example_input=x).eval()
    batch = torch.cat([x, torch.randn_like(x)])  # another batch size than the traced one
    with torch.no_grad():
        outputs = fused(batch)
        for out, model in zip(outputs, models):
            ref = call(model, batch) if call is not None else model(batch)
            assert type(out) is type(ref)
            got, want = (out[main], ref[main]) if main is not None else (out, ref)
            assert got.shape == want.shape
            scale = want.abs().max().clamp_min(1e-6)
            assert (got - want).abs().max() <= 1e-5 * scale
    return [level.points[0].node for level in fused.meta["nddrify_plan"].levels]


# -- the registry ------------------------------------------------------------------------------


class _Checked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def check(self, x: torch.Tensor) -> None:
        if x.shape[-1] % 4:
            raise ValueError("size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.conv2(self.conv1(x).relu()).relu()


def test_user_adapter_patches_only_while_tracing():
    with pytest.raises(nddrify.errors.TraceError):
        nddrify.trace([_Checked(), _Checked()], example_input=torch.randn(1, 3, 16, 16))
    adapter = register_adapter(
        TraceAdapter(name="checked", applies_to=(_Checked,), patches={(_Checked, "check"): None})
    )
    try:
        assert find_adapter(_Checked()) is adapter
        points = _fuse_identity(_Checked, torch.randn(1, 3, 16, 16))
        assert points
        assert _Checked.__dict__["check"] is _Checked.check  # restored
        with pytest.raises(ValueError, match="size"):
            _Checked()(torch.randn(1, 3, 15, 15))
    finally:
        unregister_adapter(adapter)
    assert find_adapter(_Checked()) is None


def test_adapter_matches_by_class_path_and_module_prefix():
    model = torchvision.models.resnet18()
    by_path = TraceAdapter(name="p", applies_to=("torchvision.models.resnet:ResNet",))
    by_prefix = TraceAdapter(name="m", applies_to=("torchvision.models",))
    other = TraceAdapter(name="o", applies_to=("torchvision.models.res",))  # not a module
    assert by_path.matches(model) and by_prefix.matches(model) and not other.matches(model)
    with pytest.raises(nddrify.errors.InputError):
        TraceAdapter(name="empty", applies_to=())


def test_importing_nddrify_imports_no_adapted_library():
    code = (
        "import sys, nddrify, nddrify.adapters; "
        "print(sorted(m for m in ('segmentation_models_pytorch', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- torchvision detection ----------------------------------------------------------------------


def test_detector_fails_fast_naming_backbone():
    def make():
        return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None
        )

    det = make()
    assert trunk_of(det) == "backbone"
    assert trunk_of(det.backbone) is None  # the trunk itself traces
    with pytest.raises(UntraceableModelError) as info:
        nddrify.trace([det, make()], example_input=torch.randn(1, 3, 64, 64))
    message = str(info.value)
    assert "\n" not in message and "'backbone'" in message and "within='backbone'" in message
    assert info.value.trunk == "backbone"
    assert isinstance(info.value, nddrify.errors.TraceError)


# -- segmentation_models_pytorch ----------------------------------------------------------------

SMP_ARCHS = [
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Linknet",
    "MAnet",
    "PAN",
    "UPerNet",
    "Segformer",
]
SMP_ENCODERS = ["resnet34", "efficientnet-b0", "mit_b0"]
#: combinations smp itself refuses to build
SMP_UNSUPPORTED = {
    ("Linknet", "mit_b0"): "smp: encoder mit_b0 is not supported for Linknet",
    ("UnetPlusPlus", "mit_b0"): "smp: UnetPlusPlus does not support mit_b0",
}


def _smp(arch: str, encoder: str):
    smp = pytest.importorskip("segmentation_models_pytorch")

    def make():
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    # PAN's feature pyramid pools its deepest map three more times: 64×64 is too small for it
    # (the model itself fails there).
    size = 128 if arch == "PAN" else 64
    return make, torch.randn(1, 3, size, size)


@pytest.mark.parametrize(("arch", "encoder"), [("Linknet", "resnet18")])
def test_smp_fuses_out_of_the_box(arch, encoder):
    from segmentation_models_pytorch.base.model import SegmentationModel

    check = SegmentationModel.check_input_shape
    make, x = _smp(arch, encoder)
    points = _fuse_identity(make, x)
    assert len(points) >= 3 and all(p.startswith("encoder.") for p in points)
    assert SegmentationModel.check_input_shape is check  # the patch is undone


@pytest.mark.slow
@pytest.mark.parametrize("encoder", SMP_ENCODERS)
@pytest.mark.parametrize("arch", SMP_ARCHS)
def test_smp_matrix(arch, encoder):
    if (arch, encoder) in SMP_UNSUPPORTED:
        pytest.skip(SMP_UNSUPPORTED[arch, encoder])
    make, x = _smp(arch, encoder)
    points = _fuse_identity(make, x)
    assert all(p.startswith("encoder.") for p in points), points
    # mit_b0 under PSPNet (encoder depth 3) and DeepLabV3 (dilated) keeps 2 stages of its own
    assert len(points) >= (3 if encoder != "mit_b0" else 2), points


# -- Hugging Face transformers ------------------------------------------------------------------


def _hf(name: str):
    tr = pytest.importorskip("transformers")
    vit = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
    )
    stages = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    builders = {
        "vit": lambda: tr.ViTForImageClassification(tr.ViTConfig(**vit, num_labels=3)),
        "vit_model": lambda: tr.ViTModel(tr.ViTConfig(**vit)),
        "convnext": lambda: tr.ConvNextForImageClassification(
            tr.ConvNextConfig(**stages, num_labels=3)
        ),
        "swin": lambda: tr.SwinForImageClassification(
            tr.SwinConfig(
                image_size=64,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1, 1],
                num_heads=[1, 2, 2],
                window_size=2,
                num_labels=3,
            )
        ),
        "segformer": lambda: tr.SegformerForSemanticSegmentation(
            tr.SegformerConfig(
                **stages, num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32, num_labels=3
            )
        ),
        "dpt": lambda: tr.DPTForDepthEstimation(
            tr.DPTConfig(
                **vit,
                backbone_out_indices=[0, 1, 2, 3],
                neck_hidden_sizes=[16, 32, 48, 64],
                fusion_hidden_size=32,
                head_hidden_size=16,
                reassemble_factors=[4, 2, 1, 0.5],
            )
        ),
    }
    return builders[name]


HF_MAIN = {
    "vit": "logits",
    "vit_model": "last_hidden_state",
    "convnext": "logits",
    "swin": "logits",
    "segformer": "logits",
    "dpt": "predicted_depth",
}


def _pixel_values(model, x):
    return model(pixel_values=x)


def test_hf_vit_fuses_and_keeps_model_output():
    points = _fuse_identity(_hf("vit"), torch.randn(1, 3, 64, 64), "logits", _pixel_values)
    assert points == [f"vit.layers.{i}.add_1" for i in range(4)]  # token fusion, 4 blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HF_MAIN))
def test_hf_models(name):
    points = _fuse_identity(_hf(name), torch.randn(1, 3, 64, 64), HF_MAIN[name], _pixel_values)
    assert len(points) >= 3, points
