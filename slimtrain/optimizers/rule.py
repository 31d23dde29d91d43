"""The step-rule interface: what a method is, apart from the bookkeeping every method shares.

:class:`~slimtrain.optimizers.base.LowRankAdamW` owns param groups, the non-finite policy, checkpoints,
plain AdamW for the parameters it does not project, and applying an update to a weight (weight decay,
stochastic rounding). Everything a method does to a *projected matrix* is its :class:`StepRule`:

- :meth:`StepRule.update` is the one entry point. From a matrix gradient and the matrix's state it returns
  an :class:`Update`: the step, computed but not yet applied. One process applies it in place
  (:meth:`Update.apply_`, through the fused kernel where there is one); a ZeRO owner rank turns it into a
  tensor (:meth:`Update.materialize`) and sends each rank its slice. Layer-wise training calls the same
  entry from a gradient hook. So the three paths cannot drift apart.
- :attr:`StepRule.capabilities` says which of those paths the method supports; the sharding wrapper, the
  layer-wise stepper and the recipes read it instead of testing types.
- :meth:`StepRule.state_spec` declares the state the rule creates (:mod:`slimtrain.optimizers.state`).

``docs/optimizers.md`` ("Adding a method") walks through writing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._validation import check_rank_for_shape
from .state import Slot
from .updates import Update

if TYPE_CHECKING:  # pragma: no cover
    from .base import LowRankAdamW


@dataclass(frozen=True)
class Capabilities:
    """Which execution paths a rule supports, and why not where it does not.

    Attributes:
        shardable: its :class:`Update` materializes as a tensor in weight units, so a ZeRO owner rank can
            compute it from the gathered gradient and scatter slices (stages 1-3).
        layerwise: it steps each matrix on its own gradient, with no decision taken over the whole step
            (FRUGAL's block selection is one), so it can run from a gradient hook.
        eight_bit: its moments can be kept in 8 bits (``state_bits=8``): it reads and writes them only through
            :func:`~slimtrain.optimizers.quantized.adam_direction` and the other helpers of ``quantized.py``.
        reason: the sentence a refusal quotes when any is False.
    """

    shardable: bool = True
    layerwise: bool = True
    eight_bit: bool = True
    reason: str = ""


class StepRule:
    """A method's math for projected matrices. One instance per optimizer (it may keep per-optimizer
    counters, e.g. FRUGAL's block window, through :meth:`extra_state`); per-matrix state lives in the
    optimizer's ``state[p]`` dict it is handed, never in the rule.

    Subclasses set :attr:`name` and :attr:`capabilities` and implement :meth:`update` and
    :meth:`state_spec`; the other hooks have defaults that do nothing.
    """

    name: str = ""
    capabilities: Capabilities = Capabilities()
    #: Its own keyword options, stored in every param group (like ``lr``) and read from there.
    options: tuple[str, ...] = ()

    def validate_group(self, opt: LowRankAdamW, group: dict) -> None:
        """Check a projected group's settings for this rule (raise ``ValueError`` naming the option). By default:
        the group's ``rank`` fits each of its matrices."""
        for p in group["params"]:
            shape = matrix_shape(p)
            if shape is not None:
                check_rank_for_shape(group["rank"], shape)

    def prepare_step(self, opt: LowRankAdamW) -> None:
        """Run once per ``step()``, before any parameter moves (FRUGAL's block selection)."""

    def update(self, opt: LowRankAdamW, p: Tensor, grad: Tensor, group: dict, state: dict, index: int) -> Update:
        """The step of the projected matrix ``p`` from its ``m x n`` gradient ``grad`` (any float dtype; ``p``
        itself must not be written here). ``state`` is the matrix's state, created on first use; ``index`` is
        ``p``'s position among the optimizer's parameters, which seeds whatever the rule draws."""
        raise NotImplementedError

    def state_spec(self, opt: LowRankAdamW, p: Tensor, group: dict) -> list[Slot]:
        """The state :meth:`update` keeps for ``p`` after its first step (shapes from ``p.shape`` alone, so
        ``p`` may be on the meta device)."""
        raise NotImplementedError

    #: Its updates go through the optimizer's apply, which rounds bf16 weights stochastically when asked (SST
    #: rewrites the weight from fp32 factors instead).
    stochastic_rounding: bool = True

    def host_keys(self, opt: LowRankAdamW, p: Tensor, group: dict) -> set[str]:
        """Every key ``p``'s state may hold on the host, whatever phase it is in (``load_state_dict`` reads it)."""
        return {s.key for s in self.state_spec(opt, p, group) if s.host}

    def forget_tensors(self) -> None:
        """The optimizer's state was replaced (``load_state_dict``, a copy): drop whatever the rule recorded about
        particular tensors (SST: which weights it wrote last)."""

    def extra_state(self) -> dict:
        """Optimizer-level counters saved beside torch's state (plain Python values)."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore what :meth:`extra_state` saved (a checkpoint without the keys: the defaults)."""

    def identity(self) -> dict:
        """Settings that change the state's meaning: a checkpoint written under others is refused."""
        return {}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def matrix_shape(p: Tensor) -> torch.Size | None:
    """The 2-D shape a parameter is projected as: matrices as they are, higher-rank tensors
    (convolutions) as ``(shape[0], prod(rest))``, vectors and scalars not at all."""
    if p.dim() < 2:
        return None
    return torch.Size((p.shape[0], p[0].numel()))
