"""LoLDU layers: a frozen pivoted LDU of the base weight whose leading diagonal trains.

Math (free functions, unit-tested against float64 references) first; the PEFT layer bookkeeping after.
The permutation ``P`` of ``W = P L D U`` is an index vector ``perm`` with ``W[perm] = L D U`` (LU row ``i``
is weight row ``perm[i]``); it is applied by ``index_copy`` on the output, never as a dense matmul.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..._seeds import generator, stable_seed
from ..delta_layer import DeltaLayer, DeltaModule
from ..registry import peft_api

BufferDict = peft_api.BufferDict

# A pivot whose magnitude is below this (relative to the largest entry of W) is treated as zero: the row of
# U is then left unnormalised and d0 set to 1, which keeps P L diag(d0) U equal to W's LU exactly instead of
# dividing by ~0 (the official code can produce inf there).
_PIVOT_RTOL = 1e-12


def ldu_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` factors of the pivoted LDU decomposition of ``weight`` (shape ``out x in``).

    Computed in float64 on CPU so the pivots do not depend on the device or on the weight dtype's rounding.

    Returns:
        perm (int64, ``out``): row order, ``weight[perm] == L @ diag(d) @ U`` for the full factors.
        L_r (float64, ``out x r``): the first ``r`` columns of the unit lower-trapezoidal ``L``.
        d0 (float64, ``r``): the first ``r`` pivots (1.0 where a pivot is numerically zero).
        U_r (float64, ``r x in``): the first ``r`` rows of ``U`` divided by their pivot (unit upper).
    """
    out_features, in_features = weight.shape
    k = min(out_features, in_features)
    if not 1 <= r <= k:
        raise ValueError(f"Invalid r: {r} (expected 1 <= r <= {k} for a weight of shape {tuple(weight.shape)})")
    w64 = weight.detach().to(device="cpu", dtype=torch.float64)
    # the _ex variant: a singular weight (zero pivot) is valid input here, not an error
    lu, pivots, _ = torch.linalg.lu_factor_ex(w64)
    # LAPACK pivots are 1-based sequential row swaps: replay them on arange to get the row order.
    perm = list(range(out_features))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    perm = torch.tensor(perm, dtype=torch.int64)

    L_r = torch.tril(lu[:, :r], diagonal=-1)
    L_r[:r].diagonal().fill_(1.0)
    U_r = torch.triu(lu[:r, :])
    d0 = U_r.diagonal().clone()
    tiny = _PIVOT_RTOL * max(w64.abs().max().item(), torch.finfo(torch.float64).tiny)
    d0 = torch.where(d0.abs() > tiny, d0, torch.ones_like(d0))
    U_r = U_r / d0[:, None]
    return perm, L_r, d0, U_r


def loldu_coefficients(
    diag: torch.Tensor, d0: torch.Tensor, scaling: float, scale_offset: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Diagonal of the update, ``s·(z − d₀) + τ·z``: exactly zero while ``z == d₀`` and ``τ == 0``."""
    coef = (diag - d0) * scaling
    if scale_offset is not None:
        coef = coef + scale_offset * diag
    return coef


def loldu_delta_output(
    x: torch.Tensor, perm: torch.Tensor, L_r: torch.Tensor, coef: torch.Tensor, U_r: torch.Tensor
) -> torch.Tensor:
    """``x @ ΔWᵀ`` with ``ΔW = P L_r diag(coef) U_r``, at rank-``r`` cost plus one index copy."""
    h = F.linear(x, U_r) * coef
    out_lu = F.linear(h, L_r)  # rows in LU order
    return torch.zeros_like(out_lu).index_copy(-1, perm, out_lu)


def loldu_delta_weight(perm: torch.Tensor, L_r: torch.Tensor, coef: torch.Tensor, U_r: torch.Tensor) -> torch.Tensor:
    """Dense ``ΔW = P L_r diag(coef) U_r`` (``out x in``) in the weight's original row order."""
    delta_lu = (L_r * coef) @ U_r
    return torch.zeros_like(delta_lu).index_copy(0, perm, delta_lu)


def factors_fingerprint(perm: torch.Tensor, L_r: torch.Tensor, d0: torch.Tensor, U_r: torch.Tensor) -> torch.Tensor:
    """SHA-256 of the frozen factors exactly as the layer uses them (dtype, shape and bytes), as 4 int64.

    ``checkpoint_mode="fingerprint"`` saves this instead of the factors; a reload whose LU yields other
    factors (pivots, rounding, dtype or base weight) has another fingerprint and is refused.
    """
    digest = hashlib.sha256()
    for t in (perm, L_r, d0, U_r):
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).clone()


def check_finite_weight(weight: torch.Tensor, key: str) -> None:
    """Refuse a base weight holding NaN or inf: the LU spreads one such entry through every factor (one NaN in
    48 rows made all 48 outputs NaN at init, and 512 weights NaN on merge)."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        rows, cols = bad.nonzero(as_tuple=True)
        raise ValueError(
            f"Invalid base weight of {key or 'layer'}: {int(bad.sum())} non-finite entries (first at row "
            f"{int(rows[0])}, column {int(cols[0])}: {weight[rows[0], cols[0]].item()}); LoLDU factors the weight and "
            "expects every entry finite. Repair or exclude this module (exclude_modules)."
        )


class LoLDULayer(DeltaLayer):
    """Per-adapter LDU factors of one weight, keyed by adapter name.

    The trainable diagonal (and scale offset) live in ParameterDicts named in ``adapter_layer_names``, which
    PEFT treats as trainable adapter state; the frozen factors ``L_r``, ``U_r``, ``d0`` and the integer
    ``perm`` are persistent BufferDicts in ``other_param_names``: saved, moved and deleted with the adapter,
    never trainable. Their state-dict keys are the same as when the factors were frozen Parameters, so
    older checkpoints load unchanged. Adapter tensors are fp32 for fp32/bf16/fp16 bases (`DeltaLayer`'s
    contract) and float64 for a float64 base.
    """

    adapter_layer_names = ("loldu_diag", "loldu_scale")
    other_param_names = ("loldu_L", "loldu_U", "loldu_d0", "loldu_perm", "loldu_fingerprint", "r", "scaling")
    method_name = "LoLDU"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, allow_bnb8bit=False, **kwargs)
        if not self.get_base_layer().weight.dtype.is_floating_point:
            raise TypeError(f"LoLDU needs a floating-point base weight, got {self.get_base_layer().weight.dtype}")
        self.r: dict[str, int] = {}
        self.loldu_diag = nn.ParameterDict({})
        self.loldu_scale = nn.ParameterDict({})
        self.loldu_L = BufferDict({}, persistent=True)
        self.loldu_U = BufferDict({}, persistent=True)
        self.loldu_d0 = BufferDict({}, persistent=True)
        self.loldu_perm = BufferDict({}, persistent=True)
        self.loldu_fingerprint = BufferDict({}, persistent=True)  # factors_fingerprint of the factors above

    def update_layer(self, adapter_name: str, config, key: str = "", inference_mode: bool = False) -> None:
        r = config.r
        k = min(self.out_features, self.in_features)
        if not 1 <= r <= k:
            raise ValueError(
                f"Invalid r: {r} (expected 1 <= r <= {k} for {key or 'layer'} with "
                f"out_features={self.out_features}, in_features={self.in_features})"
            )
        with peft_api.gather_params_ctx(self.get_base_layer().weight):
            weight = self.dense_base_weight()
            check_finite_weight(weight, key)
            perm, L_r, d0, U_r = ldu_factors(weight, r)
        diag = d0.clone()
        if not config.init_weights:
            # Test-only: a deterministic non-identity adapter (seeded from the module name, not the global RNG).
            g = generator(stable_seed("loldu-init", key, r))
            diag = diag * (1.0 + 0.5 * torch.randn(r, generator=g, dtype=torch.float64))

        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.alpha / r
        # fp32 for fp32/bf16/fp16 bases (DeltaLayer's contract), float64 for a float64 base
        dtype = torch.promote_types(self.get_base_layer().weight.dtype, torch.float32)
        self.loldu_diag[adapter_name] = nn.Parameter(diag.to(dtype))
        self.loldu_d0[adapter_name] = d0.to(dtype)
        self.loldu_L[adapter_name] = L_r.to(dtype)
        self.loldu_U[adapter_name] = U_r.to(dtype)
        self.loldu_perm[adapter_name] = perm
        self.loldu_fingerprint[adapter_name] = factors_fingerprint(
            perm, self.loldu_L[adapter_name], self.loldu_d0[adapter_name], self.loldu_U[adapter_name])
        if config.train_scale:
            # shape (1,), not (): FSDP refuses 0-dimensional parameters (older checkpoints' () is reshaped on load)
            self.loldu_scale[adapter_name] = nn.Parameter(torch.zeros(1, dtype=dtype))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        weight = self.get_base_layer().weight
        target = device if device is not None else weight.device
        if target.type == "meta":
            return
        for buffers in (self.loldu_L, self.loldu_U, self.loldu_d0, self.loldu_perm, self.loldu_fingerprint):
            if adapter_name in buffers:
                buffers[adapter_name] = buffers[adapter_name].to(target)

    def adapter_dtype(self, adapter: str) -> torch.dtype:
        # the input meets the frozen factors first: their precision, whatever the diagonal's
        # (autocast_adapter_dtype=False makes only the trainable diagonal bf16/fp16)
        return self.loldu_L[adapter].dtype

    def coefficients(self, adapter: str) -> torch.Tensor:
        return loldu_coefficients(
            self.loldu_diag[adapter], self.loldu_d0[adapter], self.scaling[adapter], self.loldu_scale.get(adapter)
        )

    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):
        perm, L_r, U_r = self.loldu_perm[adapter], self.loldu_L[adapter], self.loldu_U[adapter]
        coef = self.coefficients(adapter)
        out = loldu_delta_output(x, perm, L_r, coef, U_r)
        delta = loldu_delta_weight(perm, L_r, coef.detach(), U_r) if want_delta else None
        return out, delta

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``ΔW`` (``out x in``) in float32, for merging."""
        with torch.no_grad():
            dtype = torch.promote_types(self.loldu_L[adapter].dtype, torch.float32)
            return loldu_delta_weight(
                self.loldu_perm[adapter],
                self.loldu_L[adapter].to(dtype),
                self.coefficients(adapter).to(dtype),
                self.loldu_U[adapter].to(dtype),
            )

    def add_weighted(self, target: str, adapters: list[str], weights: list[float], key: str) -> None:
        """Make ``target``'s update ``sum_k weights[k] * ΔW[adapters[k]]``: the update is linear in the coefficient
        vector over the factors, so over the same factors the weighted coefficients are exact. ``target`` gets
        ``z = d₀ + c / s`` (and τ = 0), rounded once to the diagonal's dtype."""
        fingerprint = self.loldu_fingerprint[target]
        other = [a for a in adapters if not torch.equal(self.loldu_fingerprint[a], fingerprint)]
        if other:
            raise ValueError(
                f"Invalid adapters for add_weighted_adapter at {key}: {other} use other LDU factors than "
                f"{adapters[0]!r} (another r or base weight); LoLDU updates add up only over the same factors"
            )
        with torch.no_grad():
            coef = sum(w * self.coefficients(a).double() for a, w in zip(adapters, weights))
            diag = self.loldu_d0[target].double() + coef / self.scaling[target]
            self.loldu_diag[target].copy_(diag)
            if target in self.loldu_scale:
                self.loldu_scale[target].zero_()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class Linear(DeltaModule, LoLDULayer):
    """LoLDU around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str = "", **kwargs) -> None:
        nn.Module.__init__(self)
        self.init_layer(base_layer, adapter_name, **kwargs)
        self.update_layer(adapter_name, config, key, inference_mode=config.inference_mode)
