"""Losses of your own tasks (the ``losses`` field of a ``byo`` config, :mod:`recipes.custom`).

Built-ins (:data:`BUILTIN_LOSSES`), each a mean over the valid elements, with literal keyword
arguments (``ce(ignore_index=-1)``, ``l1(ignore=0.0)``):

* ``ce`` — softmax cross-entropy; image labels (N×C logits, N labels) or dense labels (N×C×h×w
  logits, N×H×W labels); ``ignore_index`` defaults to 255 for dense targets, -100 for image labels;
* ``l1``, ``l2`` (= ``mse``) — absolute / squared error per element (``ignore``: a target value
  left out, e.g. 0 for missing depth);
* ``cosine`` — ``1 − cos`` over the channels, positions whose target is all zero left out;
* ``bce`` — binary cross-entropy of logits per element.

Dense predictions smaller than their targets are compared as the paper's losses are
(``loss_at``): ``"output"`` nearest-resizes the target to the prediction, ``"input"`` upsamples
the prediction bilinearly. A spec ``module:callable`` is your own loss (:func:`resolve_loss`): a
mean over the batch's images, given the prediction and target as they are.

Example:
    >>> outputs = {"seg": torch.zeros(2, 3, 4, 4), "depth": torch.zeros(2, 1, 4, 4)}
    >>> batch = {"seg": torch.zeros(2, 8, 8, dtype=torch.long), "depth": torch.ones(2, 1, 8, 8)}
    >>> {t: round(own_task_loss(outputs[t], batch, t, "output", {"seg": "ce", "depth": "l1"}).item(), 4)
    ...  for t in outputs}
    {'seg': 1.0986, 'depth': 1.0}
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .losses import _check_at, _upsample, resize_labels

__all__ = [
    "BUILTIN_LOSSES",
    "TaskLoss",
    "CrossEntropyTaskLoss",
    "L1TaskLoss",
    "L2TaskLoss",
    "BCETaskLoss",
    "CosineTaskLoss",
    "UserTaskLoss",
    "resolve_loss",
    "check_loss_spec",
    "own_task_loss",
    "loss_counts",
]


def _align(
    prediction: torch.Tensor, target: torch.Tensor, at: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense N×C×h×w prediction and its N×(C×)H×W target at one resolution: the target
    nearest-resized to h×w (``at="output"``) or the prediction upsampled to H×W (``"input"``)."""
    _check_at(at)
    if prediction.dim() != 4 or target.dim() < 3:
        return prediction, target
    if tuple(prediction.shape[-2:]) == tuple(target.shape[-2:]):
        return prediction, target
    if at == "output":
        return prediction, resize_labels(target, tuple(prediction.shape[-2:]))
    return _upsample(prediction, tuple(target.shape[-2:])), target


def _shapes(name: str, prediction: torch.Tensor, target: torch.Tensor, expected: Any) -> None:
    if tuple(target.shape) != tuple(expected):
        raise ConfigError(
            f"loss {name!r}: prediction {tuple(prediction.shape)} and target "
            f"{tuple(target.shape)} do not fit (target expected {tuple(expected)})."
        )


class TaskLoss:
    """A built-in loss of your own task: the mean of per-element terms over the valid elements.

    ``loss(prediction, target, at)`` is the mean; ``loss.count(prediction, target, at)`` how many
    elements it averages over (the DDP normaliser, :func:`loss_counts`). Dense predictions
    (N×C×h×w) are compared with targets at one resolution as ``at`` says (:func:`_align`).
    """

    name = ""

    def prepare(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prediction, target, valid)`` at one resolution; ``valid`` is the terms' shape."""
        raise NotImplementedError

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element losses of prepared tensors."""
        raise NotImplementedError

    def __call__(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str = "output"
    ) -> torch.Tensor:
        prediction, target, valid = self.prepare(prediction, target, at)
        terms = self.terms(prediction, target).masked_fill(~valid, 0.0)
        return terms.sum() / valid.sum().clamp(min=1)

    def count(self, prediction: torch.Tensor, target: torch.Tensor, at: str = "output") -> float:
        """How many elements the mean averages over."""
        return float(self.prepare(prediction.detach(), target, at)[2].sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class CrossEntropyTaskLoss(TaskLoss):
    """``ce``: softmax cross-entropy of N×C (or N×C×h×w) logits against integer labels N (or
    N×H×W), over the labels other than ``ignore_index`` (default 255 for dense targets, -100 for
    image labels).

    Example:
        >>> loss = CrossEntropyTaskLoss()
        >>> labels = torch.tensor([[[0, 255], [1, 1]]])
        >>> round(loss(torch.zeros(1, 2, 2, 2), labels).item(), 4), loss.count(torch.zeros(1, 2, 2, 2), labels)
        (0.6931, 3.0)
    """

    name = "ce"

    def __init__(self, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index

    def ignore_for(self, prediction: torch.Tensor) -> int:
        """``ignore_index``, else 255 for dense predictions and -100 for image-level ones."""
        if self.ignore_index is not None:
            return self.ignore_index
        return 255 if prediction.dim() > 2 else -100

    def prepare(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if target.is_floating_point():
            raise ConfigError(
                f"loss 'ce' needs integer class labels, got {target.dtype} targets; use l1, l2 "
                "or bce for real-valued targets."
            )
        ignore = self.ignore_for(prediction)
        prediction, target = _align(prediction, target.long(), at)
        _shapes("ce", prediction, target, (prediction.shape[0], *prediction.shape[2:]))
        valid = target != ignore
        if bool((valid & ((target < 0) | (target >= prediction.shape[1]))).any()):
            raise ConfigError(
                f"loss 'ce': labels must lie in 0..{prediction.shape[1] - 1} (the prediction's "
                f"channels) or be the ignore index {ignore}."
            )
        return prediction, target.masked_fill(~valid, 0), valid

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction, target, reduction="none")


class _ElementwiseLoss(TaskLoss):
    """Prediction and target of one shape (an N×1… prediction takes an N… target)."""

    def __init__(self, ignore: float | None = None) -> None:
        self.ignore = ignore

    def prepare(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = target.to(prediction.dtype)
        if (
            target.dim() == prediction.dim() - 1
            and prediction.dim() > 1
            and prediction.shape[1] == 1
        ):
            target = target.unsqueeze(1)
        prediction, target = _align(prediction, target, at)
        _shapes(self.name, prediction, target, prediction.shape)
        if self.ignore is None:
            return prediction, target, torch.ones_like(target, dtype=torch.bool)
        return prediction, target, target != self.ignore


class L1TaskLoss(_ElementwiseLoss):
    """``l1``: mean absolute error over the elements (those equal to ``ignore`` left out).

    Example:
        >>> L1TaskLoss()(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])).item()
        1.0
    """

    name = "l1"

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).abs()


class L2TaskLoss(_ElementwiseLoss):
    """``l2`` / ``mse``: mean squared error over the elements (those equal to ``ignore`` left
    out).

    Example:
        >>> L2TaskLoss(ignore=0.0)(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 0.0])).item()
        4.0
    """

    name = "l2"

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target) ** 2


class BCETaskLoss(_ElementwiseLoss):
    """``bce``: binary cross-entropy of logits against 0/1 (or soft) targets, per element.

    Example:
        >>> round(BCETaskLoss()(torch.zeros(2, 3), torch.ones(2, 3)).item(), 4)  # ln 2
        0.6931
    """

    name = "bce"

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(prediction, target, reduction="none")


class CosineTaskLoss(TaskLoss):
    """``cosine``: ``1 − cos(prediction, target)`` over the channel dimension (both normalised),
    averaged over the positions whose target is not all zero (the normal loss of the paper).

    Example:
        >>> pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
        >>> target = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).reshape(1, 2, 1, 2)  # 2nd: no target
        >>> CosineTaskLoss()(pred, target).item(), CosineTaskLoss().count(pred, target)
        (0.0, 1.0)
    """

    name = "cosine"

    def prepare(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction, target = _align(prediction, target.to(prediction.dtype), at)
        _shapes("cosine", prediction, target, prediction.shape)
        if prediction.dim() < 2:
            raise ConfigError("loss 'cosine' needs N×C (or N×C×H×W) vectors.")
        return prediction, target, target.abs().sum(dim=1) > 0

    def terms(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - (F.normalize(prediction, dim=1) * F.normalize(target, dim=1)).sum(dim=1)


class UserTaskLoss:
    """Your own loss: ``fn(prediction, target)`` must return a scalar tensor, **the mean over the
    batch's images** (under DDP it is weighted by the images of each process). The prediction
    and target are passed as they are (no resizing)."""

    name = "user"

    def __init__(self, fn: Callable[..., Any], spec: str) -> None:
        self.fn, self.spec = fn, spec

    def __call__(
        self, prediction: torch.Tensor, target: torch.Tensor, at: str = "output"
    ) -> torch.Tensor:
        value = self.fn(prediction, target)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ConfigError(
                f"loss {self.spec!r} returned {type(value).__name__}"
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; a loss must "
                "return a scalar tensor (the mean over the batch)."
            )
        return value

    def count(self, prediction: torch.Tensor, target: torch.Tensor, at: str = "output") -> float:
        """Images in the batch."""
        return float(prediction.shape[0])


#: Built-in losses of your own tasks by name (``losses=seg=ce,depth=l1``).
BUILTIN_LOSSES: dict[str, type[TaskLoss]] = {
    "ce": CrossEntropyTaskLoss,
    "l1": L1TaskLoss,
    "l2": L2TaskLoss,
    "mse": L2TaskLoss,
    "cosine": CosineTaskLoss,
    "bce": BCETaskLoss,
}


def check_loss_spec(text: str, what: str = "loss") -> None:
    """Raise :class:`ConfigError` unless ``text`` is a built-in loss (with arguments it takes)
    or has the form of a spec ``module:callable``; nothing is imported.

    Example:
        >>> check_loss_spec("ce(ignore_index=-1)")
        >>> check_loss_spec("cross_entropy")
        Traceback (most recent call last):
        ...
        recipes.errors.ConfigError: loss='cross_entropy' is not a built-in loss (ce, l1, l2, mse, cosine, bce) nor a spec module:callable of your own.
    """
    from .custom import is_spec, parse_call

    target, kwargs = parse_call(text, what)
    if is_spec(target):
        return
    if target not in BUILTIN_LOSSES:
        raise ConfigError(
            f"{what}={text!r} is not a built-in loss ({', '.join(BUILTIN_LOSSES)}) nor a spec "
            "module:callable of your own."
        )
    try:
        inspect.signature(BUILTIN_LOSSES[target]).bind(**kwargs)
    except TypeError:
        takes = list(inspect.signature(BUILTIN_LOSSES[target]).parameters)
        raise ConfigError(
            f"{what}={text!r}: loss {target!r} takes the arguments {takes}, got {sorted(kwargs)}."
        ) from None


@functools.cache
def resolve_loss(text: str, what: str = "loss") -> TaskLoss | UserTaskLoss:
    """The loss ``text`` names: a built-in (``"ce(ignore_index=-1)"``) or a spec
    ``module:callable(...)`` — a loss function ``(prediction, target) -> scalar`` (keyword
    arguments are bound to it) or a class / factory returning one (``torch.nn:SmoothL1Loss``).

    Example:
        >>> resolve_loss("ce(ignore_index=-1)")
        CrossEntropyTaskLoss({'ignore_index': -1})
        >>> round(resolve_loss("torch.nn:SmoothL1Loss(beta=2.0)")(torch.zeros(1), torch.ones(1)).item(), 4)
        0.25
    """
    from .custom import is_spec, load_callable, parse_call

    check_loss_spec(text, what)
    target, kwargs = parse_call(text, what)
    if not is_spec(target):
        return BUILTIN_LOSSES[target](**kwargs)
    obj = load_callable(target, what)
    if not callable(obj):
        raise ConfigError(f"{what}={text!r} is not callable.")
    if not inspect.isclass(obj) and _binds(obj, (None, None), kwargs):
        return UserTaskLoss(functools.partial(obj, **kwargs) if kwargs else obj, text)
    if not _binds(obj, (), kwargs):
        raise ConfigError(
            f"{what}={text!r}: {target} is neither a loss (prediction, target) -> scalar nor a "
            "class or factory taking these keyword arguments."
        )
    loss = obj(**kwargs)
    if not callable(loss):
        raise ConfigError(f"{what}={text!r} returned a {type(loss).__name__}, not a loss.")
    return UserTaskLoss(loss, text)


def _binds(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume it is a loss function
        return bool(args)
    return True


def _own_loss(losses: Mapping[str, str], task: str) -> TaskLoss | UserTaskLoss:
    if task not in losses:
        raise ConfigError(f"task {task!r} has no loss: set losses.{task}=NAME.")
    return resolve_loss(losses[task], f"losses.{task}")


def _target(batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    if task not in batch:
        raise ConfigError(f"the batch has no target for task {task!r} (keys {sorted(batch)}).")
    return batch[task]


def own_task_loss(
    prediction: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    task: str,
    at: str,
    losses: Mapping[str, str],
) -> torch.Tensor:
    """Task ``task``'s loss ``losses[task]`` of ``prediction`` against ``batch[task]``."""
    return _own_loss(losses, task)(prediction, _target(batch, task), at)


def loss_counts(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    at: str,
    losses: Mapping[str, str],
) -> dict[str, float]:
    """How many elements (built-in losses) or images (your own losses) each task's mean loss
    averages over: DDP weighs each process's mean by it, so the gradient is the one-process one.

    Example:
        >>> outputs = {"seg": torch.zeros(1, 3, 1, 2), "depth": torch.zeros(1, 1, 2, 2)}
        >>> batch = {"seg": torch.tensor([[[0, 255]]]), "depth": torch.ones(1, 2, 2)}
        >>> loss_counts(outputs, batch, "output", {"seg": "ce", "depth": "l1"})
        {'seg': 1.0, 'depth': 4.0}
    """
    return {
        task: _own_loss(losses, task).count(prediction, _target(batch, task), at)
        for task, prediction in outputs.items()
    }
