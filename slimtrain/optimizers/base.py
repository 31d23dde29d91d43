"""The low-rank AdamW family's shared bookkeeping: param groups and their validation, the step loop and the
non-finite policy, plain AdamW for what is not projected, and the entry points for stepping pieces of
parameters (ZeRO). What a method does to a projected matrix is its step rule (``rule.py``, ``lowrank.py``);
applying an update to a weight is ``updates.py``; checkpoints are ``checkpoint.py``; the declared state
layout is ``state.py``; the methods themselves are named in ``registry.py``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .._seeds import MAX_OPTIMIZER_SEED, parameter_seed
from ._validation import (
    DROP_IN_OPTIONS,
    MOMENT_POLICIES,
    NONFINITE_POLICIES,
    TORCH_GROUP_KEYS,
    check_choice,
    check_drop_in_option,
    check_grad,
    check_group,
    check_int,
    is_dtensor,
    refuse_unknown,
)
from .checkpoint import Checkpointing
from .dtensor import DTensorParams
from .dtensor import check_group as check_sharded_group
from .functional import adam_step_size, closure_loss, descent
from .lowrank import LowRankRule, projects_left  # noqa: F401  (projects_left: re-exported)
from .layout import WholeMatrix, WholeMoments
from .moments import require_bitsandbytes
from .projectors import PROJECTORS, Projector, make_projector
from .registry import option_owners
from .rule import MatrixContext, StepRule, matrix_shape
from .state import ADAM, ROUNDING, Slot, counters, host_keys, moment_slots, rounding_slots
from .updates import DenseUpdate, RoundingStream, apply_, group_lr, rounds_stochastically

logger = logging.getLogger("slimtrain.optimizers")


class LowRankAdamW(Checkpointing, DTensorParams, torch.optim.Optimizer):
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
            :class:`~slimtrain.optimizers.projectors.Projector` instance (a rule that uses none, SST's or
            FRUGAL's block mode, refuses it and ``moments``).
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
            bitsandbytes (see :mod:`~slimtrain.optimizers.moments` and ``docs/low_bit.md``).
        min_8bit_size: moments with fewer elements stay fp32 (default 4096, bitsandbytes' value).
        block_size: elements per 8-bit quantization block, one fp32 absmax each (default 256).
        bf16_stochastic_round: round bf16 parameters' updates stochastically (unbiased) instead of to
            nearest, so updates below bf16's spacing still move the weights in expectation (default
            False; no effect on fp32 or fp16 parameters).
        maximize: maximize the objective: step on ``-grad``, as ``torch.optim.AdamW(maximize=True)``
            (default False).
        rule: the method's :class:`~slimtrain.optimizers.rule.StepRule` (default: the class's ``rule_type``;
            GaLore's for ``LowRankAdamW`` itself). See "Adding a method" in ``docs/optimizers.md``.
        amsgrad, foreach, fused, capturable, differentiable, decoupled_weight_decay, correct_bias,
            no_deprecation_warning: accepted for drop-in compatibility with ``torch.optim.AdamW`` and
            galore-torch at the values that mean what these optimizers do (``amsgrad=False``,
            ``foreach=None``, ...), refused otherwise. Any other keyword is a ``TypeError``.
    """

    #: Subclasses set their method's defaults for these (read where the rule steps through a projector).
    default_projector: str = "svd"
    default_moments: str = "keep"
    rule_type: type[StepRule] = LowRankRule

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
        rule: StepRule | None = None,
        **options,
    ):
        if rule is not None and not isinstance(rule, StepRule):
            raise TypeError(f"Invalid rule: {rule!r} (expected a slimtrain.optimizers.rule.StepRule instance)")
        self.rule = self.rule_type() if rule is None else rule
        method = {k: options.pop(k) for k in self.rule.options if k in options}
        refuse_unknown(type(self).__name__, "keyword argument", set(options) - set(DROP_IN_OPTIONS),
                       self._constructor_keywords(), self._option_owners())
        for k, v in options.items():
            check_drop_in_option(k, v)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        check_int("seed", seed, minimum=0, maximum=MAX_OPTIMIZER_SEED)
        self._projectors: dict[str, Projector] = {}
        if self.rule.uses_projector:
            projector = self._register_projector(self.default_projector if projector is None else projector)
            moments = self.default_moments if moments is None else moments
        else:
            self._refuse_subspace_options({"projector": projector, "moments": moments})
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, eps=eps,
            weight_decay=weight_decay, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
            projector=projector, moments=moments, stagger=stagger,
            decay_after_update=decay_after_update, state_bits=state_bits, min_8bit_size=min_8bit_size,
            block_size=block_size, bf16_stochastic_round=bf16_stochastic_round, maximize=maximize, **method,
        )
        if rank is not None:
            defaults["rank"] = rank
        self.nonfinite = nonfinite
        self.seed = seed
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------
    # Options and groups
    def _register_projector(self, spec: str | Projector) -> str:
        proj = make_projector(spec)
        if not proj.name:
            raise ValueError(f"Invalid projector: {proj!r} has no name (set the class attribute `name`)")
        self._projectors[proj.name] = proj
        return proj.name

    def _refuse_subspace_options(self, given: dict) -> None:
        """A rule that uses no projector (:attr:`StepRule.uses_projector`) takes neither a projector nor a moment
        policy: refuse either rather than ignore it."""
        for name, value in given.items():
            if value is not None:
                what = "projector" if name == "projector" else "moments policy"
                raise ValueError(f"Invalid {name}: {value!r} ({self._describe()} {self.rule.no_projector_reason}; "
                                 f"it takes no {what})")

    def projector(self, group: dict) -> Projector:
        """The projector instance of a projected group."""
        return self._projectors[group["projector"]]

    def _constructor_keywords(self) -> set[str]:
        names = set(inspect.signature(LowRankAdamW.__init__).parameters) - {"self", "params", "options"}
        return names | set(self.rule.options) | set(DROP_IN_OPTIONS)

    def _option_owners(self) -> dict[str, str]:
        """Other methods' options -> their class name (for the hint in a refusal)."""
        return {k: v for k, v in option_owners().items() if k not in self.rule.options}

    def add_param_group(self, param_group: dict) -> None:
        # A copy: torch writes the defaults into the dict it is given, and the caller's dict must stay as it
        # was, so that it can build another optimizer (which refuses the keys of this one's options).
        param_group = dict(param_group)
        # Before torch fills in the defaults: a misspelt key would otherwise sit beside the real one.
        known = set(self.defaults) | {"params", "rank"} | set(TORCH_GROUP_KEYS) | set(DROP_IN_OPTIONS)
        refuse_unknown(type(self).__name__, "param group key", set(param_group) - known, known - {"params"},
                       self._option_owners())
        for k in set(param_group) & set(DROP_IN_OPTIONS):
            check_drop_in_option(k, param_group[k])
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        self._index_params()

    def _index_params(self) -> None:
        """Each parameter's position over all groups: stable, so per-matrix seeds don't depend on which
        parameters happened to have gradients at their first step. Its keys are the tensors ``step`` accepts."""
        params = [q for g in self.param_groups for q in g["params"]]
        self._param_indices = {id(p): i for i, p in enumerate(params)}
        self._param_shapes = [tuple(p.shape) for p in params]

    def _validate_group(self, group: dict) -> None:
        check_group(group)
        if any(is_dtensor(p) for p in group["params"]):
            check_sharded_group(group, type(self).__name__)
        if group["state_bits"] == 8:
            if not self.rule.capabilities.eight_bit:
                raise ValueError(f"Invalid state_bits: 8 ({type(self).__name__} keeps no 8-bit states: "
                                 f"{self.rule.capabilities.reason})")
            require_bitsandbytes()
        if not self.rule.uses_projector:
            self._refuse_subspace_options({"projector": group["projector"], "moments": group["moments"]})
        else:
            check_choice("moments", group["moments"], MOMENT_POLICIES)
            if group["projector"] not in self._projectors:
                check_choice("projector", group["projector"], PROJECTORS)
                self._register_projector(group["projector"])
        if "rank" in group:
            self.rule.validate_group(group)

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"Invalid parameter: a tensor of shape {tuple(p.shape)} is not in this optimizer")

    @staticmethod
    def _projected(p: Tensor, group: dict) -> bool:
        return "rank" in group and matrix_shape(p) is not None

    def _context(self, p: Tensor, group: dict, layout=None) -> MatrixContext:
        """What the rule may know about ``p`` (:class:`~slimtrain.optimizers.rule.MatrixContext`); ``layout``: where
        it lives (default: wholly here, as ``p`` is)."""
        projector = self._projectors[group["projector"]] if self.rule.uses_projector else None
        return MatrixContext(self._param_indices.get(id(p)), self.seed, projector, self.param_groups, layout)

    def _rounding(self, p: Tensor, group: dict) -> RoundingStream | None:
        """``p``'s stochastic-rounding stream where its updates are rounded stochastically; ``None`` elsewhere, and
        for a tensor that is not one of the optimizer's parameters (a ZeRO shard, which the apply refuses)."""
        if not rounds_stochastically(p, group) or p not in self.state:
            return None
        return RoundingStream(self.state[p], parameter_seed(self.seed, self._param_indices[id(p)]))

    # ------------------------------------------------------------------------------------------
    # The declared state
    def state_spec(self, p: Tensor, group: dict | None = None, *, dtype: torch.dtype | None = None) -> list[Slot]:
        """The state ``p`` holds after its first step, as declared by the rule (or plain AdamW) that steps it:
        keys, shapes, dtypes, host or device, kind (:mod:`slimtrain.optimizers.state`). Needs nothing but shapes:
        ``p`` may live on the meta device. ``dtype`` declares it for ``p`` in another dtype (a bf16 weight keeps a
        stochastic-rounding stream where its group asks for one)."""
        group = self._group_of(p) if group is None else group
        dtype = p.dtype if dtype is None else dtype
        if not self._projected(p, group):
            return counters("step") + moment_slots(group, ADAM, p.shape) + rounding_slots(dtype, group)
        rounding = rounding_slots(dtype, group) if self.rule.stochastic_rounding else []
        return self.rule.state_spec(p, group, self._context(p, group)) + rounding

    def state_host_keys(self, p: Tensor, group: dict) -> set[str]:
        """The keys of ``p``'s state kept on the host, in any phase of it: what ``load_state_dict`` (and the ZeRO
        wrapper's) put back on the CPU. From shapes alone."""
        rule = self.rule.host_keys(p, group, self._context(p, group)) if self._projected(p, group) else set()
        return rule | host_keys(self.state_spec(p, group)) | host_keys(ROUNDING)

    # ------------------------------------------------------------------------------------------
    # The step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(id(p) not in self._param_indices for _, p in work):
            self._adopt_swapped()
        for _, p in work:
            check_grad(p)
        if not self._grads_finite([p.grad for _, p in work]):
            if self.nonfinite == "raise":
                raise FloatingPointError("Non-finite gradient (NaN or inf); no parameter or state was changed")
            self.skipped_steps += 1
            logger.warning("Skipped an optimizer step with a non-finite gradient (%d so far)", self.skipped_steps)
            return loss
        self.rule.prepare_step(self.param_groups, self.state, self.seed)
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
        check_grad(p)
        if not self._grads_finite([p.grad]):
            if self.nonfinite == "raise":
                raise FloatingPointError(f"Non-finite gradient for a parameter of shape {tuple(p.shape)}")
            self.skipped_steps += 1
            logger.warning("Skipped a parameter update with a non-finite gradient (%d so far)", self.skipped_steps)
            return False
        self._step_one(p, group)
        return True

    def _step_one(self, p: Tensor, group: dict) -> None:
        if is_dtensor(p):  # FSDP2: this rank's piece of it (dtensor.py)
            self._fsdp().step(p, group)
            return
        state = self.state[p]
        grad = descent(p.grad, group["maximize"])
        rounding = self._rounding(p, group)
        if not self._projected(p, group):
            direction, step_size = self._dense_update(grad.float(), group, state)
            apply_(p, group, direction, step_size, rounding)
            return
        update = self.rule.update(p, grad.reshape(matrix_shape(p)), group, state, self._context(p, group))
        update.apply_(p, group, rounding)

    def _grads_finite(self, grads: list[Tensor]) -> bool:
        """Whether every gradient is finite; under FSDP2, whether every rank's pieces are (every rank agrees)."""
        sharded = any(is_dtensor(g) for g in grads)
        grads = [g.to_local() if is_dtensor(g) else g for g in grads]
        finite = True
        if grads:
            # One reduction per tensor and a single host sync. A sum of finite values that overflows fp32
            # reads as non-finite too; a gradient that large is broken anyway, and skipping is safe.
            sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
            finite = bool(torch.isfinite(sums).all())
        return self._fsdp().all_ranks(finite, grads[0].device) if sharded else finite

    @staticmethod
    def _dense_update(grad: Tensor, group: dict, state: dict, moments=None) -> tuple[Tensor, float]:
        """Plain AdamW on any fp32 descent direction (of a whole parameter or a shard of one): returns the
        direction and its step size. Creates the state on first use, in ``moments``' storage (default: whole, of
        ``grad``'s shape; an FSDP2 rank's piece:
        :meth:`~slimtrain.optimizers.shard_layout.ShardedMatrix.dense_moments`)."""
        moments = WholeMoments(grad.shape) if moments is None else moments
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)
            moments.init(state, group, ADAM, grad.device)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        direction = moments.adam_direction(state, group, grad)
        return direction, adam_step_size(group_lr(group), beta1, beta2, int(state["step"]))

    # Entry points for a wrapper that steps pieces of parameters (slimtrain.sharding.zero: ZeRO hands each
    # rank flat slices, and one owner rank the whole gradient of each projected matrix) ------------------
    def step_dense_shard_(self, shard: Tensor, grad: Tensor, group: dict, state: dict) -> None:
        """AdamW with the group's weight decay on ``shard`` (an fp32 slice of an unprojected parameter, or
        of a vector in a projected group) from its gradient ``grad``; ``state`` holds the slice's moments
        (created on first use). The same arithmetic as a whole parameter's step."""
        direction, step_size = self._dense_update(descent(grad, group["maximize"]), group, state)
        apply_(shard, group, direction, step_size, self._rounding(shard, group))

    def matrix_update(self, p: Tensor, grad: Tensor, group: dict, state: dict) -> Tensor:
        """The step of the projected matrix parameter ``p`` from its whole gradient ``grad`` (``m x n``) as an
        update in weight units, ``p`` untouched: subtract it, or the slices of it each rank holds, with
        :meth:`apply_update_`. The rule's own entry point, the one a single process calls; ``state`` is the
        matrix's state, created on first use with ``p``'s seed, wherever ``state`` is kept."""
        if not self.rule.capabilities.shardable:
            raise RuntimeError(f"{type(self).__name__} cannot step a matrix from a gathered gradient: "
                               f"{self.rule.capabilities.reason}")
        # The whole matrix's shape from its gradient: ZeRO-3's own parameter holds an empty placeholder here.
        ctx = self._context(p, group, WholeMatrix(grad.shape))
        update = self.rule.update(p, descent(grad, group["maximize"]), group, state, ctx)
        if isinstance(update, DenseUpdate) and update.direction is None:
            return torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        return update.materialize()

    def apply_update_(self, shard: Tensor, group: dict, update: Tensor) -> None:
        """``shard <- shard - update`` with the group's decoupled weight decay (``update`` from
        :meth:`matrix_update`, or the slice of it that matches ``shard``)."""
        apply_(shard, group, update, 1.0, self._rounding(shard, group))
