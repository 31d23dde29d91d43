"""The methods of ``slimtrain.optimizers``, each named once.

A method module ends with one :func:`register_method` call: its name, its optimizer class and 8-bit twin, the
step rule of each of its modes, and the recipes' defaults. Every consumer reads this registry instead of
keeping its own list:

- :data:`OPTIMIZERS` (``slimtrain.optimizers.OPTIMIZERS``): name -> class, ``"galore"`` and ``"galore8bit"``;
- checkpoints: the method a state dict records (:func:`method_of`) and the refusal of another's, with
  :func:`option_owners` naming the class that takes an option another class was given;
- ``slimtrain memory --optimizer`` and its options (a mode, a density, a projector where the rule uses one);
- the recipes (``slimtrain pretrain --optimizer``): names, variants (``frugal-block``), defaults and each
  rule's capabilities (:mod:`slimtrain.recipes.optim`).

This module imports nothing from the optimizer classes; it reads the attributes of the classes it is given
(``rule_type``, a rule's ``options``). ``docs/optimizers.md`` ("Adding a method") shows a complete entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._validation import check_choice

#: Names a method cannot take: plain AdamW in ``slimtrain memory`` and the recipes.
RESERVED = ("adamw",)
EIGHT_BIT_SUFFIX = "8bit"
#: What the recipes need of every method: its learning rate, refresh gap and update scale.
RECIPE_KEYS = ("lr", "update_proj_gap", "scale")
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Method:
    """One method, as registered by :func:`register_method` (see its arguments)."""

    name: str
    optimizer: type
    optimizer_8bit: type | None
    modes: Mapping[str, type]
    recipe: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def default_mode(self) -> str | None:
        """The mode the optimizer runs without a ``mode`` argument (``None`` for a method without modes)."""
        return next((m for m, rule in self.modes.items() if rule is self.optimizer.rule_type), None)

    def rule_type(self, mode: str | None = None) -> type:
        """The step rule of ``mode`` (``None``: the default mode, or the only rule of a method without modes)."""
        if mode is None:
            return self.optimizer.rule_type
        if not self.modes:
            raise ValueError(f"Invalid mode: {mode!r} ({self.name} has no modes)")
        return self.modes[check_choice("mode", mode, tuple(self.modes))]

    def mode_of(self, rule: object) -> str | None:
        """The mode whose rule ``rule`` is (``None`` for a method without modes)."""
        return next((m for m, cls in self.modes.items() if isinstance(rule, cls)), None)

    @property
    def rule_types(self) -> tuple[type, ...]:
        return tuple(self.modes.values()) or (self.optimizer.rule_type,)

    @property
    def options(self) -> frozenset[str]:
        """The method's own keyword options (every mode's rule's)."""
        return frozenset(k for rule in self.rule_types for k in rule.options)

    @property
    def recipe_names(self) -> dict[str, tuple[str | None, bool]]:
        """What users type in the recipes -> (variant or None, 8-bit): ``frugal``, ``frugal8bit``,
        ``frugal-block``, ``frugal-block8bit``."""
        out = {}
        for variant in (None, *self.variants):
            base = self.name if variant is None else f"{self.name}-{variant}"
            out[base] = (variant, False)
            if self.optimizer_8bit is not None:
                out[base + EIGHT_BIT_SUFFIX] = (variant, True)
        return out


_METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    optimizer: type,
    optimizer_8bit: type | None = None,
    *,
    recipe: Mapping[str, Any],
    modes: Mapping[str, type] | None = None,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
) -> Method:
    """Make a method known to every consumer (see the module docstring); return its record.

    Args:
        name: what users type (``slimtrain.optimizers.OPTIMIZERS[name]``, ``--optimizer name``): lowercase
            letters, digits and ``_``, not ``adamw``, not ending in ``8bit``.
        optimizer: the class users build, a :class:`~slimtrain.optimizers.base.LowRankAdamW` subclass whose
            ``rule_type`` is its (default) step rule. Checkpoints record its class name.
        optimizer_8bit: its twin with 8-bit moments (``EightBitStates`` first among its bases), registered
            as ``name + "8bit"``; ``None`` if it has none.
        recipe: the recipes' defaults: ``lr``, ``update_proj_gap`` and ``scale`` (in every projected group),
            and any of the method's own options (e.g. FRUGAL's ``density``) for its constructor.
        modes: for a class that takes a ``mode`` argument, the step rule of each mode (its ``rule_type`` is
            the default mode's).
        variants: recipe names for a method run another way: ``{"block": {"mode": "block"}}`` makes
            ``name-block`` (and ``name-block8bit``) the method with those constructor options.

    Registering a name again with a class of the same module and qualified name replaces the entry (the same
    definition run again: a reloaded module, a notebook cell); another class under a taken name is refused.

    Raises:
        ValueError: a name or class already registered, or an entry that is not one of the above.
    """
    modes = MappingProxyType(dict(modes or {}))
    method = Method(name, optimizer, optimizer_8bit, modes, MappingProxyType(dict(recipe)),
                    MappingProxyType({k: MappingProxyType(dict(v)) for k, v in (variants or {}).items()}))
    previous = _METHODS.get(name)
    _check(method, replaces=previous if previous is not None and _same_definition(previous.optimizer, optimizer) else None)
    _METHODS[name] = method
    return method


def _same_definition(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _check(method: Method, replaces: Method | None) -> None:
    name, cls = method.name, method.optimizer
    others = {k: m for k, m in _METHODS.items() if m is not replaces}
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in RESERVED or name.endswith(EIGHT_BIT_SUFFIX):
        raise ValueError(f"Invalid method name: {name!r} (expected lowercase letters, digits and '_', not "
                         f"{' or '.join(map(repr, RESERVED))} and not ending in {EIGHT_BIT_SUFFIX!r})")
    if name in others:
        raise ValueError(f"Invalid method name: {name!r} is registered already (by {others[name].optimizer.__name__})")
    if not isinstance(cls, type) or not hasattr(cls, "rule_type"):
        raise ValueError(f"Invalid optimizer for method {name!r}: {cls!r} (expected a LowRankAdamW subclass)")
    taken = {c: m.name for m in others.values() for c in (m.optimizer, m.optimizer_8bit) if c is not None}
    for c in (cls, method.optimizer_8bit):
        if c in taken:
            raise ValueError(f"Invalid optimizer for method {name!r}: {c.__name__} is method {taken[c]!r} already")
    twin = method.optimizer_8bit
    if twin is not None and not (isinstance(twin, type) and issubclass(twin, cls) and twin is not cls):
        raise ValueError(f"Invalid optimizer_8bit for method {name!r}: {twin!r} (expected a subclass of {cls.__name__})")
    if method.modes and cls.rule_type not in method.modes.values():
        raise ValueError(f"Invalid modes for method {name!r}: {cls.__name__}.rule_type ({cls.rule_type.__name__}) is "
                         "not the rule of any mode")
    missing = [k for k in RECIPE_KEYS if k not in method.recipe]
    unknown = set(method.recipe) - set(RECIPE_KEYS) - method.options
    if missing or unknown:
        raise ValueError(f"Invalid recipe for method {name!r}: {dict(method.recipe)!r} (expected {', '.join(RECIPE_KEYS)} "
                         f"and the method's own options {sorted(method.options)})")
    for variant, options in method.variants.items():
        if not isinstance(variant, str) or not _NAME.fullmatch(variant):
            raise ValueError(f"Invalid variant of method {name!r}: {variant!r} (expected lowercase letters, digits, '_')")
        if "mode" in options:
            method.rule_type(options["mode"])


def unregister_method(name: str) -> None:
    """Forget a method registered with :func:`register_method` (for tests and interactive sessions)."""
    if name not in _METHODS:
        raise ValueError(f"Invalid method name: {name!r} is not registered")
    del _METHODS[name]


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def get_method(name: str) -> Method:
    """The method registered as ``name`` (``ValueError`` naming the registered ones otherwise)."""
    if name not in _METHODS:
        raise ValueError(f"Invalid method: {name!r} (expected one of {', '.join(_METHODS)})")
    return _METHODS[name]


def method_of(cls: type) -> Method | None:
    """The method a class steps as: its own, its 8-bit twin's method, or the method of the nearest registered
    class among its bases (a user's subclass writes and reads its method's state); ``None`` for none."""
    by_class = {m.optimizer: m for m in _METHODS.values()}
    return next((by_class[c] for c in cls.__mro__ if c in by_class), None)


def option_owners() -> dict[str, str]:
    """Every method's own options -> the class that takes them (for the hint in a refusal)."""
    return {k: m.optimizer.__name__ for m in reversed(_METHODS.values()) for k in sorted(m.options)}


class _Optimizers(Mapping):
    """Name -> optimizer class of every registered method: ``"galore"`` ... then ``"galore8bit"`` ...; it reads
    the registry on every access, so a method registered later is in it."""

    def _table(self) -> dict[str, type]:
        table = {m.name: m.optimizer for m in _METHODS.values()}
        table.update({m.name + EIGHT_BIT_SUFFIX: m.optimizer_8bit for m in _METHODS.values() if m.optimizer_8bit})
        return table

    def __getitem__(self, name: str) -> type:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


OPTIMIZERS: Mapping[str, type] = _Optimizers()
