"""The one module of slimtrain that touches PEFT internals.

PEFT resolves a saved adapter by ``adapter_config.json["peft_type"]`` through the mappings in
``peft.mapping``; ``peft.utils.peft_types.register_peft_method`` (PEFT >= 0.15) fills those mappings but only
accepts names that are already members of the ``PeftType`` enum. So :func:`register_method` first adds a
member to ``PeftType`` (a ``str`` enum, extended in place the way ``enum`` itself builds members), then calls
the official helper. Everything else our tuners need from PEFT (``BaseTuner``, ``BaseTunerLayer``,
``BufferDict``, the quantization backends) is imported through :func:`peft_api` so a moved name fails here,
loudly, and ``tests/adapters/test_registry.py`` pins the behaviour.

Supported: ``peft>=0.18,<0.22`` (from 0.18 only ``_create_and_replace`` is abstract on ``BaseTuner``;
0.21 selects saved keys structurally from ``adapter_layer_names``/``other_param_names``). Older and newer
versions raise :class:`ImportError` at import time, naming the range.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace

import peft
from packaging.version import Version

from .._versions import check_version, version_spec

SUPPORTED_PEFT = (Version("0.18"), Version("0.22"))  # [lower, upper)
SUPPORTED_PEFT_SPEC = version_spec("peft", SUPPORTED_PEFT)


def check_peft_version(version: str | None = None) -> None:
    """Raise ``ImportError`` unless ``version`` (default: the installed PEFT) is in :data:`SUPPORTED_PEFT`."""
    check_version("peft", peft.__version__ if version is None else version, SUPPORTED_PEFT, "slimtrain.adapters",
                  "Registration of our methods relies on PEFT internals (PeftType enum, register_peft_method, "
                  "BaseTuner hooks)")


check_peft_version()

from peft.mapping import (  # noqa: E402  (after the version check on purpose)
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils.peft_types import PeftType, register_peft_method  # noqa: E402


def _peft_api() -> SimpleNamespace:
    from peft.config import PeftConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from peft.utils.integrations import gather_params_ctx

    try:  # generic quantization backend, PEFT >= 0.20
        from peft.utils import resolve_quantization_backend
    except ImportError:  # pragma: no cover - 0.18/0.19
        resolve_quantization_backend = None
    return SimpleNamespace(
        PeftConfig=PeftConfig,
        BufferDict=BufferDict,
        BaseTuner=BaseTuner,
        BaseTunerLayer=BaseTunerLayer,
        check_adapters_to_merge=check_adapters_to_merge,
        LORA_TARGET_MODULES=TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        gather_params_ctx=gather_params_ctx,
        resolve_quantization_backend=resolve_quantization_backend,
    )


peft_api = _peft_api()
"""The PEFT names our tuners build on, resolved once; import them from here, not from ``peft.*``."""


def _add_peft_type_member(value: str) -> PeftType:
    """Add ``value`` to the ``PeftType`` str-enum (no-op if present) and return the member.

    ``enum.Enum`` has no public way to add members after class creation; this does what ``EnumType``
    does when it builds a member: a ``str`` instance of the enum class with ``_name_``/``_value_``, entered
    into ``_member_map_``, ``_value2member_map_`` and ``_member_names_``, and set as a class attribute
    (``type.__setattr__`` bypasses ``EnumType.__setattr__``, which forbids reassigning members). Checked on
    Python 3.10-3.13. ``PeftType("NOLA")``, ``PeftType["NOLA"]``, ``list(PeftType)`` and JSON round trips
    (``peft_type`` is written as the plain string) all work afterwards.
    """
    if value in PeftType._value2member_map_:
        return PeftType._value2member_map_[value]
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(PeftType, attr):
            raise RuntimeError(
                f"PEFT's PeftType enum no longer has {attr!r} (Python {enum.__name__} internals moved); "
                f"slimtrain cannot register {value!r}. Supported: {SUPPORTED_PEFT_SPEC} on Python 3.10-3.13."
            )
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)
    return member


def register_method(name: str, config_cls, model_cls, prefix: str) -> None:
    """Make ``name`` a PEFT method: ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained``
    then work with ``config_cls`` exactly as for PEFT's own tuners.

    Idempotent: registering the same (name, config_cls, model_cls, prefix) again does nothing; registering a
    different class or prefix under a taken name raises ``ValueError``.

    Args:
        name: lower-case method name, e.g. ``"nola"``; ``name.upper()`` becomes the ``PeftType`` value and is
            what ``adapter_config.json`` stores as ``peft_type``.
        config_cls: a ``PeftConfig`` dataclass whose ``__post_init__`` sets ``self.peft_type = name.upper()``.
        model_cls: a ``BaseTuner`` subclass with ``prefix`` equal to ``prefix``.
        prefix: the parameter-name prefix of the method (e.g. ``"nola_"``); must be unique across PEFT methods.
    """
    if not isinstance(name, str) or not name or not name.islower() or name.endswith("_"):
        raise ValueError(f"Invalid method name: {name!r} (expected a non-empty lower-case str not ending in '_')")
    if getattr(model_cls, "prefix", None) != prefix:
        raise ValueError(
            f"Invalid prefix: {prefix!r} for {model_cls.__name__} (expected it to equal {model_cls.__name__}.prefix="
            f"{getattr(model_cls, 'prefix', None)!r})"
        )
    value = name.upper()
    existing = PeftType._value2member_map_.get(value)
    if existing is not None and existing in PEFT_TYPE_TO_CONFIG_MAPPING:
        same = (
            PEFT_TYPE_TO_CONFIG_MAPPING[existing] is config_cls
            and PEFT_TYPE_TO_TUNER_MAPPING.get(existing) is model_cls
            and PEFT_TYPE_TO_PREFIX_MAPPING.get(existing) == prefix
        )
        if same:
            return
        raise ValueError(
            f"Invalid method name: {name!r} is already registered in PEFT with "
            f"{PEFT_TYPE_TO_CONFIG_MAPPING[existing].__name__}; pick another name."
        )
    _add_peft_type_member(value)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


def peft_type_member(value: str) -> PeftType:
    """The ``PeftType`` member ``value`` of a registered method, for ``config.peft_type``.

    PEFT reads ``config.peft_type.value`` in many places (saving helpers, pickling, FSDP, hotswap, mixed
    models, error messages), so a plain ``str`` there breaks them; configs set this member in
    ``__post_init__``, which also turns the plain string of a loaded ``adapter_config.json`` into it.
    """
    member = PeftType._value2member_map_.get(value)
    if member is None:
        raise ValueError(f"Invalid peft_type: {value!r} (expected a registered PeftType value; import slimtrain.adapters)")
    return member


def is_registered(name: str) -> bool:
    member = PeftType._value2member_map_.get(name.upper())
    return member is not None and member in PEFT_TYPE_TO_CONFIG_MAPPING


__all__ = ["register_method", "is_registered", "peft_type_member", "check_peft_version", "peft_api", "SUPPORTED_PEFT_SPEC"]
