"""The layer side of spectral SST (see :mod:`slimtrain.optimizers.spectral`): :class:`SpectralLinear`, its
autograd product, the sampling of singular vectors, and the module surgery to and from ``nn.Linear``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _seeds
from ._validation import check_bool, check_int, check_rank_for_shape, check_unit_interval
from .groups import _LINEAR_TYPES, _matches


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 factors are trained in fp64 (the exactness tests); everything else in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sample_spectrum(s: Tensor, rank: int, uniform_mix: float, generator: torch.Generator) -> Tensor:
    r"""``rank`` distinct indices drawn from a multinomial with :math:`p_i \propto \Sigma_i`, mixed with
    ``uniform_mix`` of the uniform distribution (0: the paper's :math:`p \propto \Sigma`), sorted.

    Drawn on the CPU in fp64 so that every device and dtype draws the same set from the same seed."""
    probs = s.detach().double().cpu().clamp(min=0)
    total = probs.sum()
    probs = probs / total if total > 0 else torch.full_like(probs, 1.0 / probs.numel())
    probs = (1.0 - uniform_mix) * probs + uniform_mix / probs.numel()
    # Without replacement multinomial needs `rank` nonzero weights; a zero singular value can still be
    # drawn, last, with a weight 1e-30 below every other.
    probs = probs + (probs == 0) * 1e-30
    return torch.multinomial(probs, rank, replacement=False, generator=generator).sort().values


def _rows(t: Tensor) -> Tensor:
    """``t`` as a matrix of its last dimension (any leading shape, none included; zero columns allowed)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class _SpectralProduct(torch.autograd.Function):
    r"""``x -> U diag(Σ) Vᵀ x`` over the active/frozen split, with SST's gradients.

    :math:`\nabla \Sigma` and :math:`\nabla x` are the chain rule's. For the active vectors the paper's
    *enhanced* gradients :math:`G V_S` and :math:`G^\top U_S` (``enhanced=True``) drop the chain rule's
    factor :math:`\Sigma_i`, so vectors of small singular values still move; computing them here costs
    nothing extra, where dividing autograd's gradient by :math:`\Sigma_i` would fail at :math:`\Sigma_i = 0`.
    """

    @staticmethod
    def forward(ctx, x, s, u_a, v_a, u_f, v_f, a_idx, f_idx, enhanced):
        s_a, s_f = s[a_idx], s[f_idx]
        xa, xf = x @ v_a, x @ v_f
        y = (xa * s_a) @ u_a.T + (xf * s_f) @ u_f.T
        ctx.save_for_backward(x, xa, xf, s, u_a, v_a, u_f, v_f, a_idx, f_idx)
        ctx.enhanced = enhanced
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        # Under autocast the forward's products (and so dy) may be bf16 while the factors are fp32: the
        # backward runs in dy's dtype, and autograd casts each gradient back to its input's dtype.
        x, xa, xf, s, u_a, v_a, u_f, v_f = (t.to(dy.dtype) for t in saved[:8])
        a_idx, f_idx = saved[8:]
        s_a, s_f = s[a_idx], s[f_idx]
        dya, dyf = dy @ u_a, dy @ u_f
        grad_x = grad_s = grad_u = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = (dya * s_a) @ v_a.T + (dyf * s_f) @ v_f.T
        if ctx.needs_input_grad[1]:
            grad_s = torch.zeros_like(s)
            grad_s.index_copy_(0, a_idx, _rows(dya * xa).sum(0))
            grad_s.index_copy_(0, f_idx, _rows(dyf * xf).sum(0))
        if ctx.needs_input_grad[2]:
            ka = xa if ctx.enhanced else xa * s_a
            grad_u = _rows(dy).T @ _rows(ka)
        if ctx.needs_input_grad[3]:
            ka = dya if ctx.enhanced else dya * s_a
            grad_v = _rows(x).T @ _rows(ka)
        return grad_x, grad_s, grad_u, grad_v, None, None, None, None, None


class SpectralLinear(nn.Module):
    r"""A linear layer held as its singular factors: :math:`y = U \operatorname{diag}(\Sigma) V^\top x + b`.

    ``U`` is ``out_features x d`` and ``V`` is ``in_features x d`` with ``d = min(in, out)``. Column
    ``j`` of ``u_active``/``v_active`` is singular vector ``active_idx[j]`` (its value ``s[active_idx[j]]``);
    the same for the frozen buffers and ``frozen_idx``. :meth:`resample_` moves columns between the two
    in place, so the parameter objects (and an optimizer's references to them) never change.

    Build one with :meth:`from_linear` or :func:`to_spectral`; the first sample is drawn there.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: number of sampled singular vector pairs, ``1 <= rank <= min(in, out)``.
        bias: whether the layer has a bias (default True).
        uniform_mix: fraction of uniform probability mixed into the sampling distribution (default 0:
            the paper's :math:`p \propto \Sigma`).
        enhanced_grad: give the active vectors the paper's enhanced gradients (default True); False
            gives the chain rule's (what autograd of the dense product gives).
        seed: this layer's sampling seed (default 0).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 uniform_mix: float = 0.0, enhanced_grad: bool = True, seed: int = 0, device=None, dtype=None):
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        check_rank_for_shape(rank, torch.Size((out_features, in_features)))
        check_unit_interval("uniform_mix", uniform_mix)
        check_bool("enhanced_grad", enhanced_grad)
        check_int("seed", seed, minimum=0)
        kw = dict(device=device, dtype=dtype)
        d = min(in_features, out_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.uniform_mix, self.enhanced_grad = uniform_mix, enhanced_grad
        self.s = nn.Parameter(torch.zeros(d, **kw))
        self.u_active = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.v_active = nn.Parameter(torch.zeros(in_features, rank, **kw))
        self.register_buffer("u_frozen", torch.zeros(out_features, d - rank, **kw))
        self.register_buffer("v_frozen", torch.zeros(in_features, d - rank, **kw))
        self.register_buffer("active_idx", torch.arange(rank, device=device))
        self.register_buffer("frozen_idx", torch.arange(rank, d, device=device))
        # The sampling stream: seed and draws so far, saved with the model so a resumed run draws the same.
        self.register_buffer("sample_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("sample_draws", torch.zeros((), dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **kwargs) -> SpectralLinear:
        """The spectral form of ``linear``: its SVD (in fp32, fp64 for an fp64 weight), first sample drawn."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        u, s, vh = torch.linalg.svd(w.to(_compute_dtype(w)), full_matrices=False)
        with torch.no_grad():
            layer.s.copy_(s)
            layer.resample_(u, vh.T)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def d(self) -> int:
        return self.s.numel()

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, Σ, V)`` in singular-value order, in the compute dtype (a copy, not a view)."""
        dt = _compute_dtype(self.s)
        u = self.s.new_empty(self.out_features, self.d, dtype=dt)
        v = self.s.new_empty(self.in_features, self.d, dtype=dt)
        u[:, self.active_idx], u[:, self.frozen_idx] = self.u_active.detach().to(dt), self.u_frozen.to(dt)
        v[:, self.active_idx], v[:, self.frozen_idx] = self.v_active.detach().to(dt), self.v_frozen.to(dt)
        return u, self.s.detach().to(dt), v

    def merged_weight(self) -> Tensor:
        """``U diag(Σ) Vᵀ`` (``out x in``) in the layer's dtype."""
        u, s, v = self.factors()
        return ((u * s) @ v.T).to(self.s.dtype)

    @torch.no_grad()
    def resample_(self, u: Tensor | None = None, v: Tensor | None = None) -> Tensor:
        """Draw the next ``rank`` active vectors (:func:`sample_spectrum` on ``Σ``) and move the columns
        in place. ``u``/``v`` (full factors in singular-value order) replace the current ones: the
        re-SVD path. Returns the new ``active_idx``."""
        if u is None or v is None:
            u, _, v = self.factors()
        gen = _seeds.generator(_seeds.sst_draw_seed(int(self.sample_seed), int(self.sample_draws)))
        active = sample_spectrum(self.s, self.rank, self.uniform_mix, gen).to(self.active_idx.device)
        keep = torch.ones(self.d, dtype=torch.bool, device=active.device)
        keep[active] = False
        frozen = keep.nonzero().flatten()
        self.active_idx.copy_(active)
        self.frozen_idx.copy_(frozen)
        self.sample_draws += 1
        self.u_active.copy_(u[:, active])
        self.v_active.copy_(v[:, active])
        self.u_frozen.copy_(u[:, frozen])
        self.v_frozen.copy_(v[:, frozen])
        return active

    @torch.no_grad()
    def resvd_(self) -> None:
        """End of a round: ``U, Σ, V = SVD(U diag(Σ) Vᵀ)``, restoring orthonormal factors (the sampled
        vectors drift from orthogonality between re-SVDs), then a new sample."""
        u, s, v = self.factors()
        u, s, vh = torch.linalg.svd((u * s) @ v.T, full_matrices=False)
        self.s.copy_(s)
        self.resample_(u, vh.T)

    def forward(self, x: Tensor) -> Tensor:
        y = _SpectralProduct.apply(x, self.s, self.u_active, self.v_active, self.u_frozen, self.v_frozen,
                                   self.active_idx, self.frozen_idx, self.enhanced_grad)
        return y if self.bias is None else y + self.bias

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing ``merged_weight() x + b``."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.s.device, dtype=self.s.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, uniform_mix={self.uniform_mix}, enhanced_grad={self.enhanced_grad}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_spectral(model: nn.Module, target_modules: str | list[str], rank: int, *, seed: int = 0,
                uniform_mix: float = 0.0, enhanced_grad: bool = True) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose name matches ``target_modules`` by its
    :class:`SpectralLinear` (exact up to the SVD's rounding), and return ``model``.

    Args:
        target_modules: as :func:`~slimtrain.optimizers.low_rank_param_groups`: a list of substrings, a
            regular expression, or ``"all-linear"`` (every linear layer but an output head).
        rank: sampled vector pairs per layer; must be ``<= min(in, out)`` of every targeted layer.
        seed: base sampling seed; layer ``k`` (in ``named_modules`` order) uses ``seed * 1_000_003 + k``.
        uniform_mix, enhanced_grad: see :class:`SpectralLinear`.

    Raises:
        ValueError: no linear layer matches, or ``rank`` does not fit a targeted layer (named).
    """
    if isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"Invalid target_modules: {target_modules!r} (expected a list of strings, a regex or 'all-linear')")
    check_int("rank", rank, minimum=1)
    check_int("seed", seed, minimum=0)
    exclude = ("lm_head", "classifier", "score") if target_modules == "all-linear" else ()
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, SpectralLinear) and _matches(name, target_modules)
               and not any(e in name for e in exclude)]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)][:8]
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} matches no nn.Linear of the model "
            f"(linear layers include: {', '.join(linear_names) or 'none'})"
        )
    for name, linear in targets:  # check every layer before replacing any
        shape = linear.weight.shape
        if rank > min(shape):
            raise ValueError(f"Invalid rank: {rank} (expected 1 <= rank <= {min(shape)} for layer {name!r} "
                             f"of shape {tuple(shape)})")
    for k, (name, linear) in enumerate(targets):
        _replace(model, name, SpectralLinear.from_linear(
            linear, rank, seed=_seeds.parameter_seed(seed, k), uniform_mix=uniform_mix, enhanced_grad=enhanced_grad))
    return model


def merge_spectral(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`SpectralLinear` of ``model`` by its ``nn.Linear``; return ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SpectralLinear):
            if not name:
                raise ValueError("Invalid model: a bare SpectralLinear (call its to_linear() instead)")
            _replace(model, name, m.to_linear())
    return model
