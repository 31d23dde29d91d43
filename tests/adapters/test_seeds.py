"""Adapters derive through slimtrain/_seeds.py exactly the seeds that saved adapters were written with: the
reference fixtures in ``seed_fixtures/`` (``seed_fixtures/make_seed_adapters.py``) hold, for every seed
derivation of the adapters, the seeded init of the trainable tensors and the output through the seeded bases
and selections."""

from __future__ import annotations

import pytest
import torch

from seed_fixtures.make_seed_adapters import CASES, HERE, run


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_of_earlier_code_regenerates_bit_for_bit(name):
    want = torch.load(HERE / f"{name}.pt", weights_only=True)
    got = run(CASES[name]())
    assert got["init"].keys() == want["init"].keys()
    for key in want["init"]:
        assert torch.equal(got["init"][key], want["init"][key]), key
        assert torch.equal(got["perturbed"][key], want["perturbed"][key]), key
    # Same trainable tensors, so the output differs only if a basis or a selection does. Exact: the reference
    # was computed with the same ops on a CPU; a wrong seed changes every basis entry, the output by O(0.1).
    assert torch.equal(got["output"], want["output"])
