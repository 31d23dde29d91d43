"""Tiny models and a deterministic training loop shared by the optimizer tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimtrain.optimizers.projectors import DCTProjector, SVDProjector
from slimtrain.optimizers import (
    DCTAdamW,
    DCTAdamW8bit,
    FiraAdamW,
    FrugalAdamW,
    FrugalAdamW8bit,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    SSTAdamW,
    SSTAdamW8bit,
    low_rank_param_groups,
)


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    """Matrices of every orientation: 40x24 (tall), 16x40 (wide), 8x16, plus biases."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 8)
    ).to(dtype)


def groups(model: nn.Module, rank: int = 4, gap: int = 5, **extra) -> list[dict]:
    return low_rank_param_groups(model, ["0", "2", "4"], rank=rank, update_proj_gap=gap, scale=0.25, **extra)


def batches(steps: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 24, generator=g)
        yield x.to(dtype), torch.sin(3 * x[:, :8]).to(dtype)


def write_checkpoint(path, factory, dtype=torch.float32) -> None:
    """The checkpoints of ``tests/optimizers/data``: the model and optimizer after 7 steps of :func:`train` and
    the parameters 11 steps later."""
    model = mlp(dtype=dtype)
    opt = factory(groups(model))
    train(model, opt, steps=7)
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    train(model, opt, steps=11, start=7)
    saved["after"] = [p.detach().clone() for p in model.parameters()]
    torch.save(saved, path)


def load_checkpoint(model: nn.Module, opt, checkpoint: dict) -> None:
    """Load ``checkpoint["model"]`` and ``checkpoint["opt"]`` (left unchanged), written by another run and
    perhaps on another processor. (SSTAdamW then finds each weight to be its saved factors' product within the
    rounding of another processor's matrix product, and goes on with the saved round.)"""
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(copy.deepcopy(checkpoint["opt"]))


def resume_checkpoint(ckpt: dict, factory) -> nn.Module:
    """Load a :func:`write_checkpoint` file into a fresh model and ``factory``'s optimizer, check that every state
    tensor came back with its dtype and value, and take the 11 steps its writer took: the model."""
    model = mlp(seed=123)
    opt = factory(groups(model))
    load_checkpoint(model, opt, ckpt)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, saved in ckpt["opt"]["state"].items():
        loaded = opt.state[params[i]]
        assert loaded.keys() == saved.keys()
        for k, v in saved.items():
            assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    train(model, opt, steps=11, start=7)
    return model


def train(model: nn.Module, opt, steps: int, seed: int = 1, start: int = 0) -> float:
    loss = torch.tensor(float("nan"))
    for i, (x, y) in enumerate(batches(start + steps, seed)):
        if i < start:
            continue
        opt.zero_grad()
        weight = next(model.parameters())  # the batches follow the model's device and dtype
        loss = ((model(x.to(weight.device, weight.dtype)).float() - y.to(weight.device)) ** 2).mean()
        loss.backward()
        opt.step()
    return float(loss.detach())


# One row per optimizer configuration every generic test runs over: (id, factory(groups) -> optimizer).
CONFIGS = [
    ("galore-svd", lambda g: GaLoreAdamW(g, lr=1e-2)),
    ("galore-randomized", lambda g: GaLoreAdamW(g, lr=1e-2, projector="randomized", moments="rotate")),
    ("galore-random", lambda g: GaLoreAdamW(g, lr=1e-2, projector="random", stagger=True)),
    ("galore-bf16-basis", lambda g: GaLoreAdamW(g, lr=1e-2, projector=SVDProjector(basis_dtype="bf16"))),
    ("galore-columns", lambda g: GaLoreAdamW(g, lr=1e-2, projector="columns", moments="reset")),
    ("fira-svd", lambda g: FiraAdamW(g, lr=1e-2, weight_decay=0.01)),
    ("fira-dct", lambda g: FiraAdamW(g, lr=1e-2, projector="dct")),
    ("frugal-svd", lambda g: FrugalAdamW(g, lr=1e-2)),
    ("frugal-columns", lambda g: FrugalAdamW(g, lr=1e-2, projector="columns", inactive_update_rule="sgd")),
    ("frugal-block", lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5, block_order="random")),
    ("dct", lambda g: DCTAdamW(g, lr=1e-2, weight_decay=0.1)),
    ("dct-matmul-l2", lambda g: DCTAdamW(g, lr=1e-2, projector=DCTProjector(norm=2, backend="matmul"), stagger=True)),
    ("sst", lambda g: SSTAdamW(g, lr=1e-2)),
    # 8-bit rows. The MLP's moments have 8-160 elements, under bitsandbytes' 4096 threshold, so
    # min_8bit_size=0 makes every moment 8-bit (test_8bit.py asserts the uint8 codes are there);
    # block_size=64 gives the larger moments several blocks. The galore row also rounds bf16
    # weights stochastically, so its sr_seed/sr_step go through the resume and dtype tests.
    ("galore8bit-svd-sr", lambda g: GaLoreAdamW8bit(g, lr=1e-2, min_8bit_size=0, weight_decay=0.01, bf16_stochastic_round=True)),
    ("dct8bit-rotate", lambda g: DCTAdamW8bit(g, lr=1e-2, min_8bit_size=0, block_size=64)),
    ("frugal8bit-columns-reset", lambda g: FrugalAdamW8bit(g, lr=1e-2, min_8bit_size=0, projector="columns")),
    ("sst8bit", lambda g: SSTAdamW8bit(g, lr=1e-2, min_8bit_size=0)),
]
