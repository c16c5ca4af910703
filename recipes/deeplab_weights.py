"""DeepLab-LargeFOV VOC weights (the official NDDR-CNN start) for :func:`recipes.models.deeplab_vgg16`.

The official TF code starts its single-task and "Mul." VGG-16 runs from
``models/vgg_deeplab_lfov/model.ckpt-init-slim`` (``experiments/VGG16/st_seg.sh``,
``mt_baseline.sh``): the Caffe DeepLab-LargeFOV model trained on Pascal VOC 2012, converted with
caffe-tensorflow and saved as a TensorFlow (V2) checkpoint under slim names —
``vgg_16/conv1/conv1_1/weights`` (HWIO ``3×3×3×64``) … ``vgg_16/conv5/conv5_3/weights``,
``vgg_16/fc6/weights`` (``3×3×512×1024``, dilation 12), ``vgg_16/fc7/weights`` (``1×1×1024×1024``),
``vgg_16/fc8_voc12/weights`` (``1×1×1024×21``) and their ``biases``. The official scripts exclude
``fc8`` (the VOC classifier); their BN networks have no conv biases, so only the weights load.

Files read here (:func:`read_voc_weights`):

* a TF V2 checkpoint (``PREFIX.index`` + ``PREFIX.data-00000-of-00001``; pass ``PREFIX`` or the
  ``.index`` path), read by a small pure-Python reader (no TensorFlow needed);
* ``.npz`` (``numpy.load(allow_pickle=False)``): arrays named ``LAYER/weights``/``LAYER/biases``
  (slim scopes like ``vgg_16/conv1/`` in front are fine), TF's HWIO layout;
* ``.pt``/``.pth`` written by ``convert`` (``torch.load(weights_only=True)``);
* caffe-tensorflow's ``.npy`` (a pickled dict ``{layer: {"weights": HWIO, "biases": …}}``), only
  through ``python -m recipes.deeplab_weights convert IN.npy OUT.pt`` (pickle can run code: convert
  once a file you trust; training then loads ``OUT.pt`` with ``weights_only=True``).

Our ``deeplab_vgg16`` has BN after every conv: the VOC model has none, so BN stays at its default
(γ=1, β=0, running mean 0 / variance 1), fc6/fc7 have no bias there (the VOC biases are dropped, as
in the official code), and conv1_1..conv5_3 keep their biases (they load). ``fc8`` is skipped unless
asked for.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from recipes.models import deeplab_vgg16
    >>> path = tempfile.mkdtemp() + "/voc.npz"
    >>> w = np.random.rand(3, 3, 3, 64).astype("float32")  # HWIO
    >>> np.savez(path, **{"conv1_1/weights": w, "conv1_1/biases": np.zeros(64, "float32")})
    >>> model = deeplab_vgg16(40)
    >>> report = load_deeplab_voc(model, path, strict=False)
    >>> report.loaded
    ['features.0.weight', 'features.0.bias']
    >>> torch.equal(model.features[0].weight, torch.from_numpy(w).permute(3, 2, 0, 1))
    True
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from .tf_checkpoint import read_tf_checkpoint

__all__ = [
    "DEFAULT_VOC_WEIGHTS",
    "FORMAT",
    "LAYERS",
    "VocLoad",
    "read_voc_weights",
    "load_deeplab_voc",
    "convert",
    "load_start_weights",
    "main",
]

#: Where the paper configs look for the (converted) DeepLab VOC weights.
DEFAULT_VOC_WEIGHTS = "weights/deeplab_vgg16_voc.pth"

#: ``format`` entry of the files ``convert`` writes.
FORMAT = "recipes.deeplab_voc/1"

#: DeepLab-LargeFOV layers: name → (kernel, in channels, out channels); fc8 has 21 VOC classes.
LAYERS: dict[str, tuple[int, int, int]] = {
    **{
        f"conv{stage}_{index}": (3, cin if index == 1 else cout, cout)
        for stage, cin, cout, count in (
            (1, 3, 64, 2),
            (2, 64, 128, 2),
            (3, 128, 256, 3),
            (4, 256, 512, 3),
            (5, 512, 512, 3),
        )
        for index in range(1, count + 1)
    },
    "fc6": (3, 512, 1024),
    "fc7": (1, 1024, 1024),
    "fc8": (1, 1024, 21),
}

_HINT = (
    "get the DeepLab-LargeFOV VOC weights the official NDDR-CNN code uses "
    "(models/vgg_deeplab_lfov/model.ckpt-init-slim) and run once: python -m "
    "recipes.deeplab_weights convert models/vgg_deeplab_lfov/model.ckpt-init-slim "
    f"{DEFAULT_VOC_WEIGHTS} (see recipes/README.md, 'Starting weights')"
)


# ----------------------------------------------------------------------------- reading any format


def _layer_param(name: str) -> tuple[str, str] | None:
    """``vgg_16/conv1/conv1_1/weights`` → ``("conv1_1", "weight")``; ``fc8_voc12`` → ``fc8``;
    names of other tensors (``…/Momentum``, BN, ``global_step``) → ``None``."""
    parts = name.replace(".", "/").split("/")
    if len(parts) < 2 or parts[-1] not in ("weights", "biases", "weight", "bias"):
        return None
    layer = "fc8" if parts[-2].startswith("fc8") else parts[-2]
    if layer not in LAYERS:
        return None
    return layer, "weight" if parts[-1].startswith("weight") else "bias"


def _from_hwio(arrays: Mapping[str, Any], path: str) -> dict[str, torch.Tensor]:
    """Named HWIO arrays → ``{"conv1_1.weight": OIHW tensor, "conv1_1.bias": …}``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in arrays.items():
        found = _layer_param(name)
        if found is None:
            continue
        layer, param = found
        key = f"{layer}.{param}"
        if key in out:
            raise DatasetFormatError(f"{path!r} holds {layer} {param} twice (again as {name!r}).")
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise DatasetFormatError(f"{path!r}: {name!r} has dtype {array.dtype}, not float.")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if param == "weight":
            if tensor.ndim != 4:
                kernel, cin, cout = LAYERS[layer]
                raise DatasetFormatError(
                    f"{path!r}: {layer} weights {name!r} have shape {tuple(tensor.shape)}; "
                    f"expected HWIO ({kernel}, {kernel}, {cin}, {cout})."
                )
            tensor = tensor.permute(3, 2, 0, 1).contiguous()  # HWIO → OIHW
        out[key] = tensor
    return out


def read_voc_weights(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read DeepLab VOC weights from any supported file (module docstring) as
    ``{"conv1_1.weight": OIHW tensor, "conv1_1.bias": …, "fc8.weight": …}``.

    ``allow_pickle`` (only ``convert`` passes it) lets a caffe-tensorflow ``.npy`` dict load.

    Raises:
        DatasetNotFoundError: nothing at ``path``.
        DatasetFormatError: an unreadable file, an unsafe file without ``allow_pickle``, or no
            DeepLab layer in it.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + "/fc7.npz"
        >>> np.savez(path, **{"vgg_16/fc7/weights": np.ones((1, 1, 1024, 1024), "float32")})
        >>> {k: tuple(v.shape) for k, v in read_voc_weights(path).items()}
        {'fc7.weight': (1024, 1024, 1, 1)}
    """
    path = os.fspath(path)
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if os.path.isfile(prefix + ".index"):
        selected = read_tf_checkpoint(prefix, select=lambda name: _layer_param(name) is not None)
        weights = _from_hwio(selected, path)
    elif not os.path.isfile(path):
        raise DatasetNotFoundError(f"DeepLab VOC weights {path!r} do not exist: {_HINT}.")
    elif path.endswith((".pt", ".pth")):
        weights = _read_converted(path)
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as archive:
                weights = _from_hwio({k: archive[k] for k in archive.files}, path)
        except (ValueError, OSError) as error:
            raise DatasetFormatError(f"{path!r} is not a readable .npz ({error}).") from None
    elif path.endswith(".npy"):
        if not allow_pickle:
            raise DatasetFormatError(
                f"{path!r} is a caffe-tensorflow .npy (a pickled dict: loading it can run code). "
                f"Convert it once, if you trust it: python -m recipes.deeplab_weights convert "
                f"{path} {DEFAULT_VOC_WEIGHTS}"
            )
        weights = _read_caffe_tf_npy(path)
    else:
        raise DatasetFormatError(
            f"{path!r}: unknown DeepLab weights format; use a TF checkpoint prefix, .npz, .npy "
            "(caffe-tensorflow) or a .pt written by python -m recipes.deeplab_weights convert."
        )
    if not weights:
        raise DatasetFormatError(
            f"{path!r} holds no DeepLab-LargeFOV layer (names like vgg_16/conv1/conv1_1/weights, "
            "conv1_1/weights, fc6/weights, fc8_voc12/weights)."
        )
    return weights


def _read_caffe_tf_npy(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = np.load(path, allow_pickle=True, encoding="latin1")
    except (ValueError, OSError) as error:
        raise DatasetFormatError(f"{path!r} is not a readable .npy ({error}).") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, Mapping):
        raise DatasetFormatError(
            f"{path!r} does not hold caffe-tensorflow's dict {{layer: {{'weights', 'biases'}}}}."
        )
    flat: dict[str, Any] = {}
    for layer, params in obj.items():
        if isinstance(params, Mapping):
            flat.update({f"{layer}/{k}": v for k, v in params.items()})
        elif isinstance(params, (list, tuple)):  # older caffe-tensorflow: [weights, biases]
            flat.update({f"{layer}/{k}": v for k, v in zip(("weights", "biases"), params)})
    return _from_hwio(flat, path)


def _read_converted(path: str) -> dict[str, torch.Tensor]:
    from .models import load_weights_only

    obj = load_weights_only(
        path, "DeepLab VOC weights", "write it with python -m recipes.deeplab_weights convert"
    )
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise DatasetFormatError(
            f"{path!r} is not a file written by python -m recipes.deeplab_weights convert "
            f"(no format={FORMAT!r} entry); convert the original DeepLab weights with it."
        )
    layers = obj.get("layers")
    if not isinstance(layers, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in layers.values()
    ):
        raise DatasetFormatError(f"{path!r}: 'layers' is not a mapping of names to tensors.")
    return dict(layers)


# ----------------------------------------------------------------------------- loading a model


@dataclass
class VocLoad:
    """What :func:`load_deeplab_voc` did.

    Attributes:
        path: the file read.
        loaded: the model's state-dict keys set from the file, in model order.
        dropped: file entries not used (fc6/fc7 biases when BN follows, fc8 when skipped).
        kept_at_init: the model's state-dict keys left as they were (BN, fc8, missing layers).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept_at_init: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts and what was not loaded."""
        dropped = f"; not used from the file: {', '.join(self.dropped)}" if self.dropped else ""
        bn = any(k.endswith("running_mean") for k in self.kept_at_init)
        why = " (BatchNorm at its defaults: the VOC model has none)" if bn else ""
        return f"{len(self.loaded)} tensors loaded, {len(self.kept_at_init)} kept at init{why}{dropped}"


def _targets(model: nn.Module) -> dict[str, tuple[str, nn.Conv2d]]:
    """DeepLab layer name → (module name, conv) in a :func:`recipes.models.deeplab_vgg16`."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    convs = [
        (f"features.{name}", m)
        for name, m in (features.named_children() if isinstance(features, nn.Module) else [])
        if isinstance(m, nn.Conv2d)
    ]
    heads = [(f"head.{n}", getattr(head, n, None)) for n in ("fc6", "fc7", "fc8")]
    if len(convs) != 13 or not all(isinstance(m, nn.Conv2d) for _, m in heads):
        raise ConfigError(
            f"DeepLab VOC weights load into recipes.models.deeplab_vgg16 only; "
            f"{type(model).__name__} has no features (13 convs) and head.fc6/fc7/fc8."
        )
    dilation = getattr(heads[0][1], "dilation", None)
    if dilation != (12, 12):
        raise ConfigError(
            f"our head.fc6 has dilation {dilation}; the DeepLab-LargeFOV VOC fc6 weights are a "
            "3×3 conv with dilation 12 and mean nothing at another dilation."
        )
    return dict(zip(LAYERS, [*convs, *heads]))  # type: ignore[arg-type]


def load_deeplab_voc(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    include_fc8: bool = False,
    strict: bool = True,
) -> VocLoad:
    """Load DeepLab-LargeFOV VOC weights (any format of :func:`read_voc_weights`) into a
    :func:`recipes.models.deeplab_vgg16` model (with or without BN).

    conv1_1..conv5_3, fc6 and fc7 load (HWIO → OIHW); fc8 (the 21-class VOC classifier) is
    skipped unless ``include_fc8`` (the model must then have 21 outputs). ``strict``: every loaded
    layer must be in the file, weights and (where the model has one) bias; ``strict=False`` loads
    what is there and reports the rest in ``kept_at_init``.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DatasetFormatError: a layer is missing (strict) or of another shape: the message names
            the file, the layer and the expected shape.
        ConfigError: ``model`` is not a DeepLab-LargeFOV VGG-16.

    Example:
        >>> import tempfile, numpy as np
        >>> from recipes.models import deeplab_vgg16
        >>> path = tempfile.mkdtemp() + "/bad.npz"
        >>> np.savez(path, **{"fc7/weights": np.zeros((1, 1, 1024, 512), "float32")})
        >>> try:
        ...     load_deeplab_voc(deeplab_vgg16(3), path, strict=False)
        ... except DatasetFormatError as error:
        ...     print(str(error).split(": ", 1)[1])
        layer fc7 (our head.fc7) has weights of HWIO shape (1, 1, 1024, 512); expected (1, 1, 1024, 1024).
    """
    path = os.fspath(path)
    weights = read_voc_weights(path)
    targets = _targets(model)
    report = VocLoad(path)
    layers = [name for name in LAYERS if include_fc8 or name != "fc8"]
    missing = [name for name in layers if f"{name}.weight" not in weights]
    missing += [
        f"{name} biases"
        for name in layers
        if name not in missing
        and targets[name][1].bias is not None
        and f"{name}.bias" not in weights
    ]
    if strict and missing:
        raise DatasetFormatError(
            f"{path!r} lacks DeepLab layer(s) {', '.join(missing)}; a full DeepLab-LargeFOV file "
            "has conv1_1..conv5_3, fc6, fc7 (and fc8_voc12), weights and biases."
        )
    updates: dict[str, torch.Tensor] = {}
    for name in layers:
        module_name, conv = targets[name]
        for param in ("weight", "bias"):
            key, own = f"{name}.{param}", getattr(conv, param)
            if key not in weights:
                continue
            if own is None:
                report.dropped.append(f"{name} biases (our {module_name} has none: BN follows)")
                continue
            tensor = weights[key]
            if tuple(tensor.shape) != tuple(own.shape):
                raise DatasetFormatError(
                    f"{path!r}: layer {name} (our {module_name}) has {param}s of "
                    + (
                        f"HWIO shape {_hwio(tensor.shape)}; expected {_hwio(own.shape)}."
                        if param == "weight"
                        else f"shape {tuple(tensor.shape)}; expected {tuple(own.shape)}."
                    )
                    + (
                        f" fc8 holds the 21 VOC classes; this model has {own.shape[0]} outputs "
                        "(load without include_fc8)."
                        if name == "fc8"
                        else ""
                    )
                )
            updates[f"{module_name}.{param}"] = tensor
    if not include_fc8 and "fc8.weight" in weights:
        report.dropped.append("fc8 (the VOC classifier, 21 classes)")
    state = model.state_dict()
    with torch.no_grad():
        for key, tensor in updates.items():
            state[key].copy_(tensor)
    report.loaded = [k for k in state if k in updates]
    report.kept_at_init = [k for k in state if k not in updates]
    return report


def _hwio(shape: Sequence[int]) -> tuple[int, ...]:
    out, cin, kh, kw = shape
    return (kh, kw, cin, out)


# ----------------------------------------------------------------------------- converting, starts


def convert(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, include_fc8: bool = True
) -> list[str]:
    """Convert DeepLab VOC weights (TF checkpoint, ``.npz``, caffe-tensorflow ``.npy`` — read with
    pickle: only files you trust) into a weights-only torch file that training reads with
    ``weights_only=True``. Returns the layers written.

    Example:
        >>> import tempfile, numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> np.save(folder + "/voc.npy", {"fc7": {"weights": np.ones((1, 1, 1024, 1024), "f4"),
        ...                                       "biases": np.zeros(1024, "f4")}})
        >>> convert(folder + "/voc.npy", folder + "/voc.pth")
        ['fc7.weight', 'fc7.bias']
        >>> list(read_voc_weights(folder + "/voc.pth"))
        ['fc7.weight', 'fc7.bias']
    """
    layers = read_voc_weights(source, allow_pickle=True)
    if not include_fc8:
        layers = {k: v for k, v in layers.items() if not k.startswith("fc8.")}
    target = os.fspath(target)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    torch.save(
        {"format": FORMAT, "source": os.path.basename(os.fspath(source)), "layers": layers}, target
    )
    return list(layers)


def voc_weights_present(path: str) -> bool:
    """Whether ``path`` (a file, or a TF checkpoint prefix) exists."""
    return bool(path) and (os.path.isfile(path) or os.path.isfile(path + ".index"))


def load_start_weights(model: nn.Module, config: Any, task: str) -> list[str]:
    """Set ``task``'s model to the start ``config.start`` asks for; returns the note lines.

    * ``"voc"``: the DeepLab VOC weights at ``config.voc_weights`` (an error if absent);
    * ``"voc_if_present"``: those weights if the file is there, else — with a ``WARNING`` line —
      ``config.pretrained`` (the ImageNet start: fc6/fc7 at random init), or random init.

    Example:
        >>> from types import SimpleNamespace
        >>> from recipes.models import deeplab_vgg16
        >>> cfg = SimpleNamespace(start="voc_if_present", voc_weights="/none.pth", pretrained="",
        ...                       mean="caffe_bgr")
        >>> print(load_start_weights(deeplab_vgg16(3), cfg, "normal")[0][:80])
        WARNING: normal: start=voc_if_present but the DeepLab VOC weights '/none.pth' ar
    """
    path = config.voc_weights
    fits = getattr(config, "model", "deeplab_vgg16") == "deeplab_vgg16"
    if config.start == "voc" or (fits and voc_weights_present(path)):
        report = load_deeplab_voc(model, path)
        notes = [
            f"{task}: start=voc (official): DeepLab-LargeFOV VOC weights from {path}: "
            f"{report.summary()}"
        ]
        if config.mean != "caffe_bgr":
            notes.append(
                f"WARNING: {task}: the VOC weights were trained on BGR images minus the Caffe "
                f"mean (mean=caffe_bgr, as the official code); this run uses mean={config.mean}."
            )
        return notes
    fallback = (
        f"the ImageNet-style weights {config.pretrained!r} (fc6/fc7 at random init)"
        if config.pretrained
        else "random initialisation"
    )
    why = (
        f"the DeepLab VOC weights {path!r} are absent"
        if fits
        else f"the DeepLab VOC weights fit model='deeplab_vgg16' only (this run: {config.model!r})"
    )
    notes = [
        f"WARNING: {task}: start={config.start} but {why}: starting from {fallback}, NOT the "
        f"official start; {_HINT}."
    ]
    if config.pretrained:
        from .models import load_pretrained

        skipped = load_pretrained(model, config.pretrained)
        loaded = len(model.state_dict()) - len(skipped)
        notes.append(
            f"{task}: {loaded} tensors from {config.pretrained} ({len(skipped)} kept at init)"
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.deeplab_weights convert IN OUT [--no-fc8]`` / ``show FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes.deeplab_weights",
        description="Convert DeepLab-LargeFOV VOC weights for recipes (see recipes/README.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser(
        "convert",
        help="IN (TF checkpoint prefix or .index, .npz, or a caffe-tensorflow .npy you trust: "
        "it is unpickled) → OUT, a weights-only torch file",
    )
    conv.add_argument("source")
    conv.add_argument("target")
    conv.add_argument("--no-fc8", action="store_true", help="leave out the VOC classifier fc8")
    show = commands.add_parser("show", help="list the DeepLab layers of a file and their shapes")
    show.add_argument("source")
    args = parser.parse_args(argv)
    if args.command == "convert":
        if args.source.endswith(".npy"):
            print(
                f"reading {args.source} with pickle (allow_pickle=True): convert only files "
                "you trust",
                file=sys.stderr,
            )
        layers = convert(args.source, args.target, include_fc8=not args.no_fc8)
        print(f"wrote {args.target}: {len(layers)} tensors ({', '.join(layers)})")
    else:
        for key, tensor in read_voc_weights(args.source).items():
            print(
                f"{key}\t{tuple(tensor.shape)} (OIHW)"
                if tensor.ndim == 4
                else f"{key}\t{tuple(tensor.shape)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
