"""The step-rule interface: what a method is, apart from the bookkeeping every method shares.

:class:`~slimtrain.optimizers.base.LowRankAdamW` owns param groups, the non-finite policy, checkpoints,
plain AdamW for the parameters it does not project, and applying an update to a weight (weight decay,
stochastic rounding). Everything a method does to a *projected matrix* is its :class:`StepRule`:

- :meth:`StepRule.update` is the one entry point. From a matrix's weight, its descent direction (the
  gradient, negated where the group maximizes), its group, its state and a :class:`MatrixContext` (the
  optimizer's facts about it: its index and seed, its projector), it returns an :class:`Update`: the step,
  computed but not yet applied. One process applies it in place (:meth:`Update.apply_`, through the fused
  kernel where there is one); a ZeRO owner rank turns it into a tensor (:meth:`Update.materialize`) and
  sends each rank its slice. Layer-wise training calls the same entry from a gradient hook. So the three
  paths cannot drift apart, and a rule never sees the optimizer: it takes what it uses.
- :attr:`StepRule.capabilities` says which of those paths the method supports; the sharding wrapper, the
  layer-wise stepper and the recipes read it instead of testing types.
- :meth:`StepRule.state_spec` declares the state the rule creates (:mod:`slimtrain.optimizers.state`).

``docs/optimizers.md`` ("Adding a method") walks through writing one.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._seeds import parameter_seed
from .._validation import check_rank_for_shape
from .layout import WholeMatrix
from .projectors import Projector
from .state import Slot
from .updates import Update


@dataclass(frozen=True)
class Capabilities:
    """Which execution paths a rule supports, and why not where it does not.

    Attributes:
        shardable: its :class:`Update` materializes as a tensor in weight units, so a ZeRO owner rank can
            compute it from the gathered gradient and scatter slices (stages 1-3).
        layerwise: it steps each matrix on its own gradient, with no decision taken over the whole step
            (FRUGAL's block selection is one), so it can run from a gradient hook.
        eight_bit: its moments can be kept in 8 bits (``state_bits=8``): it reads and writes them only through
            :func:`~slimtrain.optimizers.moments.adam_direction` and the other helpers of ``moments.py``.
        reason: the sentence a refusal quotes when any is False.
    """

    shardable: bool = True
    layerwise: bool = True
    eight_bit: bool = True
    reason: str = ""


class MatrixContext(NamedTuple):
    """What a step rule may know about the matrix it steps besides its weight, gradient, group and state: the
    optimizer's facts about it, never the optimizer itself. Immutable, and cheap to build at every step.

    Attributes:
        index: the parameter's position among all of the optimizer's parameters, in group order (stable, so
            per-matrix seeds don't depend on which parameters had gradients at their first step); ``None`` for
            a tensor the optimizer does not hold, which is asked only for its declared state (a stand-in of a
            parameter's shape).
        seed: the optimizer's ``seed``; the matrix's own is :attr:`param_seed`.
        projector: the group's projector (``None`` for a rule that uses none).
        groups: every param group, for what a rule decides over all matrices (stagger spreads refreshes over
            the parameters, FRUGAL's block mode chooses among the projected matrices).
        layout: where the matrix lives (:mod:`slimtrain.optimizers.layout`): one rank's piece of it under FSDP2,
            or ``None``: wholly in this process. The rule's moments, projection, refresh and sums over rows or
            columns go through :meth:`layout_for`; the ``grad`` it is handed is that piece.
    """

    index: int | None
    seed: int
    projector: Projector | None
    groups: Sequence[dict]
    layout: WholeMatrix | None = None

    def layout_for(self, p: Tensor) -> WholeMatrix:
        """Where the parameter ``p`` lives: :attr:`layout`, or the whole of ``p`` in this process."""
        return WholeMatrix(p.shape) if self.layout is None else self.layout

    @property
    def param_seed(self) -> int:
        """The matrix's own seed, from which every stream it draws is derived (:mod:`slimtrain._seeds`)."""
        return parameter_seed(self.seed, self.index)

    @property
    def num_params(self) -> int:
        return sum(len(g["params"]) for g in self.groups)


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
    #: Its updates go through the optimizer's apply, which rounds bf16 weights stochastically when asked (SST
    #: rewrites the weight from fp32 factors instead).
    stochastic_rounding: bool = True
    #: Whether it steps through its group's projector and applies the group's ``moments`` policy at each
    #: refresh. A rule that does neither says why in :attr:`no_projector_reason`, and the optimizer refuses
    #: both options instead of ignoring them.
    uses_projector: bool = True
    no_projector_reason: str = ""

    def validate_group(self, group: dict) -> None:
        """Check a projected group's settings for this rule (raise ``ValueError`` naming the option)."""

    def prepare_step(self, groups: Sequence[dict], state: MutableMapping[Tensor, dict], seed: int) -> None:
        """Run once per ``step()``, before any parameter moves, with every param group, the optimizer's state
        and its seed (FRUGAL's block selection)."""

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> Update:
        """The step of the projected matrix ``p`` from its ``m x n`` descent direction ``grad`` (the gradient,
        negated where the group maximizes; any float dtype). Neither ``p`` nor ``grad`` may be written here.
        ``state`` is the matrix's state, created on first use."""
        raise NotImplementedError

    def state_spec(self, p: Tensor, group: dict, ctx: MatrixContext) -> list[Slot]:
        """The state :meth:`update` keeps for ``p`` after its first step (shapes from ``p.shape`` alone, so
        ``p`` may be on the meta device)."""
        raise NotImplementedError

    def host_keys(self, p: Tensor, group: dict, ctx: MatrixContext) -> set[str]:
        """Every key ``p``'s state may hold on the host, whatever phase it is in (``load_state_dict`` reads it)."""
        return {s.key for s in self.state_spec(p, group, ctx) if s.host}

    def describe_state(self, group: dict, projector: Projector | None) -> str:
        """One sentence on what the rule keeps per matrix, for the memory calculator's assumptions."""
        return ""

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
    return torch.Size((p.shape[0], math.prod(p.shape[1:])))


def check_rank_fits(group: dict) -> None:
    """The group's ``rank`` fits each of its matrices (``ValueError`` naming the first it does not)."""
    for p in group["params"]:
        shape = matrix_shape(p)
        if shape is not None:
            check_rank_for_shape(group["rank"], shape)
