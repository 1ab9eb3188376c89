"""Registries: names to factories ``(**hyperparameters) -> product``.

One `Registry` class serves the continual methods (`Method`, below) and the unlearners
(`clax.core.unlearning.Unlearner`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from clax.core.method import Method

T = TypeVar("T")


def _qualname(f: Callable) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


class Registry(Generic[T]):
    """Factories of one kind of product (``kind`` names it in errors, e.g. "method")."""

    def __init__(self, kind: str, product: type[T], *, hint: Callable[[], str] = lambda: ""):
        self.kind, self.product, self._hint = kind, product, hint
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: registers a factory ``(**hyperparameters) -> product`` under `name`."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            old = self._factories.get(name)
            # Re-running the same definition (a notebook cell, a reloaded module) replaces
            # it; a different factory under a taken name is a mistake.
            if old is not None and _qualname(old) != _qualname(factory):
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered by {_qualname(old)}")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> tuple[str, ...]:
        """Names of all registered factories, sorted."""
        return tuple(sorted(self._factories))

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; valid choices: "
                             f"{', '.join(self.names()) or 'none'}{self._hint()}")
        return self._factories[name]

    def hyperparameters(self, name: str) -> dict[str, Any]:
        """The hyperparameters of factory `name` with their defaults."""
        params = inspect.signature(self.factory(name)).parameters.values()
        return {p.name: p.default for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def make(self, name: str, **kwargs: Any) -> T:
        """Builds `name` with hyperparameters `kwargs`.

        Raises:
          ValueError: unknown name (lists the registered ones) or unknown hyperparameter
            (lists the valid ones).
          TypeError: the factory did not return the registry's product type.
        """
        factory = self.factory(name)
        valid = list(self.hyperparameters(name))
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"{self.kind} {name!r} got unknown hyperparameter(s) {unknown}; "
                             f"valid: {valid or 'none'}")
        made = factory(**kwargs)
        if not isinstance(made, self.product):
            raise TypeError(f"factory for {name!r} returned {type(made).__name__}, "
                            f"not {self.product.__name__}")
        return made


METHODS: Registry[Method] = Registry(
    "method", Method,
    hint=lambda: ("" if "finetune" in METHODS.names() else
                  " (the built-in methods register when clax.methods is imported)"))


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator: registers a factory ``(**hyperparameters) -> Method`` under `name`."""
    return METHODS.register(name)


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of registered method `name` with their defaults."""
    return METHODS.hyperparameters(name)


def registered_methods() -> tuple[str, ...]:
    """Names of all registered methods, sorted."""
    return METHODS.names()


def make_method(name: str, **kwargs: Any) -> Method:
    """Builds the registered method `name` with hyperparameters `kwargs`.

    Raises:
      ValueError: unknown name (lists the registered ones) or unknown hyperparameter
        (lists the method's valid ones).
      TypeError: the factory did not return a `Method`.
    """
    return METHODS.make(name, **kwargs)
