"""slimtrain/_seeds.py derives exactly the seeds the code before it derived: a table of values computed by
that code (the inline formulas of projectors/base.py, quantized.py, sst.py, frugal.py, base.py, and
adapters/_common.py's stable_seed, s2ft/model.py, randlora/layer.py at commit 84746c6), and optimizer runs
recorded by it (``data/seeds/make_seed_checkpoints.py``) that a fresh run and a resumed one must follow.

What a seed decides is compared exactly: the integers in the optimizer's state (seeds, counters, drawn
indices) and the sampled decisions after every step. What is computed from them (the parameters, through
matmuls, SVDs and QRs) is compared within a bound, because another processor rounds those differently. All
of it runs on the CPU, where the files were computed, whatever device the suite runs on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimtrain import _seeds

from .data.seeds.make_seed_checkpoints import CASES, HERE, train_deciding
from .helpers import groups, load_checkpoint, mlp

# (function of slimtrain._seeds, arguments, the seed the code at commit 84746c6 computed)
PINNED = [
    ("parameter_seed", (0, 0), 0),
    ("parameter_seed", (0, 5), 5),
    ("parameter_seed", (12345, 3), 12345037038),
    ("parameter_seed", (1099511627776, 7), 1099514926310883335),
    ("projector_stream_seed", (0, 0), 0),
    ("projector_stream_seed", (12345037038, 2), 12345074073111116),
    ("projector_stream_seed", (4611686018427387904, 5), 4611686018427887910),
    ("rounding_stream_seed", (0, 0), 0),
    ("rounding_stream_seed", (12345037038, 9), 24690432082074111),
    ("rounding_stream_seed", (4611686018427387904, 5), 4611686018428387923),
    ("sst_draw_seed", (0, 0), 0),
    ("sst_draw_seed", (12345037038, 4), 97760348303926),
    ("sst_draw_seed", (4611686018427387904, 5), 4611686018427391868),
    ("data_order_seed", (0, 3), 3),  # recipes/data.py's inline seed * 1_000_003 + epoch at commit 4d8fe6f
    ("data_order_seed", (12345, 2), 12345037037),
    ("block_order_seed", (0, 0), 0),
    ("block_order_seed", (12345, 2), 12345037037),
    ("block_order_seed", (1099511627776, 3), 1099514926310883331),
    ("stable_seed", ("nola", 2, 5, "base_model.model.lin0", "A"), 7082498027551490521),
    ("stable_seed", ("nola", 1, 0, "lin0", "A0"), 5476990534996061719),
    ("stable_seed", (5, 1), 6087751059095086736),
    ("stable_seed", ("nola-init", 5, "lin0", "B"), 5001044683115852345),
    ("stable_seed", ("randlora", 1, 3, "B"), 6131265217624946095),
    ("stable_seed", ("randlora", 2, 3, "A"), 3327478447844534862),
    ("stable_seed", ("loldu-init", "base_model.model.lin1", 4), 6556619663368224198),
    ("stable_seed", ("s2ft-init", "lin0"), 5499504963747382763),
    ("s2ft_selection_seed", (0, "lin0"), 3390378381),
    ("s2ft_selection_seed", (3, "block0"), 8520659557),
    ("s2ft_selection_seed", (4611686018427387904, "model.layers.1.mlp"), 4611686018938220814),
    ("randlora_init_seed", (0,), 1),
    ("randlora_init_seed", (3,), 4),
    ("randlora_init_seed", (9223372036854775806,), 9223372036854775807),
]


@pytest.mark.parametrize("name, args, expected", PINNED, ids=lambda v: v if isinstance(v, str) else None)
def test_every_derivation_gives_the_seeds_it_always_gave(name, args, expected):
    assert getattr(_seeds, name)(*args) == expected


def test_every_derivation_is_pinned():
    derivations = {n for n in dir(_seeds) if n.endswith("_seed") and callable(getattr(_seeds, n))} - {"child_seed"}
    assert derivations == {name for name, _, _ in PINNED}


def test_generator_is_torchs_generator_seeded_so():
    a, b = _seeds.generator(12345), torch.Generator().manual_seed(12345)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


RECORDED = json.loads((HERE / "decisions.json").read_text())  # the decisions after each of the 7 + 11 steps

# fp32 parameters respond smoothly to rounding. Another processor's gradients differ from these by about
# 136 u times their matrix's largest entry at most (u = 2**-24; the longest chain of sums here: the forward's
# 24-, 40- and 16-term dot products, the backward's 8- and 16-term ones, the 32-row batch sum; cancellation
# aside), measured: 4.5 u with MKL's processor-independent kernels, 13 u with ATen's scalar ones. NOISE is
# 168 u. Moving every gradient entry by up to NOISE times its matrix's largest moves the parameters of these
# 7 or 11 steps by at most 5.4e-5 (FRUGAL; SST 1.5e-5, GaLore 1.1e-6), and FP32_ATOL leaves a factor 2 over
# that. Measured with MKL's and ATen's other kernel paths against the AMD EPYC that wrote the files: 1.6e-6 at
# most. A wrong seed moves them by 5e-3 or more. (galore-randomized's warm-started range finder hides a wrong
# seed after the first refresh, to 6e-6; its fresh run, whose first sketch is all drawn, catches it.)
NOISE = 1e-5
FP32_ATOL = 1e-4
# bf16 weights with stochastic rounding: a rounding difference elsewhere flips an element's rounding, by one
# bf16 step, only where the seeded draw lands that close to the threshold: 5 of 1792 elements at worst,
# measured. A wrong rounding stream re-rounds everything: 62% to 88% of each tensor moves. Steps are those
# of the tensor's largest entries, next to which an fp32 difference of rounding size is nothing.
BF16_STEPS, BF16_SHARE = 2, 0.05


def _assert_near(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if want.dtype != torch.bfloat16:
        torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL, msg=lambda m: f"{what}: {m}")
        return
    step = 2.0 ** (math.floor(math.log2(max(want.float().abs().max().item(), 2.0**-126))) - 7)
    diff = (got.float() - want.float()).abs()
    share = (diff > 0).float().mean().item()
    assert diff.max() <= BF16_STEPS * step and share <= BF16_SHARE, (
        f"{what}: {diff.max() / step:.1f} bf16 steps, {share:.1%} of the elements moved")


def _add_gradient_noise(model, size: float) -> None:
    """Move every gradient entry by up to ``size`` times its matrix's largest entry, uniformly, seeded."""
    g = torch.Generator().manual_seed(99)
    for p in model.parameters():
        p.register_hook(lambda grad: (grad.float() + size * grad.float().abs().max()
                                      * (2 * torch.rand(grad.shape, generator=g) - 1)).to(grad.dtype))


# A run with noisy gradients must pass the same checks: every decision it makes is that far from a tie (an
# SST draw from singular values, a sign in FRUGAL's inactive update), and the bounds above hold for it. Not
# for bf16 weights: there the noise moves a gradient entry by a whole bf16 step or not at all, which can flip
# the sign of an SVD basis vector (at galore-bf16-sr's last refresh). Their bf16 runs came out the same bits
# on every processor and kernel path tried (an Intel Xeon; oneDNN held to AVX2 or AVX-512; ATen's AVX2 path).
RUNS = [(name, 0.0) for name in sorted(CASES)]
RUNS += [(name, NOISE) for name in sorted(CASES) if CASES[name][0] == torch.float32]
ROUNDINGS = pytest.mark.parametrize("name, noise", RUNS, ids=[f"{n}-{'noisy' if x else 'here'}" for n, x in RUNS])


@ROUNDINGS
def test_fresh_run_makes_the_saved_draws(name, noise):
    """A fresh optimizer makes the earlier code's decisions at every step, and after 7 steps holds its integer
    state (the parameter seeds it stored, counters, drawn indices) and nearly its parameters."""
    dtype, factory = CASES[name]
    saved = torch.load(HERE / f"{name}.pt", weights_only=True)
    model = mlp(dtype=dtype)
    opt = factory(groups(model))
    if noise:
        _add_gradient_noise(model, noise)
    assert train_deciding(model, opt, steps=7) == RECORDED[name][:7]
    fresh, want = opt.state_dict()["state"], saved["opt"]["state"]
    assert fresh.keys() == want.keys()
    compared = set()
    for i, entries in want.items():
        assert fresh[i].keys() == entries.keys(), i
        for key, value in entries.items():
            if not value.is_floating_point():
                assert torch.equal(fresh[i][key], value), (i, key)
                compared.add(key)
    # Parameter seeds among them, but for FRUGAL's block order, seeded from the optimizer's seed alone.
    assert compared & {"proj_seed", "sst_seed", "sr_seed"} or name == "frugal-block-random"
    for key, p in model.state_dict().items():
        _assert_near(p, saved["model"][key], key)


@ROUNDINGS
def test_checkpoint_of_earlier_code_resumes(name, noise):
    """Loaded with weights_only and stepped 11 more times, the optimizer makes the earlier code's decisions
    at every step and reaches its parameters."""
    dtype, factory = CASES[name]
    ckpt = torch.load(HERE / f"{name}.pt", weights_only=True)
    model = mlp(dtype=dtype)
    opt = factory(groups(model))
    load_checkpoint(model, opt, ckpt)
    if noise:
        _add_gradient_noise(model, noise)
    assert train_deciding(model, opt, steps=11, start=7) == RECORDED[name][7:]
    for i, (p, want) in enumerate(zip(model.parameters(), ckpt["after"])):
        _assert_near(p.detach(), want, f"parameter {i}")
