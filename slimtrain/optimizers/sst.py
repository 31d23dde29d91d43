"""Sparse Spectral Training (Zhao et al., ICML 2025, arXiv:2405.15481), in drop-in optimizer form."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._seeds import generator, sst_draw_seed
from ._validation import check_int, check_unit_interval
from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .functional import adam_step_size, sst_factor_grads
from .layout import WholeMoments
from .projectors import Projector
from .registry import register_method
from .rule import Capabilities, MatrixContext, StepRule, check_rank_fits, matrix_shape
# The paper's form (the weight replaced by its factors, state for the sampled vectors only), exported here too.
from .spectral import SpectralLinear, SpectralSSTAdamW, merge_spectral, sample_spectrum, to_spectral  # noqa: F401
from .state import Slot, adam_moments, counters, moment_slots, projector_slot
from .updates import RoundingStream, Update, group_lr

# Adam's moments for the singular values and for the sampled columns of U and V.
MOMENTS = {"s": adam_moments("_s"), "u": adam_moments("_u"), "v": adam_moments("_v")}


@dataclass
class Rewrite(Update):
    """SST's step: the weight rebuilt from its updated factors, written over the parameter (this process's piece
    of it under FSDP2); or, with ``weight`` None (a step at lr 0), the parameter left as it is. ``key`` names the
    parameter in the rule's record of what it wrote."""

    rule: SSTRule
    weight: Tensor | None
    key: int

    def apply_(self, p: Tensor, group: dict, rounding: RoundingStream | None) -> None:
        if self.weight is not None:
            p.copy_(self.weight.reshape(p.shape))
        self.rule.written[self.key] = (p.data_ptr(), p._version)

    def materialize(self) -> Tensor:
        raise RuntimeError(SSTRule.capabilities.reason)


class SSTRule(StepRule):
    """Adam on all singular values and on ``r`` sampled singular vector pairs of the weight, resampled every
    ``update_proj_gap`` steps, re-SVD every ``iterations_per_round`` samples; the weight is rewritten from the
    factors at each step.

    Under FSDP2 each rank holds the rows of the factor on the weight's split side (``U`` for rows, ``V`` for
    columns) and of its moments; ``Σ``, the other factor and their moments are kept whole on every rank, each
    rank updating them identically from all-reduced gradients, and a decomposition gathers the weight to one
    rank, which broadcasts the factors."""

    name = "sst"
    options = ("iterations_per_round", "uniform_mix")
    capabilities = Capabilities(shardable=False, layerwise=True, reason=(
        "SSTAdamW rewrites whole weights from their singular factors, which ZeRO (stage >= 1) shards; use stage "
        "0, or GaLoreAdamW, FiraAdamW, FrugalAdamW or DCTAdamW"))
    stochastic_rounding = False
    uses_projector = False
    no_projector_reason = "samples the weight's own singular vectors"

    def __init__(self):
        self.written: dict[int, tuple[int, int]] = {}

    # A weight written outside the optimizer ----------------------------------------------------
    # Each step rebuilds W from the factors, so a write between steps (model.load_state_dict, zero_(),
    # nn.init) would be undone. After writing W the optimizer records its storage and version counter:
    # every in-place write through the parameter bumps the counter, and replacing `.data` changes the
    # storage, so the check costs nothing per step. A checksum would read all of W every step and, on a
    # GPU, synchronize to compare it on the host. (A write through `p.data.<op>_()` escapes the counter,
    # as it escapes autograd.) Counters are per process: without a record (after load_state_dict or a
    # copy) W is compared once with the factors, within the rounding of the product that wrote it: a resume
    # on another processor (whose matrix product rounds its last bits differently) continues the saved round,
    # while a weight written with anything else (another checkpoint, an initializer) starts a new one.
    def validate_group(self, group: dict) -> None:
        check_rank_fits(group)  # the sampled vector pairs

    def forget_tensors(self) -> None:
        self.written.clear()

    def __getstate__(self) -> dict:
        return {**vars(self), "written": {}}  # tensor addresses and version counters are per process

    @staticmethod
    def _keys(transposed: bool) -> tuple[str, str, str, str]:
        """The state keys of the factor whose rows a process holds and of the other one, and their moments'."""
        return ("sst_v", "sst_u", "v", "u") if transposed else ("sst_u", "sst_v", "u", "v")

    @staticmethod
    def _matches_factors(p: Tensor, state: dict) -> bool:
        """Whether ``p`` (this process's piece of the weight: ``sst_u`` holds its rows, or ``sst_v`` its columns) is
        the product of its factors as some processor rounds it. Each element of
        ``(U * S) @ V.T`` is a length-d dot product, off by at most gamma_d = d u / (1 - d u) times the same product
        of absolute values (Higham, Accuracy and Stability, 3.1; u = 2^-24); the weight that was written and the
        product computed here may each be that far off, and a weight stored in a lower precision also carries its
        own rounding (at most one unit of ``p``'s dtype at the element's size)."""
        u, s, v = state["sst_u"], state["sst_s"], state["sst_v"]
        rebuilt = ((u * s) @ v.T).reshape(p.shape)
        if torch.equal(p, rebuilt.to(p.dtype)):
            return True
        d = s.numel()
        unit = torch.finfo(torch.float32).eps / 2
        gamma = d * unit / (1 - d * unit)
        magnitudes = ((u.abs() * s.abs()) @ v.abs().T).reshape(p.shape)
        allowed = 2 * gamma * magnitudes
        if p.dtype != torch.float32:
            allowed = allowed + torch.finfo(p.dtype).eps * rebuilt.abs()
        return bool(((p.float() - rebuilt).abs() <= allowed).all())

    def _written_elsewhere(self, key: int, piece: Tensor, state: dict, frame) -> bool:
        record = self.written.get(key)
        if record is None:
            changed = not self._matches_factors(piece, state)
        else:
            changed = record != (piece.data_ptr(), piece._version)
        return frame.any(changed, piece.device)  # every process restarts the round, or none

    @staticmethod
    def _decompose(piece: Tensor, group: dict, state: dict, frame, transposed: bool) -> None:
        whole = frame.gather(piece.detach().reshape(piece.shape[0], math.prod(piece.shape[1:])).float())
        if whole is not None:
            u, s, vh = torch.linalg.svd(whole.T if transposed else whole, full_matrices=False)
            u, v = u.contiguous(), vh.T.contiguous()
        else:
            m, n = frame.shape[::-1] if transposed else frame.shape
            d = min(m, n)
            u, s, v = (torch.empty(m, d, device=piece.device), torch.empty(d, device=piece.device),
                       torch.empty(n, d, device=piece.device))
        frame.broadcast([u, s, v])
        a_key, b_key, _, _ = SSTRule._keys(transposed)
        a, b = (v, u) if transposed else (u, v)
        start, stop = frame.rows
        state[a_key] = a if (start, stop) == (0, a.shape[0]) else a[start:stop].clone()
        state["sst_s"], state[b_key] = s, b
        frame.keep_rows(a_key, tuple(a.shape))
        WholeMoments((s.numel(),)).init(state, group, MOMENTS["s"], piece.device)
        state["step"] = torch.zeros((), dtype=torch.int64)

    @staticmethod
    def _resample(group: dict, state: dict, frame, transposed: bool) -> None:
        s = state["sst_s"]
        rank = group["rank"]
        k = int(state["sst_draws"])
        gen = generator(sst_draw_seed(int(state["sst_seed"]), k))
        state["sst_idx"] = sample_spectrum(s, rank, group["uniform_mix"], gen).to(s.device)
        state["sst_draws"].fill_(k + 1)
        _, b_key, a_name, b_name = SSTRule._keys(transposed)
        stores = {a_name: frame.moments(rank), b_name: WholeMoments((state[b_key].shape[0], rank))}
        for name in ("u", "v"):
            stores[name].init(state, group, MOMENTS[name], s.device)
        state["vec_step"] = torch.zeros((), dtype=torch.int64)

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> Rewrite:
        gap = group["update_proj_gap"]
        layout = ctx.layout_for(p)
        transposed, frame = layout.split_rows()
        piece = layout.piece(p)
        if not state:
            state["iters"] = torch.zeros((), dtype=torch.int64)
            state["sst_draws"] = torch.zeros((), dtype=torch.int64)
            state["sst_seed"] = torch.tensor(ctx.param_seed, dtype=torch.int64)
            self._decompose(piece, group, state, frame, transposed)
        elif self._written_elsewhere(id(p), piece, state, frame):
            # The factors describe a weight that is gone: restart the round from the one written.
            self._decompose(piece, group, state, frame, transposed)
            self._resample(group, state, frame, transposed)
        iters = int(state["iters"])
        if iters % gap == 0:
            d = state["sst_s"].numel()
            per_round = group["iterations_per_round"] or math.ceil(d / group["rank"])
            if iters > 0 and (iters // gap) % per_round == 0:
                self._decompose(piece, group, state, frame, transposed)  # end of round: re-SVD restores orthogonality
            self._resample(group, state, frame, transposed)
        a_key, b_key, a_name, b_name = self._keys(transposed)
        a, s, b, idx = state[a_key], state["sst_s"], state[b_key], state["sst_idx"]
        # In the frame whose rows this process holds: sums over rows are completed across processes.
        grad_s, grad_a, grad_b = sst_factor_grads((grad.T if transposed else grad).float(), a, b, idx)
        grad_s, grad_b = frame.sum_rows(grad_s), frame.sum_rows(grad_b)

        beta1, beta2 = group["betas"]
        lr = group_lr(group)
        state["step"] += 1
        state["vec_step"] += 1
        state["iters"] += 1
        dir_s = WholeMoments(s.shape).adam_direction(state, group, grad_s, MOMENTS["s"])
        if group["weight_decay"]:
            s.mul_(1.0 - lr * group["weight_decay"])
        s.add_(dir_s, alpha=-adam_step_size(lr, beta1, beta2, int(state["step"]))).clamp_(min=0)

        vec_size = adam_step_size(lr, beta1, beta2, int(state["vec_step"]))
        for name, factor, g, store, norms in (
            (a_name, a, grad_a, frame.moments(idx.numel()), frame.column_norms),
            (b_name, b, grad_b, WholeMoments(tuple(b[:, :idx.numel()].shape)), lambda t: t.norm(dim=0, keepdim=True)),
        ):
            direction = store.adam_direction(state, group, g, MOMENTS[name])
            cols = factor.index_select(1, idx).add_(direction, alpha=-vec_size)
            cols.div_(norms(cols).clamp_min(1e-12))
            factor.index_copy_(1, idx, cols)
        # At lr 0 the factors moved only by the renormalization's rounding: rebuilding W from them would move it by
        # that rounding (about 1e-7 of |W|), and a step at lr 0 moves nothing (warm-ups that start at 0, and the
        # zero-lr step torch.distributed.checkpoint takes to create the state of a fresh optimizer).
        if not lr:
            return Rewrite(self, None, id(p))
        weight = (a * s) @ b.T
        return Rewrite(self, weight.T if transposed else weight, id(p))

    def state_spec(self, p: Tensor, group: dict, ctx: MatrixContext) -> list[Slot]:
        m, n = matrix_shape(p)
        d, r = min(m, n), group["rank"]
        return [
            *counters("iters", "sst_draws", "sst_seed", "step", "vec_step"),
            projector_slot("sst_u", (m, d), torch.float32), projector_slot("sst_s", (d,), torch.float32),
            projector_slot("sst_v", (n, d), torch.float32), projector_slot("sst_idx", (r,), torch.int64),
            *moment_slots(group, MOMENTS["s"], (d,)),
            *moment_slots(group, MOMENTS["u"], (m, r)),
            *moment_slots(group, MOMENTS["v"], (n, r)),
        ]

    def describe_state(self, group: dict, projector: Projector | None) -> str:
        return ("SST keeps U (m x d), sigma (d) and V (n x d) in fp32 as state, d = min(m, n), plus moments "
                "for sigma and for the r sampled columns of U and V")


class SSTAdamW(LowRankAdamW):
    r"""Sparse Spectral Training as an optimizer: works from the weight gradient alone.

    SST trains a matrix through its singular factors :math:`W = U \operatorname{diag}(\Sigma) V^\top`.
    Every step updates *all* singular values and a sampled set of ``r`` singular vector pairs; the set
    is resampled every ``update_proj_gap`` steps (one "iteration") from a multinomial with
    probabilities proportional to :math:`\Sigma`, and every ``iterations_per_round`` iterations the
    factors are recomputed by an SVD of the current weight (default ``ceil(min(m, n) / r)``, the
    paper's choice, so each vector is sampled about once per round).

    From :math:`G = \partial L / \partial W`, by the chain rule:

    .. math::
        \nabla \Sigma_i = U_i^\top G V_i, \qquad
        \nabla U_S = G V_S, \qquad \nabla V_S = G^\top U_S

    (the "enhanced" vector gradients of the paper, without the :math:`\Sigma_i` factor), each fed to
    its own Adam; :math:`\Sigma` is clipped at 0 and sampled vectors are renormalized; then the weight
    is rewritten as :math:`U \operatorname{diag}(\Sigma) V^\top`.

    **Memory, honestly.** This form keeps the factors as optimizer state: ``U`` (m x d), ``V`` (n x d),
    ``Σ`` (d), with d = min(m, n), plus Adam moments for Σ (2d) and for the sampled vectors
    (2r(m + n)). For a square matrix that is about ``2 d^2`` floats, the same as AdamW's two moments,
    and each step costs two extra m x n x d matmuls. It gives SST's *training dynamics*; SST's memory
    saving needs the weight itself replaced by its factors (a model re-parametrization), which this
    optimizer does not do. Use GaLore, Fira, FRUGAL or DCT for optimizer-state savings.

    Args:
        iterations_per_round: iterations between re-SVDs (default ``None``: ``ceil(d / r)``).
        uniform_mix: fraction of uniform probability mixed into the sampling distribution
            (default 0, the paper's :math:`p \propto \Sigma`); > 0 guarantees every vector can be drawn.
        Other arguments: see :class:`~slimtrain.optimizers.base.LowRankAdamW`. The group's ``rank`` is
        the number of sampled vector pairs. SST's subspace is the weight's own singular basis, and a
        resample restarts the sampled vectors' moments: ``projector`` and ``moments`` are refused;
        ``scale`` and ``proj_type`` do not apply.
    """

    rule_type = SSTRule

    def __init__(self, params, lr: float = 1e-3, *args, iterations_per_round: int | None = None, uniform_mix: float = 0.0, **kwargs):
        if iterations_per_round is not None:
            check_int("iterations_per_round", iterations_per_round, minimum=1)
        check_unit_interval("uniform_mix", uniform_mix)
        super().__init__(params, lr, *args, iterations_per_round=iterations_per_round, uniform_mix=uniform_mix, **kwargs)


class SSTAdamW8bit(EightBitStates, SSTAdamW):
    """:class:`SSTAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


# SSTAdamW's own lr and the paper's T3 = 200 steps between resamples (scale does not apply).
register_method("sst", SSTAdamW, SSTAdamW8bit, recipe=dict(lr=1e-3, update_proj_gap=200, scale=1.0))
