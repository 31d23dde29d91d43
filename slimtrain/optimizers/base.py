"""Machinery shared by the low-rank AdamW family: groups, state, refresh schedule, safety.

A subclass chooses a default projector and moment policy and, if the method has one, a rule for
the part of the gradient outside the subspace (:meth:`LowRankAdamW._residual`). The math lives in
``functional.py``; this file only gathers state and calls it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _seeds
from .._seeds import parameter_seed
from ..kernels.apply import lowrank_apply_, residual_from_back, residual_with_row_sq_norms
from . import _validation as V
from . import quantized as Q
from .functional import Residual, adam_step_size, rotate_moments_
from .projectors import PROJECTORS, Projector, make_projector

logger = logging.getLogger("slimtrain.optimizers")

# Integer bookkeeping scalars and flags stay on the CPU so reading them never synchronizes a GPU
# (FRUGAL's block-mode "active" is read with bool() at every step of every matrix).
_CPU_COUNTERS = (
    "step", "iters", "proj_refreshes", "proj_seed", "proj_rank", "refresh_offset",
    "vec_step", "sst_draws", "sst_seed", "sr_seed", "sr_step", "active",
)


def matrix_shape(p: Tensor) -> torch.Size | None:
    """The 2-D shape a parameter is projected as: matrices as they are, higher-rank tensors
    (convolutions) as ``(shape[0], prod(rest))``, vectors and scalars not at all."""
    if p.dim() < 2:
        return None
    return torch.Size((p.shape[0], p[0].numel()))


def projects_left(shape: torch.Size, proj_type: str) -> bool:
    """Whether the projection compresses the rows (left, ``P.T @ G``) rather than the columns.

    ``std`` compresses the smaller dimension (galore-torch's rule, ties go right), ``reverse_std`` the
    larger, ``left``/``right`` force a side.
    """
    m, n = shape
    if proj_type == "std":
        return m < n
    if proj_type == "reverse_std":
        return m >= n
    return proj_type == "left"


@dataclass
class LowRankStep:
    """One matrix's step in the oriented frame, before it touches the weight (see ``projectors/base.py``).

    The weight moves by ``-(alpha * direction @ basis + residual term)``; :meth:`LowRankAdamW._apply_low_rank`
    does that in place through the fused kernel, :meth:`LowRankAdamW._materialize` builds it as a tensor.
    """

    grad_t: Tensor  # G' (m' x n'), fp32 or the parameter's dtype, possibly a transposed view
    low: Tensor  # R = G' B^T (m' x r)
    direction: Tensor  # Adam's m / (sqrt(v) + eps) in the subspace (m' x r)
    alpha: float  # the subspace step in weight units: scale * bias-corrected lr
    basis: Tensor | None  # B (r x n'), None for projectors without a dense basis (columns)
    transposed: bool
    residual: Residual | None = None


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW whose matrix parameters in groups with a ``rank`` key run Adam in a projected subspace.

    Parameter groups follow galore-torch's convention: a group with ``rank`` (and optionally
    ``update_proj_gap``, ``scale``, ``proj_type``) is projected; other groups, and vectors inside a
    projected group, get plain AdamW in the same optimizer. See :func:`low_rank_param_groups`.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3).
        betas: Adam's coefficients (default (0.9, 0.999)).
        eps: added to ``sqrt(v)`` (default 1e-8, the papers' value; galore-torch and fira default to 1e-6).
        weight_decay: decoupled weight decay (default 0).
        rank, update_proj_gap, scale, proj_type: defaults for projected groups (a group without
            ``rank`` is never projected).
        projector: ``"svd"``, ``"randomized"``, ``"dct"``, ``"random"``, ``"columns"`` or a
            :class:`~slimtrain.optimizers.projectors.Projector` instance.
        moments: what happens to Adam's moments when the subspace is refreshed: ``"keep"`` (GaLore,
            Fira: the coordinates stay, now meaning other directions), ``"reset"`` (FRUGAL: zeroed and
            bias correction restarted), ``"rotate"`` (carried into the new basis, see
            :func:`~slimtrain.optimizers.functional.rotate_moments_`).
        stagger: offset each matrix's refreshes by its position among the optimizer's parameters,
            spread over the ``update_proj_gap`` window, instead of refreshing all of them at the same
            step (lower peak latency and memory). The first refresh is always at a matrix's first step.
        decay_after_update: apply weight decay after the update using the updated weights, as the
            original GaLore and Fira code do, instead of before it as ``torch.optim.AdamW`` does.
        nonfinite: ``"skip"`` (default): a step whose gradients hold NaN or inf changes no weight and
            no state, and is counted in :attr:`skipped_steps`; ``"raise"``: raise ``FloatingPointError``.
        seed: base seed for projectors that draw random numbers (each matrix derives its own).
        state_bits: 32 (default) or 8: keep Adam's moments in 8 bits, blockwise-quantized as in
            bitsandbytes (see :mod:`~slimtrain.optimizers.quantized` and ``docs/low_bit.md``).
        min_8bit_size: moments with fewer elements stay fp32 (default 4096, bitsandbytes' value).
        block_size: elements per 8-bit quantization block, one fp32 absmax each (default 256).
        bf16_stochastic_round: round bf16 parameters' updates stochastically (unbiased) instead of to
            nearest, so updates below bf16's spacing still move the weights in expectation (default
            False; no effect on fp32 or fp16 parameters).
        maximize: maximize the objective: step on ``-grad``, as ``torch.optim.AdamW(maximize=True)``
            (default False).
        amsgrad, foreach, fused, capturable, differentiable, decoupled_weight_decay, correct_bias,
            no_deprecation_warning: accepted for drop-in compatibility with ``torch.optim.AdamW`` and
            galore-torch at the values that mean what these optimizers do (``amsgrad=False``,
            ``foreach=None``, ...), refused otherwise. Any other keyword is a ``TypeError``.
    """

    #: Subclasses set their method's defaults for these.
    default_projector: str = "svd"
    default_moments: str = "keep"
    #: The keyword options a subclass adds (stored in every param group, like ``lr``).
    method_options: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        projector: str | Projector | None = None,
        moments: str | None = None,
        stagger: bool = False,
        decay_after_update: bool = False,
        nonfinite: str = "skip",
        seed: int = 0,
        state_bits: int = 32,
        min_8bit_size: int = 4096,
        block_size: int = 256,
        bf16_stochastic_round: bool = False,
        maximize: bool = False,
        **options,
    ):
        method = {k: options.pop(k) for k in self.method_options if k in options}
        V.refuse_unknown(type(self).__name__, "keyword argument", set(options) - set(V.DROP_IN_OPTIONS),
                         self._constructor_keywords(), self._option_owners())
        for k, v in options.items():
            V.check_drop_in_option(k, v)
        V.check_choice("nonfinite", nonfinite, V.NONFINITE_POLICIES)
        V.check_int("seed", seed, minimum=0, maximum=_seeds.MAX_OPTIMIZER_SEED)
        projector = self.default_projector if projector is None else projector
        self._projectors: dict[str, Projector] = {}
        projector_name = self._register_projector(projector)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projector=projector_name,
            moments=self.default_moments if moments is None else moments,
            stagger=stagger,
            decay_after_update=decay_after_update,
            state_bits=state_bits,
            min_8bit_size=min_8bit_size,
            block_size=block_size,
            bf16_stochastic_round=bf16_stochastic_round,
            maximize=maximize,
            **method,
        )
        if rank is not None:
            defaults["rank"] = rank
        self.nonfinite = nonfinite
        self.seed = seed
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Validation
    def _register_projector(self, spec: str | Projector) -> str:
        proj = make_projector(spec)
        if not proj.name:
            raise ValueError(f"Invalid projector: {proj!r} has no name (set the class attribute `name`)")
        self._projectors[proj.name] = proj
        return proj.name

    @classmethod
    def _constructor_keywords(cls) -> set[str]:
        names = set(inspect.signature(LowRankAdamW.__init__).parameters) - {"self", "params", "options"}
        return names | set(cls.method_options) | set(V.DROP_IN_OPTIONS)

    @classmethod
    def _option_owners_all(cls) -> dict[str, str]:
        """Every method's own options -> that method's class name."""
        return {k: c.__name__ for c in reversed(_methods()) for k in c.method_options}

    @classmethod
    def _option_owners(cls) -> dict[str, str]:
        """Other methods' options -> their class name (for the hint in a refusal)."""
        return {k: v for k, v in cls._option_owners_all().items() if k not in cls.method_options}

    def add_param_group(self, param_group: dict) -> None:
        # Before torch fills in the defaults: a misspelt key would otherwise sit beside the real one.
        known = set(self.defaults) | {"params", "rank"} | set(V.TORCH_GROUP_KEYS) | set(V.DROP_IN_OPTIONS)
        V.refuse_unknown(type(self).__name__, "param group key", set(param_group) - known, known - {"params"},
                         self._option_owners())
        for k in set(param_group) & set(V.DROP_IN_OPTIONS):
            V.check_drop_in_option(k, param_group[k])
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        self.__dict__.setdefault("_known_params", set()).update(id(p) for p in self.param_groups[-1]["params"])

    def _validate_group(self, group: dict) -> None:
        V.check_lr(group["lr"])
        V.check_betas(group["betas"])
        V.check_nonneg("eps", group["eps"])
        V.check_nonneg("weight_decay", group["weight_decay"])
        V.check_choice("moments", group["moments"], V.MOMENT_POLICIES)
        V.check_int_choice("state_bits", group["state_bits"], Q.STATE_BITS)
        V.check_int("min_8bit_size", group["min_8bit_size"], minimum=0)
        V.check_int_choice("block_size", group["block_size"], Q.BLOCK_SIZES)
        V.check_bool("bf16_stochastic_round", group["bf16_stochastic_round"])
        V.check_bool("maximize", group["maximize"])
        if group["state_bits"] == 8:
            Q.require_bitsandbytes()
        if group["projector"] not in self._projectors:
            if group["projector"] not in PROJECTORS:
                V.check_choice("projector", group["projector"], PROJECTORS)
            self._register_projector(group["projector"])
        for p in group["params"]:
            V.check_param(p)
        if "rank" not in group:
            return
        V.check_int("rank", group["rank"], minimum=1)
        V.check_int("update_proj_gap", group["update_proj_gap"], minimum=1)
        V.check_nonneg("scale", group["scale"])
        V.check_choice("proj_type", group["proj_type"], V.PROJ_TYPES)
        self._validate_projected_params(group)

    def _validate_projected_params(self, group: dict) -> None:
        for p in group["params"]:
            shape = matrix_shape(p)
            if shape is not None:
                V.check_rank_for_shape(group["rank"], shape)

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Checkpoints from older versions lack newer options: fill them from the defaults.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        # A copied or unpickled optimizer holds new parameter objects.
        self._known_params = {id(p) for g in self.param_groups for p in g["params"]}

    def _extra_state(self) -> dict:
        """Optimizer-level counters and identity saved beside torch's ``state`` and ``param_groups``."""
        return {"skipped_steps": self.skipped_steps, **self._identity()}

    def _identity(self) -> dict:
        """What a checkpoint must have been written by for this optimizer to resume it: the method
        (an 8-bit twin is its method with ``state_bits=8``, which the param groups carry)."""
        methods = _methods()
        return {"method": next(c for c in type(self).__mro__ if c in methods).__name__}

    def _saved_identity(self, state_dict: dict) -> dict:
        """The identity recorded in ``state_dict`` (keys of :meth:`_identity`). Checkpoints written before
        it was recorded (commit e556968 and earlier) are told apart by the method options their param
        groups hold; GaLore's and DCT's have none, so either is taken for the other (the projector check
        in :meth:`load_state_dict` still applies)."""
        extra = state_dict.get("slimtrain", {})
        saved = {k: extra[k] for k in self._identity() if k in extra}
        if "method" not in saved:
            present = {k for g in state_dict["param_groups"] for k in g} & set(self._option_owners_all())
            candidates = sorted(c.__name__ for c in _methods() if set(c.method_options) == present)
            mine = self._identity()["method"]
            if mine in candidates or len(candidates) == 1:
                saved["method"] = mine if mine in candidates else candidates[0]
            else:
                saved["method"] = f"one of {', '.join(candidates)}" if candidates else "an unknown method"
        return saved

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuse a state dict this optimizer would misread, before anything is changed."""
        me = type(self).__name__
        groups = state_dict["param_groups"]
        if "slimtrain" not in state_dict or any("projector" not in g for g in groups):
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
        for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
            if ("rank" in sg or "rank" in g) and sg["projector"] != g["projector"]:
                raise RuntimeError(
                    f"Cannot load this state dict into {me}: its param group {i} was written with projector "
                    f"{sg['projector']!r}, this optimizer's group {i} uses {g['projector']!r} (their bases are "
                    f"stored differently); build {me} with projector={sg['projector']!r} to resume it"
                )

    def _load_extra_state(self, extra: dict) -> None:
        self.skipped_steps = int(extra.get("skipped_steps", 0))

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["slimtrain"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_loadable(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop("slimtrain", {})
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        # torch casts every state tensor but `step` to its parameter's dtype; ours hold int64 indices,
        # seeds and fp32 moments of bf16 parameters, so restore each tensor's saved dtype.
        params = {
            pid: p for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])
        }
        for pid, saved in state_dict["state"].items():
            p = params[pid]
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    device = "cpu" if key in _CPU_COUNTERS else p.device
                    self.state[p][key] = value.to(device=device, dtype=value.dtype, copy=True)
        self._load_extra_state(extra)

    def state_bytes(self) -> int:
        """Bytes of every tensor held in optimizer state (what a memory table should count)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
        return total

    # ------------------------------------------------------------------------------------------
    # The step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for _, p in work:
            if id(p) not in self._known_params:
                raise RuntimeError(
                    "This optimizer is stepping tensors it was not built with: DeepSpeed ZeRO (stage >= 1) replaces "
                    "an optimizer's parameters by flat partitions, where matrices cannot be projected. Build the "
                    "engine with slimtrain.sharding.initialize(model=..., optimizer=..., config=...) instead."
                )
            V.check_grad(p)
        if not self._grads_finite([p.grad for _, p in work]):
            if self.nonfinite == "raise":
                raise FloatingPointError("Non-finite gradient (NaN or inf); no parameter or state was changed")
            self.skipped_steps += 1
            logger.warning("Skipped an optimizer step with a non-finite gradient (%d so far)", self.skipped_steps)
            return loss
        self._prepare_step(work)
        for group, p in work:
            self._step_one(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: Tensor) -> bool:
        """Step one parameter from its current gradient; return whether it was updated.

        This is what layer-wise training (:class:`~slimtrain.optimizers.layerwise.LayerwiseStepper`)
        calls from a gradient hook. The non-finite policy then applies per parameter: a NaN gradient
        skips (or raises for) this parameter only, since others were already stepped in this backward.
        """
        group = self._group_of(p)
        if p.grad is None:
            return False
        V.check_grad(p)
        if not self._grads_finite([p.grad]):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"Non-finite gradient for a parameter of shape {tuple(p.shape)}")
            self.skipped_steps += 1
            logger.warning("Skipped a parameter update with a non-finite gradient (%d so far)", self.skipped_steps)
            return False
        self._step_one(p, group)
        return True

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Invalid parameter: a tensor of shape {tuple(p.shape)} is not in this optimizer")

    def _param_index(self, p: Tensor) -> int:
        """The parameter's position over all groups: stable, so per-matrix seeds don't depend on which
        parameters happened to have gradients at their first step."""
        flat = [q for g in self.param_groups for q in g["params"]]
        return next(i for i, q in enumerate(flat) if q is p)

    def _step_one(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "rank" in group and matrix_shape(p) is not None:
            self._step_projected(p, group, state, self._param_index(p) if not state else -1)
        else:
            self._step_dense(p, group, state)

    @staticmethod
    def _grads_finite(grads: list[Tensor]) -> bool:
        if not grads:
            return True
        # One reduction per tensor and a single host sync. A sum of finite values that overflows fp32
        # reads as non-finite too; a gradient that large is broken anyway, and skipping is safe.
        sums = torch.stack([g.float().sum().to(grads[0].device) for g in grads])
        return bool(torch.isfinite(sums).all())

    def _prepare_step(self, work: list[tuple[dict, Tensor]]) -> None:
        """Hook run once per step before any parameter is updated (block selection in FRUGAL)."""

    def _step_dense(self, p: Tensor, group: dict, state: dict) -> None:
        direction, step_size = self._dense_update(p.grad.float(), group, state)
        self._apply(p, group, direction, step_size)

    @staticmethod
    def _descent(grad: Tensor, group: dict) -> Tensor:
        """The gradient the step descends: ``-grad`` when the group maximizes (a new tensor: the
        caller's, often ``p.grad`` itself, is never written)."""
        return -grad if group["maximize"] else grad

    def _dense_update(self, grad: Tensor, group: dict, state: dict) -> tuple[Tensor, float]:
        """Plain AdamW on any fp32 gradient (a whole parameter or a shard of one): returns the
        direction and its step size. Creates the state on first use."""
        grad = self._descent(grad, group)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            Q.init_moments(state, group, ("exp_avg", "exp_avg_sq"), grad.shape, grad.device)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        direction = Q.adam_direction(state, group, grad)
        return direction, adam_step_size(group["lr"], beta1, beta2, int(state["step"]))

    def _init_projected(self, grad: Tensor, group: dict, state: dict, index: int, low_shape: tuple[int, int]) -> None:
        projector = self._projectors[group["projector"]]
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["iters"] = torch.zeros((), dtype=torch.int64)
        offset = 0
        if group["stagger"]:
            # Spread the group's matrices over the refresh window by their position in the optimizer.
            offset = (index * group["update_proj_gap"]) // max(self._num_params(), 1)
        state["refresh_offset"] = torch.tensor(offset, dtype=torch.int64)
        projector.init_state(state, seed=parameter_seed(self.seed, index))
        Q.init_moments(state, group, ("exp_avg", "exp_avg_sq"), low_shape, grad.device)

    def _num_params(self) -> int:
        return sum(len(g["params"]) for g in self.param_groups)

    def _refresh_due(self, group: dict, state: dict) -> bool:
        if int(state["proj_refreshes"]) == 0:
            return True
        it = int(state["iters"]) - int(state["refresh_offset"])
        return it >= 0 and it % group["update_proj_gap"] == 0

    def _refresh(self, group: dict, state: dict, grad_t: Tensor, transposed: bool) -> None:
        projector = self._projectors[group["projector"]]
        policy = group["moments"]
        first = int(state["proj_refreshes"]) == 0
        n = grad_t.shape[1]
        old_basis = None
        if policy == "rotate" and not first:
            old_basis = projector.basis(state, n, grad_t.device)
        projector.refresh(grad_t, state, self._rank_for(group, grad_t.shape), transposed=transposed)
        if first:
            return
        if policy == "reset":
            Q.zero_moments_(state, ("exp_avg", "exp_avg_sq"))
            state["step"].zero_()
        elif policy == "rotate":
            with Q.fp32_moments(state, group, "exp_avg", "exp_avg_sq") as (exp_avg, exp_avg_sq):
                rotate_moments_(exp_avg, exp_avg_sq, old_basis, projector.basis(state, n, grad_t.device))

    def _step_projected(self, p: Tensor, group: dict, state: dict, index: int) -> None:
        shape = matrix_shape(p)
        step = self._low_rank_step(p.grad.reshape(shape), group, state, index)
        fusable = step.basis is not None and p.is_contiguous() and not self._rounds_stochastically(p, group)
        if fusable:
            weight = p.view(shape)
            self._apply_low_rank(weight.T if step.transposed else weight, group, step)
        else:
            self._apply(p, group, self._materialize(step, group, state).reshape(p.shape), 1.0)

    def _projected_update(self, grad: Tensor, group: dict, state: dict, index: int) -> Tensor:
        """The low-rank step for one matrix gradient ``grad`` (m x n, any float dtype) as a tensor in
        weight units: the caller subtracts it, with weight decay, through :meth:`_apply`. Creates the
        state on first use (``index`` seeds the projector). This is the ZeRO owner's path, which must
        send pieces of the update to other ranks; one process updates the weight in place instead."""
        return self._materialize(self._low_rank_step(grad, group, state, index), group, state)

    # Entry points for a wrapper that steps pieces of parameters (slimtrain.sharding.zero: ZeRO hands each
    # rank flat slices, and one owner rank the whole gradient of each projected matrix) ------------------
    def step_dense_shard_(self, shard: Tensor, grad: Tensor, group: dict, state: dict) -> None:
        """AdamW with the group's weight decay on ``shard`` (an fp32 slice of an unprojected parameter, or
        of a vector in a projected group) from its gradient ``grad``; ``state`` holds the slice's moments
        (created on first use). The same arithmetic as a whole parameter's step."""
        direction, step_size = self._dense_update(grad, group, state)
        self._apply(shard, group, direction, step_size)

    def matrix_update(self, p: Tensor, grad: Tensor, group: dict, state: dict) -> Tensor:
        """The low-rank step of the projected matrix parameter ``p`` from its whole gradient ``grad``
        (``m x n``) as an update in weight units, ``p`` untouched: subtract it, or the slices of it each
        rank holds, with :meth:`apply_update_`. ``state`` is the matrix's state, created on first use with
        ``p``'s seed (its position among the optimizer's parameters), wherever ``state`` is kept."""
        return self._projected_update(grad, group, state, self._param_index(p))

    def apply_update_(self, shard: Tensor, group: dict, update: Tensor) -> None:
        """``shard <- shard - update`` with the group's decoupled weight decay (``update`` from
        :meth:`matrix_update`, or the slice of it that matches ``shard``)."""
        self._apply(shard, group, update, 1.0)

    def _low_rank_step(self, grad: Tensor, group: dict, state: dict, index: int) -> LowRankStep:
        """Refresh the subspace if due, project, run Adam in the subspace and ask the method for its
        residual rule: everything but touching the weight."""
        grad = self._descent(grad, group)
        projector = self._projectors[group["projector"]]
        transposed = projects_left(grad.shape, group["proj_type"])
        grad_t = grad.T if transposed else grad
        grad32 = grad_t.float()  # no copy for fp32; the residual reads grad_t as it is
        if not state:
            self._init_projected(grad, group, state, index, (grad_t.shape[0], self._rank_for(group, grad_t.shape)))
        if self._refresh_due(group, state):
            self._refresh(group, state, grad32, transposed)
        basis = projector.dense_basis(state, grad_t.shape[1], grad_t.device)
        low = grad32 @ basis.T if basis is not None else projector.project(grad32, state)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["iters"] += 1
        direction = Q.adam_direction(state, group, low)
        step_size = adam_step_size(group["lr"], beta1, beta2, int(state["step"]))
        step = LowRankStep(grad_t, low, direction, group["scale"] * step_size, basis, transposed)
        step.residual = self._residual(group, state, projector, step, step_size)
        return step

    def _apply_low_rank(self, weight_t: Tensor, group: dict, step: LowRankStep) -> None:
        """Apply ``step`` to the oriented weight view in place, weight decay included, never building
        the full update (:func:`slimtrain.kernels.apply.lowrank_apply_`)."""
        before, after = self._decay_factors(group)
        residual = step.residual.operands() if step.residual is not None else None
        lowrank_apply_(weight_t, step.direction, step.basis, alpha=step.alpha, residual=residual,
                       decay_before=before, decay_after=after)

    def _materialize(self, step: LowRankStep, group: dict, state: dict) -> Tensor:
        """``step`` as an update tensor in the user's orientation (the same arithmetic as the torch
        reference of the fused kernel, so a ZeRO owner and one process agree exactly on CPU)."""
        projector = self._projectors[group["projector"]]
        n = step.grad_t.shape[1]
        update = projector.project_back(step.direction, state, n).mul_(step.alpha)
        residual = step.residual
        if residual is not None:
            back_low = None if residual.materialized is not None else projector.project_back(residual.low, state, n)
            update.add_(residual_from_back(residual.operands(), back_low), alpha=residual.scale)
        return update.T if step.transposed else update

    def _rank_for(self, group: dict, shape_t: torch.Size) -> int:
        """The subspace dimension for a matrix whose oriented shape is ``shape_t``."""
        return group["rank"]

    def _residual(
        self, group: dict, state: dict, projector: Projector, step: LowRankStep, step_size: float
    ) -> Residual | None:
        """The method's rule for the gradient outside the subspace (see
        :class:`~slimtrain.optimizers.functional.Residual`), or ``None`` (GaLore: discarded). ``step_size`` is
        Adam's bias-corrected learning rate for this step."""
        return None

    def _residual_with_row_sq_norms(
        self, step: LowRankStep, projector: Projector, state: dict, coef: float
    ) -> tuple[Tensor | None, Tensor]:
        """``(residual, row_sq)``: ``sum_j (G' - c R B)_ij^2`` per row, through the fused kernel when the
        basis is dense, and ``G' - c R B`` itself wherever it had to be materialized for that (the torch
        backend, projectors without a dense basis), ``None`` where the kernel did without. Put it in
        :attr:`Residual.materialized`: applying the step then reuses it instead of computing it again."""
        if step.basis is not None:
            return residual_with_row_sq_norms(step.grad_t, step.low, step.basis, coef)
        back_low = projector.project_back(step.low, state, step.grad_t.shape[1])
        residual = step.grad_t.float() - back_low.mul_(coef)
        return residual, residual.square().sum(1)

    @staticmethod
    def _decay_factors(group: dict) -> tuple[float, float]:
        """Decoupled weight decay as (factor before the update, factor after it)."""
        if not group["weight_decay"]:
            return 1.0, 1.0
        decay = 1.0 - group["lr"] * group["weight_decay"]
        return (1.0, decay) if group["decay_after_update"] else (decay, 1.0)

    @staticmethod
    def _rounds_stochastically(p: Tensor, group: dict) -> bool:
        return p.dtype == torch.bfloat16 and group["bf16_stochastic_round"]

    def _apply(self, p: Tensor, group: dict, update: Tensor, step_size: float) -> None:
        """``p <- p - step_size * update`` with decoupled weight decay, computed in fp32 (and rounded
        stochastically to a bf16 ``p`` when the group's ``bf16_stochastic_round`` is on)."""
        before, after = self._decay_factors(group)
        target = p if p.dtype == torch.float32 else p.float()
        if before != 1.0:
            target.mul_(before)
        target.add_(update, alpha=-step_size)
        if after != 1.0:
            target.mul_(after)
        if target is not p and self._rounds_stochastically(p, group):
            if p not in self.state:
                raise RuntimeError(
                    "bf16_stochastic_round needs the parameter's own state (its rounding seed and counter), but "
                    f"this tensor of shape {tuple(p.shape)} is not a parameter of the optimizer (a ZeRO shard?): "
                    "turn bf16_stochastic_round off or keep fp32 master weights"
                )
            state = self.state[p]
            seed = None if "sr_seed" in state else parameter_seed(self.seed, self._param_index(p))
            p.copy_(Q.bf16_stochastic_round(target, Q.rounding_generator(state, seed, p.device)))
        elif target is not p:
            p.copy_(target)


def _methods() -> list[type[LowRankAdamW]]:
    """``LowRankAdamW`` and every slimtrain subclass that is a method. An 8-bit twin is its method, and so is a
    user's subclass (e.g. one that records something): it writes and reads that method's state, and must not
    change which names a checkpoint check reports."""
    found, todo = [], [LowRankAdamW]
    while todo:
        c = todo.pop(0)
        todo.extend(c.__subclasses__())
        ours = c.__module__.split(".")[0] == "slimtrain"
        if ours and not issubclass(c, Q.EightBitStates) and c not in found:
            found.append(c)
    return found


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
