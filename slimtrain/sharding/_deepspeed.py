"""The one module of slimtrain that reads DeepSpeed internals.

:class:`~slimtrain.sharding.zero.ZeroLowRankOptimizer` must know where each parameter's piece sits in the
flat partitions DeepSpeed hands its ``step()``, and DeepSpeed has no public API for that. The attributes
read here are private and have moved between releases:

- stages 1 and 2: ``param._hp_mapping`` (a ``tensor_fragment``), its ``lp_fragment_address`` (where the
  piece starts in the flattened parameter, and its length) and ``hp_fragment_address`` (where it starts in
  the fp32 partition);
- stage 3: the ZeRO optimizer's ``fp16_groups`` (the parameters of each sub-group),
  ``sub_group_to_group_id`` and ``fp32_partitioned_groups_flat`` (the flat fp32 partition of each
  sub-group), and each parameter's ``ds_tensor.ds_numel`` (its partition size per rank).

Supported: ``deepspeed>=0.19,<0.20``, the range ``tests/sharding`` runs under (0.19.8 measured). Other
versions raise :class:`ImportError` when a sharded optimizer is built, naming the range, as
``adapters/registry.py`` does for PEFT; a missing attribute inside the range is a ``RuntimeError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator

from packaging.version import Version
from torch import Tensor

from .._versions import check_version, version_spec

SUPPORTED_DEEPSPEED = (Version("0.19"), Version("0.20"))  # [lower, upper)
SUPPORTED_DEEPSPEED_SPEC = version_spec("deepspeed", SUPPORTED_DEEPSPEED)


def check_deepspeed_version(version: str | None = None) -> None:
    """Raise ``ImportError`` unless ``version`` (default: the installed DeepSpeed) is in :data:`SUPPORTED_DEEPSPEED`."""
    if version is None:
        try:
            import deepspeed
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("slimtrain.sharding needs DeepSpeed: pip install 'slimtrain[deepspeed]'") from e
        version = deepspeed.__version__
    check_version("deepspeed", version, SUPPORTED_DEEPSPEED, "slimtrain.sharding",
                  "The sharded step reads DeepSpeed internals (_hp_mapping, fp16_groups, ds_tensor.ds_numel) to find "
                  "each parameter's piece of the flat partitions")


def _read(obj, *path: str):
    for name in path:
        try:
            obj = getattr(obj, name)
        except AttributeError as e:
            raise RuntimeError(
                f"DeepSpeed internal {'.'.join(path)} is missing on {type(obj).__name__}: slimtrain.sharding supports "
                f"{SUPPORTED_DEEPSPEED_SPEC}, whose ZeRO optimizers have it"
            ) from e
    return obj


def stage12_fragment(param: Tensor) -> tuple[int, int, int] | None:
    """Stages 1 and 2: ``(start in the flattened parameter, numel, offset in this rank's fp32 partition)`` of
    this rank's piece of ``param``, or ``None`` when this rank holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    lp = _read(mapping, "lp_fragment_address")
    return int(lp.start), int(lp.numel), int(_read(mapping, "hp_fragment_address", "start"))


def stage3_subgroups(zero_optimizer) -> Iterator[tuple[int, Tensor, list[Tensor]]]:
    """Stage 3: ``(param group index, flat fp32 partition, parameters)`` for each sub-group, in order."""
    groups = _read(zero_optimizer, "fp16_groups")
    group_ids = _read(zero_optimizer, "sub_group_to_group_id")
    flats = _read(zero_optimizer, "fp32_partitioned_groups_flat")
    for sg, params in enumerate(groups):
        yield group_ids[sg], flats[sg], list(params)


def stage3_partition_numel(param: Tensor) -> int:
    """Stage 3: the number of ``param``'s elements each rank holds (its partition, padded)."""
    return int(_read(param, "ds_tensor", "ds_numel"))
