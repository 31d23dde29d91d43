"""Checkpoints of the low-rank family: what a state dict records beside torch's, and the checks that refuse
one this optimizer would misread before anything is changed.

A slimtrain state dict is torch's (``state``, ``param_groups``) plus a ``"slimtrain"`` entry: optimizer-level
counters (skipped steps, the rule's own, e.g. FRUGAL's block window) and the writer's identity (its method
and the rule settings that change what the state means). Only tensors and plain values: it loads with
``torch.load(..., weights_only=True)``. Each saved param group carries a copy of the entry too, because
``torch.distributed.checkpoint`` (``get_optimizer_state_dict``, ``set_optimizer_state_dict``) keeps only
``state`` and ``param_groups``; the live param groups never hold it.

torch runs its state-dict hooks inside its own ``state_dict``/``load_state_dict``; here they run around the
whole of ours, so a hook sees (and may change) the entry, and a load post-hook sees the state as loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from ._validation import DROP_IN_OPTIONS, is_dtensor
from .registry import method_of, methods, option_owners

#: The key of slimtrain's entry in a state dict and in each of its param groups.
EXTRA = "slimtrain"


class Checkpointing:
    """Mixin of :class:`~slimtrain.optimizers.base.LowRankAdamW`: ``state_dict``/``load_state_dict`` and copies."""

    def __getstate__(self) -> dict:
        # torch pickles only defaults, state and param_groups; a copy also needs the method and its settings.
        keep = ("rule", "_projectors", "seed", "nonfinite", "skipped_steps")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in keep}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch's __setstate__ adds its own 'differentiable' flag to the defaults, from which the loop below and
        # add_param_group would copy it into every group: a load would change the state dict's groups.
        for k in set(self.defaults) & set(DROP_IN_OPTIONS):
            del self.defaults[k]
        # A state dict that holds fewer options than this optimizer takes: the missing ones get their defaults.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        # A copied or unpickled optimizer holds new parameter objects; a loaded one, new state.
        self._index_params()
        self.rule.forget_tensors()

    def _extra_state(self) -> dict:
        """Optimizer-level counters and identity saved beside torch's ``state`` and ``param_groups``."""
        return {"skipped_steps": self.skipped_steps, **self.rule.extra_state(), **self._identity()}

    def _identity(self) -> dict:
        """What a checkpoint must have been written by for this optimizer to resume it: the method's class name
        (its registered class: an 8-bit twin is its method with ``state_bits=8``, which the param groups carry;
        ``LowRankAdamW`` for a class of no registered method) and its rule's settings."""
        method = method_of(type(self))
        name = method.optimizer.__name__ if method is not None else self._unregistered()[0]
        return {"method": name, **self.rule.identity()}

    def _unregistered(self) -> tuple[str, frozenset]:
        """The class a state dict names for an optimizer of no registered method (``LowRankAdamW``, whatever rule
        it is given), and the options of its default rule."""
        cls = next(c for c in type(self).__mro__ if Checkpointing in c.__bases__)
        return cls.__name__, frozenset(cls.rule_type.options)

    def _describe(self) -> str:
        """The optimizer as a refusal names it: ``FiraAdamW``, ``FrugalAdamW(mode='block')``."""
        return _describe(self._identity())

    def _saved_identity(self, state_dict: dict) -> dict:
        """The identity recorded in ``state_dict`` (keys of :meth:`_identity`). A state dict without one is told
        apart by the method options its param groups hold; GaLore's and DCT's have none, so either is taken for
        the other (the projector check in :meth:`load_state_dict` still applies). FRUGAL's mode then shows in
        its state: only block mode keeps ``active``."""
        extra = _saved_extra(state_dict) or {}
        saved = {k: extra[k] for k in self._identity() if k in extra}
        if "method" not in saved:
            owners = option_owners()
            present = {k for g in state_dict["param_groups"] for k in g} & set(owners)
            unregistered, options = self._unregistered()
            candidates = sorted([m.optimizer.__name__ for m in methods() if m.options == present]
                                + ([unregistered] if options == present else []))
            mine = self._identity()["method"]
            if mine in candidates or len(candidates) == 1:
                saved["method"] = mine if mine in candidates else candidates[0]
            else:
                saved["method"] = f"one of {', '.join(candidates)}" if candidates else "an unknown method"
        if "mode" in self._identity() and "mode" not in saved and saved["method"] == self._identity()["method"]:
            keys = {k for st in state_dict["state"].values() for k in st}
            if keys:
                saved["mode"] = "block" if "active" in keys else "subspace"
        return saved

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuse a state dict this optimizer would misread, before anything is changed."""
        me = type(self).__name__
        groups = state_dict["param_groups"]
        if _saved_extra(state_dict) is None and groups and all("projector" in g for g in groups):
            raise RuntimeError(
                f"Cannot load this state dict into {me}: its param groups are a slimtrain optimizer's but its "
                f"'{EXTRA}' entry (skipped steps, the method, FRUGAL's block window) is gone. "
                "torch.distributed.checkpoint keeps it in the param groups, except with "
                "StateDictOptions(flatten_optimizer_state_dict=True), which keeps only the keys a live optimizer "
                "holds; save and load with flatten_optimizer_state_dict=False"
            )
        if _saved_extra(state_dict) is None or any("projector" not in g for g in groups):
            raise RuntimeError(
                f"Cannot load this state dict into {me}: it was written by {_foreign_writer(groups)}, not by a "
                f"slimtrain optimizer (its param groups have no 'projector'). Its moments would be read as {me}'s "
                f"and the low-rank groups would lose their 'rank'; start {me} from fresh state, or resume with the "
                "optimizer that wrote it"
            )
        saved, mine = self._saved_identity(state_dict), self._identity()
        if saved != {k: v for k, v in mine.items() if k in saved}:
            raise RuntimeError(
                f"Cannot load a state dict written by {_describe(saved)} into {_describe(mine)}: their states differ "
                f"(keys, meaning and update rule); build {_describe(saved)} to resume it"
            )
        if not self.rule.uses_projector:
            return
        for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if ("rank" in sg or "rank" in g) and sg["projector"] != g["projector"]:
                raise RuntimeError(
                    f"Cannot load this state dict into {me}: its param group {i} was written with projector "
                    f"{sg['projector']!r}, this optimizer's group {i} uses {g['projector']!r} (their bases are "
                    f"stored differently); build {me} with projector={sg['projector']!r} to resume it"
                )

    def _load_extra_state(self, extra: dict) -> None:
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.rule.load_extra_state(extra)

    def state_dict(self) -> dict:
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            sd = super().state_dict()
        extra = self._extra_state()
        sd[EXTRA] = extra
        for group in sd["param_groups"]:
            group[EXTRA] = dict(extra)
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        with (_hooks_held(self, "_optimizer_load_state_dict_pre_hooks") as pre_hooks,
              _hooks_held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks):
            for hook in pre_hooks.values():
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
            self._load(state_dict)
        for hook in post_hooks.values():
            hook(self)

    def _load(self, state_dict: dict) -> None:
        self._check_loadable(state_dict)
        extra = _saved_extra(state_dict)
        state_dict = dict(state_dict)
        state_dict.pop(EXTRA, None)
        # torch makes the saved groups the live ones: without the entry, which lives in state dicts only.
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k != EXTRA} for g in state_dict["param_groups"]]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        # torch casts every state tensor but `step` to its parameter's dtype; ours hold int64 indices,
        # seeds and fp32 moments of bf16 parameters, so restore each tensor's saved dtype, on the host
        # where the state's declaration keeps it (counters read every step) and on the parameter's device
        # otherwise.
        params = {
            pid: (p, g) for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])
        }
        for pid, saved in state_dict["state"].items():
            if pid not in params:  # state not assigned to a parameter, which torch keeps as it is
                continue
            p, group = params[pid]
            host = self.state_host_keys(p, group)
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    device = "cpu" if key in host else p.device
                    self.state[p][key] = value.to(device=device, dtype=value.dtype, copy=True)
        self._load_extra_state(extra)

    def state_bytes(self) -> int:
        """Bytes of every tensor held in optimizer state (what a memory table should count); of a ``DTensor``
        (FSDP2), this rank's piece."""
        pieces = (v.to_local() if is_dtensor(v) else v for st in self.state.values() for v in st.values())
        return sum(v.numel() * v.element_size() for v in pieces if isinstance(v, Tensor))


def _saved_extra(state_dict: dict) -> dict | None:
    """The state dict's slimtrain entry: its own, or the copy its param groups carry (after
    torch.distributed.checkpoint, which keeps only ``state`` and ``param_groups``); ``None`` if it has neither."""
    if EXTRA in state_dict:
        return state_dict[EXTRA]
    return next((g[EXTRA] for g in state_dict["param_groups"] if EXTRA in g), None)


@contextmanager
def _hooks_held(opt, attr: str) -> Iterator[OrderedDict]:
    """``opt``'s hooks of one kind, taken away while torch's own method runs (see the module docstring)."""
    hooks = getattr(opt, attr)
    setattr(opt, attr, OrderedDict())
    try:
        yield hooks
    finally:
        setattr(opt, attr, hooks)


def _describe(identity: dict) -> str:
    rest = ", ".join(f"{k}={v!r}" for k, v in identity.items() if k != "method")
    return f"{identity['method']}({rest})" if rest else identity["method"]


def _foreign_writer(groups: list[dict]) -> str:
    """A guess at which optimizer wrote param groups without slimtrain's keys, for the refusal."""
    keys = {k for g in groups for k in g}
    if "decoupled_weight_decay" in keys:
        return "torch.optim.AdamW" if all(g.get("decoupled_weight_decay") for g in groups) else "torch.optim.Adam"
    if "amsgrad" in keys:
        return "torch.optim.Adam or AdamW"
    return "another optimizer"
