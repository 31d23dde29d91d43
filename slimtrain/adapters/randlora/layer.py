"""RandLoRA layer. The math lives in free functions (:func:`scaled_bases`, :func:`randlora_delta`) so the
tests can hold them against PEFT's implementation; the layer picks a factored or a dense forward."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.basis_matmul import philox_linear, philox_matmul
from ...kernels.philox import philox_uniform
from ..._seeds import generator, randlora_init_seed, stable_seed
from ..bases import GENERATOR_VERSION, uniform_on_cpu
from ..delta_layer import DeltaLayer, DeltaModule
from .config import RandLoraConfig


class ScaledBases(torch.autograd.Function):
    """A_f[j*r + k, i] = lambda[k, j] * A[k, i] * gamma[j, i]  -> (n*r, d).

    Saves only A, lambda, gamma (r*d + r*n + n*d numbers) instead of the (n, r, d) intermediates autograd
    would keep for the two broadcasted products.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(A, lam, gam)
        out = lam.T[:, :, None] * A[None] * gam[:, None, :]
        return out.reshape(-1, A.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        A, lam, gam = ctx.saved_tensors
        g = grad.reshape(gam.shape[0], A.shape[0], A.shape[1])  # (n, r, d)
        ga = g * A[None]  # shared by both gradients
        grad_lam = (ga * gam[:, None, :]).sum(-1).T  # (r, n)
        grad_gam = (ga * lam.T[:, :, None]).sum(1)  # (n, d)
        return None, grad_lam, grad_gam


def scaled_bases(A: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
    return ScaledBases.apply(A, lam, gam)


class FusedDeltaLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b with dW = make_delta(*params), saving only x and the (small) params.

    Plain autograd through ``F.linear(x, W + dW)`` would keep W + dW (one weight-sized tensor per adapted
    layer) until backward; here backward rebuilds dW (n*r*in*out flops, as in forward) instead. W and b get
    the gradients ``F.linear`` would give them when they require one (a trainable base layer): dL/dW is dL/d(dW).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, make_delta, *params):
        with torch.no_grad():
            w_eff = weight + make_delta(*params)
        ctx.make_delta = make_delta
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *params)
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            delta = ctx.make_delta(*leaves)
        grad_x = grad @ (weight + delta.detach()) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        wanted = [p for p in leaves if p.requires_grad]
        grad_weight = grads = None
        if wanted or ctx.needs_input_grad[1]:
            grad_delta = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # = dL/dW
            grad_weight = grad_delta if ctx.needs_input_grad[1] else None
            grads = iter(torch.autograd.grad(delta, wanted, grad_delta)) if wanted else None
        return (grad_x, grad_weight, grad_bias, None, *[next(grads) if p.requires_grad else None for p in leaves])


def randlora_delta(A, B, lam, gam, scaling: float) -> torch.Tensor:
    """dW (D x d) = scaling * sum_j B[:, j, :] diag(lam[:, j]) A diag(gam[j]).

    Shapes: A (r, d), B (D, n, r), lam (r, n), gam (n, d).
    """
    n, r = B.shape[1], B.shape[2]
    return (B.reshape(B.shape[0], n * r) @ scaled_bases(A, lam, gam)) * scaling


_BOUND = math.sqrt(3.0)  # U(-sqrt(3), sqrt(3)) has variance 1


def _basis_seed(seed: int, part: str, generator_version: int) -> int:
    return stable_seed("randlora", generator_version, seed, part)


def make_bases(seed: int, r: int, d_max: int, D_max: int, n_max: int, *, generator_version: int = GENERATOR_VERSION,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared bases A (r, d_max) and B (D_max, n_max, r), fp32 on ``device``, with unit variance.

    Version 2: U(-sqrt(3), sqrt(3)) from Philox on ``device`` (bit-identical on CPU and GPU; no CPU draw and
    copy). PEFT instead rescales by the empirical std, whose last bits depend on the device's reduction
    order; the exact variance of U(-sqrt(3), sqrt(3)) is 1, and the empirical std differs from it by
    O(1/sqrt(numel)). Version 1 (adapters saved before): U(-1, 1) on a CPU generator over its empirical std.

    With ``cache_bases=False`` the tuner stores only A (:func:`make_basis_A`) and describes B by
    :func:`generated_basis`: the same stream, never materialized.
    """
    A = make_basis_A(seed, r, d_max, generator_version=generator_version, device=device)
    if generator_version == 1:
        B = uniform_on_cpu((D_max, n_max, r), _basis_seed(seed, "B", 1))
        return A, (B / B.std()).to(device)
    return A, generated_basis(seed, r, D_max, n_max).materialize(device).view(D_max, n_max, r)


def make_basis_A(seed: int, r: int, d_max: int, *, generator_version: int = GENERATOR_VERSION,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A of :func:`make_bases` alone (what ``cache_bases=False`` stores)."""
    seed_A = _basis_seed(seed, "A", generator_version)
    if generator_version == 1:
        A = uniform_on_cpu((r, d_max), seed_A)
        return (A / A.std()).to(device)
    return philox_uniform(seed_A, (r, d_max), -_BOUND, _BOUND, device=device)


def generated_basis(seed: int, r: int, D_max: int, n_max: int) -> GeneratedBasis:
    """B of :func:`make_bases` (generator version 2) as a :class:`GeneratedBasis`, never materialized."""
    return GeneratedBasis(_basis_seed(seed, "B", 2), (D_max, n_max * r), _BOUND)


@dataclass(frozen=True)
class GeneratedBasis:
    """RandLoRA's shared B when it is not stored (``cache_bases=False``): the Philox stream of
    :func:`make_bases`' B (D_max, n_max, r), viewed as the (D_max, n_max * r) matrix it is used as. It holds
    no tensor: every product with a leading block ``B_f = B[:rows, :cols]`` runs in a kernel of
    :mod:`slimtrain.kernels.basis_matmul` that generates the tiles it reads, forward and backward."""

    seed: int
    shape: tuple[int, int]
    bound: float

    def linear(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``x @ B_f^T`` (differentiable in ``x``)."""
        return _GeneratedProduct.apply(x, self, rows, cols, False)

    def matmul(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``x @ B_f`` (differentiable in ``x``)."""
        return _GeneratedProduct.apply(x, self, rows, cols, True)

    def product(self, x: torch.Tensor, rows: int, cols: int, adjoint: bool) -> torch.Tensor:
        op = philox_matmul if adjoint else philox_linear
        return op(x, self.seed, self.shape, -self.bound, self.bound, rows=rows, cols=cols)

    def materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole (D_max, n_max * r) matrix in fp32 on ``device``."""
        return philox_uniform(self.seed, self.shape, -self.bound, self.bound, device=device)


class _GeneratedProduct(torch.autograd.Function):
    """``x B_f^T`` (or ``x B_f`` when ``adjoint``) with B_f frozen: the backward is the other product."""

    @staticmethod
    def forward(ctx, x, basis: GeneratedBasis, rows: int, cols: int, adjoint: bool):
        ctx.spec = (basis, rows, cols, adjoint)
        return basis.product(x, rows, cols, adjoint)

    @staticmethod
    def backward(ctx, grad):
        basis, rows, cols, adjoint = ctx.spec
        return basis.product(grad, rows, cols, not adjoint), None, None, None, None


class RandLoraLayer(DeltaLayer):
    adapter_layer_names = ("slimrandlora_lambda", "slimrandlora_gamma", "slimrandlora_magnitude")
    # The shared bases are keyed by adapter name like everything here, so that PEFT's delete_adapter frees
    # them with the adapter and never takes a key of theirs for an adapter name.
    other_param_names = ("slimrandlora_basis_A", "slimrandlora_basis_B", "slimrandlora_generated",
                         "slimrandlora_dropout", "r", "scaling", "forward_mode", "use_dora", "dora_eps")
    magnitude_name = "slimrandlora_magnitude"
    method_name = "slimrandlora"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.forward_mode: dict[str, str] = {}
        self.slimrandlora_lambda = nn.ParameterDict({})
        self.slimrandlora_gamma = nn.ParameterDict({})
        self.slimrandlora_magnitude = nn.ParameterDict({})
        self.slimrandlora_dropout = nn.ModuleDict({})
        self.slimrandlora_basis_A = None  # the tuner's shared, non-persistent BufferDicts {adapter: basis}
        self.slimrandlora_basis_B = None
        self.slimrandlora_generated = None  # the tuner's {adapter: GeneratedBasis} for cache_bases=False
        self.d_small = min(self.in_features, self.out_features)
        self.d_large = max(self.in_features, self.out_features)

    def update_layer(self, adapter_name: str, config: RandLoraConfig, key: str, basis_A=None, basis_B=None,
                     generated=None, inference_mode: bool = False):
        r = config.r
        n = math.ceil(self.d_small / r)
        self.slimrandlora_basis_A, self.slimrandlora_basis_B = basis_A, basis_B
        self.slimrandlora_generated = generated
        A = basis_A[adapter_name]
        B_gen = (generated or {}).get(adapter_name)
        B_shape = tuple(basis_B[adapter_name].shape) if B_gen is None else B_gen.shape
        if A.shape[1] < self.d_small or B_shape[0] < self.d_large or math.prod(B_shape[1:]) < n * r:
            raise ValueError(
                f"Invalid shared bases for {key!r}: A {tuple(A.shape)}, B {B_shape} are smaller than this "
                f"layer needs (d={self.d_small}, D={self.d_large}, n={n}); the tuner sizes them over all targets."
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.randlora_alpha / r
        self.forward_mode[adapter_name] = config.forward_mode
        p = config.randlora_dropout
        self.slimrandlora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        lam = torch.zeros(r, n) if config.init_weights else torch.randn(r, n, generator=generator(
            randlora_init_seed(config.seed))) * 0.1
        self.slimrandlora_lambda[adapter_name] = nn.Parameter(lam)
        self.slimrandlora_gamma[adapter_name] = nn.Parameter(torch.full((n, self.d_small), 1.0 / self.d_large))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._init_dora(adapter_name, config.use_dora, config.dora_eps)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def dropout_for(self, adapter: str) -> nn.Module:
        return self.slimrandlora_dropout[adapter]

    def _basis_A(self, adapter: str, lam: torch.Tensor) -> torch.Tensor:
        return self.slimrandlora_basis_A[adapter][:, : self.d_small].to(lam.device, lam.dtype)

    def _basis_B(self, adapter: str, lam: torch.Tensor) -> torch.Tensor | None:
        """This layer's block of the stored B, (D, n, r) in lam's dtype; None when B is generated."""
        if self.slimrandlora_generated and adapter in self.slimrandlora_generated:
            return None
        return self.slimrandlora_basis_B[adapter][: self.d_large, : lam.shape[1], :].to(lam.device, lam.dtype)

    def _delta(self, adapter: str) -> torch.Tensor:
        """Differentiable dW in (out, in) orientation."""
        return self._delta_from(adapter, self.slimrandlora_lambda[adapter], self.slimrandlora_gamma[adapter])

    def _delta_from(self, adapter: str, lam: torch.Tensor, gam: torch.Tensor) -> torch.Tensor:
        A, B = self._basis_A(adapter, lam), self._basis_B(adapter, lam)
        if B is not None:
            delta = randlora_delta(A, B, lam, gam, self.scaling[adapter])  # (D, d)
            return delta if self.in_features == self.d_small else delta.T
        # generated B: dW^T = A_f^T B_f^T, one product with the generated basis
        B_gen = self.slimrandlora_generated[adapter]
        delta_t = B_gen.linear(scaled_bases(A, lam, gam).T, self.d_large, lam.numel()) * self.scaling[adapter]
        return delta_t.T if self.in_features == self.d_small else delta_t

    def delta_weight(self, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            return self._delta(adapter).float()

    def _use_dense(self, adapter: str, x: torch.Tensor, fused: bool) -> bool:
        """Pick the cheaper path in flops for this call (``forward_mode="auto"``).

        With T tokens, R = n*r, I = in, O = out, counting only what differs between the paths:
        factored  fwd+bwd ~ 2.5 T R (I + O)   (three skinny matmuls over R in backward, two in forward)
        fused     fwd+bwd ~ 3 R I O + T I O   (dW built in forward, rebuilt in backward, backprop to the
                                               factors; plus the grad of dW itself)
        dense     fwd+bwd ~ 2 R I O + 3 T I O (unfused: x dW^T is an extra matmul with its own backward)
        Without autograd (inference) only the forward terms count: T R (I + O) vs R I O (+ T I O unfused).
        """
        mode = self.forward_mode[adapter]
        if mode != "auto":
            return mode == "dense"
        T = x.numel() // self.in_features
        R = self.slimrandlora_lambda[adapter].numel()
        I, O = self.in_features, self.out_features
        training = torch.is_grad_enabled() and self.slimrandlora_lambda[adapter].requires_grad
        if training:
            factored = 2.5 * T * R * (I + O)
            dense = 3 * R * I * O + T * I * O if fused else 2 * R * I * O + 3 * T * I * O
        else:
            factored = T * R * (I + O)
            dense = R * I * O + (0 if fused else T * I * O)
        return dense < factored

    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):
        if want_delta or self._use_dense(adapter, x, fused=False):
            delta = self._delta(adapter)
            return F.linear(x, delta), (delta.detach() if want_delta else None)
        lam, gam = self.slimrandlora_lambda[adapter], self.slimrandlora_gamma[adapter]
        A_f, B = scaled_bases(self._basis_A(adapter, lam), lam, gam), self._basis_B(adapter, lam)
        s, D, R = self.scaling[adapter], self.d_large, lam.numel()
        if B is None:  # generated: x B_f^T and x B_f run in the basis-matmul kernels
            B_gen = self.slimrandlora_generated[adapter]
            if self.in_features == self.d_small:
                return B_gen.linear(F.linear(x, A_f), D, R) * s, None
            return F.linear(B_gen.matmul(x, D, R), A_f.T) * s, None
        B_f = B.reshape(D, R)
        if self.in_features == self.d_small:
            return F.linear(F.linear(x, A_f), B_f) * s, None
        return F.linear(F.linear(x, B_f.T), A_f.T) * s, None

    def _forward_active(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.scaling]
        if len(active) == 1 and not args and not kwargs:
            adapter = active[0]
            base = self.get_base_layer()
            fusable = (
                self.kind != "bnb8bit"
                and not self.use_dora[adapter]
                and base.weight.dtype == x.dtype == self.adapter_dtype(adapter)
                and (isinstance(self.dropout_for(adapter), nn.Identity) or not self.training)
            )
            if fusable and self._use_dense(adapter, x, fused=True):
                # one matmul for base + adapter: x (W + dW)^T + b
                return FusedDeltaLinear.apply(
                    x, self.oriented_base_weight(), base.bias, lambda lam, gam: self._delta_from(adapter, lam, gam),
                    self.slimrandlora_lambda[adapter], self.slimrandlora_gamma[adapter])
        return super()._forward_active(x, *args, **kwargs)


class Linear(DeltaModule, RandLoraLayer):
    """RandLoRA around an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear8bitLt``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: RandLoraConfig, key: str, basis_A=None,
                 basis_B=None, generated=None, **kwargs):
        nn.Module.__init__(self)
        self.init_layer(base_layer, adapter_name, **kwargs)
        self.update_layer(adapter_name, config, key, basis_A=basis_A, basis_B=basis_B, generated=generated)
