"""NOLA layer: A and B regenerated from seeds on every forward, in blocks, combined with trainable
coefficients by a custom autograd function that never keeps the bases between forward and backward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._common import DeltaLayer, stable_seed, uniform_on_cpu
from .config import NolaConfig

# Bases are drawn in blocks of this many, each block from its own seed, so one block is the most that is
# ever materialized (k=512, r=16, in=4096 would be 134 MB at once; a block of 32 is 8.4 MB). Part of the
# generator definition: changing it changes the bases (bump GENERATOR_VERSION).
BLOCK = 32


def basis_block(seed: int, block: int, num_basis: int, shape: tuple[int, int]) -> torch.Tensor:
    """Bases ``block*BLOCK .. min(num_basis, (block+1)*BLOCK)`` as an fp32 CPU tensor (n, *shape)."""
    n = min(BLOCK, num_basis - block * BLOCK)
    return uniform_on_cpu((n, *shape), stable_seed(seed, block)).div_(math.sqrt(num_basis))


def combine_bases_reference(coef: torch.Tensor, seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """sum_i coef[i] * U_i with every basis materialized at once; the definition the fused path must match."""
    k = coef.numel()
    bases = torch.cat([basis_block(seed, b, k, shape) for b in range(math.ceil(k / BLOCK))])
    return torch.einsum("k,kij->ij", coef.detach().cpu().double(), bases.double())


def _block_on(seed, b, k, shape, like: torch.Tensor, cache: dict | None) -> torch.Tensor:
    if cache is None:
        return basis_block(seed, b, k, shape).to(device=like.device, dtype=like.dtype)
    key = (seed, b, like.device, like.dtype)
    if key not in cache:
        cache[key] = basis_block(seed, b, k, shape).to(device=like.device, dtype=like.dtype)
    return cache[key]


class CombineBases(torch.autograd.Function):
    """M = sum_i coef[i] U_i, U_i regenerated block by block in forward and again in backward (or read from
    ``cache``, a dict the caller owns, when basis caching is on).

    Backward: dL/dcoef[i] = <dL/dM, U_i>_F. Nothing but the seed and shape is saved for backward.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, seed: int, shape: tuple[int, int], cache: dict | None = None):
        k = coef.numel()
        out = torch.zeros(shape, dtype=coef.dtype, device=coef.device)
        for b in range(math.ceil(k / BLOCK)):
            block = _block_on(seed, b, k, shape, coef, cache)
            out += torch.tensordot(coef[b * BLOCK : b * BLOCK + block.shape[0]], block, dims=1)
        ctx.seed, ctx.shape, ctx.k, ctx.cache = seed, shape, k, cache
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = []
        for b in range(math.ceil(ctx.k / BLOCK)):
            block = _block_on(ctx.seed, b, ctx.k, ctx.shape, grad, ctx.cache)
            grads.append(torch.tensordot(block, grad, dims=2))
        return torch.cat(grads), None, None, None


class NolaLayer(DeltaLayer):
    adapter_layer_names = ("nola_coef_A", "nola_coef_B", "nola_magnitude")
    other_param_names = ("nola_dropout", "r", "scaling", "seeds", "basis_cache", "use_dora", "dora_eps")
    magnitude_name = "nola_magnitude"
    method_name = "nola"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.seeds: dict[str, tuple[int, int, int]] = {}
        self.nola_coef_A = nn.ParameterDict({})
        self.nola_coef_B = nn.ParameterDict({})
        self.nola_magnitude = nn.ParameterDict({})
        self.nola_dropout = nn.ModuleDict({})
        self.basis_cache: dict[str, dict | None] = {}  # per adapter; never saved, filled on first use

    def update_layer(self, adapter_name: str, config: NolaConfig, key: str, inference_mode: bool = False):
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.nola_alpha / config.r
        self.seeds[adapter_name] = tuple(
            stable_seed("nola", config.generator_version, config.seed, key, part) for part in ("A0", "A", "B")
        )
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
        seed_A0, seed_A, seed_B = self.seeds[adapter]
        r = self.r[adapter]
        bound = 1.0 / math.sqrt(self.in_features)  # LoRA's A init range (kaiming_uniform with a=sqrt(5))
        cache = self.basis_cache[adapter]
        a0 = cache.get(("A0", coef_A.device, coef_A.dtype)) if cache is not None else None
        if a0 is None:
            a0 = uniform_on_cpu((r, self.in_features), seed_A0, -bound, bound).to(coef_A.device, coef_A.dtype)
            if cache is not None:
                cache[("A0", coef_A.device, coef_A.dtype)] = a0
        A = a0 + CombineBases.apply(coef_A, seed_A, (r, self.in_features), cache)
        B = CombineBases.apply(coef_B, seed_B, (self.out_features, r), cache)
        return A, B

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


class Linear(nn.Module, NolaLayer):
    """NOLA around an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear8bitLt``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NolaConfig, key: str, **kwargs):
        super().__init__()
        NolaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key)

    forward = DeltaLayer.forward  # nn.Module comes first in the MRO; take the adapter forward explicitly
    __repr__ = DeltaLayer.__repr__
