"""Record every optimizer configuration's trajectory, and compare a later run with the record bit for bit.

    python scripts/trajectories.py record OUT.pt     # on the code before a change
    python scripts/trajectories.py compare OUT.pt    # on the code after it: exit status 1 on any difference

A refactor of the optimizers must not move a single bit. This runs each configuration of the shared matrix
(every class and its 8-bit twin, every projector, the moment policies, stagger, maximize, weight decay before
and after the update, bf16 weights with stochastic rounding, FRUGAL's two modes, SST, spectral SST,
layer-wise stepping, unprojected groups holding matrices and vectors, a convolution weight, the ZeRO entry
points ``matrix_update``/``apply_update_``/``step_dense_shard_`` and a skipped non-finite step) for 12 steps
with a refresh every 5 (three refreshes; SST re-decomposes once), and keeps every weight and every state
tensor after every step.

Same machine only: the record holds floating-point results, which another processor (or another build of
torch or bitsandbytes) may round differently. It is a development tool for refactors, not a test.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from slimtrain.optimizers import (
    DCTAdamW,
    DCTAdamW8bit,
    FiraAdamW,
    FiraAdamW8bit,
    FrugalAdamW,
    FrugalAdamW8bit,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LayerwiseStepper,
    LowRankAdamW,
    SpectralSSTAdamW,
    SSTAdamW,
    SSTAdamW8bit,
    to_spectral,
)
from slimtrain.optimizers.projectors import DCTProjector, RandomizedProjector, SVDProjector

STEPS, GAP, RANK = 12, 5, 4


class Net(nn.Module):
    """A convolution (6 x 2 x 3 x 3, stepped as a 6 x 18 matrix) and three linear layers of every orientation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.lin1 = nn.Linear(54, 40)
        self.lin2 = nn.Linear(40, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(h)))))


def net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def groups(model: Net, **extra) -> list[dict]:
    """Projected: the convolution, lin1 and lin2 weights and lin1's bias (a vector in a projected group: plain
    AdamW); unprojected: the head's 8 x 16 weight and the other biases."""
    projected = [model.conv.weight, model.lin1.weight, model.lin2.weight, model.lin1.bias]
    plain = [model.head.weight, model.conv.bias, model.lin2.bias, model.head.bias]
    return [{"params": plain}, {"params": projected, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25, **extra}]


def batches(steps: int, dtype, nan_at: int | None = None):
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(16, 2, 5, 5, generator=g)
        y = torch.sin(3 * x.flatten(1)[:, :8])
        yield i, x.to(dtype), y, i == nan_at


def loss_of(model, x, y, poison: bool):
    loss = ((model(x).float() - y) ** 2).mean()
    return loss * float("nan") if poison else loss


def snapshot(model: nn.Module, states: dict, extra: dict | None) -> dict:
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    state = {}
    for key, st in states.items():
        i = index.get(id(key), key)
        state[i] = {k: v.detach().clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
    return {"weights": [p.detach().clone() for p in params], "state": state, "extra": extra}


def run_step(model, opt, dtype, nan_at=None):
    out = []
    for _, x, y, poison in batches(STEPS, dtype, nan_at):
        opt.zero_grad()
        loss_of(model, x, y, poison).backward()
        opt.step()
        out.append(snapshot(model, opt.state, dict(opt.state_dict().get("slimtrain", {}))))
    return out


def run_layerwise(model, opt, dtype, accumulation_steps=1):
    stepper = LayerwiseStepper(opt, accumulation_steps=accumulation_steps)
    out = []
    for _, x, y, poison in batches(STEPS, dtype):
        for _ in range(accumulation_steps):
            (loss_of(model, x, y, poison) / accumulation_steps).backward()
        out.append(snapshot(model, opt.state, dict(opt.state_dict()["slimtrain"])))
    stepper.remove()
    return out


def run_zero_entry_points(model, opt, dtype):
    """What slimtrain.sharding.zero does on one rank holding whole tensors: the owner's ``matrix_update`` and
    ``apply_update_`` for projected matrices, ``step_dense_shard_`` for the rest, states kept outside."""
    states: dict = {}
    out = []
    for _, x, y, poison in batches(STEPS, dtype):
        for p in model.parameters():
            p.grad = None
        loss_of(model, x, y, poison).backward()
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    st = states.setdefault(p, {})
                    if "rank" in g and p.dim() >= 2:
                        update = opt.matrix_update(p, p.grad.reshape(p.shape[0], -1).clone(), g, st)
                        opt.apply_update_(p.data, g, update.reshape(p.shape))
                    else:
                        opt.step_dense_shard_(p.data, p.grad.clone(), g, st)
        out.append(snapshot(model, states, None))
    return out


def run_spectral(uniform_mix=0.0, iterations_per_round=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 8))
    to_spectral(model, ["0", "2"], RANK, uniform_mix=uniform_mix)
    opt = SpectralSSTAdamW(model, lr=1e-2, weight_decay=0.01, update_proj_gap=GAP, iterations_per_round=iterations_per_round)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(16, 24, generator=g)
        opt.zero_grad()
        ((model(x) - torch.sin(3 * x[:, :8])) ** 2).mean().backward()
        opt.step()
        out.append({"weights": [t.detach().clone() for t in model.state_dict().values()],
                    "state": {i: {k: v.clone() for k, v in opt.state[p].items()}
                              for i, p in enumerate(q for grp in opt.param_groups for q in grp["params"]) if p in opt.state},
                    "extra": None})
    return out


def eight(cls, **kw):
    # min_8bit_size=0: every moment of these tiny matrices is 8-bit; block_size=64: the larger ones hold several blocks.
    return lambda g: cls(g, lr=1e-2, min_8bit_size=0, block_size=64, **kw)


# name -> (factory(groups) -> optimizer, dtype, runner, group options)
STEP, LAYERWISE, ZERO = "step", "layerwise", "zero"
CONFIGS: dict[str, tuple] = {
    # GaLore: projectors, moment policies, orientations, weight decay before and after, maximize, stagger
    "galore-svd": (lambda g: GaLoreAdamW(g, lr=1e-2), torch.float32, STEP, {}),
    "galore-svd-decay-after": (lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.1, decay_after_update=True, eps=1e-6), torch.float32, STEP, {}),
    "galore-svd-decay-before": (lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.1), torch.float32, STEP, {}),
    "galore-svd-maximize": (lambda g: GaLoreAdamW(g, lr=1e-2, maximize=True, weight_decay=0.01), torch.float32, STEP, {}),
    "galore-bf16-basis": (lambda g: GaLoreAdamW(g, lr=1e-2, projector=SVDProjector(basis_dtype="bf16")), torch.float32, STEP, {}),
    "galore-randomized-rotate": (lambda g: GaLoreAdamW(g, lr=1e-2, projector="randomized", moments="rotate"), torch.float32, STEP, {}),
    "galore-randomized-cold-bf16": (lambda g: GaLoreAdamW(g, lr=1e-2, projector=RandomizedProjector(warm_start=False, niter=2, basis_dtype="bf16")), torch.float32, STEP, {}),
    "galore-random-stagger": (lambda g: GaLoreAdamW(g, lr=1e-2, projector="random", stagger=True, seed=7), torch.float32, STEP, {}),
    "galore-columns-reset": (lambda g: GaLoreAdamW(g, lr=1e-2, projector="columns", moments="reset"), torch.float32, STEP, {}),
    "galore-dct-keep": (lambda g: GaLoreAdamW(g, lr=1e-2, projector="dct"), torch.float32, STEP, {}),
    "galore-reverse-std": (lambda g: GaLoreAdamW(g, lr=1e-2), torch.float32, STEP, {"proj_type": "reverse_std"}),
    "galore-left": (lambda g: GaLoreAdamW(g, lr=1e-2, moments="rotate"), torch.float32, STEP, {"proj_type": "left"}),
    "galore-right-stagger": (lambda g: GaLoreAdamW(g, lr=1e-2, stagger=True), torch.float32, STEP, {"proj_type": "right"}),
    "galore-nonfinite-skip": (lambda g: GaLoreAdamW(g, lr=1e-2), torch.float32, "nan", {}),
    "lowrank-plain": (lambda g: LowRankAdamW(g, lr=1e-2, weight_decay=0.05), torch.float32, STEP, {}),
    "galore8bit": (eight(GaLoreAdamW8bit, weight_decay=0.01), torch.float32, STEP, {}),
    "galore8bit-rotate": (eight(GaLoreAdamW8bit, projector="randomized", moments="rotate"), torch.float32, STEP, {}),
    "galore8bit-reset-maximize": (eight(GaLoreAdamW8bit, projector="columns", moments="reset", maximize=True), torch.float32, STEP, {}),
    # Fira
    "fira-svd": (lambda g: FiraAdamW(g, lr=1e-2, weight_decay=0.01), torch.float32, STEP, {}),
    "fira-dct-fira_code": (lambda g: FiraAdamW(g, lr=1e-2, projector="dct", residual="fira_code", gamma=1.05), torch.float32, STEP, {}),
    "fira-columns": (lambda g: FiraAdamW(g, lr=1e-2, projector="columns", moments="reset"), torch.float32, STEP, {}),
    "fira-random-maximize": (lambda g: FiraAdamW(g, lr=1e-2, projector="random", maximize=True, decay_after_update=True, weight_decay=0.1), torch.float32, STEP, {}),
    "fira8bit": (eight(FiraAdamW8bit), torch.float32, STEP, {}),
    # FRUGAL, both modes
    "frugal-svd": (lambda g: FrugalAdamW(g, lr=1e-2), torch.float32, STEP, {}),
    "frugal-columns-sgd": (lambda g: FrugalAdamW(g, lr=1e-2, projector="columns", inactive_update_rule="sgd", inactive_lr_scale=0.5), torch.float32, STEP, {}),
    "frugal-none-rank": (lambda g: FrugalAdamW(g, lr=1e-2, density=None, inactive_update_rule="none", moments="keep"), torch.float32, STEP, {}),
    "frugal-density0": (lambda g: FrugalAdamW(g, lr=1e-2, density=0.0, weight_decay=0.1), torch.float32, STEP, {}),
    "frugal-maximize-rotate": (lambda g: FrugalAdamW(g, lr=1e-2, maximize=True, moments="rotate", projector="dct"), torch.float32, STEP, {}),
    "frugal-block-descending": (lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5), torch.float32, STEP, {}),
    "frugal-block-ascending": (lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.34, block_order="ascending", weight_decay=0.1), torch.float32, STEP, {}),
    "frugal-block-random-maximize": (lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5, block_order="random", maximize=True, seed=3), torch.float32, STEP, {}),
    "frugal8bit-columns": (eight(FrugalAdamW8bit, projector="columns"), torch.float32, STEP, {}),
    "frugal8bit-block": (eight(FrugalAdamW8bit, mode="block", density=0.5), torch.float32, STEP, {}),
    # DCT
    "dct": (lambda g: DCTAdamW(g, lr=1e-2, weight_decay=0.1), torch.float32, STEP, {}),
    "dct-matmul-l2-stagger": (lambda g: DCTAdamW(g, lr=1e-2, projector=DCTProjector(norm=2, backend="matmul"), stagger=True), torch.float32, STEP, {}),
    "dct8bit": (eight(DCTAdamW8bit), torch.float32, STEP, {}),
    # SST (its own subspace: no projector)
    "sst": (lambda g: SSTAdamW(g, lr=1e-2, weight_decay=0.01), torch.float32, STEP, {}),
    "sst-mix-round1-maximize": (lambda g: SSTAdamW(g, lr=1e-2, uniform_mix=0.5, iterations_per_round=1, maximize=True), torch.float32, STEP, {}),
    "sst8bit": (eight(SSTAdamW8bit), torch.float32, STEP, {}),
    # bf16 weights, rounded stochastically (and one to nearest)
    "galore8bit-bf16-sr": (eight(GaLoreAdamW8bit, weight_decay=0.01, bf16_stochastic_round=True), torch.bfloat16, STEP, {}),
    "galore-bf16-nearest": (lambda g: GaLoreAdamW(g, lr=1e-2), torch.bfloat16, STEP, {}),
    "fira-bf16-sr": (lambda g: FiraAdamW(g, lr=1e-2, bf16_stochastic_round=True, weight_decay=0.01), torch.bfloat16, STEP, {}),
    "fira-columns-bf16-sr": (lambda g: FiraAdamW(g, lr=1e-2, projector="columns", bf16_stochastic_round=True), torch.bfloat16, STEP, {}),
    "frugal-bf16-sr": (lambda g: FrugalAdamW(g, lr=1e-2, bf16_stochastic_round=True), torch.bfloat16, STEP, {}),
    "frugal-block-bf16-sr": (lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5, bf16_stochastic_round=True), torch.bfloat16, STEP, {}),
    "sst-bf16-sr": (lambda g: SSTAdamW(g, lr=1e-2, bf16_stochastic_round=True), torch.bfloat16, STEP, {}),
    "dct-bf16-sr-maximize": (lambda g: DCTAdamW(g, lr=1e-2, bf16_stochastic_round=True, maximize=True), torch.bfloat16, STEP, {}),
    # layer-wise
    "layerwise-galore": (lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.01), torch.float32, LAYERWISE, {}),
    "layerwise-fira8bit-accumulate": (eight(FiraAdamW8bit), torch.float32, LAYERWISE + "2", {}),
    "layerwise-frugal": (lambda g: FrugalAdamW(g, lr=1e-2, projector="columns"), torch.float32, LAYERWISE, {}),
    "layerwise-sst": (lambda g: SSTAdamW(g, lr=1e-2), torch.float32, LAYERWISE, {}),
    "layerwise-dct-bf16-sr": (lambda g: DCTAdamW(g, lr=1e-2, bf16_stochastic_round=True), torch.bfloat16, LAYERWISE, {}),
    # the ZeRO entry points
    "zero-galore": (lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.01), torch.float32, ZERO, {}),
    "zero-galore-maximize-after": (lambda g: GaLoreAdamW(g, lr=1e-2, maximize=True, weight_decay=0.1, decay_after_update=True), torch.float32, ZERO, {}),
    "zero-fira": (lambda g: FiraAdamW(g, lr=1e-2), torch.float32, ZERO, {}),
    "zero-fira-columns": (lambda g: FiraAdamW(g, lr=1e-2, projector="columns"), torch.float32, ZERO, {}),
    "zero-frugal": (lambda g: FrugalAdamW(g, lr=1e-2, weight_decay=0.01), torch.float32, ZERO, {}),
    "zero-frugal-density0": (lambda g: FrugalAdamW(g, lr=1e-2, density=0.0), torch.float32, ZERO, {}),
    "zero-frugal-none": (lambda g: FrugalAdamW(g, lr=1e-2, inactive_update_rule="none"), torch.float32, ZERO, {}),
    "zero-dct8bit": (eight(DCTAdamW8bit, maximize=True), torch.float32, ZERO, {}),
}


def run(name: str) -> list[dict]:
    if name.startswith("spectral"):
        return run_spectral(**SPECTRAL[name])
    factory, dtype, runner, extra = CONFIGS[name]
    model = net(dtype)
    opt = factory(groups(model, **extra))
    if runner == STEP:
        return run_step(model, opt, dtype)
    if runner == "nan":
        return run_step(model, opt, dtype, nan_at=3)
    if runner.startswith(LAYERWISE):
        return run_layerwise(model, opt, dtype, int(runner[len(LAYERWISE):] or 1))
    return run_zero_entry_points(model, opt, dtype)


SPECTRAL = {"spectral-sst": {}, "spectral-sst-mix-round1": {"uniform_mix": 0.25, "iterations_per_round": 1}}
NAMES = [*CONFIGS, *SPECTRAL]


def differences(a, b, where: str) -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return [f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"]
        if not torch.equal(a, b) and not (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                          and torch.equal(a.nan_to_num(), b.nan_to_num())):
            return [f"{where}: differs (max |a - b| = {(a.double() - b.double()).abs().max().item():.3g})"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in only one"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return [f"{where}: {a!r} vs {b!r}"]
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("path")
    parser.add_argument("--only", nargs="+", default=None, choices=NAMES, metavar="NAME",
                        help="configuration names (default: all)")
    args = parser.parse_args(argv)
    names = args.only or NAMES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order for every run
    try:
        if args.action == "record":
            torch.save({name: run(name) for name in names}, args.path)
            print(f"recorded {len(names)} configurations x {STEPS} steps in {args.path}")
            return 0
        recorded = torch.load(args.path, weights_only=True)
        failed = 0
        for name in names:
            found = differences(recorded[name], run(name), name)
            failed += bool(found)
            print(f"{'DIFFERS' if found else 'same   '} {name}")
            for line in found[:8]:
                print(f"    {line}")
        print(f"{len(names) - failed} of {len(names)} configurations bit-identical")
        return 1 if failed else 0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
