"""FRUGAL (Zmushko et al., ICML 2025, arXiv:2411.07837): Adam in a state-full subspace, state-free
signSGD (or SGD) on the rest of the gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .._seeds import block_order_seed, generator
from . import _validation as V
from . import quantized as Q
from .base import LowRankAdamW, LowRankStep, matrix_shape, projects_left
from .functional import STATE_FREE_RULES, Residual, adam_step_size, state_free_residual
from .projectors import Projector

MODES = ("subspace", "block")
BLOCK_ORDERS = ("descending", "ascending", "random")


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
    method_options = ("density", "inactive_update_rule", "inactive_lr_scale")

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
        self.mode = mode
        self.block_order = block_order
        self._block_iters = 0
        super().__init__(
            params,
            lr,
            *args,
            density=density,
            inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale,
            **kwargs,
        )

    # Ranks ------------------------------------------------------------------------------------
    def _validate_projected_params(self, group: dict) -> None:
        if group["density"] is None:
            super()._validate_projected_params(group)

    def _rank_for(self, group: dict, shape_t: torch.Size) -> int:
        if group["density"] is None:
            return group["rank"]
        return round(group["density"] * shape_t[1])

    # Subspace mode ----------------------------------------------------------------------------
    def _step_projected(self, p: Tensor, group: dict, state: dict, index: int) -> None:
        if self.mode == "block":
            self._step_block(p, group, state)
            return
        shape = matrix_shape(p)
        transposed = projects_left(shape, group["proj_type"])
        grad = self._descent(p.grad.reshape(shape).float(), group)
        grad_t = grad.T if transposed else grad
        if self._rank_for(group, grad_t.shape) == 0:
            # density 0: nothing is state-full; the whole gradient takes the state-free rule.
            update = state_free_residual(grad_t, torch.zeros_like(grad_t), group["inactive_update_rule"])
            if update is None:
                return
            update = update.T if transposed else update
            self._apply(p, group, update.reshape(p.shape), group["lr"] * group["inactive_lr_scale"])
            return
        super()._step_projected(p, group, state, index)

    def _residual(
        self, group: dict, state: dict, projector: Projector, step: LowRankStep, step_size: float
    ) -> Residual | None:
        rule = group["inactive_update_rule"]
        if rule == "none":
            return None
        return Residual(step.grad_t, step.low, rule, scale=group["lr"] * group["inactive_lr_scale"])

    # Block mode -------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "block_iters": self._block_iters}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self._block_iters = int(extra.get("block_iters", 0))

    def _identity(self) -> dict:
        return {**super()._identity(), "mode": self.mode}

    def _saved_identity(self, state_dict: dict) -> dict:
        saved = super()._saved_identity(state_dict)
        if "mode" not in saved and saved["method"] == "FrugalAdamW":  # written before the mode was recorded:
            # only block mode keeps "active"
            keys = {k for st in state_dict["state"].values() for k in st}
            if keys:
                saved["mode"] = "block" if "active" in keys else "subspace"
        return saved

    def _block_members(self) -> list[Tensor]:
        return [p for g in self.param_groups if "rank" in g for p in g["params"] if matrix_shape(p) is not None]

    def active_blocks(self, refresh_index: int) -> list[int]:
        """Indices (into the projected matrices, in group order) active during refresh window
        ``refresh_index``. Deterministic: every data-parallel rank computes the same set."""
        members = self._block_members()
        count = len(members)
        density = next(g["density"] for g in self.param_groups if "rank" in g)
        k = round(density * count)
        if k == 0 or count == 0:
            return []
        if self.block_order == "random":
            gen = generator(block_order_seed(self.seed, refresh_index))
            return sorted(torch.randperm(count, generator=gen)[:k].tolist())
        start = (refresh_index * k) % count
        window = [(start + i) % count for i in range(k)]
        if self.block_order == "descending":
            window = [count - 1 - i for i in window]
        return sorted(window)

    def _prepare_step(self, work) -> None:
        if self.mode != "block":
            return
        gap = next((g["update_proj_gap"] for g in self.param_groups if "rank" in g), None)
        if gap is None:
            return
        if self._block_iters % gap == 0:
            active = set(self.active_blocks(self._block_iters // gap))
            for i, p in enumerate(self._block_members()):
                state = self.state[p]
                # Stochastic rounding's stream outlives the window, so it never repeats.
                rounding = {k: state[k] for k in ("sr_seed", "sr_step") if k in state}
                state.clear()  # moments reset at every refresh; inactive matrices hold nothing
                state.update(rounding)
                state["active"] = torch.tensor(i in active)
                if i in active:
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    Q.init_moments(state, self._group_of(p), ("exp_avg", "exp_avg_sq"), p.shape, p.device)
        self._block_iters += 1

    def _step_block(self, p: Tensor, group: dict, state: dict) -> None:
        grad = self._descent(p.grad.float(), group)
        if bool(state["active"]):
            beta1, beta2 = group["betas"]
            state["step"] += 1
            direction = Q.adam_direction(state, group, grad)
            step_size = adam_step_size(group["lr"], beta1, beta2, int(state["step"])) * group["scale"]
            self._apply(p, group, direction, step_size)
            return
        update = state_free_residual(grad, torch.zeros((), device=p.device), group["inactive_update_rule"])
        if update is not None:
            self._apply(p, group, update, group["lr"] * group["inactive_lr_scale"])


class FrugalAdamW8bit(Q.EightBitStates, FrugalAdamW):
    """:class:`FrugalAdamW` with 8-bit Adam moments (``state_bits=8``), torchao's naming.

    Moments with at least ``min_8bit_size`` (4096) elements are stored as uint8 codes plus one fp32
    absmax per ``block_size`` (256) elements, bitsandbytes' blockwise dynamic quantization: about 1/4
    of their fp32 bytes. Smaller ones stay fp32. See ``docs/low_bit.md``.
    """
