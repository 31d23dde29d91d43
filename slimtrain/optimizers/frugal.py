"""FRUGAL (Zmushko et al., ICML 2025, arXiv:2411.07837): Adam in a state-full subspace, state-free
signSGD (or SGD) on the rest of the gradient. Two step rules, one per mode."""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence

import torch
from torch import Tensor

from .._seeds import block_order_seed, generator
from ..kernels._triton import matmul_precision
from ..kernels.apply import residual_with_row_sq_norms
from ._validation import check_choice, check_nonneg, check_unit_interval
from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .functional import STATE_FREE_RULES, Residual, adam_step_size, state_free_residual
from .lowrank import LowRankRule, LowRankStep, projects_left
from .projectors import Projector
from .registry import register_method
from .rule import Capabilities, MatrixContext, StepRule, matrix_shape
from .state import ADAM, Slot, counter, counters, moment_slots
from .updates import DenseUpdate, Update, group_lr

BLOCK_ORDERS = ("descending", "ascending", "random")
OPTIONS = ("density", "inactive_update_rule", "inactive_lr_scale")


def _state_free(grad: Tensor, group: dict) -> DenseUpdate:
    """The state-free rule on a whole gradient (FRUGAL's inactive matrices, or density 0)."""
    update = state_free_residual(grad, torch.zeros((), device=grad.device), group["inactive_update_rule"])
    return DenseUpdate(update, group_lr(group) * group["inactive_lr_scale"])


# ------------------------------------------------------------------------------------------ rounding noise
# What rounding alone puts into FRUGAL's projection, G' B^T, and residual, G' - (G' B^T) B, for an oriented gradient
# G' (m' x n') and an r x n' basis B. gamma_k = k u / (1 - k u) is the error factor of a length-k dot product in
# fp32 (Higham, "Accuracy and Stability of Numerical Algorithms", (3.5); u = 2^-24; with TF32 matmuls the operands
# are first rounded to 10 bits: (1 + u_tf32)^2 (1 + gamma_k) - 1). B's rows are orthonormal to within
# delta = |B B^T - I|_2 and, computed from a gradient, span its row space to within delta |G'|_F: delta = gamma_n'
# for a basis computed in fp32 by a backward-stable factorization or formula (SVD, QR, DCT), plus u_b per row for
# one stored rounded to unit roundoff u_b (bf16: 2^-9). The bounds are normwise against |G'|_F, as the
# factorizations' own backward errors are, and worst cases: measured noise stays several times under them
# (tests/optimizers/test_frugal_residual.py). Second-order terms (products of two of these) are left out.


def _gamma(k: int, tf32: bool) -> float:
    u, u_in = 2.0**-24, (2.0**-11 if tf32 else 0.0)
    return (1 + u_in) ** 2 * (1 + k * u / (1 - k * u)) - 1


def projection_noise_bound(n: int, basis_roundoff: float = 0.0, *, tf32: bool = False) -> float:
    r"""``beta`` such that the projection :math:`fl(G' B_k^\top)` of a gradient onto a basis row ``B_k`` it has no
    component along has norm at most :math:`\beta \lVert G'\rVert_F`: the row's span defect,
    :math:`\gamma_{n'} + u_b`, plus each entry's rounding, :math:`\gamma_{n'} \lVert G'_i\rVert \lVert B_k\rVert`
    (Cauchy-Schwarz). :math:`2\gamma_{n'}`: 5e-4 at n' = 4096. A row of a new basis along which the refresh's
    gradient is under it was chosen from rounding noise."""
    return 2 * _gamma(n, tf32) + basis_roundoff


def residual_noise_bound(n: int, r: int, basis_roundoff: float = 0.0, *, tf32: bool = False) -> float:
    r"""``beta`` such that, for every gradient whose rows lie in the row space of the basis, FRUGAL's computed
    residual :math:`\hat R = fl(G' - fl(fl(G' B^\top) B))` has
    :math:`\lVert \hat R\rVert_F \le \beta \lVert G'\rVert_F`. Such a residual (a gradient of rank at most ``r``)
    cannot be told from one computed under the bound, and signSGD would step every coordinate by the full lr in
    the direction of its noise. The terms:

    - the exact residual of an imperfect basis, :math:`G'(I - B^\top B) = L (I - B B^\top) B` for
      :math:`G' = L B`: :math:`\delta = \gamma_{n'} + 2\sqrt{r}\,u_b`;
    - the projection's rounding carried back through ``B`` and the back-projection's own,
      :math:`\gamma_{n'} \lVert B\rVert_F` and :math:`\gamma_r \lVert B\rVert_F`, with
      :math:`\lVert B\rVert_F \le \sqrt{r}`, and, at a refresh, what the gradient holds along the rows dropped
      as noise, each under :func:`projection_noise_bound`: together
      :math:`\sqrt{r}\,(\gamma_{n'} + \gamma_r + \beta_{proj})`;
    - the subtraction: ``u`` of :math:`\lVert G'\rVert_F` and of :math:`\lVert \hat R\rVert_F`.

    It scales as :math:`n' \sqrt{r}\,u`: 23 u at n' = 5, r = 1 (torch's 10 x 5 test problem at FRUGAL's density
    0.25); 2.6e-2 at n' = 4096, r = 1024, where a residual holding less than 7e-4 of the gradient's energy is
    dropped. The Gaussian ``"random"`` projector's rows are not orthonormal; its residual is of the order of the
    gradient itself, far above the bound.
    """
    u = 2.0**-24
    delta = _gamma(n, tf32) + 2 * math.sqrt(r) * basis_roundoff
    beta_proj = projection_noise_bound(n, basis_roundoff, tf32=tf32)
    return delta + math.sqrt(r) * (_gamma(n, tf32) + _gamma(r, tf32) + beta_proj) + 2 * u


def basis_roundoff(state: dict) -> float:
    """Unit roundoff of a basis the projector stores below fp32 (``basis_dtype="bf16"``), else 0."""
    stored = state.get("proj_basis")
    if stored is None or stored.dtype == torch.float32:
        return 0.0
    return torch.finfo(stored.dtype).eps / 2


def tf32_matmuls(device: torch.device) -> bool:
    """Whether fp32 matmuls on ``device`` round their operands to TF32 (torch's flag, which the kernels follow)."""
    return device.type == "cuda" and matmul_precision() == "tf32"


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
        shape = ctx.layout_for(p).matrix_shape
        if self.rank_for(group, shape[::-1] if projects_left(shape, group["proj_type"]) else shape) == 0:
            # density 0: nothing is state-full; the whole gradient takes the state-free rule.
            return _state_free(grad.float(), group)
        return super().update(p, grad, group, state, ctx)

    def refresh(self, projector, group: dict, state: dict, grad_t: Tensor, transposed: bool, frame, moments) -> None:
        super().refresh(projector, group, state, grad_t, transposed, frame, moments)
        stored = state.get("proj_basis")
        if stored is None:
            return
        # A factorization of a gradient whose rank is below the subspace's (small batches, small matrices) fills the
        # rest of the basis with directions of its null space: any orthonormal completion will do, and a last-bit
        # change in the gradient picks another, which the window's later gradients then follow (and Adam, on the
        # refresh's own gradient, would scale their noise up to full steps). Those rows, under
        # projection_noise_bound, are left out (zeroed) until the next refresh: what later gradients hold along
        # them is residual, for the state-free rule. Projectors that store no basis draw theirs from a seed (random)
        # or select rows (DCT, columns), continuously in the gradient.
        n = frame.shape[1]
        bound = projection_noise_bound(n, basis_roundoff(state), tf32=tf32_matmuls(grad_t.device))
        along = frame.column_norms(frame.project(grad_t, stored.float())).reshape(-1)
        kept = along > bound * frame.norm(grad_t)
        stored.mul_(kept.to(stored.dtype)[:, None])
        if not bool(kept.any()):
            # An all-zero gradient (torch.distributed.checkpoint creates a fresh optimizer's state with one) spans
            # nothing: choose the subspace again at the next step, as if this refresh had not been.
            state["proj_refreshes"].zero_()

    def residual(self, group: dict, state: dict, step: LowRankStep, step_size: float) -> Residual | None:
        rule = group["inactive_update_rule"]
        if rule == "none":
            return None
        scale = group_lr(group) * group["inactive_lr_scale"]
        if rule == "sgd" or step.basis is None:
            # SGD's step on a residual of rounding noise is itself of the size of that noise; and without a dense
            # basis (column selection) the residual is copied, not computed, so it holds no rounding at all.
            return Residual(step.grad_t, step.low, rule, scale=scale)
        # signSGD: a residual indistinguishable from the rounding of an in-subspace gradient is dropped (see
        # residual_noise_bound). The decision is a 0/1 row scale, so the fused kernel, the torch reference, a ZeRO
        # owner's materialized update and layer-wise steps all apply it alike, with no host synchronization.
        materialized, row_sq = residual_with_row_sq_norms(step.grad_t, step.low, step.basis)
        frame = step.frame
        n, r = frame.shape[1], step.basis.shape[0]
        bound = residual_noise_bound(n, r, basis_roundoff(state), tf32=tf32_matmuls(step.grad_t.device))
        real = (frame.sum_pieces(row_sq.sum()).sqrt() > bound * frame.norm(step.grad_t.float())).to(torch.float32)
        row_scale = real.expand(step.grad_t.shape[0]).contiguous()
        return Residual(step.grad_t, step.low, rule, scale=scale, row_scale=row_scale, materialized=materialized)

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
                if i in active:  # its moments start at zero with its next update (in the storage of its layout)
                    st["step"] = torch.zeros((), dtype=torch.int64)
        self.block_iters += 1

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> Update:
        moments = ctx.layout_for(p).dense_moments()
        grad = grad.reshape(moments.local_shape).float()
        # A matrix added (add_param_group) in the middle of a window joins the selection at the next window.
        if not bool(state.setdefault("active", torch.tensor(False))):
            return _state_free(grad, group)
        if ADAM[0].key not in state:
            moments.init(state, group, ADAM, grad.device)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        direction = moments.adam_direction(state, group, grad)
        step_size = adam_step_size(group_lr(group), beta1, beta2, int(state["step"]))
        return DenseUpdate(direction, step_size * group["scale"])

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
    also restarts bias correction. Where a gradient has nothing outside the subspace (its rank is at most the
    subspace's), its computed residual is rounding noise: it takes no sign step (:func:`residual_noise_bound`),
    and basis rows a refresh chose from noise are left out until the next (docs/optimizers.md). Paper
    defaults: lr 1e-3, density 0.25, gap 200, signSGD with ``inactive_lr_scale`` 1.0 for pre-training (0.1 for
    fine-tuning).

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
    """:class:`FrugalAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


register_method(
    "frugal", FrugalAdamW, FrugalAdamW8bit,
    modes=RULES,
    # The paper's pre-training setting; block mode as its official pre-training scripts run it.
    recipe=dict(lr=1e-3, update_proj_gap=200, scale=1.0, density=0.25),
    variants={"block": dict(mode="block", block_order="descending")},
)
