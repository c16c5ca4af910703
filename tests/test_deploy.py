"""Deployment paths of a fused model: torch.compile, torch.export, ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

import nddrify

from .models import FunctionalDropout, TinyCNN

ATOL = 1e-4  # compiled kernels and ONNX Runtime may reorder float sums


def _max_diff(got, want) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def test_torch_compile_fullgraph_matches_eager() -> None:
    x = torch.randn(2, 3, 32, 32)
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], example_input=x[:1], shortcut=True).eval()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert _max_diff(compiled(x), fused(x)) <= ATOL


def test_torch_export_in_both_modes() -> None:
    x = torch.randn(2, 3, 32, 32)
    fused = nddrify.fuse([FunctionalDropout(), FunctionalDropout()], example_input=x[:1]).eval()
    exported = torch.export.export(fused, (x,))
    with torch.no_grad():
        assert _max_diff(exported.module()(x), fused(x)) == 0.0
    fused.train()
    exported_train = torch.export.export(fused, (x,))
    ops = {str(n.target) for n in exported_train.graph.nodes if n.op == "call_function"}
    assert any("dropout" in op for op in ops)  # the train graph was exported


def test_onnx_export_runs_in_onnxruntime(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x = torch.randn(2, 3, 64, 64)
    fused = nddrify.fuse(["torchvision:resnet18", "torchvision:resnet18(num_classes=7)"]).eval()
    path = tmp_path / "fused.onnx"
    torch.onnx.export(fused, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.shape for o in outputs] == [(2, 1000), (2, 7)]
    with torch.no_grad():
        assert _max_diff([torch.from_numpy(o) for o in outputs], fused(x)) <= ATOL
