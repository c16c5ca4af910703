"""Model specs: build a model from a short string, for the CLI and for checkpoints.

A SPEC is ``torchvision:NAME``, ``timm:NAME`` (always ``pretrained=False``: nothing is downloaded)
or ``package.module:callable``, optionally followed by literal keyword arguments in parentheses:
``torchvision:resnet50(replace_stride_with_dilation=[False, True, True])``.

Example:
    >>> from nddrify.specs import load_spec
    >>> type(load_spec("torchvision:resnet18(num_classes=10)")).__name__
    'ResNet'
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

from torch import nn

from .errors import SpecError

__all__ = ["load_spec", "is_spec"]


def is_spec(value: object) -> bool:
    """Whether ``value`` is a spec string (``"source:name"``)."""
    return isinstance(value, str) and ":" in value


def _parse_call(spec: str) -> tuple[str, str, dict[str, Any]]:
    source, sep, rest = spec.partition(":")
    if not sep or not source or not rest:
        raise SpecError(
            f"model spec {spec!r} must look like 'torchvision:NAME', 'timm:NAME' or "
            "'package.module:callable' (optionally with keyword arguments: 'NAME(key=value)')."
        )
    name, paren, args = rest.partition("(")
    kwargs: dict[str, Any] = {}
    if paren:
        if not args.endswith(")"):
            raise SpecError(f"model spec {spec!r}: unbalanced parentheses in the arguments.")
        try:
            call = ast.parse(f"f({args[:-1]})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args:
                raise ValueError("only keyword arguments are accepted")
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as err:
            raise SpecError(
                f"model spec {spec!r}: arguments must be literal keyword arguments such as "
                f"'resnet50(replace_stride_with_dilation=[False, True, True])' ({err})."
            ) from None
    return source.strip(), name.strip(), kwargs


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = sorted(torchvision.models.list_models())
        import difflib

        close = difflib.get_close_matches(name, known, n=5)
        raise SpecError(
            f"torchvision has no model {name!r}"
            + (f"; did you mean {close}?" if close else "; see torchvision.models.list_models().")
        ) from None
    params = inspect.signature(builder).parameters
    kwargs.setdefault("weights", None)
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)
    return builder(**kwargs)


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise SpecError(
            f"'timm:{name}' needs timm, which is not installed; install it with "
            "'pip install timm' (or 'pip install nddrify[timm]')."
        ) from None
    if kwargs.get("pretrained"):
        raise SpecError(
            "timm specs are built with pretrained=False; nddrify never downloads weights."
        )
    kwargs["pretrained"] = False
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        raise SpecError(f"timm cannot build {name!r}: {err}") from None


def _callable_model(module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SpecError(f"cannot import {module_name!r} for model spec: {err}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise SpecError(f"module {module_name!r} has no attribute {attr!r}.") from None
    model = obj if isinstance(obj, nn.Module) else obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{module_name}:{attr} returned {type(model).__name__}, not an nn.Module.")
    return model


def load_spec(spec: str) -> nn.Module:
    """Build the model a CLI spec names.

    Example:
        >>> from nddrify.cli import load_spec
        >>> type(load_spec("torchvision:resnet18")).__name__
        'ResNet'
    """
    source, name, kwargs = _parse_call(spec)
    if source == "torchvision":
        return _torchvision_model(name, kwargs)
    if source == "timm":
        return _timm_model(name, kwargs)
    return _callable_model(source, name, kwargs)
