"""The NDDR layers' fast arithmetic (GEMMs accumulating over tasks, in-place channel mixing,
eval BatchNorm folded into the weights) against the plain computation: the concatenation, one
``conv2d`` per task with the layer's dense mixing matrix, BatchNorm, activation.

Each test runs on both arithmetic paths (per-input GEMMs for large maps, one conv2d of the
concatenation for small ones: the ``arithmetic`` fixture moves the threshold).

Tolerance: 1e-5 relative to the output's largest value (fp32 rounding of sums over ≤ 48
channels), gradients in float64 to 1e-9; the identity init is exact.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from nddrify.layers import NDDRGroupedLayer, NDDRLayer, NDDRLowRankLayer, kernels
from nddrify.layers.kernels import channel_mix, eval_affine, pointwise

CHANNELS = (16, 32)
TOL = 1e-5


def dense_matrices(layer: torch.nn.Module) -> list[torch.Tensor]:
    """Task i's mixing as one C_i × ΣC matrix over the task-major concatenation."""
    widths = list(layer.in_channels)
    if isinstance(layer, NDDRLayer):
        return [conv.weight[:, :, 0, 0] for conv in layer.convs]
    if isinstance(layer, NDDRLowRankLayer):
        down = layer.down.weight[:, :, 0, 0]
        matrices = []
        for c_i, up, scales in zip(widths, layer.ups, layer.diagonal):
            blocks = []
            for j, c_j in enumerate(widths):
                block = torch.zeros(c_i, c_j, dtype=down.dtype)
                m = min(c_i, c_j)
                block[:m, :m] = torch.diag(scales[j, :m])
                blocks.append(block)
            matrices.append(up.weight[:, :, 0, 0] @ down + torch.cat(blocks, 1))
        return matrices
    groups = layer.groups
    total = sum(widths)
    full = torch.zeros(total, total, dtype=layer.conv.weight.dtype)  # group-major rows and columns
    size = total // groups
    for g, block in enumerate(layer.conv.weight[:, :, 0, 0].chunk(groups)):
        full[g * size : (g + 1) * size, g * size : (g + 1) * size] = block
    order = layer.group_order  # group-major position -> task-major channel
    task_major = torch.zeros_like(full)
    task_major[order[:, None], order[None, :]] = full
    return list(task_major.split(widths))


def reference(layer: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    stacked = torch.cat([x.contiguous() for x in inputs], 1)
    outputs = []
    for matrix, norm, act in zip(dense_matrices(layer), layer.norms, layer.activations):
        outputs.append(act(norm(F.conv2d(stacked, matrix[:, :, None, None]))))
    return outputs


@pytest.fixture(params=["gemms", "conv"], autouse=True)
def arithmetic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both paths: per-input GEMMs (what large maps use) and one conv2d of
    the concatenation (small maps), whatever the size of the test's maps."""
    gemms = request.param == "gemms"
    monkeypatch.setattr(kernels, "GEMM_MIN_ELEMENTS", 0 if gemms else 1 << 62)
    monkeypatch.setattr(kernels, "GEMM_MIN_PIXELS", 0 if gemms else 1 << 62)
    return request.param


def build(kind: str, channels=CHANNELS, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    options.setdefault("init", (0.7, 0.4))
    options.setdefault("nonnegative", (True, False))
    if kind == "nddr":
        layer = NDDRLayer(channels, **options)
    elif kind == "rank":
        layer = NDDRLowRankLayer(channels, rank=8, **options)
        with torch.no_grad():
            for up in layer.ups:
                up.weight.normal_()
    else:
        layer = NDDRGroupedLayer(channels, groups=4, **options)
        with torch.no_grad():
            layer.conv.weight.normal_()
    for norm in layer.norms:  # non-trivial running statistics and affine parameters
        if isinstance(norm, torch.nn.BatchNorm2d):
            with torch.no_grad():
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.normal_()
                norm.bias.normal_()
    return layer


def maps(channels=CHANNELS, channels_last=False, n=3, h=5, w=7) -> list[torch.Tensor]:
    torch.manual_seed(1)
    xs = [torch.randn(n, c, h, w) for c in channels]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return xs


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOL * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize(
    "kind,train,channels_last",
    list(itertools.product(["nddr", "rank", "groups"], [False, True], [False, True])),
)
def test_layers_equal_the_plain_computation(kind: str, train: bool, channels_last: bool) -> None:
    layer = build(kind).train(train)
    xs = maps(channels_last=channels_last)
    got = layer(*xs)
    want = reference(layer, xs)
    assert all(close(g, w) for g, w in zip(got, want))
    assert all(g.shape == w.shape for g, w in zip(got, want))
    if channels_last:  # the output keeps the input's layout
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in got)


@pytest.mark.parametrize("kind", ["nddr", "rank", "groups"])
def test_gradients_equal_the_plain_computation(kind: str) -> None:
    # in float64: a training BatchNorm's backward cancels large terms, so fp32 rounding would
    # dominate the comparison
    layer = build(kind).train().double()
    xs = [x.double().requires_grad_() for x in maps()]
    sum(o.square().sum() for o in layer(*xs)).backward()
    got = [x.grad.clone() for x in xs] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    for x in xs:
        x.grad = None
    sum(o.square().sum() for o in reference(layer, xs)).backward()
    want = [x.grad for x in xs] + [p.grad for p in layer.parameters()]
    assert all(torch.allclose(g, w, rtol=1e-9, atol=1e-9) for g, w in zip(got, want))


def test_low_rank_with_unequal_widths_pads_the_narrow_task() -> None:
    layer = build("rank", channels=(8, 24)).eval()
    xs = maps(channels=(8, 24))
    assert all(close(g, w) for g, w in zip(layer(*xs), reference(layer, xs)))


@pytest.mark.parametrize("kind", ["nddr", "rank", "groups"])
def test_identity_init_is_exact(kind: str) -> None:
    layer = build(kind, init=(1.0, 0.0), norm=None, activation=None)
    if kind == "rank":
        for up in layer.ups:
            torch.nn.init.zeros_(up.weight)
    else:
        layer.reset_parameters((1.0, 0.0))
    xs = maps()
    assert all(torch.equal(y, x) for y, x in zip(layer(*xs), xs))


def test_pointwise_other_layouts_fall_back_to_conv() -> None:
    x = torch.randn(2, 4, 6, 5).transpose(2, 3)  # neither contiguous nor channels-last
    w = torch.randn(3, 4)
    assert close(pointwise([x], [w]), F.conv2d(x, w[:, :, None, None]))


def test_channel_mix_with_bias_and_narrow_first_input() -> None:
    a, b = torch.randn(2, 2, 3, 3), torch.randn(2, 4, 3, 3)
    scales = [torch.arange(1.0, 5.0), torch.full((4,), 0.5)]
    bias = torch.tensor([1.0, -1.0, 2.0, 0.0])
    want = 0.5 * b + bias.view(1, 4, 1, 1)
    want[:, :2] += a * scales[0][:2].view(1, 2, 1, 1)
    assert close(channel_mix([a, b], scales, 4, bias), want)


def test_eval_affine_matches_batchnorm_and_refuses_training() -> None:
    bn = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
    x = torch.randn(2, 3, 4, 4)
    scale, shift = eval_affine(bn)
    assert close(scale.view(1, 3, 1, 1) * x + shift.view(1, 3, 1, 1), bn(x))
    assert eval_affine(bn.train()) is None
    assert eval_affine(torch.nn.GroupNorm(1, 3)) is None


# ----------------------------------------------------------------------------- inference form


@pytest.mark.parametrize("fusion", ["nddr", "rank", "groups"])
def test_inference_form_equals_the_eval_model(fusion: str) -> None:
    import torchvision

    import nddrify
    from nddrify.errors import FusionConfigError
    from nddrify.inference import InferenceForm, optimize_for_inference

    kind = {"nddr": nddrify.NDDR(), "rank": nddrify.NDDR(rank=16), "groups": nddrify.NDDR(groups=4)}
    torch.manual_seed(0)
    models = [torchvision.models.resnet18(), torchvision.models.resnet18()]
    fused = nddrify.fuse(models, fusion=kind[fusion])
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():  # train a little so that every BatchNorm has non-trivial statistics
        for _ in range(3):
            fused.train()(torch.randn(4, 3, 64, 64))
    fused.eval()
    fast = optimize_for_inference(fused)
    # 10 fusion norms (5 levels × 2 tasks), 20 conv→BN pairs per ResNet-18
    assert fast.meta["nddrify_inference"] == InferenceForm(fusion_norms=10, conv_bn_pairs=40)
    assert type(fast.task0.layer1[0].bn1).__name__ == "Identity"
    assert type(fused.task0.layer1[0].bn1).__name__ == "BatchNorm2d"  # the original is untouched
    with torch.no_grad():
        want, got = fused(x), fast(x)
    assert all(close(g, w) for g, w in zip(got, want))
    with pytest.raises(FusionConfigError, match="cannot be trained"):
        fast.train()
