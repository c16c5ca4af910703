"""How a recipes run balances its tasks (config ``weighting`` and ``aggregator``): the loss
weighting methods of :mod:`nddrify.weighting` and the TorchJD aggregators of
:mod:`nddrify.aggregation`, wired into the training step.

* ``weighting=fixed`` (default): ``Σ loss_weights[t] · L_t``, exactly the loop's former sum.
* Other weightings take the unweighted task losses; learned weights (uncertainty) train with
  the network at the base lr without weight decay; DWA ends an epoch every
  ⌈train images / batch_size⌉ steps; FAMO learns from the losses recomputed on the same batch
  after the step (one extra forward without gradients; BatchNorm statistics restored), as in
  the paper; GradNorm balances the gradient norms on the last shared fusion layer (its shared
  parameters, :func:`last_shared_layer`).
* ``aggregator=NAME``: the shared parameters (:func:`nddrify.aggregation.shared_parameters`,
  found on the first batch) get TorchJD's aggregation of the per-task gradients of
  ``loss_weights[t] · L_t``; every other parameter its plain gradient.

Data-parallel runs (DDP): the weightings follow the global per-task means (the same in every
process, so their states stay equal) while each process differentiates its own share, and the
learned weights' gradients are averaged over the processes; GradNorm and the aggregators need
one process (refused with a ``ConfigError``).

Example:
    >>> from recipes.balancing import steps_per_epoch
    >>> steps_per_epoch(num_samples=100, batch_size=8)
    13
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nddrify.aggregation import aggregate_backward, make_aggregator, shared_parameters
from nddrify.errors import NddrifyError
from nddrify.weighting import FAMO, LossWeighting, make_weighting

from .configs import RecipeConfig
from .distributed import DistContext
from .errors import ConfigError
from .step_losses import global_means

__all__ = ["Balancer", "last_shared_layer", "steps_per_epoch"]


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimiser steps per pass over the training images (the global batch)."""
    return max(1, math.ceil(num_samples / batch_size))


def last_shared_layer(net: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    """GradNorm's W: the shared parameters of the deepest fusion layer that is shared
    (``nddrK``), or, in a hard-sharing model, of the trunk's last module holding parameters."""
    found = shared_parameters(net, example)
    params = dict(net.named_parameters())
    levels = sorted(
        {int(n.split(".")[0][4:]) for n in found.shared if n.split(".")[0][4:].isdigit()}
    )
    if levels:
        prefix = f"nddr{levels[-1]}."
        return [params[n] for n in found.shared if n.startswith(prefix)]
    if not found.shared:
        raise ConfigError("weighting=gradnorm: the network has no shared parameters.")
    last_module = found.shared[-1].rpartition(".")[0]
    return [params[n] for n in found.shared if n.rpartition(".")[0] == last_module]


class Balancer:
    """The run's weighting and aggregation: :meth:`prepare` runs before the first forward, :meth:`backward` replaces
    ``total.backward()``,
    :meth:`after_step` follows the optimiser's step, and the state goes into the checkpoint
    (:meth:`state_dict`)."""

    def __init__(
        self,
        config: RecipeConfig,
        net: nn.Module,
        tasks: Sequence[str],
        context: DistContext,
        epoch_steps: int,
    ) -> None:
        self.config, self.net, self.tasks, self.context = config, net, tuple(tasks), context
        self.loss_weights = {t: float(config.loss_weights.get(t, 1.0)) for t in self.tasks}
        self.epoch_steps = epoch_steps
        self.example: torch.Tensor | None = None
        self.weighting: LossWeighting | None = None
        self.aggregator: Any = None
        self.shared: Any = None
        many = context.world_size > 1
        try:
            if config.weighting != "fixed":
                options: dict[str, Any] = dict(config.weighting_options)
                if config.weighting == "gradnorm":
                    if many:
                        raise ConfigError("weighting=gradnorm needs one process (not DDP).")
                    options["shared"] = self._gradnorm_layer
                if config.weighting == "rlw":
                    options["seed"] = int(options.get("seed", config.seed))
                self.weighting = make_weighting(config.weighting, self.tasks, **options)
                self.weighting.to(context.device)
            if config.aggregator != "none":
                if many:
                    raise ConfigError(
                        f"aggregator={config.aggregator!r} needs one process (not DDP)."
                    )
                self.aggregator = make_aggregator(config.aggregator, **config.aggregator_options)
        except NddrifyError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(str(err)) from err
        self._layer: list[torch.Tensor] | None = None

    def _gradnorm_layer(self) -> list[torch.Tensor]:
        if self._layer is None:
            raise RuntimeError("Balancer.prepare(images) must run before the first step")
        return self._layer

    def prepare(self, images: torch.Tensor) -> None:
        """Before the first forward: find the shared parameters (aggregators, GradNorm) on two
        of its images. It must run before the step's forward: it restores the BatchNorm
        statistics it moves, which that forward's backward still reads."""
        if self.example is not None:
            return
        self.example = images[:2].detach()
        if self.aggregator is not None:
            self.shared = shared_parameters(self.net, self.example)
        if self.config.weighting == "gradnorm":
            self._layer = last_shared_layer(self.net, self.example)

    def parameters(self) -> list[nn.Parameter]:
        """Learned weights (uncertainty weighting's), for the optimiser."""
        return list(self.weighting.parameters()) if self.weighting is not None else []

    def backward(
        self,
        per_task: Mapping[str, torch.Tensor],
        observed: Mapping[str, torch.Tensor] | None,
        scaler: Any,
        images: torch.Tensor,
    ) -> None:
        """Backward of one step. ``per_task``: this process's losses (their sum over processes
        is the global mean); ``observed``: the global per-task means under DDP, else None."""
        if self.aggregator is not None:
            losses = [self.loss_weights[t] * per_task[t] for t in self.tasks]
            aggregate_backward(losses, self.net, self.aggregator, shared=self.shared)
            return
        if self.weighting is None:
            total = torch.stack([self.loss_weights[t] * per_task[t] for t in self.tasks]).sum()
        else:
            total = self.weighting(dict(per_task), observed)
        scaler.scale(total).backward()
        if self.weighting is not None and self.context.world_size > 1:
            for param in self.weighting.parameters():  # DDP averages the network's only
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.context.world_size

    def after_step(self, step: int, recompute: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """After the optimiser's step ``step``: FAMO's update, DWA's epoch boundary."""
        if self.weighting is None:
            return
        if isinstance(self.weighting, FAMO):
            self.weighting.after_step(dict(recompute()))
        if step % self.epoch_steps == 0:
            self.weighting.end_epoch()

    @property
    def needs_observed(self) -> bool:
        """Whether the weighting's state follows the losses (so DDP must share them)."""
        return self.weighting is not None and self.context.world_size > 1

    def global_means(
        self, per_task: Mapping[str, torch.Tensor], counts: Mapping[str, float]
    ) -> dict[str, torch.Tensor]:
        """The per-task means over every process's batch (one all-reduce)."""
        means = global_means({t: per_task[t].detach() for t in self.tasks}, counts, self.context)
        return {t: torch.tensor(value) for t, value in means.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weighting.state_dict()) if self.weighting is not None else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor] | None) -> None:
        if self.weighting is not None and state:
            self.weighting.load_state_dict(dict(state))

    def describe(self) -> str:
        """One line for the log and the results."""
        weighting = (
            "fixed loss weights " + ", ".join(f"{t} {w:g}" for t, w in self.loss_weights.items())
            if self.weighting is None
            else f"weighting {self.config.weighting}"
        )
        if self.aggregator is None:
            return weighting
        return f"{weighting}; aggregator {self.config.aggregator} on the shared parameters"
