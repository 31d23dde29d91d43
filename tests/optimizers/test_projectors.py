"""Projectors against independent math: scipy's DCT, exact SVD, float64 projections."""

import math

import pytest
import torch

from slimtrain.optimizers import GaLoreAdamW
from slimtrain.optimizers.projectors import (
    PROJECTORS,
    DCTProjector,
    RandomizedProjector,
    SVDProjector,
    make_projector,
)
from slimtrain.optimizers.projectors.dct import dct_ii, dct_matrix, dct_rows

from .helpers import groups, mlp, train

scipy_fft = pytest.importorskip("scipy.fft")


@pytest.mark.parametrize("n", [1, 2, 7, 36, 37, 128])
def test_fft_dct_matches_scipy(n):
    x = torch.randn(5, n, dtype=torch.float64)
    ref = torch.from_numpy(scipy_fft.dct(x.numpy(), type=2, norm="ortho"))
    torch.testing.assert_close(dct_ii(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [5, 64, 11008])
def test_dct_rows_are_orthonormal_and_match_fft(n):
    idx = torch.tensor([0, 1, n // 2, n - 1])
    rows = dct_rows(idx, n, torch.device("cpu")).double()
    torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
    # Row k of the DCT-II matrix is the transform of the k-th unit impulse's dual: C @ e_j = column j.
    x = torch.randn(3, n, dtype=torch.float64)
    ref = dct_ii(x)[:, idx]
    # fp32 cosines (phase reduced exactly in int64): error ~ sqrt(n) * 6e-8 * |x|.
    torch.testing.assert_close(x @ rows.T, ref, rtol=0, atol=1e-4 * math.sqrt(n) / 10)


def test_dense_dct_basis_shared_per_dimension():
    a = dct_matrix(48, torch.device("cpu"))
    assert dct_matrix(48, torch.device("cpu")) is a
    torch.testing.assert_close(a.double() @ a.double().T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["fft", "matmul"])
def test_dct_selects_the_aligned_frequencies(backend):
    n, r = 64, 3
    basis = dct_rows(torch.tensor([5, 17, 40]), n, torch.device("cpu"))
    coeff = torch.randn(100, r) * 10
    grad = coeff @ basis + 1e-3 * torch.randn(100, n)  # energy on frequencies 5, 17, 40
    state = {}
    proj = DCTProjector(backend=backend)
    proj.init_state(state, seed=0)
    proj.refresh(grad, state, r, transposed=False)
    assert state["proj_idx"].tolist() == [5, 17, 40]
    assert state["proj_idx"].dtype == torch.int64
    torch.testing.assert_close(proj.project(grad, state), grad @ basis.T)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_project_back_of_project_is_a_projection(name):
    torch.manual_seed(0)
    grad = torch.randn(30, 20)
    proj = make_projector(name)
    state = {}
    proj.init_state(state, seed=3)
    proj.refresh(grad, state, 6, transposed=False)
    b = proj.basis(state, 20, grad.device).double()
    assert b.shape == (6, 20)
    if name != "random":  # Gaussian rows are only nearly orthonormal (N(0, 1/n) entries)
        torch.testing.assert_close(b @ b.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-5)
    low = proj.project(grad, state)
    torch.testing.assert_close(low.double(), grad.double() @ b.T, rtol=1e-5, atol=1e-5)
    back = proj.project_back(low, state, 20)
    torch.testing.assert_close(back.double(), grad.double() @ b.T @ b, rtol=1e-5, atol=1e-5)


def test_randomized_recovers_exact_low_rank_subspace():
    torch.manual_seed(0)
    grad = torch.randn(200, 4) @ torch.randn(4, 60)  # rank 4
    state = {}
    proj = RandomizedProjector(oversample=4, niter=1)
    proj.init_state(state, seed=1)
    proj.refresh(grad, state, 4, transposed=False)
    b = state["proj_basis"]
    _, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    # Same subspace: the projector onto it is the same.
    torch.testing.assert_close((b.T @ b).double(), vh[:4].T @ vh[:4], rtol=0, atol=1e-4)


def test_seeded_projectors_never_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for name in ("random", "randomized", "columns"):
        state = {}
        proj = make_projector(name)
        proj.init_state(state, seed=5)
        proj.refresh(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)), state, 3, transposed=False)
        proj.basis(state, 8, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------ bf16 bases
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits: round to nearest is within 2^-8 relative)


class _RoundedThroughFp32(SVDProjector):
    """An fp32 SVD projector whose basis is the bf16-rounded one, stored in fp32: the reference for
    ``basis_dtype="bf16"``, which must step exactly as if its basis were this one."""

    def refresh(self, grad_t, state, rank, *, transposed):
        super().refresh(grad_t, state, rank, transposed=transposed)
        state["proj_basis"] = state["proj_basis"].to(torch.bfloat16).float()


@pytest.mark.parametrize("projector", [SVDProjector(basis_dtype="bf16"), RandomizedProjector(basis_dtype="bf16")],
                         ids=["svd", "randomized"])
def test_bf16_basis_is_the_fp32_basis_rounded(projector):
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    fp32 = type(projector)()
    state16, state32 = {}, {}
    for proj, st in ((projector, state16), (fp32, state32)):
        proj.init_state(st, seed=3)
        proj.refresh(g, st, 8, transposed=False)
    assert state16["proj_basis"].dtype == torch.bfloat16
    assert torch.equal(state16["proj_basis"], state32["proj_basis"].to(torch.bfloat16))
    # Rows stay orthonormal within the rounding: each element moves by at most u relative, so
    # |(B~ B~^T - I)_ij| <= 2u sum_k |b_ik b_jk| + u^2 <= 2u + u^2 (Cauchy-Schwarz), plus the fp32 basis's own
    # departure from orthonormality (measured on it).
    b16, b32 = projector.basis(state16, 32, g.device), fp32.basis(state32, 32, g.device)
    eye = torch.eye(8)
    fp32_error = float((b32 @ b32.T - eye).abs().max())
    assert float((b16.double() @ b16.double().T - eye.double()).abs().max()) <= 2 * BF16_U + BF16_U**2 + fp32_error


def test_bf16_basis_steps_as_the_rounded_basis_in_fp32():
    """Storing the basis in bf16 changes only its rounding: GaLore with it moves the weights exactly as GaLore
    with the bf16-rounded basis kept in fp32 (the projection itself always runs in fp32)."""
    runs = []
    for projector in (SVDProjector(basis_dtype="bf16"), _RoundedThroughFp32()):
        model = mlp()
        opt = GaLoreAdamW(groups(model), lr=1e-2, projector=projector)
        train(model, opt, 12)  # refreshes at steps 0, 5, 10
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_basis_dtype_is_checked_by_name():
    with pytest.raises(ValueError, match=r"Invalid basis_dtype: 'fp16' \(expected one of 'fp32', 'bf16'\)"):
        SVDProjector(basis_dtype="fp16")
    with pytest.raises(ValueError, match=r"Invalid basis_dtype: torch.bfloat16"):
        RandomizedProjector(basis_dtype=torch.bfloat16)


def test_dense_dct_basis_is_one_copy_per_device_whatever_its_spelling():
    from slimtrain.optimizers.projectors import dct as dct_module

    a = dct_matrix(24, torch.device("cpu"))
    assert dct_matrix(24, "cpu") is a
    if torch.cuda.is_available():  # where it mattered: "cuda" and "cuda:0" made two copies
        assert dct_matrix(24, "cuda") is dct_matrix(24, torch.device("cuda", torch.cuda.current_device()))
    assert sum(1 for key in dct_module._DENSE_CACHE if key[0] == 24) == (2 if torch.cuda.is_available() else 1)
