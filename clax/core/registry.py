"""The method registry: names to factories ``(**hyperparameters) -> Method``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from clax.core.method import Method

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: registers a factory ``(**hyperparameters) -> Method`` under `name`."""

    def decorator(factory: Callable[..., Method]) -> Callable[..., Method]:
        old = _REGISTRY.get(name)
        # Re-running the same definition (a notebook cell, a reloaded module) replaces it;
        # a different factory under a taken name is a mistake.
        if old is not None and _qualname(old) != _qualname(factory):
            raise ValueError(
                f"a method named {name!r} is already registered by {_qualname(old)}"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _qualname(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _factory(name: str) -> Callable[..., Method]:
    if name not in _REGISTRY:
        hint = ("" if "finetune" in _REGISTRY else
                " (the built-in methods register when clax.methods is imported)")
        raise ValueError(
            f"unknown method {name!r}; valid choices: "
            f"{', '.join(registered_methods()) or 'none'}{hint}"
        )
    return _REGISTRY[name]


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of registered method `name` with their defaults."""
    params = inspect.signature(_factory(name)).parameters.values()
    return {p.name: p.default for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def registered_methods() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return tuple(sorted(_REGISTRY))


def make_method(name: str, **kwargs: Any) -> Method:
    """Builds the registered method `name` with hyperparameters `kwargs`.

    Raises:
      ValueError: unknown name (lists the registered ones) or unknown hyperparameter
        (lists the method's valid ones).
      TypeError: the factory did not return a `Method`.
    """
    factory = _factory(name)
    valid = list(method_hyperparameters(name))
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"method {name!r} got unknown hyperparameter(s) {unknown}; valid: {valid or 'none'}"
        )
    method = factory(**kwargs)
    if not isinstance(method, Method):
        raise TypeError(f"factory for {name!r} returned {type(method).__name__}, not Method")
    return method
