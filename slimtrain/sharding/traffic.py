"""Count the bytes of every collective this process issues through ``torch.distributed``.

FSDP2 issues its all-gathers and reduce-scatters as ``torch.distributed.all_gather_single`` and
``reduce_scatter_single``, looked up on the module at call time, and slimtrain's sharded step calls
``torch.distributed.<collective>`` the same way; :class:`CollectiveCounter` replaces those functions while it
is active and records each call. Bytes are what this rank *receives* under the bandwidth-optimal (ring)
algorithms, with ``W`` the group's size:

=================================  ====================================================================
all-gather (any form)              ``(W - 1)`` x the input
reduce-scatter (any form)          ``(W - 1)`` x the output
all-reduce, reduce                 ``2 (W - 1) / W`` x the tensor
broadcast, scatter                 the tensor (the output), on every rank but the source
gather                             ``(W - 1)`` x the input, on the destination
all-to-all                         the input less this rank's own part (even splits)
recv                               the tensor
=================================  ====================================================================

Averaged over ranks, these are the bytes each rank moves. Collectives issued inside other collectives
(``all_gather_object`` and friends, DTensor's functional collectives) are not seen: slimtrain's step uses
none of them. Each call is attributed to ``"fsdp2"`` when FSDP2 issued it, ``"slimtrain"`` when slimtrain
did, else ``"other"``.

    with CollectiveCounter() as counter:
        loss.backward(); opt.step()
    counter.bytes_by_origin()      # {"fsdp2": ..., "slimtrain": ...}
"""

from __future__ import annotations

import inspect
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

_ALL_GATHER = ("all_gather_single", "all_gather_into_tensor", "all_gather")
_REDUCE_SCATTER = ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter")
_ALL_REDUCE = ("all_reduce", "reduce")
_OTHERS = ("broadcast", "gather", "scatter", "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv",
           "barrier", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
COLLECTIVES = _ALL_GATHER + _REDUCE_SCATTER + _ALL_REDUCE + _OTHERS

_FSDP_DIR = os.path.join("torch", "distributed", "fsdp")
_SLIMTRAIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _is_me(args: dict, key: str) -> bool:
    """Whether this rank is the root named by ``group_<key>`` (a group rank) or ``<key>`` (a global rank)."""
    group = args.get("group")
    if args.get(f"group_{key}") is not None:
        return dist.get_rank(group) == args[f"group_{key}"]
    return dist.get_rank() == args.get(key)


def received_bytes(name: str, args: dict) -> int:
    """Bytes this rank receives in the collective ``name`` called with ``args`` (see the module docstring)."""
    world = dist.get_world_size(args.get("group"))
    if name in _ALL_GATHER:
        return (world - 1) * _nbytes(args.get("input_tensor", args.get("input", args.get("tensor"))))
    if name in _REDUCE_SCATTER:
        return (world - 1) * _nbytes(args.get("output", args.get("output_tensor")))
    if name in _ALL_REDUCE:
        return 2 * (world - 1) * _nbytes(args["tensor"]) // world
    if name in ("broadcast", "scatter"):
        return 0 if _is_me(args, "src") else _nbytes(args["tensor"])
    if name == "gather":
        return (world - 1) * _nbytes(args["tensor"]) if _is_me(args, "dst") else 0
    if name == "all_to_all_single":
        return (world - 1) * _nbytes(args["input"]) // world
    if name == "all_to_all":
        return _nbytes(args["output_tensor_list"]) * (world - 1) // world
    if name in ("recv", "irecv"):
        return _nbytes(args["tensor"])
    return 0


def _origin() -> str:
    """Who called the counted collective: FSDP2, slimtrain or other code (from the caller of the wrapper out)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if _FSDP_DIR in path:
            return "fsdp2"
        if path.startswith(_SLIMTRAIN_DIR):
            return "slimtrain"
        frame = frame.f_back
    return "other"


class CollectiveCounter:
    """While active, every collective called through ``torch.distributed`` is counted (see the module
    docstring). Re-entrant use is refused; the original functions are restored on exit."""

    _active = False

    def __init__(self):
        self.calls: Counter = Counter()  # (origin, name) -> calls
        self.bytes: Counter = Counter()  # (origin, name) -> bytes received
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCounter:
        if CollectiveCounter._active:
            raise RuntimeError("A CollectiveCounter is already counting in this process")
        CollectiveCounter._active = True
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
        CollectiveCounter._active = False

    def _wrap(self, name: str, original):
        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            key = (_origin(), name)
            self.calls[key] += 1
            self.bytes[key] += received_bytes(name, bound)
            return original(*args, **kwargs)

        counted.__wrapped__ = original
        return counted

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def bytes_by_origin(self) -> dict[str, int]:
        out: Counter = Counter()
        for (origin, _), n in self.bytes.items():
            out[origin] += n
        return dict(out)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
