"""Every forward path of an adapter computes the same function, so it must give every trainable tensor the same
gradient: the base weight and bias (when the user trains them too) as much as the adapter's own parameters.

Paths per method: RandLoRA's ``forward_mode`` (factored; dense folded into the base matmul; dense as a separate
adapter output, taken when dropout is a module), with stored and generated bases; NOLA's regenerated and cached
bases; DoRA's reuse of the base output (dropout off) and recomputation of W x (dropout on, here p = 0), for
standalone DoRA and ``use_dora=True``. LoLDU and S²FT have one path each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimtrain.adapters as adapters  # noqa: E402
from cases import TinyMLP  # noqa: E402

TARGETS = ["lin0", "lin1", "lin2"]


def _dropout_module(model) -> None:
    """Replace every adapter's ``nn.Identity`` dropout by ``nn.Dropout(0.0)``: the same function (p = 0 returns its
    input), but a module the layers treat as dropout, which sends them down their other path."""
    for module in model.modules():
        for name in ("slimrandlora_dropout", "nola_dropout", "dora_dropout"):
            container = getattr(module, name, None)
            if isinstance(container, nn.ModuleDict):
                for key in container:
                    container[key] = nn.Dropout(0.0)


def _grads(config, dropout_module: bool):
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(), config)
    with torch.no_grad():  # a non-trivial adapter: every path's update then matters
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    for name, p in model.named_parameters():
        if "base_layer" in name:
            p.requires_grad_(True)  # full fine-tuning beside the adapter
    if dropout_module:
        _dropout_module(model)
    model.train()
    x = torch.randn(96, 16, generator=torch.Generator().manual_seed(1))
    out = model(x=x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _randlora(**kw):
    return lambda mode: adapters.RandLoraConfig(target_modules=TARGETS, r=4, randlora_alpha=4.0, init_weights=False,
                                                forward_mode=mode, **kw)


# (id, config for a path, [(path, dropout as a module)]): the first path is the reference
PATHS = [
    ("randlora", _randlora(), [("factored", False), ("dense", False), ("dense", True), ("factored", True)]),
    ("randlora-generated", _randlora(cache_bases=False), [("factored", False), ("dense", False), ("dense", True)]),
    ("randlora-dora", _randlora(use_dora=True), [("factored", False), ("dense", False), ("dense", True)]),
    ("nola", lambda cache: adapters.NolaConfig(target_modules=TARGETS, r=4, num_basis_A=8, num_basis_B=8,
                                               init_weights=False, cache_bases=cache), [(False, False), (True, False)]),
    ("nola-dora", lambda cache: adapters.NolaConfig(target_modules=TARGETS, r=4, num_basis_A=8, num_basis_B=8,
                                                    init_weights=False, cache_bases=cache, use_dora=True),
     [(False, False), (False, True), (True, True)]),
    ("dora", lambda _: adapters.DoraConfig(target_modules=TARGETS, r=4, init_weights=False), [(None, False), (None, True)]),
]


@pytest.mark.parametrize("make_config,paths", [pytest.param(c, p, id=i) for i, c, p in PATHS])
def test_every_forward_path_gives_every_trainable_tensor_the_same_gradient(make_config, paths):
    ref_out, ref = _grads(make_config(paths[0][0]), paths[0][1])
    assert any("base_layer.weight" in n for n in ref) and any("base_layer.bias" in n for n in ref)
    for option, dropout_module in paths[1:]:
        out, grads = _grads(make_config(option), dropout_module)
        # fp32 sums over at most 96 tokens and 32 features (and 8 bases), in another order per path: each result
        # is within ~128 * 2^-24 = 7.6e-6 of the exact value, relative to the largest magnitude of the tensor
        _close(out, ref_out)
        assert grads.keys() == ref.keys()
        missing = [n for n, g in grads.items() if g is None]
        assert not missing, f"path {option!r} (dropout module: {dropout_module}) gives no gradient to {missing}"
        for name, g in grads.items():
            _close(g, ref[name], name)


def _close(value: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    bound = 2e-5 * max(1.0, ref.abs().max().item())
    err = (value - ref).abs().max().item()
    assert err <= bound, f"{name}: max difference {err:.3g} > {bound:.3g}"
