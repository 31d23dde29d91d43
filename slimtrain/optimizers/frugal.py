"""FRUGAL (Zmushko et al., ICML 2025, arXiv:2411.07837): Adam in a state-full subspace, state-free
signSGD (or SGD) on the rest of the gradient. Two step rules, one per mode."""

from __future__ import annotations

import torch
from torch import Tensor

from .._seeds import block_order_seed, generator
from . import _validation as V
from . import quantized as Q
from .base import LowRankAdamW
from .functional import STATE_FREE_RULES, Residual, adam_step_size, state_free_residual
from .lowrank import MOMENTS, LowRankRule, LowRankStep, projects_left
from .rule import Capabilities, StepRule, matrix_shape
from .state import Slot, counter, counters, moment_slots
from .updates import DenseUpdate, Update

MODES = ("subspace", "block")
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

    def validate_group(self, opt, group: dict) -> None:
        if group["density"] is None:
            super().validate_group(opt, group)

    def rank_for(self, group: dict, shape_t: torch.Size) -> int:
        if group["density"] is None:
            return group["rank"]
        return round(group["density"] * shape_t[1])

    def update(self, opt, p: Tensor, grad: Tensor, group: dict, state: dict, index: int) -> Update:
        transposed = projects_left(grad.shape, group["proj_type"])
        if self.rank_for(group, grad.T.shape if transposed else grad.shape) == 0:
            # density 0: nothing is state-full; the whole gradient takes the state-free rule.
            return _state_free(opt._descent(grad.float(), group), group)
        return super().update(opt, p, grad, group, state, index)

    def residual(self, group: dict, state: dict, step: LowRankStep, step_size: float) -> Residual | None:
        rule = group["inactive_update_rule"]
        if rule == "none":
            return None
        return Residual(step.grad_t, step.low, rule, scale=group["lr"] * group["inactive_lr_scale"])

    def state_spec(self, opt, p: Tensor, group: dict) -> list[Slot]:
        shape = matrix_shape(p)
        if self.rank_for(group, shape[::-1] if projects_left(shape, group["proj_type"]) else shape) == 0:
            return []
        return super().state_spec(opt, p, group)

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

    def validate_group(self, opt, group: dict) -> None:
        pass  # whole matrices are active or not: no rank to fit

    def __init__(self, block_order: str = "descending"):
        self.block_order = block_order
        self.block_iters = 0

    @staticmethod
    def members(opt) -> list[Tensor]:
        return [p for g in opt.param_groups if "rank" in g for p in g["params"] if matrix_shape(p) is not None]

    def active_blocks(self, opt, refresh_index: int) -> list[int]:
        members = self.members(opt)
        count = len(members)
        density = next(g["density"] for g in opt.param_groups if "rank" in g)
        k = round(density * count)
        if k == 0 or count == 0:
            return []
        if self.block_order == "random":
            gen = generator(block_order_seed(opt.seed, refresh_index))
            return sorted(torch.randperm(count, generator=gen)[:k].tolist())
        start = (refresh_index * k) % count
        window = [(start + i) % count for i in range(k)]
        if self.block_order == "descending":
            window = [count - 1 - i for i in window]
        return sorted(window)

    def prepare_step(self, opt) -> None:
        gap = next((g["update_proj_gap"] for g in opt.param_groups if "rank" in g), None)
        if gap is None:
            return
        if self.block_iters % gap == 0:
            active = set(self.active_blocks(opt, self.block_iters // gap))
            for i, p in enumerate(self.members(opt)):
                state = opt.state[p]
                # Stochastic rounding's stream outlives the window, so it never repeats.
                rounding = {k: state[k] for k in ("sr_seed", "sr_step") if k in state}
                state.clear()  # moments reset at every refresh; inactive matrices hold nothing
                state.update(rounding)
                state["active"] = torch.tensor(i in active)
                if i in active:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    Q.init_moments(state, opt._group_of(p), MOMENTS, p.shape, p.device)
        self.block_iters += 1

    def update(self, opt, p: Tensor, grad: Tensor, group: dict, state: dict, index: int) -> Update:
        grad = opt._descent(grad.reshape(p.shape).float(), group)
        if not bool(state["active"]):
            return _state_free(grad, group)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        direction = Q.adam_direction(state, group, grad)
        return DenseUpdate(direction, adam_step_size(group["lr"], beta1, beta2, int(state["step"])) * group["scale"])

    def state_spec(self, opt, p: Tensor, group: dict) -> list[Slot]:
        """During the first window (``block_order``'s first active set)."""
        index = next(i for i, q in enumerate(self.members(opt)) if q is p)
        if index not in self.active_blocks(opt, 0):
            return [counter("active", torch.bool)]
        return [counter("active", torch.bool), *counters("step"), *moment_slots(group, MOMENTS, p.shape)]

    def host_keys(self, opt, p: Tensor, group: dict) -> set[str]:
        return {"active", "step"}

    def extra_state(self) -> dict:
        return {"block_iters": self.block_iters}

    def load_extra_state(self, extra: dict) -> None:
        self.block_iters = int(extra.get("block_iters", 0))

    def identity(self) -> dict:
        return {"mode": "block"}


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
            V.check_unit_interval("density", density)
        V.check_choice("mode", mode, MODES)
        V.check_choice("block_order", block_order, BLOCK_ORDERS)
        V.check_choice("inactive_update_rule", inactive_update_rule, STATE_FREE_RULES)
        V.check_nonneg("inactive_lr_scale", inactive_lr_scale)
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
        return self.rule.active_blocks(self, refresh_index)


class FrugalAdamW8bit(Q.EightBitStates, FrugalAdamW):
    """:class:`FrugalAdamW` with 8-bit Adam moments (``state_bits=8``), torchao's naming.

    Moments with at least ``min_8bit_size`` (4096) elements are stored as uint8 codes plus one fp32
    absmax per ``block_size`` (256) elements, bitsandbytes' blockwise dynamic quantization: about 1/4
    of their fp32 bytes. Smaller ones stay fp32. See ``docs/low_bit.md``.
    """
