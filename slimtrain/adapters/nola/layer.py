"""NOLA layer: A = A0 + sum_i a_i U_i and B = sum_j b_j V_j, where the random bases U, V are regenerated from
seeds by the fused Philox kernels (:mod:`slimtrain.kernels.philox`) in forward and again in backward. The
bases are never stored and, on the Triton path, never written to memory at all."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.philox import philox_combine, philox_project, philox_uniform
from ..._seeds import stable_seed
from ..bases import seeded_uniform, uniform_on_cpu
from ..delta_layer import DeltaLayer, DeltaModule
from ..registry import peft_api
from .config import NolaConfig

# Part of generator version 1's definition: bases were drawn in blocks of this many, each from its own CPU
# generator. Version 2 has no blocks (the kernels generate any element directly).
LEGACY_BLOCK = 32


@dataclass(frozen=True)
class RandomBases:
    """The ``num_basis`` frozen bases of ``shape`` that one coefficient vector mixes: U_i ~ U(-1, 1) / sqrt(k)
    with k = ``num_basis`` (so sum_i a_i U_i keeps its scale as k grows), a pure function of ``seed``.

    This describes the bases; it holds no tensor. Generator version 2: Philox, generated inside the kernels.
    """

    seed: int
    num_basis: int
    shape: tuple[int, int]

    @property
    def bound(self) -> float:
        return 1.0 / math.sqrt(self.num_basis)

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        """sum_i coef[i] U_i, of ``shape``."""
        return philox_combine(coef, self.seed, self.shape, -self.bound, self.bound)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """[<grad, U_i>_F for each i]: the gradient of :meth:`combine` w.r.t. ``coef``."""
        return philox_project(grad, self.seed, self.num_basis, -self.bound, self.bound)

    def materialize(self, like: torch.Tensor) -> torch.Tensor:
        """All bases as one (num_basis, *shape) tensor on ``like``'s device and dtype (for ``cache_bases``)."""
        return philox_uniform(self.seed, self.shape, -self.bound, self.bound, num_basis=self.num_basis,
                              device=like.device).to(like.dtype)


class LegacyBases(RandomBases):
    """Generator version 1, kept so adapters saved with it reload with their exact bases: blocks of
    ``LEGACY_BLOCK`` bases, each drawn as U(-1, 1) on a CPU generator seeded by (seed, block), divided by
    sqrt(k) and copied to the device (at most one block exists at a time)."""

    def _block(self, b: int, like: torch.Tensor) -> torch.Tensor:
        n = min(LEGACY_BLOCK, self.num_basis - b * LEGACY_BLOCK)
        block = uniform_on_cpu((n, *self.shape), stable_seed(self.seed, b)).div_(math.sqrt(self.num_basis))
        return block.to(device=like.device, dtype=like.dtype)

    def _blocks(self) -> range:
        return range(math.ceil(self.num_basis / LEGACY_BLOCK))

    def combine(self, coef: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=coef.dtype, device=coef.device)
        for b in self._blocks():
            block = self._block(b, coef)
            out += torch.tensordot(coef[b * LEGACY_BLOCK : b * LEGACY_BLOCK + block.shape[0]], block, dims=1)
        return out

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.tensordot(self._block(b, grad), grad, dims=2) for b in self._blocks()])

    def materialize(self, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._block(b, like) for b in self._blocks()])


def random_bases(seed: int, num_basis: int, shape: tuple[int, int], generator_version: int) -> RandomBases:
    """The bases that ``generator_version`` (recorded in the adapter's config) defines for this seed."""
    return (LegacyBases if generator_version == 1 else RandomBases)(seed, num_basis, tuple(shape))


class CombineBases(torch.autograd.Function):
    """M = sum_i coef[i] U_i with U_i regenerated from ``bases`` in forward and again in backward.

    Backward: dL/dcoef[i] = <dL/dM, U_i>_F (:meth:`RandomBases.project`). Nothing but the bases' description
    (seed, count, shape) is kept for backward.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, bases: RandomBases) -> torch.Tensor:
        ctx.bases = bases
        return bases.combine(coef)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.bases.project(grad), None


class NolaLayer(DeltaLayer):
    adapter_layer_names = ("nola_coef_A", "nola_coef_B", "nola_magnitude")
    # nola_shape: (out, in) the bases were generated for, saved so that a checkpoint refuses a layer of another
    # shape (only coefficients are saved; bases of any shape come from the same seed)
    other_param_names = ("nola_shape", "nola_dropout", "r", "scaling", "seeds", "generator_version", "basis_cache",
                         "use_dora", "dora_eps")
    magnitude_name = "nola_magnitude"
    method_name = "nola"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.seeds: dict[str, tuple[int, int, int]] = {}  # (A0, A, B)
        self.generator_version: dict[str, int] = {}
        self.nola_coef_A = nn.ParameterDict({})
        self.nola_coef_B = nn.ParameterDict({})
        self.nola_magnitude = nn.ParameterDict({})
        self.nola_shape = peft_api.BufferDict({}, persistent=True)
        self.nola_dropout = nn.ModuleDict({})
        self.basis_cache: dict[str, dict | None] = {}  # per adapter; never saved, filled on first use

    def update_layer(self, adapter_name: str, config: NolaConfig, key: str, inference_mode: bool = False):
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.nola_alpha / config.r
        self.seeds[adapter_name] = tuple(
            stable_seed("nola", config.generator_version, config.seed, key, part) for part in ("A0", "A", "B")
        )
        self.generator_version[adapter_name] = config.generator_version
        self.nola_shape[adapter_name] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64)
        self.basis_cache[adapter_name] = {} if config.cache_bases else None
        self.nola_dropout[adapter_name] = nn.Dropout(config.nola_dropout) if config.nola_dropout > 0 else nn.Identity()
        k, l = config.num_basis_A, config.num_basis_B
        if config.init_weights:
            coef_A, coef_B = torch.zeros(k), torch.zeros(l)
        else:  # a non-trivial adapter for tests, from the same seeded stream so it is reproducible
            coef_A = uniform_on_cpu((k,), stable_seed("nola-init", config.seed, key, "A"))
            coef_B = uniform_on_cpu((l,), stable_seed("nola-init", config.seed, key, "B"))
        self.nola_coef_A[adapter_name] = nn.Parameter(coef_A)
        self.nola_coef_B[adapter_name] = nn.Parameter(coef_B)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._init_dora(adapter_name, config.use_dora, config.dora_eps)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def dropout_for(self, adapter: str) -> nn.Module:
        return self.nola_dropout[adapter]

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of shapes (r, in) and (out, r), differentiable in the coefficients."""
        coef_A, coef_B = self.nola_coef_A[adapter], self.nola_coef_B[adapter]
        _, seed_A, seed_B = self.seeds[adapter]
        version, r = self.generator_version[adapter], self.r[adapter]
        bases_A = random_bases(seed_A, coef_A.numel(), (r, self.in_features), version)
        bases_B = random_bases(seed_B, coef_B.numel(), (self.out_features, r), version)
        A = self._frozen_a0(adapter, coef_A) + self._mix(adapter, "A", coef_A, bases_A)
        B = self._mix(adapter, "B", coef_B, bases_B)
        return A, B

    def _cached(self, adapter: str, name: str, like: torch.Tensor, make) -> torch.Tensor:
        """``make()``, kept between calls per (name, device, dtype) when ``cache_bases`` is on."""
        cache = self.basis_cache[adapter]
        if cache is None:
            return make()
        key = (name, like.device, like.dtype)
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _frozen_a0(self, adapter: str, like: torch.Tensor) -> torch.Tensor:
        """A0 ~ U(-1/sqrt(in), 1/sqrt(in)) (LoRA's A init range): keeps d/db non-zero while a = b = 0."""
        bound = 1.0 / math.sqrt(self.in_features)

        def make() -> torch.Tensor:
            a0 = seeded_uniform((self.r[adapter], self.in_features), self.seeds[adapter][0], -bound, bound,
                                generator_version=self.generator_version[adapter], device=like.device)
            return a0.to(like.dtype)

        return self._cached(adapter, "A0", like, make)

    def _mix(self, adapter: str, name: str, coef: torch.Tensor, bases: RandomBases) -> torch.Tensor:
        """sum_i coef[i] U_i: regenerated in the fused kernels, or one matmul over the cached bases."""
        if self.basis_cache[adapter] is None:
            return CombineBases.apply(coef, bases)
        return torch.tensordot(coef, self._cached(adapter, name, coef, lambda: bases.materialize(coef)), dims=1)

    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):
        A, B = self.factors(adapter)
        s = self.scaling[adapter]
        out = F.linear(F.linear(x, A), B) * s
        delta = (B.detach() @ A.detach()) * s if want_delta else None
        return out, delta

    def delta_weight(self, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            A, B = self.factors(adapter)
            return (B.float() @ A.float()) * self.scaling[adapter]


class Linear(DeltaModule, NolaLayer):
    """NOLA around an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear8bitLt``."""
