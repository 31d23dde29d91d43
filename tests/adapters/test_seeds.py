"""Adapters derive their seeds through slimtrain/_seeds.py exactly as the code before it did: the fixtures in
``seed_fixtures/`` (written by ``seed_fixtures/make_seed_adapters.py`` with the code of commit 84746c6) hold,
for every seed derivation of the adapters, the seeded init of the trainable tensors and the output through
the seeded bases and selections."""

from __future__ import annotations

import pytest
import torch

from seed_fixtures.make_seed_adapters import CASES, HERE, run

# The output is computed from the seeded tensors by fp32 sums: a basis mix of at most 40 terms, a rank-4
# product, the three layers' dot products of 16, 32 and 24 terms; N = 128 bounds the terms summed along
# any path to an output. Each processor's result is within N * u * S of the exact one (u = 2**-24, S the
# sums' magnitude, which no cancellation in these models lifts far above max|out|), so two processors agree
# within 2 * N * u * max|out| = 1.5e-5 * max|out|. Measured: 3.5 * u * max|out| at worst (an Intel Xeon
# against the fixtures' AMD EPYC, and MKL's processor-independent kernels, MKL_CBWR=COMPATIBLE). A wrong seed
# or selection moves the output by 0.11 * max|out| or more; a generator's range scaled by 1 + 1e-4, by 5e-5.
OUTPUT_RTOL = 2 * 128 * 2.0**-24


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_of_earlier_code_regenerates(name):
    want = torch.load(HERE / f"{name}.pt", weights_only=True)
    got = run(CASES[name]())
    # Seeded tensors are exact: the same seed and generator give the same bits on every x86-64 processor with
    # AVX2 (torch draws the same normals with its AVX2 and AVX-512 kernels; only its scalar fallback differs).
    assert got["init"].keys() == want["init"].keys()
    for key in want["init"]:
        assert torch.equal(got["init"][key], want["init"][key]), key
        assert torch.equal(got["perturbed"][key], want["perturbed"][key]), key
    # Same trainable tensors, so the output differs beyond rounding only if a basis or a selection does.
    # Computed on the CPU, as the fixture was, whatever device the suite runs on.
    tolerance = OUTPUT_RTOL * want["output"].abs().max().item()
    torch.testing.assert_close(got["output"], want["output"], rtol=0, atol=tolerance)
