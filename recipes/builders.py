"""From a :class:`~recipes.configs.RecipeConfig` to a network, its optimizer and its schedule.

Every network returns a dict task → prediction:

* ``method="single"``: the task model in a :class:`SingleTask` wrapper (``net.seg`` is the model);
  with ``shortcut=True`` the NDDR-Shortcut is spliced into the single network (paper Table 6,
  "Sing."): one task's pool1..pool5 outputs are resized, concatenated and reduced to pool5's
  width by :class:`nddrify.layers.NDDRShortcutLayer` (K = 1);
* ``nddr`` / ``cross_stitch`` / ``sluice``: :func:`nddrify.fuse` of the task models;
* ``mul``: :func:`nddrify.share` (one trunk up to the split point, the paper's "Mul."). With
  ``shortcut=True`` (Table 6, "Mul.") the tasks' trunks are fused by a pass-through layer with the
  shortcut and their parameters are *tied* (one set of trunk weights; the trunk is computed once
  per task, a 2× cost on the trunk, the same function and gradients as one shared trunk); so are
  the tasks' reducers with ``mul_shortcut="shared"`` (the official code's one reducer).

The shortcut pieces (and the reducers' ``shortcut_lr_mult`` groups) are in :mod:`recipes.shortcuts`.

Task models start from ``init_from[task]`` (a single-task run's ``model.pt`` or any recipes
checkpoint: strict, every key must be there) or else from ``pretrained`` (a local ImageNet-style
state dict: :func:`recipes.models.load_pretrained`, by name and shape), or with ``start=voc`` /
``voc_if_present`` from the DeepLab-LargeFOV VOC weights ``voc_weights``
(:func:`recipes.deeplab_weights.load_start_weights`; the note says which start was used).

Your own models (``models`` / a spec ``model``, :mod:`recipes.custom`) are built by
:func:`nddrify.specs.load_spec` and fused the same way; with your own dataset they are traced on
two copies of its first training image and must each return one tensor.

Example:
    >>> import torch
    >>> from recipes.configs import get_config, apply_overrides
    >>> cfg = apply_overrides(get_config("synthetic_demo_nddr"), ["init_from={}", "crop=32"])
    >>> net = build_network(cfg).module
    >>> out = net(torch.randn(2, 3, 32, 32))
    >>> sorted(out), tuple(out["seg"].shape), tuple(out["normal"].shape)
    (['normal', 'seg'], (2, 40, 8, 8), (2, 3, 8, 8))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import nddrify
from nddrify.layers import FusionLayer
from nddrify.meta import SEGMENT_META_KEY, TASK_META_KEY, fused_plan

from .configs import RecipeConfig
from .errors import DatasetFormatError, RecipeError
from .shortcuts import (
    add_single_shortcut,
    load_shortcut_extras,
    shortcut_layers,
    shortcut_param_groups,
    tie_modules,
    tie_reducers,
)

__all__ = [
    "DENSE_TASKS",
    "CHECKPOINT_FORMAT",
    "DemoCNN",
    "demo_cnn",
    "SingleTask",
    "Network",
    "PolyDecay",
    "head_names",
    "num_outputs",
    "build_task_model",
    "build_network",
    "load_task_weights",
    "add_single_shortcut",
    "build_optimizer",
    "set_train_mode",
]

#: Tasks whose predictions are maps (scored per pixel); the others are image-level.
DENSE_TASKS = frozenset({"seg", "normal"})

#: ``format`` entry of the training checkpoints written by :mod:`recipes.train`.
CHECKPOINT_FORMAT = "recipes.checkpoint/1"


# ----------------------------------------------------------------------------- the demo network


class DemoCNN(nn.Module):
    """A small DeepLab-style CNN: ``features`` (three conv-BN-ReLU stages ending in 3×3 max pools,
    strides 2, 2, 1: output stride 4) → ``head`` (a dilated 3×3 "fc6", BN, ReLU, dropout, and the
    1×1 classifier ``fc8``; or global average pooling and a linear ``fc8`` for image-level tasks).

    ``nddrify.plan(..., "auto")`` finds the three pools (``features.6``, ``.13``, ``.20``).
    """

    def __init__(
        self, num_outputs: int, *, dense: bool = True, width: int = 16, dropout: float = 0.1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels_in = 3
        for channels, stride in ((width, 2), (2 * width, 2), (4 * width, 1)):
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels_in, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
                channels_in = channels
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.features = nn.Sequential(*layers)
        head: OrderedDict[str, nn.Module] = OrderedDict()
        if dense:
            head["fc6"] = nn.Conv2d(channels_in, channels_in, 3, padding=2, dilation=2, bias=False)
            head["bn6"] = nn.BatchNorm2d(channels_in)
            head["relu6"] = nn.ReLU(inplace=True)
            head["drop6"] = nn.Dropout(dropout)
            head["fc8"] = nn.Conv2d(channels_in, num_outputs, 1)
        else:
            head["pool"] = nn.AdaptiveAvgPool2d(1)
            head["flatten"] = nn.Flatten()
            head["drop6"] = nn.Dropout(dropout)
            head["fc8"] = nn.Linear(channels_in, num_outputs)
        self.head = nn.Sequential(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def demo_cnn(num_outputs: int, *, dense: bool = True, width: int = 16) -> DemoCNN:
    """The small network of ``python -m recipes.demo`` and of the tests (``model=demo_cnn``).

    Example:
        >>> import torch
        >>> tuple(demo_cnn(40)(torch.randn(1, 3, 32, 32)).shape)
        (1, 40, 8, 8)
        >>> tuple(demo_cnn(2, dense=False)(torch.randn(1, 3, 32, 32)).shape)
        (1, 2)
    """
    return DemoCNN(num_outputs, dense=dense, width=width)


# ----------------------------------------------------------------------------- task models


def head_names(model: str) -> list[str]:
    """The classifier modules trained at 10× / 20× (``recipes.models.HEAD_NAMES``)."""
    if model == "demo_cnn":
        return ["head.fc8"]
    from .models import HEAD_NAMES

    return list(HEAD_NAMES[model])


def num_outputs(config: RecipeConfig, task: str) -> int:
    """Output channels of ``task`` on ``config.dataset``."""
    from .data import NUM_OUTPUTS

    return int(NUM_OUTPUTS[config.dataset][task])


def build_task_model(config: RecipeConfig, task: str) -> nn.Module:
    """The single-task network for ``task``, with ``config.dropout`` applied (no weights loaded)."""
    from .custom import build_user_model, model_spec

    spec = model_spec(config, task)
    if spec is not None:
        model: nn.Module = build_user_model(spec, task)
    elif config.model == "demo_cnn":
        outputs = num_outputs(config, task)
        model = demo_cnn(outputs, dense=task in DENSE_TASKS)
    else:
        from .models import build_model, model_options

        options = model_options(config.model, config.tf_same_pooling)
        model = build_model(config.model, num_outputs(config, task), **options)
    if config.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = config.dropout
    return model


def load_task_weights(model: nn.Module, path: str, task: str) -> dict[str, torch.Tensor]:
    """Load ``task``'s weights from ``path`` into ``model``, strictly: every key of the model
    must be in the file with the same shape.

    The file may be a plain state dict (a single-task run's ``model.pt``) or a recipes training
    checkpoint of any run that has the task (keys ``{task}.…``, a hard-sharing trunk's
    ``shared.…``). Returns the file's entries the model does not have (e.g. a single-task
    shortcut's ``shortcut.…`` weights), with the task prefix removed.
    """
    from .models import read_state_dict

    state = dict(
        read_state_dict(
            path,
            f"init_from[{task!r}]",
            f"train the single-task runs first (python -m {__package__}.train "
            "<prefix>_single_<task>), "
            "or point it at a weights file with --set init_from.<task>=PATH",
        )
    )
    own = model.state_dict()
    if not any(k in state for k in own):  # a whole-network checkpoint: take this task's part
        prefixed = {}
        for prefix in ("shared.", f"{task}."):
            prefixed.update({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        state = prefixed
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:5]}" if missing else ""
        if wrong:
            shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]
            detail += f"{'; ' if detail else ''}shape differs (file, model) for {shapes}"
        raise DatasetFormatError(
            f"init_from[{task!r}] = {path!r} does not fit the {task} model: {detail}. Was it "
            "trained with the same model and dataset (number of classes)?"
        )
    model.load_state_dict({k: state[k] for k in own})
    return {k: v for k, v in state.items() if k not in own}


# ----------------------------------------------------------------------------- networks


class SingleTask(nn.Module):
    """One task model returning ``{task: prediction}`` like the fused networks; the model is the
    attribute named after the task (``net.seg``), so state-dict keys match fused ones."""

    def __init__(self, task: str, model: nn.Module) -> None:
        super().__init__()
        self.task_name = task
        self.add_module(task, model)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.task_name: getattr(self, self.task_name)(x)}


@dataclass
class Network:
    """A built network and what was done to build it.

    Attributes:
        module: the network (returns a dict task → prediction).
        tasks: task names in order.
        heads: classifier module names for :func:`nddrify.param_groups`.
        notes: human-readable lines (plan, weights loaded, parameters).
    """

    module: nn.Module
    tasks: tuple[str, ...]
    heads: list[str]
    notes: list[str] = field(default_factory=list)


def _points_argument(config: RecipeConfig) -> Any:
    return "auto" if tuple(config.points) == ("auto",) else list(config.points)


def _fusion_factory(config: RecipeConfig) -> Any:
    init: Any = (config.alpha, config.beta)
    if config.method == "nddr":
        activation = {"auto": "auto", "relu": "relu", "none": None}[config.nddr_activation]
        return nddrify.NDDR(
            init="xavier" if config.init == "xavier" else init,
            activation=activation,
            rank=config.nddr_rank or None,
            groups=config.nddr_groups,
        )
    if config.method == "cross_stitch":
        return nddrify.CrossStitch(per_channel=config.cross_stitch_per_channel, init=init)
    return nddrify.Sluice(subspaces=config.subspaces, init=init)


class _PassThroughLayer(FusionLayer):
    """Returns the tasks' maps unchanged (the place-holder of a tied-trunk fusion)."""

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(maps)


class _PassThrough:
    """The fusion kind of a tied-trunk fusion: nothing is mixed, nothing is added."""

    name = "PassThrough"

    def build(self, level: Any) -> FusionLayer:
        return _PassThroughLayer()

    def num_parameters(self, level: Any) -> tuple[int, int]:
        return (0, 0)


def _trunk_modules(fused: fx.GraphModule, task: str) -> list[str]:
    """Names (without the task prefix) of ``task``'s modules called before the last fusion layer:
    the trunk a hard-sharing model would share. Read from the node-by-node graph's segment
    marks (segment s runs before fusion level s)."""
    levels = len(fused_plan(fused).levels)
    names = []
    for node in fused.flat_graph(train=False).nodes:
        before_last = node.meta.get(SEGMENT_META_KEY, levels) < levels
        if node.op == "call_module" and node.meta.get(TASK_META_KEY) == task and before_last:
            names.append(str(node.target)[len(task) + 1 :])
    return names


def _tie_trunks(fused: fx.GraphModule, tasks: Sequence[str], mode: str) -> int:
    """Make every task's trunk parameters the same ``nn.Parameter`` objects (task 0's, or the
    average); returns how many parameters the tasks now share."""
    names = _trunk_modules(fused, tasks[0])
    return sum(tie_modules([fused.get_submodule(f"{t}.{n}") for t in tasks], mode) for n in names)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_network(config: RecipeConfig, *, log: Callable[[str], None] | None = None) -> Network:
    """Build (and initialise) the network ``config`` describes; see the module docstring."""
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if log is not None:
            log(text)

    from .custom import check_outputs, example_input, is_custom_data, is_spec, model_spec

    if not config.tasks:
        raise RecipeError("config.tasks is empty: load configs with recipes.configs.load_config.")
    if is_custom_data(config):
        from .custom_losses import resolve_loss

        for task in config.tasks:  # a loss that does not import fails before any file is written
            resolve_loss(config.losses[task], f"losses.{task}")
        example = example_input(config)
    else:
        example = torch.zeros(1, 3, config.crop, config.crop)
    init_from = config.resolved_init_from()
    models: dict[str, nn.Module] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for task in config.tasks:
        model = build_task_model(config, task)
        if task in init_from:
            extras[task] = load_task_weights(model, init_from[task], task)
            note(f"{task}: weights from {init_from[task]}")
        elif config.start != "pretrained":  # the DeepLab VOC start (recipes.deeplab_weights)
            from .deeplab_weights import load_start_weights

            for line in load_start_weights(model, config, task):
                note(line)
        elif config.pretrained:
            from .models import load_pretrained

            skipped = load_pretrained(model, config.pretrained)
            loaded = len(model.state_dict()) - len(skipped)
            note(f"{task}: {loaded} tensors from {config.pretrained} ({len(skipped)} kept at init)")
        else:
            note(f"{task}: random initialisation")
        models[task] = model
    own = {task: models[task] for task in config.tasks if model_spec(config, task) is not None}
    check_outputs(own, example)
    points = _points_argument(config)
    builtin = config.model and not is_spec(config.model) and len(own) < len(config.tasks)
    heads = [*(head_names(config.model) if builtin else []), *config.heads]
    tasks = tuple(config.tasks)
    if config.method == "single":
        task = tasks[0]
        model = models[task]
        if config.shortcut:
            model = add_single_shortcut(model, points, example, config.shortcut_resize)
            load_shortcut_extras(model, extras.get(task, {}), 0, note)
        net: nn.Module = SingleTask(task, model)
    elif config.method == "mul" and not config.shortcut:
        split = points if points == "auto" else points[-1]
        net = nddrify.share(models, split=split, trunk=config.mul_trunk, example_input=example)
    else:
        factory = _PassThrough() if config.method == "mul" else _fusion_factory(config)
        shortcut = (
            nddrify.Shortcut(resize_mode=config.shortcut_resize) if config.shortcut else False
        )
        net = nddrify.fuse(models, points, fusion=factory, shortcut=shortcut, example_input=example)
        if config.method == "mul":
            shared = _tie_trunks(net, tasks, config.mul_trunk)
            note(f"hard sharing with shortcut: {shared:,} trunk parameters tied across tasks")
        else:
            note(str(fused_plan(net).overhead))
        if config.shortcut:
            (layer,) = shortcut_layers(net)
            carried = sum(
                load_shortcut_extras(layer, extras.get(task, {}), index, note, prefix="")
                for index, task in enumerate(tasks)
            )
            if config.method == "mul" and config.mul_shortcut == "shared":
                # fresh reducers: task 0's Xavier init (an average of two is not Xavier's)
                mode = config.mul_trunk if carried else "first"
                reducer = tie_reducers(layer, mode)
                note(f"hard sharing with shortcut: one shared reducer ({reducer:,} parameters)")
    note(f"{config.method} network: {_count(net):,} parameters")
    return Network(module=net, tasks=tasks, heads=heads, notes=notes)


def set_train_mode(module: nn.Module, freeze_bn: bool) -> None:
    """``module.train()``; with ``freeze_bn`` the task networks' BatchNorm layers stay in eval
    mode (running statistics), while fusion layers' norms keep training."""
    module.train()
    if not freeze_bn:
        return
    inside_fusion = {
        id(m)
        for layer in module.modules()
        if isinstance(layer, FusionLayer)
        for m in layer.modules()
    }
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and id(sub) not in inside_fusion:
            sub.eval()


# ----------------------------------------------------------------------------- optimisation


class PolyDecay:
    """Poly learning-rate factor ``(1 − step / total) ** power`` (a picklable ``LambdaLR``
    function: its state is plain numbers).

    Example:
        >>> PolyDecay(100, 0.9)(0), round(PolyDecay(100, 0.9)(50), 4)
        (1.0, 0.5359)
    """

    def __init__(self, total: int, power: float) -> None:
        self.total = int(total)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.total) ** self.power


def build_optimizer(
    network: Network, config: RecipeConfig, extra: Sequence[nn.Parameter] = ()
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with the official parameter groups (:func:`nddrify.param_groups`) and the per-step
    poly schedule (``LambdaLR``: the groups' multipliers survive). ``extra``: parameters
    trained beside the network (learned loss weights), at the base lr without weight decay.

    Example:
        >>> from recipes.configs import get_config, apply_overrides
        >>> cfg = apply_overrides(get_config("synthetic_demo_nddr"), ["init_from={}", "crop=32"])
        >>> optimizer, _ = build_optimizer(build_network(cfg), cfg)
        >>> sorted((g["name"], g["lr"]) for g in optimizer.param_groups)[:3]
        [('base', 0.01), ('base_no_decay', 0.01), ('fusion', 1.0)]
    """
    groups = nddrify.param_groups(
        network.module,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fusion_lr_mult=config.fusion_lr_mult,
        head=network.heads,
        head_weight_lr_mult=config.head_weight_lr_mult,
        head_bias_lr_mult=config.head_bias_lr_mult,
    )
    if config.shortcut and config.shortcut_lr_mult is not None:
        groups = shortcut_param_groups(
            network.module,
            groups,
            lr=config.lr,
            weight_decay=config.weight_decay,
            lr_mult=config.shortcut_lr_mult,
        )
    if extra:
        groups = [*groups, {"name": "loss_weighting", "params": list(extra), "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolyDecay(config.steps, config.poly_power)
    )
    return optimizer, scheduler
