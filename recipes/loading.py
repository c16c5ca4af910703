"""Deterministic data loading: the batch of every step is a pure function of ``(seed, step)``.

:class:`StepBatchSampler` walks an endless sequence of epoch permutations (epoch ``e`` is a
permutation drawn from ``(seed, e)``); step ``s`` takes positions ``s·B … s·B + B − 1`` of that
sequence (``B`` = the global batch). Under DDP rank ``r`` of ``W`` takes its slice
``r·B/W … (r+1)·B/W − 1`` of every global batch, so the processes together see exactly the
samples of a one-process run. Each sample's augmentation draws from a generator seeded by
``(seed, step, position in the global batch)`` (:class:`StepSeededDataset`), never from the
workers' RNG: the same samples and crops with any number of workers, any number of processes, and
after a resume (the sampler's whole state is the step it starts at).

Your own dataset (``dataset=module:callable``, :mod:`recipes.custom`) takes the same path without
augmentation: its samples become sample dicts and the sampler picks them, so a resume is
bit-exact when its ``__getitem__`` is deterministic.

Example:
    >>> sampler = StepBatchSampler(5, global_batch=4, seed=0, start_step=0, end_step=3)
    >>> [len(batch) for batch in sampler], sampler.state_dict()["start_step"]
    ([4, 4, 4], 0)
    >>> halves = [StepBatchSampler(5, 4, seed=0, start_step=0, end_step=3, rank=r, world_size=2)
    ...           for r in range(2)]
    >>> [a + b for a, b in zip(*halves)] == list(sampler)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from .configs import RecipeConfig
from .errors import ConfigError

__all__ = [
    "StepBatchSampler",
    "StepSeededDataset",
    "epoch_permutation",
    "dataset_for",
    "train_loader",
    "eval_loader",
]

_PERMUTATION_STREAM = 1
_AUGMENTATION_STREAM = 2


def _generator(seed: int, *keys: int) -> torch.Generator:
    from .data.transforms import sample_generator

    return sample_generator(seed, *keys)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of ``epoch`` (a permutation drawn from ``(seed, epoch)``).

    Example:
        >>> sorted(epoch_permutation(4, seed=0, epoch=3))
        [0, 1, 2, 3]
    """
    generator = _generator(seed, _PERMUTATION_STREAM, epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class StepBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields, for each step from ``start_step`` to ``end_step − 1``, this rank's part of the
    global batch as ``(index, step, position)`` keys for :class:`StepSeededDataset`."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ConfigError("the training set is empty: check data_root and the split lists.")
        if global_batch % world_size:
            raise ConfigError(
                f"batch_size={global_batch} is the global batch and must be divisible by the "
                f"{world_size} processes."
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.rank = rank
        self.world_size = world_size
        self._cached: tuple[int, list[int]] | None = None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.num_samples, self.seed, epoch))
        return self._cached[1][offset]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        local = self.global_batch // self.world_size
        for step in range(self.start_step, self.end_step):
            first = step * self.global_batch + self.rank * local
            yield [(self._index(first + i), step, self.rank * local + i) for i in range(local)]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def state_dict(self) -> dict[str, int]:
        """Everything needed to rebuild this sampler's order (plain ints)."""
        return {
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "start_step": self.start_step,
        }


class StepSeededDataset(Dataset):
    """``transform(base[index], generator=…)`` with the generator seeded by
    ``(seed, step, position)``: the key a :class:`StepBatchSampler` yields."""

    def __init__(self, base: Dataset, transform: Any, seed: int, cache: bool = False) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        index, step, position = key
        generator = _generator(self.seed, _AUGMENTATION_STREAM, step, position)
        if self.cache is None:
            return self.transform(self.base[index], generator=generator)
        if index not in self.cache:
            self.cache[index] = self.base[index]
        return self.transform(self.cache[index], generator=generator)


def dataset_for(config: RecipeConfig, split: str, *, train: bool) -> Any:
    """``recipes.data.build_dataset`` with the config's data options (a TransformedDataset:
    ``.base`` raw samples, ``.transform`` the augmentation or evaluation transform); your own
    dataset (:func:`recipes.custom.custom_dataset`) has no augmentation."""
    from .custom import custom_dataset, is_custom_data
    from .data import build_dataset

    if is_custom_data(config):
        return custom_dataset(config, split)

    options: dict[str, Any] = {}
    if config.dataset == "synthetic":
        options = {
            "num_images": config.synthetic_images
            if split == "train"
            else config.synthetic_test_images,
            "size": tuple(config.synthetic_size),
            "data_seed": config.seed,
            # a fraction of the training labels only; the test split keeps every label
            "labelled": config.synthetic_labelled if split == "train" else None,
        }
    if config.dataset in ("imdb", "wiki"):
        options = {"test_subjects": config.test_subjects, "resize": config.face_resize}
    return build_dataset(
        config.dataset,
        config.data_root or None,
        split,
        train=train,
        crop=config.crop,
        mean=config.mean,
        scale=(config.scale_min, config.scale_max),
        mirror=config.mirror,
        negate_normal_x=config.metrics_convention == "mtan",  # MTAN negates x on flips
        rescale_resize=config.rescale_resize,
        normals=config.normals,
        **options,
    )


def train_loader(
    config: RecipeConfig, *, start_step: int, end_step: int, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, StepBatchSampler]:
    """The training DataLoader from ``start_step`` (its iterator yields ``end_step −
    start_step`` batches of ``batch_size / world_size`` samples)."""
    data = dataset_for(config, "train", train=True)
    sampler = StepBatchSampler(
        len(data.base),
        config.batch_size,
        seed=config.seed,
        start_step=start_step,
        end_step=end_step,
        rank=rank,
        world_size=world_size,
    )
    loader = DataLoader(
        StepSeededDataset(data.base, data.transform, config.seed, cache=config.cache_data),
        batch_sampler=sampler,
        num_workers=config.num_workers,
        collate_fn=default_collate,
        # the loader's base-seed draw must not consume the global RNG (bit-exact resume)
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=torch.cuda.is_available() and config.device != "cpu",
    )
    return loader, sampler


def eval_loader(
    config: RecipeConfig, split: str, *, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Evaluation batches of this rank's shard (images ``rank, rank + W, …``), no augmentation;
    ``eval_max_images`` > 0 keeps the first images of the split only."""
    data = dataset_for(config, split, train=False)
    count = len(data)
    if config.eval_max_images:
        count = min(count, config.eval_max_images)
    shard = Subset(data, list(range(rank, count, world_size)))
    return DataLoader(
        shard,
        batch_size=config.eval_batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=default_collate,
        generator=torch.Generator().manual_seed(0),
    )
