"""The sharded-matrix maths (slimtrain/optimizers/shards.py) against whole-matrix computations, and the
collective counter (slimtrain/sharding/traffic.py) against FSDP2's traffic computed from the parameter shapes.

The distributed cases run in the launches of ``test_fsdp.py`` (one per world size, 2 and 3 gloo ranks).
"""

from __future__ import annotations

import functools

import pytest
import torch

from slimtrain.optimizers import moments as Q
from slimtrain.optimizers.shards import BlockPiece, balanced_owners, chunk_bounds

from . import _fsdp_worker as W

pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 7, 9, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_bounds_are_torch_chunk(size, world):
    expected, start = [], 0
    for piece in torch.arange(size).chunk(world):
        expected.append((start, start + piece.numel()))
        start += piece.numel()
    expected += [(size, size)] * (world - len(expected))  # torch.chunk leaves out empty trailing pieces
    assert list(chunk_bounds(size, world)) == expected


def test_balanced_owners_spread_the_cost():
    assert balanced_owners([4, 4, 4, 4], 2) == [0, 1, 0, 1]
    assert balanced_owners([10, 1, 1, 8], 2) == [0, 1, 1, 1]
    owners = balanced_owners([5.0] * 7, 3)
    assert sorted(owners.count(r) for r in range(3)) == [2, 2, 3]


@pytest.mark.parametrize("shape,block_size", [((7, 5), 64), ((40, 37), 64), ((13, 300), 256), ((5, 3), 64), ((300, 1), 64)])
@pytest.mark.parametrize("signed", [True, False])
def test_block_pieces_quantize_as_the_whole_tensor(shape, block_size, signed):
    """Every piece of a row or column partition into 2 or 3 gets bitsandbytes' codes of the whole tensor for
    its elements, and the MAX of the pieces' partial absmax is the whole tensor's absmax: exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) if signed else torch.rand(shape, generator=g)
    x[0, 0] = 0.0  # a zero, and a block whose largest element lies in another piece
    codes, absmax = Q.quantize_blockwise(x, signed=signed, block_size=block_size)
    whole_values = Q.dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size)
    quantize = functools.partial(Q.quantize_blockwise, signed=signed, block_size=block_size)

    def dequantize(c, a):
        return Q.dequantize_blockwise(c, a, signed=signed, block_size=block_size)

    for world in (2, 3):
        for dim in (0, 1):
            pieces = []
            for bounds in chunk_bounds(shape[dim], world):
                rows, cols = (bounds, (0, shape[1])) if dim == 0 else ((0, shape[0]), bounds)
                pieces.append(BlockPiece(shape, rows, cols, block_size))
            parts = [x[p.rows[0]:p.rows[1], p.cols[0]:p.cols[1]] for p in pieces]
            reduced = torch.stack([p.partial_absmax(part) for p, part in zip(pieces, parts)]).amax(0)
            assert torch.equal(reduced, absmax)
            for p, part in zip(pieces, parts):
                where = (slice(*p.rows), slice(*p.cols))
                piece_codes = p.quantize(part, reduced, quantize)
                assert torch.equal(piece_codes, codes[where])
                assert torch.equal(p.dequantize(piece_codes, reduced, dequantize), whole_values[where])


def test_partial_absmax_turns_nan_into_inf():
    piece = BlockPiece((4, 4), (0, 2), (0, 4), 64)
    part = torch.ones(2, 4)
    part[1, 1] = float("nan")
    assert torch.isinf(piece.partial_absmax(part)).all()


@pytest.mark.parametrize("world", [2, 3])
def test_matrix_ops_match_the_whole_matrix(ranks, world):
    results = ranks[world]
    for shape in W.MATRIX_SHAPES:
        for dim in (0, 1):
            for transposed in (False, True):
                key = f"{shape[0]}x{shape[1]}-dim{dim}-{'left' if transposed else 'right'}"
                grad, basis, direction = W.matrix_data(shape, transposed)
                grad_t = grad.T if transposed else grad
                low, back = grad_t @ basis.T, direction @ basis
                covered = torch.zeros(grad_t.shape[0], dtype=torch.int64)
                for rank in range(world):
                    got = results[(rank, "matrix_ops")][key]
                    (r0, r1), (c0, c1) = got["rows"].tolist(), got["cols"].tolist()
                    covered[r0:r1] += 1
                    # A contracted projection sums the ranks' partial products: fp32 rounding of a 9-term dot.
                    torch.testing.assert_close(got["low"], low[r0:r1], rtol=1e-6, atol=1e-6)
                    # The back projection of this rank's piece of G': its rows when row-local, all when contracted.
                    rows = (r0, r1) if got["row_local"] else (0, grad_t.shape[0])
                    torch.testing.assert_close(got["back"], back[rows[0]:rows[1], c0:c1], rtol=1e-6, atol=1e-6)
                    if rank == got["owner"]:
                        assert torch.equal(got["whole"], grad_t)
                    assert torch.equal(got["state"][0], torch.full((2, 3), 1.5))
                    assert torch.equal(got["state"][1], torch.arange(4)) and int(got["state"][2]) == 7
                assert torch.equal(covered, torch.ones_like(covered)), f"{key}: rows not split exactly once"


@pytest.mark.parametrize("world", [2, 3])
def test_counter_sees_fsdp2_traffic(ranks, world):
    """One AdamW step on the sharded MLP: FSDP2 all-gathers each layer's padded shards in the forward and
    again in the backward, and reduce-scatters its gradients; AdamW sends nothing. The counter must see exactly
    those bytes (fp32, padded shards of ceil(rows / W) rows), attributed to FSDP2."""
    results = ranks[world]
    model = W.tiny_mlp()
    padded = 0
    for layer in (model[0], model[2], model[4]):
        for p in layer.parameters():
            rows = -(-p.shape[0] // world)
            padded += rows * p[0].numel() * 4
    expected = {"fsdp2:all_gather_single": 2 * (world - 1) * padded, "fsdp2:reduce_scatter_single": (world - 1) * padded}
    for rank in range(world):
        got = results[(rank, "traffic_adamw")]
        assert got["bytes"] == expected
        assert got["calls"] == {"fsdp2:all_gather_single": 6, "fsdp2:reduce_scatter_single": 3}
