"""Errors raised by the recipes: every one is an :class:`nddrify.NddrifyError`."""

from __future__ import annotations

from nddrify.errors import NddrifyError

__all__ = ["RecipeError", "DatasetNotFoundError", "DatasetFormatError", "ConfigError"]


class RecipeError(NddrifyError):
    """Base class of the errors raised by ``recipes``."""


class DatasetNotFoundError(RecipeError, FileNotFoundError):
    """A dataset file or folder is missing: the message names the path expected and how to
    prepare it."""


class DatasetFormatError(RecipeError, ValueError):
    """A dataset file exists but does not hold what its format promises (wrong shape, dtype,
    fields)."""


class ConfigError(RecipeError, ValueError):
    """A training configuration or command-line override is invalid."""
