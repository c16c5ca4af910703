"""Batched execution of fused models (nddrify.batching): the same outputs as the fused model, the
report's exact content, training through the batched model and ``sync`` back, torch.compile, and
the errors.

Outputs agree to max |Δ| ≤ 1e-5 · max(1, max |output|): grouped convolutions sum in another order,
so the float32 rounding grows with the outputs' magnitude (a random-init ResNet-34 gives logits of
~16); on CPU, maps under 14×14 run one convolution per task and agree exactly."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import nddrify
from nddrify.batching import (
    BatchedFusedModel,
    BatchingError,
    TaskBatchedBatchNormAct2d,
    TaskBatchedConv2d,
    TaskBatchedCrossStitch,
    TaskBatchedNDDR,
    TaskBatchedShortcut,
    batch_tasks,
    batching_report,
    register_batched_form,
)

from .models import FunctionalDropout, TinyCNN, UNet

TOLERANCE = 1e-5
SMALL = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def largest(a) -> float:
    if isinstance(a, dict):
        return max(largest(v) for v in a.values())
    if isinstance(a, (tuple, list)):
        return max(largest(v) for v in a)
    return float(a.abs().max())


def max_difference(a, b) -> float:
    if isinstance(a, dict):
        assert list(a) == list(b)
        return max(max_difference(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        return max(max_difference(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape
    return float((a - b).abs().max())


def assert_same_outputs(fused: nn.Module, batched: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = fused(x), batched(x)
    assert max_difference(expected, got) <= TOLERANCE * max(1.0, largest(expected))


@pytest.fixture(scope="module")
def resnet_pair() -> nn.Module:
    """Two ResNet-18s with different heads, fused at the automatic points (never modified)."""
    models = {
        "seg": torchvision.models.resnet18(num_classes=10),
        "normal": torchvision.models.resnet18(num_classes=3),
    }
    return nddrify.fuse(models, example_input=SMALL).eval()


def sequential_cnn(classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


@pytest.mark.parametrize("conv_mode", ["split", "grouped"])
def test_resnet18_pair_with_different_heads(resnet_pair: nn.Module, conv_mode: str) -> None:
    fused = resnet_pair
    batched = batch_tasks(fused, conv_mode=conv_mode)
    assert_same_outputs(fused, batched, SMALL)
    report = batched.report
    assert (report.batched_operations, report.operations) == (68, 69)
    assert [f.batched for f in report.fusions] == [True] * 5
    assert [len(s.per_task) for s in report.stages] == [0, 0, 0, 0, 0, 1]
    head = report.stages[-1].per_task[0]
    assert (head.node, head.reason, head.differs) == (
        "fc",
        "Linear: out_features 10 in seg vs 3 in normal",
        True,
    )
    assert isinstance(batched.batched.conv1, TaskBatchedConv2d)
    assert batched.batched.conv1.weight.shape == (128, 3, 7, 7)
    assert isinstance(batched.nddr1, TaskBatchedNDDR)
    assert type(batched.seg.fc) is nn.Linear and batched.seg.fc.out_features == 10


def test_three_tasks_batch_size_two_tuple_output() -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN(), TinyCNN()], points=["stem", "stage1"]).eval()
    batched = batch_tasks(fused)
    x = torch.randn(2, 3, 32, 32)
    assert_same_outputs(fused, batched, x)
    assert isinstance(batched(x), tuple)
    assert (batched.report.batched_operations, batched.report.operations) == (12, 12)
    assert batched.get_submodule("batched.stem.0").weight.shape == (
        24,
        3,
        3,
        3,
    )  # 3 tasks × 8 channels


def test_unet_skip_connections_across_fusion_points() -> None:
    fused = nddrify.fuse(
        {"a": UNet(classes=3), "b": UNet(classes=5)}, points=["enc1", "enc2", "enc3"]
    ).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, torch.randn(2, 3, 32, 32))
    report = batched.report
    assert [(s.start, s.end, s.batched, s.operations) for s in report.stages] == [
        ("x", "nddr1", 6, 6),
        ("nddr1", "nddr2", 7, 7),
        ("nddr2", "nddr3", 7, 7),
        ("nddr3", "output", 31, 32),
    ]
    assert [str(op) for op in report.stages[-1].per_task] == [
        "out (Conv2d: out_channels 3 in a vs 5 in b)"
    ]
    # the decoder's skip concatenations keep each task's channels together
    assert batched.code.count("cat_task_channels(") == 3


def test_torchvision_blocks_mobilenet_v3() -> None:
    # leaf modules: Conv2dNormActivation (a Sequential), SqueezeExcitation; Hardswish; dropout
    models = [torchvision.models.mobilenet_v3_small(num_classes=c) for c in (10, 3)]
    fused = nddrify.fuse(models, example_input=SMALL).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, torch.randn(2, 3, 64, 64))
    assert (batched.report.batched_operations, batched.report.operations) == (54, 55)
    se = batched.get_submodule("batched.features.1.block.1")
    assert type(se) is torchvision.ops.SqueezeExcitation
    assert isinstance(se.fc1, TaskBatchedConv2d) and se.fc1.weight.shape == (16, 16, 1, 1)
    state = batched.fused_state_dict()
    assert all(torch.equal(state[k], v) for k, v in fused.state_dict().items())


def test_timm_batchnorm_act() -> None:
    timm = pytest.importorskip("timm")
    models = [timm.create_model("mobilenetv3_small_050", num_classes=c) for c in (10, 3)]
    fused = nddrify.fuse(models, example_input=SMALL).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, torch.randn(2, 3, 64, 64))
    norm = batched.get_submodule("batched.bn1")
    assert isinstance(norm, TaskBatchedBatchNormAct2d) and norm.num_features == 2 * 16
    per_task = [op.node for stage in batched.report.stages for op in stage.per_task]
    # timm's classifier is traced through: its weight, bias and F.linear differ per task
    assert per_task == [
        "classifier.classifier_weight",
        "classifier.classifier_bias",
        "classifier.linear",
    ]


@pytest.mark.parametrize(
    ("fusion", "batched_type"),
    [
        ("cross_stitch", TaskBatchedCrossStitch),
        (nddrify.CrossStitch(per_channel=True), TaskBatchedCrossStitch),
        (nddrify.NDDR(rank=4), None),  # low rank: the layer runs on the K maps
        ("sluice", None),
    ],
)
def test_fusion_kinds(fusion, batched_type) -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem", "stage1"], fusion=fusion).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, torch.randn(2, 3, 32, 32))
    assert batched.report.batched_operations == batched.report.operations == 12
    if batched_type is None:
        assert not any(f.batched for f in batched.report.fusions)
        assert type(batched.nddr1) is type(fused.nddr1)
    else:
        assert all(f.batched for f in batched.report.fusions)
        assert isinstance(batched.nddr1, batched_type)


def test_shortcut_runs_batched() -> None:
    models = {"a": UNet(classes=3), "b": UNet(classes=5)}
    fused = nddrify.fuse(models, points=["enc1", "enc2", "enc3"], shortcut=True).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, torch.randn(2, 3, 32, 32))
    assert isinstance(batched.shortcut, TaskBatchedShortcut)
    names = [(f.name, f.batched, f.after_stage) for f in batched.report.fusions]
    assert names == [
        ("nddr1", True, 0),
        ("nddr2", True, 1),
        ("nddr3", True, 2),
        ("shortcut", True, 2),
    ]
    assert batched.report.stages[-1].start == "nddr3"


def test_report_exact_text() -> None:
    fused = nddrify.fuse(
        {"seg": sequential_cnn(40), "normal": sequential_cnn(3)}, points=["2"]
    ).eval()
    expected = (
        "BatchingReport(2 tasks: seg, normal; 8 of 9 operations batched, 1 of 1 fusion layers)\n"
        "  stage 0  x → nddr1           3/3 batched\n"
        "  nddr1    batched\n"
        "  stage 1  nddr1 → output      5/6 batched; per task: 8 (Linear: out_features 40 in "
        "seg vs 3 in normal)"
    )
    assert str(batching_report(fused)) == expected
    assert repr(batch_tasks(fused).report) == expected
    stages = batching_report(fused).stages
    assert [s.identical for s in stages] == [True, False]


def test_registered_module_type_runs_batched() -> None:
    class TaggedConv2d(nn.Conv2d):
        """A user's own layer type: Conv2d's forward under another name (local to this test, so
        registering it leaves the other tests alone)."""

    def model(classes: int) -> nn.Sequential:
        return nn.Sequential(
            TaggedConv2d(3, 8, 3, 2, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            TaggedConv2d(8, 16, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, classes),
        )

    models = {"seg": model(40), "normal": model(3)}
    options = nddrify.TraceOptions(leaf_modules=[TaggedConv2d])
    fused = nddrify.fuse(models, points=["2"], trace_options=options).eval()
    assert str(batching_report(fused).stages[0].per_task[0]) == (
        "0 (no batched form for TaggedConv2d)"
    )
    register_batched_form(TaggedConv2d, TaskBatchedConv2d, kind="conv")
    batched = batch_tasks(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_difference(fused(x), batched(x)) <= TOLERANCE
    assert isinstance(batched.get_submodule("batched.0"), TaskBatchedConv2d)
    assert isinstance(batched.get_submodule("batched.3"), TaskBatchedConv2d)
    report = batched.report
    assert (report.batched_operations, report.operations) == (7, 8)
    assert [str(op) for stage in report.stages for op in stage.per_task] == [
        "7 (Linear: out_features 40 in seg vs 3 in normal)"
    ]


def test_tasks_with_nothing_in_common_still_run() -> None:
    fused = nddrify.fuse([TinyCNN(width=8), TinyCNN(width=16)], points=["stem"]).eval()
    report = batching_report(fused)
    assert not report.batchable
    assert report.batched_operations == 0
    assert str(report).splitlines()[1] == (
        "  nothing runs batched: the tasks share no identical operation"
    )
    assert report.fusions[0].reason == "the tasks' maps differ in shape"
    assert_same_outputs(fused, batch_tasks(fused), torch.randn(1, 3, 32, 32))


def test_diverging_architectures_batch_their_common_prefix() -> None:
    models = [torchvision.models.resnet18(), torchvision.models.resnet34()]
    fused = nddrify.fuse(models, points=["layer1", "layer2"], example_input=SMALL).eval()
    batched = batch_tasks(fused)
    assert_same_outputs(fused, batched, SMALL)
    layer1 = batched.report.stages[0]
    # stem + the two blocks both have in layer1 run batched; resnet34's third block per task
    assert (layer1.batched, layer1.operations) == (18, 25)
    assert str(layer1.per_task[0]) == (
        "layer1.2.conv1 (the task graphs diverge here (0 in task0, 7 in task1 operations left))"
    )


def test_hard_sharing_model_batches_the_heads() -> None:
    shared = nddrify.share([TinyCNN(classes=5), TinyCNN(classes=5)], split="stage1").eval()
    batched = batch_tasks(shared)
    assert_same_outputs(shared, batched, torch.randn(2, 3, 32, 32))
    assert (batched.report.batched_operations, batched.report.operations) == (6, 6)


def test_fused_model_is_not_modified(resnet_pair: nn.Module) -> None:
    fused = resnet_pair
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    code = fused.code
    batched = batch_tasks(fused)
    with torch.no_grad():
        for parameter in batched.parameters():
            parameter.add_(1.0)
    after = fused.state_dict()
    assert fused.code == code
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_state_dict_round_trip(resnet_pair: nn.Module) -> None:
    fused = resnet_pair
    state = batch_tasks(fused).fused_state_dict()
    reference = fused.state_dict()
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_training_step_matches_fused_and_syncs_back() -> None:
    fused = nddrify.fuse({"a": TinyCNN(classes=5), "b": TinyCNN(classes=3)}, points=["stem"])
    untrained = copy.deepcopy(fused.train())
    initial = {key: value.clone() for key, value in fused.state_dict().items()}
    batched = batch_tasks(fused)
    x, steps = torch.randn(4, 3, 32, 32), 2
    for model in (fused, batched):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            out = model(x)
            loss = out["a"].square().mean() + out["b"].abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    synced = batched.sync(untrained).state_dict()
    for key, value in fused.state_dict().items():
        assert torch.allclose(synced[key], value, atol=1e-6), key
    # weights, running statistics and batch counts moved, through the batched modules
    moved = ["a.stem.0.weight", "b.fc.weight", "nddr1.convs.1.weight", "b.stem.1.running_mean"]
    assert not any(torch.equal(initial[key], synced[key]) for key in moved)
    assert int(synced["nddr1.norms.0.num_batches_tracked"]) == steps


def test_param_groups_match_the_fused_model() -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"])

    def summary(model: nn.Module) -> list[tuple[str, float, int]]:
        groups = nddrify.param_groups(model, lr=1e-3, head=["fc"])
        return sorted((g["name"], g["lr"], sum(p.numel() for p in g["params"])) for g in groups)

    assert (
        summary(batch_tasks(fused))
        == summary(fused)
        == [
            ("base", 1e-3, 3888),
            ("base_no_decay", 1e-3, 192),
            ("fusion", 0.1, 256),
            ("fusion_no_decay", 0.1, 32),
            ("head", 0.01, 160),
            ("head_bias", 0.02, 10),
        ]
    )


def test_sync_rejects_another_model() -> None:
    batched = batch_tasks(nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"]))
    other = nddrify.fuse([TinyCNN(width=4), TinyCNN(width=4)], points=["stem"])
    with pytest.raises(BatchingError, match=r"'task0\.stem\.0\.weight' is shape 4×3×3×3"):
        batched.sync(other)


def test_separate_train_and_eval_graphs() -> None:
    fused = nddrify.fuse([FunctionalDropout(), FunctionalDropout()], points=["net.stem"])
    assert fused.eval_graph is not None
    batched = batch_tasks(fused.eval())
    assert batched.eval_graph is not None and batched.graph is batched.eval_graph
    assert_same_outputs(fused, batched, torch.randn(1, 3, 32, 32))
    batched.train()
    assert batched.graph is batched.train_graph
    assert "training = True" in batched.code
    assert "training = False" in batched.eval_graph.python_code("self").src
    # The train graph knows its maps' shapes too (copied from the eval graph), so it batches
    # the fusion layer as the eval graph does; it used to call the batched layer per task.
    out = batched(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 5), (2, 5)]
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in batched.nddr1.parameters())


def test_deepcopy_and_pickle_keep_everything() -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"]).eval()
    batched = batch_tasks(fused)
    x = torch.randn(1, 3, 32, 32)
    for clone in (copy.deepcopy(batched), pickle.loads(pickle.dumps(batched))):
        assert isinstance(clone, BatchedFusedModel) and not clone.training
        assert clone.report == batched.report
        assert_same_outputs(fused, clone, x)


def test_torch_compile_fullgraph() -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"]).eval()
    batched = batch_tasks(fused)
    compiled = torch.compile(batched, backend="aot_eager", fullgraph=True)
    assert_same_outputs(fused, compiled, torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_torch_compile_inductor_cpu(resnet_pair: nn.Module) -> None:
    fused = resnet_pair
    compiled = torch.compile(batch_tasks(fused), fullgraph=True)
    assert_same_outputs(fused, compiled, SMALL)


@pytest.mark.cuda
@pytest.mark.parametrize("conv_mode", ["auto", "split"])
def test_cuda_graphs(resnet_pair: nn.Module, conv_mode: str) -> None:
    fused = copy.deepcopy(resnet_pair).cuda()
    batched = batch_tasks(fused, conv_mode=conv_mode)
    compiled = torch.compile(batched, mode="reduce-overhead", fullgraph=True)
    x = SMALL.cuda()
    for _ in range(3):  # record, then replay the CUDA graph
        with torch.no_grad():
            got = compiled(x)
    with torch.no_grad():
        expected = fused(x)
    # cuDNN picks other algorithms for grouped convolutions; TF32 stays off by default
    assert max_difference(expected, got) <= 1e-4 * max(1.0, largest(expected))


def test_not_a_fused_model() -> None:
    with pytest.raises(BatchingError, match=r"needs a model returned by nddrify\.fuse"):
        batch_tasks(TinyCNN())
    with pytest.raises(BatchingError, match=r"needs a model returned by nddrify\.fuse"):
        batching_report(torch.fx.symbolic_trace(TinyCNN()))
    batched = batch_tasks(nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"]))
    with pytest.raises(BatchingError, match="already batched"):
        batch_tasks(batched)
    assert issubclass(BatchingError, nddrify.NddrifyError)


def test_unknown_conv_mode() -> None:
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], points=["stem"])
    with pytest.raises(BatchingError, match=r"conv_mode='fast' is unknown; use one of"):
        batch_tasks(fused, conv_mode="fast")
