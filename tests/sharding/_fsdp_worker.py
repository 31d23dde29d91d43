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

from slimtrain.sharding.matrix_shards import MatrixShard, broadcast_tensors

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# The sharded-matrix maths on its own

#: Shapes with uneven pieces on 2 and 3 ranks, a rank with no rows (3 x 7 on 3 ranks... of its 3 rows, 1 each;
#: 2 x 9 on 3 ranks: the third rank holds none), and both orientations.
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
