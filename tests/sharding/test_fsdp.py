"""slimtrain's optimizers on FSDP2 (fully_shard) models, on 2 and 3 torchrun gloo ranks, against one process.

Every case runs in one launch per world size (starting ranks dominates the time): ``tests/sharding/_fsdp_worker.py``
holds them. The model (``fsdp_mlp``) has matrices of both orientations whose dimensions 2 and 3 mostly do not
divide, so pieces are uneven; under ``low_rank_placement`` one wide matrix is sharded by columns on each world
size (4 x 8 on 2 ranks, 2 x 9 on 3), and on 3 ranks a 2-row matrix sharded by rows leaves a rank with none.

**The tolerance.** A sharded step is the single-process arithmetic on the same global batch, but FSDP2's gradient
is the reduce-scatter's average of per-rank means, where one process takes one mean over every sample, and a
contracted projection adds the ranks' partial products: both differ from one process in the last bits of fp32
(a few 1e-8 relative). Over 12 steps that crosses two refreshes (an SVD's basis turns with its input), the
weights measured stay within 5e-7 of one process's for every method, 8-bit twins included; 1e-5 leaves that
margin. 8-bit moments are quantized in blocks of the whole moment (``BlockPiece``), so their codes are one
process's wherever the fp32 values entering quantization are: the 8-bit twins' only difference is the gradient
rounding above, which can move a value across a code boundary; measured, it did not at this size, and the same
1e-5 holds.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from . import _fsdp_worker as W

pytest.importorskip("torch.distributed.fsdp")
dcp = pytest.importorskip("torch.distributed.checkpoint")

EXACT = W.config_names()
TOLERANCE = 1e-5  # see the module docstring


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", EXACT)
def test_every_method_matches_one_process(ranks, world, name):
    ref = W.one_process(name, world)
    for rank in range(world):
        got = ranks[world][(rank, f"exact-{name}")]
        assert _max_diff(got["weights"], ref) <= TOLERANCE
        assert all(torch.equal(a, b) for a, b in zip(got["weights"], ranks[world][(0, f"exact-{name}")]["weights"]))


@pytest.mark.parametrize("name", W.EXACT_ROWS)
def test_every_parameter_by_rows_matches_one_process(ranks, name):
    """FSDP2's default placement: the wide matrices' projections are contracted (a reduce-scatter and an
    all-gather of their ``m' x r`` products each step)."""
    ref = W.one_process(name, 2)
    for rank in range(2):
        got = ranks[2][(rank, f"exact-rows-{name}")]
        assert set(got["placements"]) == {"S(0)"}
        assert _max_diff(got["weights"], ref) <= TOLERANCE


@pytest.mark.parametrize("world", [2, 3])
def test_low_rank_placement_keeps_wide_matrices_by_columns_where_they_divide(ranks, world):
    """4 x 8 divides into 2 column pieces, 2 x 9 into 3; every other parameter stays by rows."""
    placements = ranks[world][(0, "exact-galore")]["placements"]
    wide = {2: 2, 3: 6}[world]  # the parameter index sharded along dimension 1
    assert placements == ["S(1)" if i == wide else "S(0)" for i in range(len(placements))]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", EXACT)
def test_state_is_split_and_whole_state_is_replicated(ranks, world, name):
    """Against one process's state, key by key: a split tensor's pieces add up to its whole shape over the ranks,
    a tensor kept whole is one process's size on every rank; Adam's moments (fp32 or 8-bit codes) are always
    split, the 8-bit block scales, bases, indices and counters kept whole."""
    model = W.fsdp_mlp()
    opt = W.optimizer_for(name, model)
    for step in range(W.STEPS):  # the same steps, so FRUGAL's block mode is in the same window
        xs, ys = zip(*(W.fsdp_batch(step, r) for r in range(world)))
        opt.zero_grad()
        ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean().backward()
        opt.step()
    whole = [{k: list(v.shape) for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
             for p in (q for g in opt.param_groups for q in g["params"])]
    layouts = [ranks[world][(rank, f"exact-{name}")]["state"] for rank in range(world)]
    for index, expected in enumerate(whole):
        assert set(layouts[0][index]) == set(expected), index
        for key, shape in expected.items():
            pieces = [layout[index][key] for layout in layouts]
            assert all(piece[1] == shape for piece in pieces), (index, key)
            numel = torch.Size(shape).numel()
            if pieces[0][2]:
                assert sum(piece[0] for piece in pieces) == numel, (index, key)
            else:
                assert all(piece[0] == numel for piece in pieces), (index, key)
            if key in ("exp_avg", "exp_avg_sq"):
                assert pieces[0][2], f"{key} of parameter {index} is not split"
            if key.endswith("_absmax") or key.startswith("proj_"):
                assert not pieces[0][2], f"{key} of parameter {index} is split"
        if "sst_u" in expected:  # SST: the factor on the split side, and its moments, by rows
            assert layouts[0][index]["sst_u"][2] != layouts[0][index]["sst_v"][2]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", W.DCP_ROWS)
def test_sharded_checkpoint_resumes_bit_for_bit(ranks, world, name):
    """dcp.save at step 7, then a fresh model and optimizer (other weights) restored with dcp.load and
    set_state_dict, 5 more steps: the uninterrupted run's weights exactly."""
    for rank in range(world):
        got = ranks[world][(rank, f"dcp-{name}")]
        assert all(torch.equal(a, b) for a, b in zip(got["resumed"], got["uninterrupted"]))


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed.checkpoint's state-dict functions in this process: a group of one gloo rank."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", W.DCP_ROWS)
def test_full_checkpoint_of_two_ranks_continues_in_one_process_and_on_three(ranks, shared, one_rank_group, name):
    """The full state dict a 2-rank run saved at step 7 (get_optimizer_state_dict(full_state_dict=True), saved with
    torch.save, loaded with weights_only=True) continues in one process exactly as the 2-rank run did, and on 3
    ranks as one process does on the 3 ranks' batches."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    saved = torch.load(os.path.join(shared, f"{name}-2ranks-full.pt"), weights_only=True)
    full = StateDictOptions(full_state_dict=True)
    for world, expected in ((2, ranks[2][(0, f"dcp-{name}")]["uninterrupted"]),
                            (3, ranks[3][(0, f"dcp-{name}")]["from_2_ranks"])):
        model = W.fsdp_mlp(seed=1)
        opt = W.optimizer_for(name, model)
        set_model_state_dict(model, saved["model"], options=full)
        set_optimizer_state_dict(model, opt, saved["optim"], options=full)
        for step in range(W.SAVED_AT, W.STEPS):
            xs, ys = zip(*(W.fsdp_batch(step, r) for r in range(world)))
            opt.zero_grad()
            ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean().backward()
            opt.step()
        assert _max_diff([p.detach() for p in model.parameters()], expected) <= TOLERANCE, world


@pytest.mark.parametrize("name", W.ACCELERATE_ROWS)
def test_parameters_swapped_as_accelerate_swaps_them(ranks, name):
    """Accelerate's FSDP2 preparation swaps the optimizer's parameters for the sharded ones after it was built:
    before its first step the optimizer takes them and matches one process; after it, the next step is refused,
    naming what to do, and moves no weight."""
    ref = W.one_process(name, 2)
    for rank in range(2):
        got = ranks[2][(rank, f"accelerate-{name}")]
        assert _max_diff(got["weights"], ref) <= TOLERANCE
        assert "swapped in after it was built" in got["refusal"] and "Build the optimizer after fully_shard" in got["refusal"]
        assert got["unchanged"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", W.MIXED_ROWS)
def test_a_mixed_model_matches_one_process(ranks, world, name):
    """One layer left out of FSDP2 (plain tensors, gradients averaged by hand) beside sharded ones, in one
    optimizer: one process's weights."""
    ref = W.one_process(name, world)
    for rank in range(world):
        got = ranks[world][(rank, f"mixed-{name}")]
        assert got["plain"] == [False] * 4 + [True] * 2 + [False] * 2
        assert _max_diff(got["weights"], ref) <= TOLERANCE


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name,accum", W.LAYERWISE_ROWS)
def test_layerwise_under_fsdp2(ranks, world, name, accum):
    """Each sharded gradient stepped in FSDP2's hook and freed: one process's weights (with accumulation over
    backward passes too), the global gradient norm of every step, and, without accumulation, a peak of sharded
    gradient bytes below the regular step's (one fully_shard group's at a time instead of every group's; with
    accumulation they are held over the window, as the regular step holds them)."""
    norms = []
    ref = W.one_process(name, world, accum=accum, norms=norms)
    for rank in range(world):
        got = ranks[world][(rank, f"layerwise-{name}-accum{accum}")]
        assert _max_diff(got["weights"], ref) <= TOLERANCE
        # The norm sums every rank's squared pieces: the order of an fp32 sum, relative 1e-6.
        torch.testing.assert_close(torch.stack(got["norms"]), torch.stack(norms), rtol=1e-6, atol=0)
        if accum == 1:
            assert got["peak_layerwise"] < got["peak_step"]
        else:
            assert got["peak_layerwise"] <= got["peak_step"]


def test_what_cannot_run_sharded_is_refused_when_built(ranks):
    for rank in range(2):
        m = ranks[2][(rank, "refusals")]
        assert m["hsdp"] and "on a 2-D mesh" in m["hsdp"] and "HSDP" in m["hsdp"]
        assert m["bf16_stochastic_round"] and "MixedPrecisionPolicy" in m["bf16_stochastic_round"]
        assert m["layerwise_outside"] and "that the fully_shard model does not" in m["layerwise_outside"]
        assert m["layerwise_no_model"] and "model=fsdp_model" in m["layerwise_no_model"]


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    for rank in range(2):
        got = ranks[2][(rank, "nonfinite_on_one_rank")]
        assert got["skipped"] == 1 and got["unchanged"] and got["state_unchanged"]
