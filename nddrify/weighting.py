"""Loss weighting for multi-task training: methods that combine the K task losses into one
scalar with weights they choose (the gradient of every parameter is then that of the weighted
sum). Each method is an ``nn.Module``: its state (learned weights, loss history, random
state, its own optimiser's moments) lives in parameters and buffers, so it goes into a
checkpoint with ``state_dict`` and a resumed run continues bit for bit.

========================  =============================================================
``"equal"``               :class:`EqualWeighting` — every weight 1 (the sum of the losses)
``"fixed"``               :class:`FixedWeighting` — given weights (the paper: seg 1, normal 20)
``"uncertainty"``         :class:`UncertaintyWeighting` — Kendall, Gal & Cipolla, CVPR 2018
``"dwa"``                 :class:`DynamicWeightAverage` — Liu, Johns & Davison, CVPR 2019
``"rlw"``                 :class:`RandomLossWeighting` — Lin et al., TMLR 2022
``"gradnorm"``            :class:`GradNorm` — Chen et al., ICML 2018
``"famo"``                :class:`FAMO` — Liu et al., NeurIPS 2023
========================  =============================================================

Use: ``total = weighting(losses)`` (a dict task → scalar loss, or a sequence in task order),
``total.backward()``, the optimiser's step, then ``weighting.after_step(new_losses)`` (FAMO
learns from how the losses moved) and, at the end of every epoch, ``weighting.end_epoch()``
(DWA compares epochs). Learned weights (uncertainty) are parameters: give
``weighting.parameters()`` to the optimiser too.

Example:
    >>> import torch
    >>> from nddrify.weighting import make_weighting
    >>> weighting = make_weighting("uncertainty", ["seg", "normal"])
    >>> total = weighting({"seg": torch.tensor(2.0), "normal": torch.tensor(4.0)})
    >>> total.item(), weighting.last_weights.tolist()  # ½·e^0·2 + ½·e^0·4 + 0
    (3.0, [0.5, 0.5])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FusionConfigError

__all__ = [
    "LossWeighting",
    "EqualWeighting",
    "FixedWeighting",
    "UncertaintyWeighting",
    "DynamicWeightAverage",
    "RandomLossWeighting",
    "GradNorm",
    "FAMO",
    "WEIGHTINGS",
    "make_weighting",
]

Losses = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


class LossWeighting(nn.Module):
    """Base class: ``forward(losses)`` returns the weighted total; :meth:`weights` chooses the
    weights (a K-vector in task order) from the detached losses."""

    #: the method's paper
    reference: str = ""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = tuple(str(t) for t in tasks)
        if len(self.tasks) < 2:
            raise FusionConfigError(f"loss weighting needs ≥ 2 tasks, got {list(self.tasks)}.")
        self.register_buffer("last_weights", torch.ones(len(self.tasks)), persistent=False)

    def stack(self, losses: Losses) -> torch.Tensor:
        """The losses as a K-vector in task order (a dict must name exactly the tasks)."""
        if isinstance(losses, Mapping):
            if set(losses) != set(self.tasks):
                raise FusionConfigError(
                    f"the losses are for tasks {sorted(losses)}, the weighting's are "
                    f"{list(self.tasks)}; give one scalar loss per task."
                )
            values = [losses[t] for t in self.tasks]
        else:
            values = list(losses)
            if len(values) != len(self.tasks):
                raise FusionConfigError(
                    f"got {len(values)} losses for the {len(self.tasks)} tasks {list(self.tasks)}."
                )
        return torch.stack([v.reshape(()) for v in values])

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, losses: Losses, observed: Losses | None = None) -> torch.Tensor:
        """The weighted total ``Σ_i w_i·L_i``. ``observed``: the losses the weights and the
        method's state follow, when they differ from the ones differentiated (under
        data-parallel training: the global means, the same in every process, while ``losses``
        are the process's own share); default ``losses``."""
        vector = self.stack(losses)
        reference = (self.stack(observed) if observed is not None else vector).detach()
        weights = self.weights(reference)
        self.last_weights = weights.detach().to(self.last_weights.dtype)
        return (weights.to(vector.dtype) * vector).sum()

    def after_step(self, losses: Losses) -> None:
        """Called after the optimiser's step with the losses it led to (FAMO learns from them)."""

    def end_epoch(self) -> None:
        """Called at the end of every epoch (DWA compares epochs)."""

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


class EqualWeighting(LossWeighting):
    """Every weight 1: the plain sum of the losses."""

    reference = "the sum of the task losses (LibMTL's EW)"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)


class FixedWeighting(LossWeighting):
    """Fixed weights, a dict task → weight or a sequence in task order.

    Example:
        >>> import torch
        >>> from nddrify.weighting import FixedWeighting
        >>> FixedWeighting(["seg", "normal"], {"seg": 1.0, "normal": 20.0})([torch.tensor(1.0)] * 2)
        tensor(21.)
    """

    reference = "fixed weights (the NDDR paper: segmentation 1, surface normals 20)"

    def __init__(
        self, tasks: Sequence[str], weights: Mapping[str, float] | Sequence[float]
    ) -> None:
        super().__init__(tasks)
        if isinstance(weights, Mapping):
            missing = sorted(set(self.tasks) - set(weights))
            if missing or set(weights) - set(self.tasks):
                raise FusionConfigError(
                    f"fixed weights {dict(weights)} must name exactly the tasks {list(self.tasks)}."
                )
            values = [float(weights[t]) for t in self.tasks]
        else:
            values = [float(w) for w in weights]
        if len(values) != len(self.tasks) or not all(math.isfinite(v) for v in values):
            raise FusionConfigError(f"fixed weights {values} for tasks {list(self.tasks)}.")
        self.register_buffer("fixed", torch.tensor(values))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.fixed.to(losses)


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty (Kendall et al.): learned s_i = log σ_i²; the total is
    Σ_i ½·exp(−s_i)·L_i + ½·s_i, so a task's weight ½·exp(−s_i) falls as its loss stays high.
    ``s`` starts at 0 (weights ½); train it with the model (``weighting.parameters()``)."""

    reference = (
        "Kendall, Gal & Cipolla, Multi-task learning using uncertainty to weigh losses, CVPR 2018"
    )

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.log_variance = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Losses, observed: Losses | None = None) -> torch.Tensor:
        vector = self.stack(losses)
        weights = 0.5 * torch.exp(-self.log_variance)
        self.last_weights = weights.detach().clone()
        return (weights * vector + 0.5 * self.log_variance).sum()


class DynamicWeightAverage(LossWeighting):
    """DWA (Liu et al.): w_i = K·softmax_i(r_i / T) with r_i = L̄_i(e−1) / L̄_i(e−2), the ratio
    of task i's mean loss in the last two epochs; weights 1 in the first two epochs. Call
    :meth:`end_epoch` at the end of every epoch."""

    reference = "Liu, Johns & Davison, End-to-end multi-task learning with attention, CVPR 2019"

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise FusionConfigError(f"DWA temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)
        k = len(self.tasks)
        self.register_buffer("epoch_means", torch.zeros(2, k, dtype=torch.float64))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        self.running_sum += losses.to(self.running_sum)
        self.running_count += 1
        if int(self.epochs) < 2:
            return torch.ones_like(losses)
        ratio = self.epoch_means[1] / self.epoch_means[0]
        return (len(self.tasks) * F.softmax(ratio / self.temperature, dim=0)).to(losses)

    def end_epoch(self) -> None:
        if int(self.running_count) == 0:
            return
        mean = self.running_sum / self.running_count
        self.epoch_means.copy_(torch.stack([self.epoch_means[1], mean]))
        self.epochs += 1
        self.running_sum.zero_()
        self.running_count.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class RandomLossWeighting(LossWeighting):
    """RLW (Lin et al.): at every step, weights softmax(z) with z ~ N(0, I) drawn from the
    method's own generator (seeded; its state is a buffer, so a resumed run draws the same)."""

    reference = "Lin et al., Reasonable effectiveness of random weighting, TMLR 2022"

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("generator_state", generator.get_state())

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator()
        generator.set_state(self.generator_state.cpu())
        z = torch.randn(len(self.tasks), generator=generator)
        self.generator_state.copy_(generator.get_state())
        return F.softmax(z, dim=0).to(losses)


class GradNorm(LossWeighting):
    """GradNorm (Chen et al.): learned weights w_i (start 1, kept summing to K) chosen so that
    the gradient norms G_i = ‖∇_W w_i·L_i‖ on the shared parameters W follow each task's
    relative training rate: the target is Ḡ·(L̃_i / mean L̃)^α with L̃_i = L_i / L_i(first step).
    After every step of the model, w takes one gradient step of size ``lr`` on
    Σ_i |G_i − target_i| (closed form: G_i is linear in w_i) and is renormalised.

    Args:
        tasks: the task names.
        shared: the shared parameters W (typically the last shared layer's weight), or a
            callable returning them.
        alpha: the asymmetry α (paper: 1.5 for NYUv2).
        lr: the step size of the weights.
    """

    reference = (
        "Chen et al., GradNorm: gradient normalization for adaptive loss balancing, ICML 2018"
    )

    def __init__(
        self,
        tasks: Sequence[str],
        shared: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__(tasks)
        self._shared = shared
        self.alpha, self.lr = float(alpha), float(lr)
        k = len(self.tasks)
        self.register_buffer("task_weights", torch.ones(k))
        self.register_buffer("initial_losses", torch.zeros(k))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def shared_parameters(self) -> list[torch.Tensor]:
        found = self._shared() if callable(self._shared) else self._shared
        params = [p for p in found if p.requires_grad]
        if not params:
            raise FusionConfigError("GradNorm needs shared parameters that require gradients.")
        return params

    def forward(self, losses: Losses, observed: Losses | None = None) -> torch.Tensor:
        if observed is not None:
            raise FusionConfigError(
                "GradNorm balances the gradient norms of this process's own losses; it does not "
                "support data-parallel training (observed=): train on one process."
            )
        vector = self.stack(losses)
        detached = vector.detach()
        if not bool(self.started):
            self.initial_losses.copy_(detached)
            self.started.fill_(True)
        params = self.shared_parameters()
        norms = []
        for loss in vector:  # ‖∇_W L_i‖ (G_i = w_i times it)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            squares = [g.pow(2).sum() for g in grads if g is not None]
            norms.append(torch.sqrt(sum(squares)) if squares else detached.new_zeros(()))
        norms_t = torch.stack(norms).detach()
        w = self.task_weights.clone()
        g = w * norms_t
        rates = detached / self.initial_losses.clamp_min(1e-12)
        target = g.mean() * (rates / rates.mean()) ** self.alpha
        gradient = torch.sign(g - target) * norms_t  # d/dw_i Σ|w_j·n_j − target_j|
        updated = (w - self.lr * gradient).clamp_min(1e-6)
        self.task_weights.copy_(updated * len(self.tasks) / updated.sum())
        self.last_weights = w
        return (w.to(vector.dtype) * vector).sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, lr={self.lr}"


class FAMO(LossWeighting):
    """FAMO (Liu et al.): with z = softmax(ξ), the step follows the gradient of
    Σ_i z_i·log L_i / c, c = Σ_i z_i / L_i, i.e. the weights w_i = z_i / (c·L_i) on the losses
    (the total returned is Σ_i w_i·L_i = 1/c·Σ_i z_i, whose gradient is the same).
    After the model's step, :meth:`after_step` with the new losses moves ξ to favour the tasks
    whose log-loss decreased least: the gradient of ξ is J_softmax(ξ)ᵀ·(log L_before − log
    L_after), applied with Adam (lr ``lr``, weight decay ``gamma``) whose moments are buffers.
    The paper's loop passes the losses recomputed on the same batch after the step; the losses
    of the next batch are a cheaper approximation."""

    reference = "Liu et al., FAMO: fast adaptive multitask optimization, NeurIPS 2023"

    def __init__(
        self, tasks: Sequence[str], lr: float = 0.025, gamma: float = 0.001, eps: float = 1e-8
    ) -> None:
        super().__init__(tasks)
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        k = len(self.tasks)
        self.register_buffer("logits", torch.zeros(k))
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("previous_losses", torch.zeros(k))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        z = F.softmax(self.logits, dim=0).to(losses)
        positive = losses.clamp_min(self.eps)
        self.previous_losses.copy_(positive)
        return z / ((z / positive).sum() * positive)

    def after_step(self, losses: Losses) -> None:
        after = self.stack(losses).detach().to(self.logits).clamp_min(self.eps)
        delta = torch.log(self.previous_losses) - torch.log(after)
        z = F.softmax(self.logits, dim=0)
        gradient = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # Jᵀδ + decay
        beta1, beta2 = 0.9, 0.999
        self.adam_steps += 1
        t = int(self.adam_steps)
        self.adam_m.mul_(beta1).add_(gradient, alpha=1 - beta1)
        self.adam_v.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        m_hat = self.adam_m / (1 - beta1**t)
        v_hat = self.adam_v / (1 - beta2**t)
        self.logits.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, gamma={self.gamma}"


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
    "gradnorm": GradNorm,
    "famo": FAMO,
}


def make_weighting(name: str, tasks: Sequence[str], **options: object) -> LossWeighting:
    """The weighting method ``name`` (see the table above) for ``tasks``, with its options.

    Raises:
        FusionConfigError: an unknown name (the known ones listed) or option.

    Example:
        >>> from nddrify.weighting import make_weighting
        >>> make_weighting("dwa", ["seg", "normal"], temperature=2.0)
        DynamicWeightAverage(tasks=['seg', 'normal'], temperature=2.0)
    """
    cls = WEIGHTINGS.get(name)
    if cls is None:
        raise FusionConfigError(
            f"unknown loss weighting {name!r}; choose one of {sorted(WEIGHTINGS)}."
        )
    try:
        return cls(tasks, **options)  # type: ignore[arg-type]
    except TypeError as err:
        raise FusionConfigError(f"loss weighting {name!r}: {err}.") from None
