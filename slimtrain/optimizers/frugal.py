"""FRUGAL (Zmushko et al., ICML 2025, arXiv:2411.07837): Adam in a state-full subspace, state-free
signSGD (or SGD) on the rest of the gradient. Two step rules, one per mode."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch
from torch import Tensor

from .._seeds import block_order_seed, generator
from ._validation import check_choice, check_nonneg, check_unit_interval
from .base import EightBitStates, LowRankAdamW
from .functional import STATE_FREE_RULES, Residual, adam_step_size, state_free_residual
from .lowrank import LowRankRule, LowRankStep, projects_left
from .moments import adam_direction, init_moments
from .projectors import Projector
from .registry import register_method
from .rule import Capabilities, MatrixContext, StepRule, matrix_shape
from .state import ADAM, Slot, counter, counters, moment_slots
from .updates import DenseUpdate, Update

BLOCK_ORDERS = ("descending", "ascending", "random")
OPTIONS = ("density", "inactive_update_rule", "inactive_lr_scale")


def _state_free(grad: Tensor, group: dict) -> DenseUpdate:
    """The state-free rule on a whole gradient (FRUGAL's inactive matrices, or density 0)."""
    update = state_free_residual(grad, torch.zeros((), device=grad.device), group["inactive_update_rule"])
    return DenseUpdate(update, group["lr"] * group["inactive_lr_scale"])


class FrugalSubspaceRule(LowRankRule):
    """``mode="subspace"``: GaLore's rule at rank ``round(density * n)``, and the state-free rule on ``G - R B``."""

    name = "frugal"
    options = OPTIONS

    def validate_group(self, group: dict) -> None:
        if group["density"] is None:  # with a density the rank is round(density * n), which always fits
            super().validate_group(group)

    def rank_for(self, group: dict, shape_t: torch.Size) -> int:
        if group["density"] is None:
            return group["rank"]
        return round(group["density"] * shape_t[1])

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> Update:
        transposed = projects_left(grad.shape, group["proj_type"])
        if self.rank_for(group, grad.T.shape if transposed else grad.shape) == 0:
            # density 0: nothing is state-full; the whole gradient takes the state-free rule.
            return _state_free(grad.float(), group)
        return super().update(p, grad, group, state, ctx)

    def residual(self, group: dict, state: dict, step: LowRankStep, step_size: float) -> Residual | None:
        rule = group["inactive_update_rule"]
        if rule == "none":
            return None
        return Residual(step.grad_t, step.low, rule, scale=group["lr"] * group["inactive_lr_scale"])

    def state_spec(self, p: Tensor, group: dict, ctx: MatrixContext) -> list[Slot]:
        shape = matrix_shape(p)
        if self.rank_for(group, shape[::-1] if projects_left(shape, group["proj_type"]) else shape) == 0:
            return []
        return super().state_spec(p, group, ctx)

    def describe_rank(self, group: dict) -> str:
        return "round(density * n)" if group["density"] is not None else super().describe_rank(group)

    def identity(self) -> dict:
        return {"mode": "subspace"}


class FrugalBlockRule(StepRule):
    """``mode="block"``: every ``update_proj_gap`` steps ``round(density * K)`` of the K projected matrices become
    active and hold full AdamW state, reset each window; the others take the state-free rule."""

    name = "frugal"
    options = OPTIONS
    capabilities = Capabilities(shardable=False, layerwise=False, reason=(
        "FrugalAdamW(mode='block') chooses the active matrices once per step over all of them; use "
        "mode='subspace' (or, layer-wise, a regular optimizer.step())"))
    uses_projector = False
    no_projector_reason = "steps whole matrices, each active one with AdamW moments that restart every window"

    def __init__(self, block_order: str = "descending"):
        self.block_order = block_order
        self.block_iters = 0

    @staticmethod
    def members(groups: Sequence[dict]) -> list[tuple[Tensor, dict]]:
        """The projected matrices, in group order, with their groups."""
        return [(p, g) for g in groups if "rank" in g for p in g["params"] if matrix_shape(p) is not None]

    def active_blocks(self, groups: Sequence[dict], seed: int, refresh_index: int) -> list[int]:
        """Indices into :meth:`members` active during refresh window ``refresh_index``; ``seed`` is the
        optimizer's (``block_order="random"`` draws from it)."""
        count = len(self.members(groups))
        density = next(g["density"] for g in groups if "rank" in g)
        k = round(density * count)
        if k == 0 or count == 0:
            return []
        if self.block_order == "random":
            gen = generator(block_order_seed(seed, refresh_index))
            return sorted(torch.randperm(count, generator=gen)[:k].tolist())
        start = (refresh_index * k) % count
        window = [(start + i) % count for i in range(k)]
        if self.block_order == "descending":
            window = [count - 1 - i for i in window]
        return sorted(window)

    def prepare_step(self, groups: Sequence[dict], state: MutableMapping[Tensor, dict], seed: int) -> None:
        gap = next((g["update_proj_gap"] for g in groups if "rank" in g), None)
        if gap is None:
            return
        if self.block_iters % gap == 0:
            active = set(self.active_blocks(groups, seed, self.block_iters // gap))
            for i, (p, group) in enumerate(self.members(groups)):
                st = state.setdefault(p, {})
                # Stochastic rounding's stream outlives the window, so it never repeats.
                rounding = {k: st[k] for k in ("sr_seed", "sr_step") if k in st}
                st.clear()  # moments reset at every refresh; inactive matrices hold nothing
                st.update(rounding)
                st["active"] = torch.tensor(i in active)
                if i in active:
                    st["step"] = torch.zeros((), dtype=torch.int64)
                    init_moments(st, group, ADAM, p.shape, p.device)
        self.block_iters += 1

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> Update:
        grad = grad.reshape(p.shape).float()
        if not bool(state["active"]):
            return _state_free(grad, group)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        direction = adam_direction(state, group, grad)
        return DenseUpdate(direction, adam_step_size(group["lr"], beta1, beta2, int(state["step"])) * group["scale"])

    def state_spec(self, p: Tensor, group: dict, ctx: MatrixContext) -> list[Slot]:
        """During the first window (``block_order``'s first active set)."""
        index = next(i for i, (q, _) in enumerate(self.members(ctx.groups)) if q is p)
        if index not in self.active_blocks(ctx.groups, ctx.seed, 0):
            return [counter("active", torch.bool)]
        return [counter("active", torch.bool), *counters("step"), *moment_slots(group, ADAM, p.shape)]

    def host_keys(self, p: Tensor, group: dict, ctx: MatrixContext) -> set[str]:
        return {"active", "step"}

    def describe_state(self, group: dict, projector: Projector | None) -> str:
        return "FRUGAL block mode: round(density * K) of the K projected matrices hold full AdamW state"

    def extra_state(self) -> dict:
        return {"block_iters": self.block_iters}

    def load_extra_state(self, extra: dict) -> None:
        self.block_iters = int(extra.get("block_iters", 0))

    def identity(self) -> dict:
        return {"mode": "block"}


#: The step rule of each of ``FrugalAdamW``'s modes.
RULES = {"subspace": FrugalSubspaceRule, "block": FrugalBlockRule}


class FrugalAdamW(LowRankAdamW):
    r"""FRUGAL: the full gradient is used every step, but only a fraction ``density`` of it carries
    optimizer state.

    Two ways to split the gradient:

    - ``mode="subspace"`` (default): per matrix, Adam on a rank ``round(density * n)`` projection
      (any projector: ``"svd"`` default, ``"random"``, ``"columns"`` for FRUGAL's coordinate variant,
      ``"dct"``, ``"randomized"``), and the state-free rule on the residual ``G - R B``:

      .. math::
          W_t = W_{t-1} - \eta_t\,\alpha\,\mathrm{Adam}(G_t B^\top) B
                        - \eta\,\lambda_{in}\,\mathrm{sign}(G_t - G_t B^\top B)

    - ``mode="block"`` (the paper's pre-training setting): every ``update_proj_gap`` steps,
      ``round(density * K)`` of the group's K matrices are made active and get full AdamW; the others
      get the state-free rule on their whole gradient. Only active matrices hold moments.

    Moments are reset at every refresh (``moments="reset"``, the paper's ``reset_statistics``), which
    also restarts bias correction. Paper defaults: lr 1e-3, density 0.25, gap 200, signSGD with
    ``inactive_lr_scale`` 1.0 for pre-training (0.1 for fine-tuning).

    Args:
        density: fraction of each matrix (subspace mode) or of the matrices (block mode) that is
            state-full, in [0, 1]. ``None`` uses each group's ``rank`` instead (subspace mode).
        mode: ``"subspace"`` or ``"block"``.
        block_order: which matrices become active, refresh after refresh: ``"descending"`` (default,
            last layers first, cycling), ``"ascending"`` or ``"random"`` (seeded).
        inactive_update_rule: ``"sign_sgd"`` (default), ``"sgd"`` or ``"none"``.
        inactive_lr_scale: multiplies ``lr`` for the state-free update (default 1.0).
        Other arguments: see :class:`~slimtrain.optimizers.base.LowRankAdamW`.
    """

    default_projector = "svd"
    default_moments = "reset"
    rule_type = FrugalSubspaceRule

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        *args,
        density: float | None = 0.25,
        mode: str = "subspace",
        block_order: str = "descending",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        **kwargs,
    ):
        if density is not None:
            check_unit_interval("density", density)
        check_choice("mode", mode, tuple(RULES))
        check_choice("block_order", block_order, BLOCK_ORDERS)
        check_choice("inactive_update_rule", inactive_update_rule, STATE_FREE_RULES)
        check_nonneg("inactive_lr_scale", inactive_lr_scale)
        if density is None and mode == "block":
            raise ValueError("Invalid density: None (block mode needs a density in [0, 1])")
        rule = FrugalBlockRule(block_order) if mode == "block" else FrugalSubspaceRule()
        super().__init__(params, lr, *args, rule=rule, density=density, inactive_update_rule=inactive_update_rule,
                         inactive_lr_scale=inactive_lr_scale, **kwargs)

    @property
    def mode(self) -> str:
        return "block" if isinstance(self.rule, FrugalBlockRule) else "subspace"

    def active_blocks(self, refresh_index: int) -> list[int]:
        """Indices (into the projected matrices, in group order) active during refresh window
        ``refresh_index`` in block mode. Deterministic: every data-parallel rank computes the same set."""
        if not isinstance(self.rule, FrugalBlockRule):
            raise RuntimeError("FrugalAdamW(mode='subspace') has no active blocks (mode='block' has)")
        return self.rule.active_blocks(self.param_groups, self.seed, refresh_index)


class FrugalAdamW8bit(EightBitStates, FrugalAdamW):
    """:class:`FrugalAdamW` with 8-bit Adam moments (``state_bits=8``); see :class:`~slimtrain.optimizers.base.EightBitStates`."""


register_method(
    "frugal", FrugalAdamW, FrugalAdamW8bit,
    modes=RULES,
    # The paper's pre-training setting; block mode as its official pre-training scripts run it.
    recipe=dict(lr=1e-3, update_proj_gap=200, scale=1.0, density=0.25),
    variants={"block": dict(mode="block", block_order="descending")},
)
