"""DCT selection scores: the fused kernel against the dense product it replaces."""

from __future__ import annotations

import pytest
import torch

from slimtrain.kernels import dct_scores as D
from slimtrain.optimizers.projectors.dct import dct_matrix

from .conftest import DEVICE


def _grad(m, n, dtype, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=g).T if transposed else torch.randn(m, n, generator=g)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", [(37, 53), (100, 40), (1, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed-view"])
def test_kernel_matches_reference(shape, dtype, norm, transposed, triton_backend, poison):
    grad = _grad(*shape, dtype, transposed)
    dct = dct_matrix(shape[1], DEVICE)
    got = D.dct_scores(grad, dct, norm)
    # A sum over m rows of fp32 dot products: relative error a few ulps times sqrt(m).
    torch.testing.assert_close(got, D.dct_scores_reference(grad, dct, norm), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [2, 3])
def test_row_splits_sum_to_the_same_scores(splits):
    grad = _grad(100, 40, torch.float32, transposed=False)
    dct = dct_matrix(40, DEVICE)
    got = D._dct_scores_triton(grad, dct, 1, splits=splits)
    torch.testing.assert_close(got, D.dct_scores_reference(grad, dct, 1), rtol=1e-5, atol=1e-6)


def test_scores_pick_the_directions_the_gradient_lies_in():
    dct = dct_matrix(64, DEVICE)
    grad = torch.randn(30, 3, device=DEVICE) @ dct[[3, 17, 40]]  # rows in the span of three DCT directions
    assert set(torch.topk(D.dct_scores(grad, dct, 1), 3).indices.tolist()) == {3, 17, 40}


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match=r"Invalid norm: 3 \(expected 1 or 2\)"):
        D.dct_scores(torch.zeros(4, 8), dct_matrix(8, torch.device("cpu")), 3)
    with pytest.raises(ValueError, match=r"Invalid dct: torch.float32 of shape \(7, 7\) \(expected torch.float32 \(8, 8\)\)"):
        D.dct_scores(torch.zeros(4, 8), dct_matrix(7, torch.device("cpu")))
