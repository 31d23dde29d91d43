"""Sparse Spectral Training as the paper runs it (Zhao et al., ICML 2025, arXiv:2405.15481): the weight
is *replaced* by its singular factors, and only the sampled singular vectors carry gradients and state.

When to use this rather than :class:`~slimtrain.optimizers.sst.SSTAdamW`: when the point is memory.
``SSTAdamW`` keeps ``U``, ``Σ``, ``V`` as optimizer state beside the weight (state about 1.2x AdamW's);
here the model holds the factors *instead of* the weight, and a step needs gradients and Adam moments
for ``Σ`` and the ``r`` sampled vector pairs only. For an ``m x n`` matrix, ``d = min(m, n)``:

======================  =====================  ======================================
                        AdamW                  spectral SST
======================  =====================  ======================================
weights                 ``m n``                ``(m + n) d + d`` (factors)
gradients               ``m n``                ``(m + n) r + d``
optimizer state         ``2 m n``              ``2 (m + n) r + 2 d``
======================  =====================  ======================================

so at ``r = d / 4`` a square matrix needs ``3.5 n^2`` floats against AdamW's ``4 n^2`` (0.875x), and a
``4 : 1`` rectangle ``8.75 n^2`` against ``16 n^2`` (0.55x); ``benchmarks/results/sst_memory.md`` measures whole models.

Three pieces:

- :class:`SpectralLinear`: ``y = U diag(Σ) Vᵀ x + b``. The ``r`` sampled columns of ``U`` and ``V``
  (``u_active``, ``v_active``) and all of ``Σ`` are parameters; the other ``d - r`` columns are
  buffers (``u_frozen``, ``v_frozen``), so autograd never builds their gradients.
- :func:`to_spectral` / :func:`merge_spectral`: module surgery, ``nn.Linear`` to ``SpectralLinear``
  (exact up to the SVD's rounding) and back.
- :class:`SpectralSSTAdamW`: Adam on ``Σ`` every step, Adam on the sampled vectors, renormalized;
  every ``update_proj_gap`` steps (one *iteration*) a new sample, and every ``iterations_per_round``
  iterations (one *round*, default ``ceil(d / r)``) a re-SVD of ``U diag(Σ) Vᵀ``.

It implements the paper's description. Two choices the paper leaves open are made here and documented where
they are made: Adam's moments for ``Σ`` restart at every re-SVD (its coordinates are new), and the ``r``
vectors of a sample are drawn without replacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..kernels.adam import adam_direction_, adam_direction_reference
from ._validation import DROP_IN_OPTIONS, check_betas, check_int, check_lr, check_nonneg
from .functional import adam_step_size, closure_loss
# The layer side, re-exported: this module is where users meet spectral SST.
from .spectral_layers import (  # noqa: F401
    SpectralLinear,
    _compute_dtype,
    _SpectralProduct,
    merge_spectral,
    sample_spectrum,
    to_spectral,
)
from .state import counters, host_keys
from .updates import group_lr

# Integer bookkeeping scalars stay on the CPU so reading them never synchronizes a GPU.
_HOST_KEYS = host_keys(counters("step", "iters"))


class SpectralSSTAdamW(torch.optim.Optimizer):
    r"""The SST optimizer for a model converted by :func:`to_spectral`; AdamW for its other parameters.

    For every :class:`SpectralLinear`, each step, with :math:`\eta` the group's lr and Adam's
    bias-corrected direction :math:`\mathrm{Adam}(\cdot)`:

    .. math::
        \Sigma \leftarrow \max\big(0,\ (1 - \eta\lambda)\Sigma - \eta\,\mathrm{Adam}(\nabla\Sigma)\big), \quad
        U_S \leftarrow \mathrm{normalize}\big(U_S - \eta\,\mathrm{Adam}(G V_S)\big), \quad
        V_S \leftarrow \mathrm{normalize}\big(V_S - \eta\,\mathrm{Adam}(G^\top U_S)\big)

    (all singular values every step, only the sampled pairs ``S``; columns renormalized to unit length;
    weight decay :math:`\lambda` on :math:`\Sigma` only, which is decay of ``W``). After every
    ``update_proj_gap`` steps (an iteration) a new ``S`` is drawn and the vectors' moments restart; after
    every ``iterations_per_round`` iterations (a round) the layer is re-SVD'd first and ``Σ``'s moments
    restart too, since the new singular values are new coordinates (the paper does not say what its
    code does here). Memory: moments for ``Σ`` (``2 d``) and the sampled vectors (``2 r (m + n)``)
    only, see the module docstring.

    The paper restarts a 20-step lr warm-up at each iteration (Appendix F, machine translation); that is
    the scheduler's business and not done here. Non-finite gradients are not skipped (as torch's AdamW).

    Args:
        model: a model with :class:`SpectralLinear` layers (:func:`to_spectral`); its other trainable
            parameters get AdamW in a second group.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-8, 0).
        update_proj_gap: steps per iteration, between resamples (default 200, the paper's T3).
        iterations_per_round: iterations between re-SVDs (default None: ``ceil(d / r)`` per layer, the
            paper's choice, so each vector is sampled about once per round).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, update_proj_gap: int = 200,
                 iterations_per_round: int | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (expected an nn.Module converted by to_spectral)")
        check_lr(lr)
        check_betas(betas)
        check_nonneg("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        check_int("update_proj_gap", update_proj_gap, minimum=1)
        if iterations_per_round is not None:
            check_int("iterations_per_round", iterations_per_round, minimum=1)
        layers = [m for m in model.modules() if isinstance(m, SpectralLinear)]
        if not layers:
            raise ValueError("Invalid model: it has no SpectralLinear layer (convert it with to_spectral first)")
        spectral = [p for m in layers for p in (m.s, m.u_active, m.v_active)]
        ids = {id(p) for p in spectral}
        plain = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self._layers = layers
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        update_proj_gap=update_proj_gap, iterations_per_round=iterations_per_round)
        super().__init__(([{"params": plain}] if plain else []) + [{"params": spectral, "spectral": True}], defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch's __setstate__ adds its 'differentiable' flag to the defaults: copied into the groups below, a load
        # would change the state dict it loaded.
        for k in set(self.defaults) & set(DROP_IN_OPTIONS):
            del self.defaults[k]
        for group in self.param_groups:  # a state dict without an option gets its default
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts every state tensor but `step` to its parameter's dtype: restore the saved dtypes
        # (int64 counters, fp32 moments of bf16 factors).
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, entries in saved.items():
            p = params[pid]
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    device = "cpu" if key in _HOST_KEYS else p.device
                    self.state[p][key] = value.to(device=device, dtype=value.dtype, copy=True)

    def state_bytes(self) -> int:
        """Bytes of every tensor held in optimizer state."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, Tensor))

    @staticmethod
    def _init_moments(state: dict, p: Tensor) -> None:
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["exp_avg"] = torch.zeros_like(p, dtype=_compute_dtype(p))
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=_compute_dtype(p))

    @staticmethod
    def _restart(state: dict) -> None:
        state["step"].zero_()
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()

    def _adam(self, p: Tensor, group: dict) -> tuple[Tensor, float]:
        state = self.state[p]
        if not state:
            self._init_moments(state, p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        # fp32 moments go through the dispatched kernel; fp64 ones (fp64 factors) through its reference,
        # since the kernel keeps optimizer state in fp32 only.
        adam = adam_direction_ if state["exp_avg"].dtype == torch.float32 else adam_direction_reference
        direction = adam(p.grad.to(state["exp_avg"].dtype), state["exp_avg"], state["exp_avg_sq"],
                         beta1, beta2, group["eps"])
        return direction, adam_step_size(group_lr(group), beta1, beta2, int(state["step"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            if group.get("spectral"):
                for layer in self._layers:
                    if layer.s.grad is not None:
                        self._step_layer(layer, group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction, size = self._adam(p, group)
                target = p.to(direction.dtype)
                if group["weight_decay"]:
                    target.mul_(1.0 - group_lr(group) * group["weight_decay"])
                p.copy_(target.add_(direction, alpha=-size))
        return loss

    def _step_layer(self, layer: SpectralLinear, group: dict) -> None:
        s_state = self.state[layer.s]
        direction, size = self._adam(layer.s, group)
        s_state.setdefault("iters", torch.zeros((), dtype=torch.int64))
        s_state["iters"] += 1
        s = layer.s.to(direction.dtype)
        if group["weight_decay"]:
            s.mul_(1.0 - group_lr(group) * group["weight_decay"])
        layer.s.copy_(s.add_(direction, alpha=-size).clamp_(min=0))
        for p in (layer.u_active, layer.v_active):
            if p.grad is None:
                continue
            direction, size = self._adam(p, group)
            cols = p.to(direction.dtype).add_(direction, alpha=-size)
            p.copy_(cols.div_(cols.norm(dim=0, keepdim=True).clamp_min(1e-12)))
        iters = int(s_state["iters"])
        gap = group["update_proj_gap"]
        if iters % gap:
            return
        per_round = group["iterations_per_round"] or math.ceil(layer.d / layer.rank)
        if (iters // gap) % per_round == 0:
            layer.resvd_()  # draws the next sample too
            self._restart(s_state)
        else:
            layer.resample_()
        for p in (layer.u_active, layer.v_active):  # new vectors: their moments start over
            if self.state[p]:
                self._restart(self.state[p])
