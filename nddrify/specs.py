"""Model specs: build a model from a short string, for the CLI and for checkpoints.

A SPEC is ``torchvision:NAME``, ``timm:NAME`` or ``package.module:callable``, optionally followed
by literal keyword arguments in parentheses:
``torchvision:resnet50(replace_stride_with_dilation=[False, True, True])``. The keywords are
checked against what the builder accepts (a :class:`~nddrify.errors.SpecError` names a wrong one
and lists the right ones).

Nothing is downloaded: a spec asking for pretrained weights (torchvision ``weights=...``,
``weights_backbone=...`` or ``pretrained=True``; timm ``pretrained=True``) is refused, except timm's
``pretrained=True, pretrained_cfg_overlay={'file': PATH}`` naming a local file. To start from
other local weights, use a callable of your own as the spec, e.g. ``mymod:make`` where mymod.py
holds ``def make(): m = torchvision.models.resnet18(); m.load_state_dict(torch.load(PATH,
weights_only=True)); return m``. As with ``python -m``, modules in the working directory can be
named (the ``nddrify`` command does not otherwise put it on ``sys.path``).

Example:
    >>> from nddrify.specs import load_spec
    >>> type(load_spec("torchvision:resnet18(num_classes=10)")).__name__
    'ResNet'
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import SpecError

__all__ = ["load_spec", "is_spec", "parse_arguments"]

_LOCAL_WEIGHTS = (
    "nddrify never downloads weights. Build the model without weights and load a local file "
    "with model.load_state_dict(torch.load(PATH, weights_only=True)): for instance in mymod.py, "
    "'def make(): model = torchvision.models.resnet18(); model.load_state_dict(torch.load(PATH, "
    "weights_only=True)); return model', then use the spec 'mymod:make'"
)


def is_spec(value: object) -> bool:
    """Whether ``value`` is a spec string (``"source:name"``).

    Example:
        >>> is_spec("timm:resnet50"), is_spec("resnet50")
        (True, False)
    """
    return isinstance(value, str) and ":" in value


def parse_arguments(text: str, what: str = "model spec") -> tuple[str, dict[str, Any]]:
    """Split ``"target(key=literal, ...)"`` into the target and its literal keyword arguments;
    a :class:`SpecError` naming ``what`` otherwise.

    Example:
        >>> parse_arguments("mymod:Data(size=64, names=['a'])")
        ('mymod:Data', {'size': 64, 'names': ['a']})
    """
    target, paren, args = text.strip().partition("(")
    kwargs: dict[str, Any] = {}
    if paren:
        if not args.endswith(")"):
            raise SpecError(f"{what} {text!r}: unbalanced parentheses in the arguments.")
        try:
            call = ast.parse(f"f({args[:-1]})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args:
                raise ValueError("only keyword arguments are accepted")
            kwargs = {str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError) as err:
            raise SpecError(
                f"{what} {text!r}: arguments must be literal keyword arguments such as "
                f"'resnet50(replace_stride_with_dilation=[False, True, True])' ({err})."
            ) from None
    return target.strip(), kwargs


def _parse_call(spec: str) -> tuple[str, str, dict[str, Any]]:
    source, sep, rest = spec.partition(":")
    if not sep or not source or not rest:
        raise SpecError(
            f"model spec {spec!r} must look like 'torchvision:NAME', 'timm:NAME' or "
            "'package.module:callable' (optionally with keyword arguments: 'NAME(key=value)')."
        )
    name, kwargs = parse_arguments(rest)
    if "(" in spec and not name:
        raise SpecError(f"model spec {spec!r} names no model before its arguments.")
    return source.strip(), name, kwargs


def _keywords(func: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword arguments ``func`` accepts, and whether it also takes ``**kwargs``."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): accept anything
        return set(), True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def _check_keywords(spec: str, kwargs: dict[str, Any], accepted: set[str]) -> None:
    """Raise a :class:`SpecError` naming the first keyword of ``kwargs`` not in ``accepted``."""
    for bad in kwargs:
        if bad not in accepted:
            close = difflib.get_close_matches(bad, sorted(accepted), n=1)
            raise SpecError(
                f"model spec {spec!r}: {spec.partition('(')[0]} takes no keyword argument {bad!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; it accepts: {', '.join(sorted(accepted)) or 'no keyword arguments'}."
            )


def _build_error(spec: str, err: Exception) -> SpecError:
    """A builder's TypeError/ValueError about its arguments, as a SpecError."""
    pattern = r"(?:unexpected keyword argument|multiple values for .*argument) '(\w+)'"
    found = re.search(pattern, str(err))
    if found:
        return SpecError(
            f"model spec {spec!r}: {found.group(1)!r} cannot be given to this model "
            f"({type(err).__name__}: {err}); remove it from the spec."
        )
    return SpecError(f"model spec {spec!r}: the model cannot be built with its arguments ({err}).")


def _model_class_keywords(builder: Callable[..., Any]) -> tuple[set[str], bool] | None:
    """The optional ``__init__`` keywords of the class a torchvision builder returns (the
    builder passes its ``**kwargs`` on to it), or ``None`` if the class cannot be found."""
    returned = inspect.signature(builder).return_annotation
    if isinstance(returned, str):
        try:
            returned = typing.get_type_hints(builder).get("return")
        except Exception:  # an annotation that does not resolve: no class to check against
            return None
    if not (isinstance(returned, type) and issubclass(returned, nn.Module)):
        return None
    if returned.__init__ is nn.Module.__init__:
        return None
    try:
        params = list(inspect.signature(returned.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    optional = {p.name for p in params if p.default is not p.empty and p.kind is not p.VAR_KEYWORD}
    return optional, any(p.kind is p.VAR_KEYWORD for p in params)


def _torchvision_model(spec: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        known = sorted(torchvision.models.list_models())
        close = difflib.get_close_matches(name, known, n=5)
        raise SpecError(
            f"torchvision has no model {name!r}"
            + (f"; did you mean {close}?" if close else "; see torchvision.models.list_models().")
        ) from None
    for key in ("pretrained", "pretrained_backbone"):  # legacy: True downloads, False is no-op
        if kwargs.get(key):
            raise SpecError(
                f"model spec {spec!r} asks for pretrained weights ({key}={kwargs[key]!r}), which "
                f"torchvision would download; {_LOCAL_WEIGHTS}."
            )
        kwargs.pop(key, None)
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise SpecError(
                f"model spec {spec!r} asks for pretrained weights ({key}={kwargs[key]!r}), which "
                f"torchvision would download; {_LOCAL_WEIGHTS}."
            )
    accepted, open_ended = _keywords(builder)
    found = _model_class_keywords(builder) if open_ended else (set(), False)
    if found is not None:
        accepted |= found[0]
        if not found[1]:
            _check_keywords(spec, kwargs, accepted)
    kwargs.setdefault("weights", None)
    if "weights_backbone" in accepted:
        kwargs.setdefault("weights_backbone", None)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise _build_error(spec, err) from err


def _timm_model(spec: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise SpecError(
            f"'timm:{name}' needs timm, which is not installed; install it with "
            "'pip install timm' (or 'pip install nddrify[timm]')."
        ) from None
    if name.partition(":")[0] in ("hf-hub", "hf_hub"):
        raise SpecError(
            f"model spec {spec!r} names a Hugging Face Hub model, which timm would download; "
            f"{_LOCAL_WEIGHTS}."
        )
    if ":" not in name and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise SpecError(
            f"timm cannot build {name!r}: timm has no model {name!r}"
            + (f"; did you mean {close}?" if close else "; see timm.list_models().")
        )
    if kwargs.get("pretrained"):  # only timm's way to load a local file: the overlay's "file"
        overlay = kwargs.get("pretrained_cfg_overlay")
        local = overlay.get("file") if isinstance(overlay, dict) else None
        if not (
            isinstance(local, str)
            and os.path.isfile(local)
            and not overlay.get("source")  # "hf-hub" would fetch from the Hub
            and "pretrained_cfg" not in kwargs
        ):
            missing = isinstance(local, str) and not os.path.isfile(local)
            raise SpecError(
                f"model spec {spec!r} asks for pretrained weights"
                + (
                    f" from {local!r}, which is not a file; give the path of a local weights file"
                    if missing
                    else f", which timm would download; {_LOCAL_WEIGHTS}; or, with timm, load a "
                    f"local file with 'timm:{name}(pretrained=True, "
                    'pretrained_cfg_overlay={"file": "/path/to/weights.pth"})\''
                )
                + "."
            )
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise _build_error(spec, err) from err
    except RuntimeError as err:
        raise SpecError(f"timm cannot build {name!r}: {err}") from None


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Put the working directory first on ``sys.path`` while a spec's module is imported and its
    callable runs, as ``python -m`` does; the entry is taken out again afterwards, so it cannot
    shadow modules imported later (code that imports lazily from the working directory after
    the call should import at its module's top instead)."""
    cwd = os.getcwd()
    present = any(isinstance(p, str) and os.path.abspath(p or os.curdir) == cwd for p in sys.path)
    if not present:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if not present and cwd in sys.path:
            sys.path.remove(cwd)


def _callable_model(spec: str, module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    with _working_directory_importable():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise SpecError(
                f"cannot import {module_name!r} for model spec {spec!r}: {err} (looked in the "
                f"working directory {os.getcwd()!r} and on sys.path)."
            ) from None
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise SpecError(f"module {module_name!r} has no attribute {attr!r}.") from None
        if isinstance(obj, nn.Module):
            if kwargs:
                raise SpecError(
                    f"model spec {spec!r}: {module_name}.{attr} is a model instance, which takes "
                    "no arguments; name a function or class to pass keyword arguments to."
                )
            return obj
        accepted, open_ended = _keywords(obj)
        if not open_ended:
            _check_keywords(spec, kwargs, accepted)
            try:
                inspect.signature(obj).bind(**kwargs)
            except TypeError as err:
                raise SpecError(
                    f"model spec {spec!r}: {err}; give it in the spec, as in "
                    f"'{module_name}:{attr}(name=value)'."
                ) from None
        model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{module_name}:{attr} returned {type(model).__name__}, not an nn.Module.")
    return model


def load_spec(spec: str, *, device: str | torch.device | None = None) -> nn.Module:
    """Build the model a spec names (see the module docstring).

    Args:
        spec: the spec string.
        device: build the model under ``torch.device(device)``; ``"meta"`` builds it without
            weights (no memory, no initialisation time), which is all planning and
            ``nddrify inspect`` need. A callable spec that cannot be built on the meta device
            is built normally, with a ``UserWarning``.

    Raises:
        SpecError: the spec is malformed, names an unknown model or a keyword argument the model
            does not take, or asks for weights that would be downloaded.

    Example:
        >>> from nddrify.specs import load_spec
        >>> type(load_spec("torchvision:resnet18")).__name__
        'ResNet'
        >>> load_spec("timm:vit_large_patch16_224", device="meta").cls_token.device
        device(type='meta')
    """
    source, name, kwargs = _parse_call(spec)
    if device is None:
        return _build(spec, source, name, kwargs)
    try:
        with torch.device(device):
            return _build(spec, source, name, kwargs)
    except SpecError:
        raise
    except Exception as err:  # a user's builder that computes on its weights, say
        if str(device) != "meta":
            raise
        warnings.warn(
            f"nddrify: model spec {spec!r} could not be built on the meta device "
            f"({type(err).__name__}: {err}); building it with its weights instead.",
            stacklevel=2,
        )
        return _build(spec, source, name, kwargs)


def _build(spec: str, source: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    if source == "torchvision":
        return _torchvision_model(spec, name, kwargs)
    if source == "timm":
        return _timm_model(spec, name, kwargs)
    return _callable_model(spec, source, name, kwargs)
