"""The cases tests/sharding/test_fsdp*.py run on W gloo ranks (launched by ``_fsdp_harness.run_cases``).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.sharding._fsdp_worker \
        --out DIR --cases matrix_ops,traffic_adamw

Each case is a function of no arguments run on every rank in the order given; it returns tensors, numbers and
strings in dicts and lists, saved as ``DIR/<case>.rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.optimizers.shards import MatrixShard, broadcast_tensors
from slimtrain.sharding import leave_process_group

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# The sharded-matrix maths on its own

#: Shapes with uneven pieces on 2 and 3 ranks, both orientations, and a rank with no rows (2 x 9 by rows on 3 ranks).
MATRIX_SHAPES = [(7, 5), (3, 7), (2, 9), (12, 4)]


def matrix_data(shape: tuple[int, int], transposed: bool, r: int = 2):
    """The same gradient, basis and direction on every rank (and in the test process): ``G`` (m x n), ``B``
    (r x n') and ``N`` (m' x r) in the oriented frame."""
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1] * 10 + transposed)
    grad = torch.randn(shape, generator=g)
    m_t, n_t = (shape[1], shape[0]) if transposed else shape
    return grad, torch.randn(r, n_t, generator=g), torch.randn(m_t, r, generator=g)


@case
def matrix_ops() -> dict:
    """For each shape, split dimension and orientation: this rank's rows of ``R = G' B^T``, its piece of the
    back projection ``N B`` (with the rows it needed, all-gathered when contracted), the whole ``G'`` at an
    owner, and a broadcast of state from it."""
    rank, world = rank_world()
    out = {}
    for shape in MATRIX_SHAPES:
        for dim in (0, 1):
            for transposed in (False, True):
                key = f"{shape[0]}x{shape[1]}-dim{dim}-{'left' if transposed else 'right'}"
                grad, basis, direction = matrix_data(shape, transposed)
                shard = MatrixShard(shape, dim, rank, world)
                o = shard.oriented(transposed)
                piece_t = o.orient(shard.piece(grad))
                low = o.project(piece_t, basis)
                start, stop = o.rows
                (rows,) = o.rows_for_back_projection(direction[start:stop])
                back = rows @ o.local_basis(basis)
                owner = (shape[0] + dim) % world
                whole = o.gather_to(owner, shard.piece(grad))
                state = [torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64), torch.zeros((), dtype=torch.int64)]
                if rank == owner:
                    state = [torch.full((2, 3), 1.5), torch.arange(4), torch.tensor(7)]
                broadcast_tensors(state, owner)
                out[key] = dict(low=low, rows=torch.tensor(o.rows), cols=torch.tensor(o.cols), back=back,
                                whole=whole if whole is not None else torch.empty(0), owner=owner, state=state,
                                row_local=o.row_local)
    return out


# ----------------------------------------------------------------------------------------------
# FSDP2's own traffic, counted


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """Matrices of both orientations with dimensions 2 and 3 do not divide: 7 x 6, 5 x 7, 9 x 5 (plus biases)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 9))


def shard_model(model: nn.Module, placement=None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


def batch(step: int, rank: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(rows, 6, generator=g)
    return x, torch.sin(2 * x).repeat(1, 2)[:, :9]


@case
def traffic_adamw() -> dict:
    """Bytes FSDP2 moves in one step of torch's AdamW, as the counter sees them, per collective."""
    from slimtrain.sharding.traffic import CollectiveCounter

    rank, world = rank_world()
    model = shard_model(tiny_mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(0, rank)
    with CollectiveCounter() as counter:
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {"calls": {f"{o}:{n}": c for (o, n), c in counter.calls.items()},
            "bytes": {f"{o}:{n}": b for (o, n), b in counter.bytes.items()}}


# ----------------------------------------------------------------------------------------------
# slimtrain's optimizers under fully_shard, against one process

STEPS = 12  # refreshes at steps 0, 5 and 10: two after the first
SEED_ROWS = 4  # each rank's micro-batch


def fsdp_mlp(seed: int = 0) -> nn.Sequential:
    """8 x 6 (tall: a right projection), 4 x 8 (wide: left; dimension 1 divides by 2), 9 x 4 (tall), 2 x 9 (wide;
    dimension 1 divides by 3; under dimension-0 sharding on 3 ranks the third holds no row), and biases."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 9), nn.Tanh(),
                         nn.Linear(9, 2))


def fsdp_groups(model: nn.Module) -> list[dict]:
    from slimtrain.optimizers import low_rank_param_groups

    return low_rank_param_groups(model, ["0", "2", "4", "6"], rank=2, update_proj_gap=5, scale=0.5)


def fsdp_batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank + 10_000 * micro)
    x = torch.randn(SEED_ROWS, 6, generator=g)
    return x, torch.stack([torch.sin(2 * x[:, 0]), torch.cos(x[:, 1] * x[:, 2])], dim=1)


def _configs() -> dict:
    from slimtrain.optimizers import DCTAdamW, DCTAdamW8bit, FiraAdamW, FiraAdamW8bit, FrugalAdamW, FrugalAdamW8bit
    from slimtrain.optimizers import GaLoreAdamW, GaLoreAdamW8bit, SSTAdamW, SSTAdamW8bit
    from slimtrain.optimizers import APOLLOAdamW, APOLLOAdamW8bit, APOLLOMiniAdamW
    from slimtrain.optimizers.projectors import DCTProjector, SVDProjector

    def mini(groups: list[dict]) -> list[dict]:  # APOLLO-Mini's projected group: rank 1, its scale
        return [{**g, "rank": 1, "scale": 128.0} if "rank" in g else g for g in groups]

    # 8-bit rows: every moment 8-bit (min_8bit_size=0) in blocks of 64, so blocks straddle the ranks' pieces.
    q = dict(min_8bit_size=0, block_size=64)
    return {
        "galore": lambda g: GaLoreAdamW(g, lr=1e-2, weight_decay=0.01),
        "galore-randomized-rotate": lambda g: GaLoreAdamW(g, lr=1e-2, projector="randomized", moments="rotate"),
        "galore-random-stagger": lambda g: GaLoreAdamW(g, lr=1e-2, projector="random", stagger=True),
        "galore-columns-reset": lambda g: GaLoreAdamW(g, lr=1e-2, projector="columns", moments="reset"),
        "galore-bf16-basis": lambda g: GaLoreAdamW(g, lr=1e-2, projector=SVDProjector(basis_dtype="bf16")),
        "fira": lambda g: FiraAdamW(g, lr=1e-2, weight_decay=0.01),
        "fira-dct": lambda g: FiraAdamW(g, lr=1e-2, projector="dct"),
        "frugal": lambda g: FrugalAdamW(g, lr=1e-2),
        "frugal-columns-sgd": lambda g: FrugalAdamW(g, lr=1e-2, projector="columns", inactive_update_rule="sgd"),
        "frugal-block": lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5, block_order="random"),
        "dct": lambda g: DCTAdamW(g, lr=1e-2, weight_decay=0.1),
        "dct-matmul-l2-stagger": lambda g: DCTAdamW(g, lr=1e-2, projector=DCTProjector(norm=2, backend="matmul"),
                                                    stagger=True),
        "sst": lambda g: SSTAdamW(g, lr=1e-2),
        "apollo": lambda g: APOLLOAdamW(g, lr=1e-2, weight_decay=0.01),
        "apollo-tensor-svd": lambda g: APOLLOAdamW(g, lr=1e-2, projector="svd", scale_type="tensor"),
        "apollo-mini": lambda g: APOLLOMiniAdamW(mini(g), lr=1e-2),
        "galore8bit": lambda g: GaLoreAdamW8bit(g, lr=1e-2, weight_decay=0.01, **q),
        "fira8bit": lambda g: FiraAdamW8bit(g, lr=1e-2, **q),
        "frugal8bit-columns": lambda g: FrugalAdamW8bit(g, lr=1e-2, projector="columns", **q),
        "frugal-block8bit": lambda g: FrugalAdamW8bit(g, lr=1e-2, mode="block", density=0.5, **q),
        "dct8bit-rotate": lambda g: DCTAdamW8bit(g, lr=1e-2, **q),
        "sst8bit": lambda g: SSTAdamW8bit(g, lr=1e-2, **q),
        "apollo8bit": lambda g: APOLLOAdamW8bit(g, lr=1e-2, **q),
    }


def optimizer_for(name: str, model: nn.Module):
    return _configs()[name](fsdp_groups(model))


def one_process(name: str, world: int, steps: int = STEPS, accum: int = 1, norms: list | None = None) -> list[torch.Tensor]:
    """The weights one process reaches with the same optimizer on the same global batch (the ranks' micro-batches
    in one mean; with ``accum`` backward passes per step, each scaled by ``1/accum``); ``norms`` receives each
    step's gradient norm."""
    model = fsdp_mlp()
    opt = optimizer_for(name, model)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accum):
            xs, ys = zip(*(fsdp_batch(step, r, micro) for r in range(world)))
            (((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean() / accum).backward()
        if norms is not None:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _sharded_run(name: str, placement: str, steps: int = STEPS) -> dict:
    from slimtrain.sharding import low_rank_placement

    rank, world = rank_world()
    model = shard_model(fsdp_mlp(), low_rank_placement() if placement == "low-rank" else None)
    opt = optimizer_for(name, model)
    for step in range(steps):
        x, y = fsdp_batch(step, rank)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {"weights": [p.full_tensor().detach().clone() for p in model.parameters()],
            "placements": [str(p.placements[0]) for p in model.parameters()], "state_bytes": opt.state_bytes(),
            "state": state_layout(opt)}


def state_layout(opt) -> list[dict]:
    """Per parameter, in order: each state tensor's ``(elements here, whole shape, split)``: a DTensor's piece, or
    a tensor this rank keeps whole."""
    from slimtrain.optimizers._validation import is_dtensor

    out = []
    for p in (q for g in opt.param_groups for q in g["params"]):
        entry = {}
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                split = is_dtensor(v)
                entry[key] = (v.to_local().numel() if split else v.numel(), list(v.shape), split)
        out.append(entry)
    return out


EXACT_ROWS = ["galore", "fira", "dct", "galore8bit", "apollo", "apollo-mini"]  # also run with every parameter sharded by rows


def _register_exact_cases() -> None:
    for name in config_names():
        CASES[f"exact-{name}"] = (lambda n: lambda: _sharded_run(n, "low-rank"))(name)
    for name in EXACT_ROWS:
        CASES[f"exact-rows-{name}"] = (lambda n: lambda: _sharded_run(n, "rows"))(name)


def config_names() -> list[str]:
    """The names of the optimizer configurations every exactness case runs."""
    return list(_configs())


_register_exact_cases()


# ----------------------------------------------------------------------------------------------
# Checkpoints through torch.distributed.checkpoint

DCP_ROWS = ["galore", "galore-randomized-rotate", "fira8bit", "dct8bit-rotate", "apollo-mini"]
SAVED_AT = 7  # between the refreshes at 5 and 10


def train_steps(model, opt, start: int, stop: int, rank: int) -> None:
    for step in range(start, stop):
        x, y = fsdp_batch(step, rank)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _sharded(name: str, seed: int = 0):
    from slimtrain.sharding import low_rank_placement

    model = shard_model(fsdp_mlp(seed), low_rank_placement())
    return model, optimizer_for(name, model)


def _dcp_case(name: str) -> dict:
    """Train to step 7, save a sharded checkpoint and a full one, train on to 12. Then: a fresh model and optimizer
    (other initial weights) resumed from the sharded checkpoint and trained to 12; on 3 ranks, also one resumed
    from the full checkpoint a 2-rank run wrote (``SLIMTRAIN_FSDP_SHARED``, shared across launches)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, get_state_dict, set_model_state_dict,
        set_optimizer_state_dict, set_state_dict)

    rank, world = rank_world()
    shared = os.environ["SLIMTRAIN_FSDP_SHARED"]
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = _sharded(name)
    train_steps(model, opt, 0, SAVED_AT, rank)
    path = os.path.join(shared, f"{name}-{world}ranks")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    full_sd = {"model": get_model_state_dict(model, options=full), "optim": get_optimizer_state_dict(model, opt, options=full)}
    if rank == 0:
        torch.save(full_sd, path + "-full.pt")
    train_steps(model, opt, SAVED_AT, STEPS, rank)
    uninterrupted = [p.full_tensor() for p in model.parameters()]

    model, opt = _sharded(name, seed=1)
    msd, osd = get_state_dict(model, opt)
    loaded = {"model": msd, "optim": osd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train_steps(model, opt, SAVED_AT, STEPS, rank)
    out = {"uninterrupted": uninterrupted, "resumed": [p.full_tensor() for p in model.parameters()]}
    two_rank_full = os.path.join(shared, f"{name}-2ranks-full.pt")
    if world != 2 and os.path.exists(two_rank_full):
        saved = torch.load(two_rank_full, weights_only=True)
        model, opt = _sharded(name, seed=1)
        set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, opt, saved["optim"], options=StateDictOptions(full_state_dict=True))
        train_steps(model, opt, SAVED_AT, STEPS, rank)
        out["from_2_ranks"] = [p.full_tensor() for p in model.parameters()]
    return out


for _name in DCP_ROWS:
    CASES[f"dcp-{_name}"] = (lambda n: lambda: _dcp_case(n))(_name)


# ----------------------------------------------------------------------------------------------
# Accelerate's FSDP2 preparation: the optimizer is built first, its parameters swapped afterwards


def accelerate_swap(model: nn.Module, opt) -> None:
    """What ``accelerate.Accelerator.prepare`` does for FSDP2 (accelerate 1.16, ``accelerator.py`` and
    ``utils/fsdp_utils.py: fsdp2_switch_optimizer_parameters``): note each optimizer entry's parameter name, put
    a 1-element placeholder in its place, ``fully_shard`` the model, then put in each place the sharded parameter
    of that name."""
    from slimtrain.sharding import low_rank_placement

    names = {id(p): n for n, p in model.named_parameters()}
    keys = [[names[id(p)] for p in group["params"]] for group in opt.param_groups]
    for group in opt.param_groups:
        group["params"] = [torch.empty(1, dtype=p.dtype) for p in group["params"]]
    shard_model(model, low_rank_placement())
    sharded = dict(model.named_parameters())
    for group, names_of_group in zip(opt.param_groups, keys):
        group["params"] = [sharded[n] for n in names_of_group]


ACCELERATE_ROWS = ["galore", "fira8bit"]


def _accelerate_case(name: str) -> dict:
    """The optimizer built on the plain model, its parameters swapped as Accelerate swaps them, then 12 steps; and
    the same swap after a first step, which must be refused at the next."""
    rank, _ = rank_world()
    model = fsdp_mlp()
    opt = optimizer_for(name, model)
    accelerate_swap(model, opt)
    train_steps(model, opt, 0, STEPS, rank)
    out = {"weights": [p.full_tensor() for p in model.parameters()]}
    model = fsdp_mlp()
    opt = optimizer_for(name, model)
    x, y = fsdp_batch(0, rank)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()  # on the plain model: this rank's gradient, as a single process would
    opt.zero_grad()
    accelerate_swap(model, opt)
    before = [p.to_local().clone() for p in model.parameters()]
    try:
        train_steps(model, opt, 1, 2, rank)
    except RuntimeError as e:
        out["refusal"] = str(e)
    out["unchanged"] = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
    return out


for _name in ACCELERATE_ROWS:
    CASES[f"accelerate-{_name}"] = (lambda n: lambda: _accelerate_case(n))(_name)


MIXED_ROWS = ["galore", "fira8bit", "apollo-mini"]


def _mixed_case(name: str) -> dict:
    """A mixed model: the 9 x 4 layer is left out of FSDP2 (``ignored_params``), so the optimizer holds plain
    tensors beside DTensors; its gradients are averaged over the ranks by hand, as data parallelism would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slimtrain.sharding import low_rank_placement

    rank, world = rank_world()
    model = fsdp_mlp()
    ignored = set(model[4].parameters())
    mesh = init_device_mesh("cpu", (world,))
    for i, layer in enumerate(model):
        if i != 4 and any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh, shard_placement_fn=low_rank_placement())
    fully_shard(model, mesh=mesh, shard_placement_fn=low_rank_placement(), ignored_params=ignored)
    opt = optimizer_for(name, model)
    for step in range(STEPS):
        x, y = fsdp_batch(step, rank)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        for p in ignored:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opt.step()
    return {"weights": [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                        for p in model.parameters()],
            "plain": [not hasattr(p, "full_tensor") for p in model.parameters()]}


for _name in MIXED_ROWS:
    CASES[f"mixed-{_name}"] = (lambda n: lambda: _mixed_case(n))(_name)


# ----------------------------------------------------------------------------------------------
# Layer-wise stepping under FSDP2

LAYERWISE_ROWS = [("galore", 1), ("fira8bit", 2), ("sst", 1), ("apollo", 2)]


def _grad_bytes(model: nn.Module) -> int:
    """Bytes of the storage behind every sharded gradient the parameters hold now (FSDP2's gradients of one
    fully_shard group are views of one reduce-scatter output: it lives until the last of them is freed)."""
    storages = {}
    for p in model.parameters():
        if p.grad is not None:
            storage = p.grad.to_local().untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _layerwise_case(name: str, accum: int) -> dict:
    """Layer-wise training on the sharded model with ``accum`` backward passes per step; and the same steps with
    ``optimizer.step()``: the peak of the sharded gradients' bytes in each."""
    from slimtrain.optimizers import LayerwiseStepper

    rank, _ = rank_world()
    model, opt = _sharded(name)
    peak = [0]
    for p in model.parameters():  # before the stepper's own hooks, which free each gradient
        p.register_post_accumulate_grad_hook(lambda p: peak.__setitem__(0, max(peak[0], _grad_bytes(model))))
    stepper = LayerwiseStepper(opt, accum, model=model)
    norms = []
    for step in range(STEPS):
        for micro in range(accum):
            x, y = fsdp_batch(step, rank, micro)
            (((model(x) - y) ** 2).mean() / accum).backward()
        assert all(p.grad is None for p in model.parameters())
        norms.append(stepper.grad_norm)
    stepper.remove()
    out = {"weights": [p.full_tensor() for p in model.parameters()], "norms": norms, "peak_layerwise": peak[0]}
    model, opt = _sharded(name)
    peak = 0
    for step in range(2):
        opt.zero_grad()
        for micro in range(accum):
            x, y = fsdp_batch(step, rank, micro)
            (((model(x) - y) ** 2).mean() / accum).backward()
        peak = max(peak, _grad_bytes(model))
        opt.step()
    out["peak_step"] = peak
    return out


for _name, _accum in LAYERWISE_ROWS:
    CASES[f"layerwise-{_name}-accum{_accum}"] = (lambda n, a: lambda: _layerwise_case(n, a))(_name, _accum)


@case
def nonfinite_on_one_rank() -> dict:
    """A NaN in the last rank's piece of one gradient: every rank skips the step (no weight, no state moves)."""
    rank, world = rank_world()
    model, opt = _sharded("galore")
    train_steps(model, opt, 0, 2, rank)
    before = [p.to_local().clone() for p in model.parameters()]
    state = {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone()
             for k, v in opt.state[next(iter(model.parameters()))].items()}
    x, y = fsdp_batch(2, rank)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if rank == world - 1:
        next(p for p in model.parameters() if p.grad.to_local().numel()).grad.to_local()[0] = float("nan")
    opt.step()
    after = opt.state[next(iter(model.parameters()))]
    return {"skipped": opt.skipped_steps,
            "unchanged": all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before)),
            "state_unchanged": all(torch.equal(after[k].to_local() if hasattr(after[k], "to_local") else after[k], v)
                                   for k, v in state.items())}


# ----------------------------------------------------------------------------------------------
# What is refused, and when


@case
def refusals() -> dict:
    """Each refusal's message, or ``None`` where nothing was refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slimtrain.optimizers import GaLoreAdamW, LayerwiseStepper

    _, world = rank_world()
    out = {}

    def attempt(key, build):
        try:
            build()
        except RuntimeError as e:
            out[key] = str(e)
        else:
            out[key] = None

    # HSDP: replicated over one mesh dimension, sharded over the other.
    hsdp = fsdp_mlp()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    for layer in (hsdp[0], hsdp[2], hsdp[4], hsdp[6]):
        fully_shard(layer, mesh=mesh)
    attempt("hsdp", lambda: GaLoreAdamW(fsdp_groups(hsdp), lr=1e-2))
    # bf16 weights rounded stochastically: each rank would draw its own piece's noise.
    bf16 = shard_model(fsdp_mlp().to(torch.bfloat16))
    attempt("bf16_stochastic_round", lambda: GaLoreAdamW(fsdp_groups(bf16), lr=1e-2, bf16_stochastic_round=True))
    # Layer-wise under FSDP2 with a parameter the sharded model does not hold.
    model = shard_model(fsdp_mlp())
    extra = torch.nn.Parameter(torch.zeros(3))
    attempt("layerwise_outside", lambda: LayerwiseStepper(GaLoreAdamW([*fsdp_groups(model), {"params": [extra]}]),
                                                          model=model))
    attempt("layerwise_no_model", lambda: LayerwiseStepper(GaLoreAdamW(fsdp_groups(model))))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # A rank that fails exits at once (torchrun then stops the others); a lost peer fails a collective in 120 s.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    for name in args.cases.split(","):
        try:
            result = CASES[name]()
        except BaseException:  # noqa: BLE001 - reported to the test, then this rank stops
            with open(os.path.join(args.out, f"{name}.rank{rank}.error"), "w") as f:
                f.write(traceback.format_exc())
            os._exit(1)
        torch.save(result, os.path.join(args.out, f"{name}.rank{rank}.pt"))
    leave_process_group()


if __name__ == "__main__":
    main()
