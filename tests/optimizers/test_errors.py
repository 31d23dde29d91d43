"""Every bad input gets a clear error naming the parameter, the value and what is allowed.

Errors are test data: add a row to ERROR_CASES, and the one generic test runs it.
"""

import pytest
import torch

from slimtrain.optimizers import (
    APOLLOAdamW,
    APOLLOMiniAdamW,
    DCTAdamW,
    FiraAdamW,
    FrugalAdamW,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    SSTAdamW,
    low_rank_param_groups,
)

from .helpers import mlp


def _groups(**over):
    m = mlp()
    g = {"params": [m[0].weight, m[2].weight], "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}
    g.update(over)
    return [g]


# (id, optimizer class, group overrides, constructor kwargs, error type, message regex)
ERROR_CASES = [
    ("lr<0", GaLoreAdamW, {}, {"lr": -1.0}, ValueError, r"Invalid lr: -1\.0 \(expected a finite number >= 0\)"),
    ("lr-nan", GaLoreAdamW, {}, {"lr": float("nan")}, ValueError, r"Invalid lr: nan"),
    ("beta1=1", GaLoreAdamW, {}, {"betas": (1.0, 0.999)}, ValueError, r"Invalid beta1: 1\.0 \(expected 0 <= beta1 < 1\)"),
    ("beta2<0", FiraAdamW, {}, {"betas": (0.9, -0.1)}, ValueError, r"Invalid beta2: -0\.1"),
    ("betas-shape", GaLoreAdamW, {}, {"betas": (0.9,)}, ValueError, r"Invalid betas"),
    ("eps<0", DCTAdamW, {}, {"eps": -1e-8}, ValueError, r"Invalid eps: -1e-08 \(expected a finite number >= 0\)"),
    ("wd<0", GaLoreAdamW, {}, {"weight_decay": -0.1}, ValueError, r"Invalid weight_decay: -0\.1"),
    ("rank0", GaLoreAdamW, {"rank": 0}, {}, ValueError, r"Invalid rank: 0 \(expected an integer >= 1\)"),
    ("rank-too-big", GaLoreAdamW, {"rank": 17}, {}, ValueError, r"Invalid rank: 17 \(expected 1 <= rank <= 16 for parameter of shape \(16, 40\)\)"),
    ("rank-float", FiraAdamW, {"rank": 2.5}, {}, ValueError, r"Invalid rank: 2\.5"),
    ("sst-rank-too-big", SSTAdamW, {"rank": 30}, {}, ValueError, r"Invalid rank: 30 \(expected 1 <= rank <= 24"),
    ("gap0", GaLoreAdamW, {"update_proj_gap": 0}, {}, ValueError, r"Invalid update_proj_gap: 0 \(expected an integer >= 1\)"),
    ("scale<0", GaLoreAdamW, {"scale": -1.0}, {}, ValueError, r"Invalid scale: -1\.0"),
    ("proj_type", GaLoreAdamW, {"proj_type": "full"}, {}, ValueError, r"Invalid proj_type: 'full' \(expected one of 'std', 'reverse_std', 'left', 'right'\)"),
    ("projector", GaLoreAdamW, {}, {"projector": "qr"}, ValueError, r"Invalid projector: 'qr' \(expected one of 'svd', 'randomized', 'dct', 'random', 'columns'\)"),
    ("group-projector", DCTAdamW, {"projector": "nope"}, {}, ValueError, r"Invalid projector: 'nope'"),
    ("moments", GaLoreAdamW, {}, {"moments": "forget"}, ValueError, r"Invalid moments: 'forget' \(expected one of 'keep', 'reset', 'rotate'\)"),
    ("nonfinite", GaLoreAdamW, {}, {"nonfinite": "ignore"}, ValueError, r"Invalid nonfinite: 'ignore'"),
    ("density>1", FrugalAdamW, {}, {"density": 1.5}, ValueError, r"Invalid density: 1\.5 \(expected 0 <= density <= 1\)"),
    ("density<0", FrugalAdamW, {}, {"density": -0.1}, ValueError, r"Invalid density: -0\.1"),
    ("frugal-mode", FrugalAdamW, {}, {"mode": "layer"}, ValueError, r"Invalid mode: 'layer' \(expected one of 'subspace', 'block'\)"),
    ("frugal-rule", FrugalAdamW, {}, {"inactive_update_rule": "adam"}, ValueError, r"Invalid inactive_update_rule: 'adam'"),
    ("frugal-block-none", FrugalAdamW, {}, {"mode": "block", "density": None}, ValueError, r"Invalid density: None"),
    ("fira-gamma", FiraAdamW, {}, {"gamma": 0.5}, ValueError, r"Invalid gamma: 0\.5 \(expected a number >= 1\)"),
    ("fira-residual", FiraAdamW, {}, {"residual": "paper"}, ValueError, r"Invalid residual: 'paper'"),
    ("apollo-scale_type", APOLLOAdamW, {}, {"scale_type": "row"}, ValueError, r"Invalid scale_type: 'row' \(expected one of 'channel', 'tensor'\)"),
    ("apollo-group-scale_type", APOLLOAdamW, {"scale_type": "layer"}, {}, ValueError, r"Invalid scale_type: 'layer'"),
    ("apollo-scale_front", APOLLOAdamW, {}, {"scale_front": 1}, ValueError, r"Invalid scale_front: 1 \(expected True or False\)"),
    ("apollo-gamma", APOLLOAdamW, {}, {"gamma": 0.9}, ValueError, r"Invalid gamma: 0\.9 \(expected a number >= 1, or None for no norm-growth limiter\)"),
    ("apollo-group-gamma", APOLLOAdamW, {"gamma": float("inf")}, {}, ValueError, r"Invalid gamma: inf"),
    ("apollo-mini-rank", APOLLOMiniAdamW, {}, {}, ValueError, r"Invalid rank/scale_type: 4/'tensor' \(APOLLOMiniAdamW is APOLLO at rank 1"),
    ("apollo-disable_nl", APOLLOAdamW, {}, {"disable_nl": True}, TypeError, r"APOLLOAdamW got unexpected keyword argument 'disable_nl' \(for 'disable_nl' use gamma=None"),
    ("apollo-proj", APOLLOAdamW, {"proj": "random"}, {}, TypeError, r"for 'proj' use 'projector' \(APOLLO's 'proj'\)"),
    ("sst-projector", SSTAdamW, {}, {"projector": "dct"}, ValueError, r"Invalid projector: 'dct' \(SSTAdamW samples"),
    ("sst-round", SSTAdamW, {}, {"iterations_per_round": 0}, ValueError, r"Invalid iterations_per_round: 0"),
    ("seed", GaLoreAdamW, {}, {"seed": -1}, ValueError, r"Invalid seed: -1"),
    # a parameter's seed, seed * 1_000_003 + index, is an int64 tensor: 10**13 overflowed at the first step
    ("seed-int64", GaLoreAdamW, {}, {"seed": 10**13}, ValueError,
     r"Invalid seed: 10000000000000 \(expected an integer in \[0, 9223344364674\]\)"),
    ("state_bits", GaLoreAdamW, {}, {"state_bits": 4}, ValueError, r"Invalid state_bits: 4 \(expected one of 32, 8\)"),
    ("group-state_bits", FiraAdamW, {"state_bits": 16}, {}, ValueError, r"Invalid state_bits: 16 \(expected one of 32, 8\)"),
    ("8bit-class-bits", GaLoreAdamW8bit, {}, {"state_bits": 32}, ValueError, r"Invalid state_bits: 32 \(GaLoreAdamW8bit keeps 8-bit states; use GaLoreAdamW"),
    ("block_size", GaLoreAdamW, {}, {"block_size": 100}, ValueError, r"Invalid block_size: 100 \(expected one of 64, 128, 256"),
    ("min_8bit_size", DCTAdamW, {}, {"min_8bit_size": -1}, ValueError, r"Invalid min_8bit_size: -1 \(expected an integer >= 0\)"),
    ("bf16_stochastic_round", GaLoreAdamW, {}, {"bf16_stochastic_round": "yes"}, ValueError, r"Invalid bf16_stochastic_round: 'yes' \(expected True or False\)"),
    ("maximize", GaLoreAdamW, {}, {"maximize": 1}, ValueError, r"Invalid maximize: 1 \(expected True or False\)"),
    # Keywords no method understands are refused as Python refuses an unexpected keyword argument.
    ("misspelt-kwarg", GaLoreAdamW, {}, {"maximize": True, "weigth_decay": 0.5}, TypeError, r"GaLoreAdamW got unexpected keyword argument 'weigth_decay' \('weigth_decay': did you mean 'weight_decay'\?\)"),
    ("misspelt-rank", FiraAdamW, {}, {"ranks": 8}, TypeError, r"FiraAdamW got unexpected keyword argument 'ranks' \('ranks': did you mean 'rank'\?\)"),
    ("other-method-option", GaLoreAdamW, {}, {"density": 0.25}, TypeError, r"GaLoreAdamW got unexpected keyword argument 'density' \('density' is an option of FrugalAdamW\)"),
    ("other-method-misspelt", GaLoreAdamW, {}, {"denisty": 0.25}, TypeError, r"'denisty': did you mean 'density', an option of FrugalAdamW\?"),
    ("frugal-misspelt", FrugalAdamW, {}, {"denisty": 0.25}, TypeError, r"FrugalAdamW got unexpected keyword argument 'denisty' \('denisty': did you mean 'density'\?\)"),
    ("two-unknown", DCTAdamW, {}, {"foo": 1, "bar": 2}, TypeError, r"DCTAdamW got unexpected keyword arguments 'bar', 'foo' \(accepted: amsgrad, betas, "),
    # torch.optim.AdamW's own keywords: accepted where they mean what we do, refused otherwise.
    ("amsgrad", GaLoreAdamW, {}, {"amsgrad": True}, ValueError, r"Invalid amsgrad: True \(expected False: AMSGrad's running max of v is not implemented\)"),
    ("fused", GaLoreAdamW, {}, {"fused": True}, ValueError, r"Invalid fused: True \(expected None: slimtrain picks its kernels itself .*set_backend"),
    ("foreach", FiraAdamW, {}, {"foreach": False}, ValueError, r"Invalid foreach: False \(expected None"),
    ("capturable", SSTAdamW, {}, {"capturable": True}, ValueError, r"Invalid capturable: True \(expected False"),
    ("correct_bias", GaLoreAdamW, {}, {"correct_bias": False}, ValueError, r"Invalid correct_bias: False \(expected True: Adam's bias correction is always on\)"),
    # Param-group keys: the same refusal (galore-torch's rank/update_proj_gap/scale/proj_type are ours).
    ("group-misspelt", GaLoreAdamW, {"rnak": 8}, {}, TypeError, r"GaLoreAdamW got unexpected param group key 'rnak' \('rnak': did you mean 'rank'\?\)"),
    ("group-fira-alpha", FiraAdamW, {"alpha": 0.25}, {}, TypeError, r"FiraAdamW got unexpected param group key 'alpha' \(for 'alpha' use 'scale' \(fira's 'alpha'\)\)"),
    ("group-other-method", GaLoreAdamW, {"gamma": 1.1}, {}, TypeError, r"'gamma' is an option of FiraAdamW"),
    ("group-amsgrad", GaLoreAdamW, {"amsgrad": True}, {}, ValueError, r"Invalid amsgrad: True"),
]


@pytest.mark.parametrize("cls,group_over,kwargs,exc,match", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_refused(cls, group_over, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(_groups(**group_over), **kwargs)


def test_complex_parameter_refused():
    p = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"Invalid parameter: complex dtype torch\.complex64"):
        GaLoreAdamW([p])


def test_sparse_gradient_refused_and_nothing_changes():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = GaLoreAdamW(emb.parameters(), lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Sparse gradients are not supported"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match=r"Invalid target_modules: \['attn'\] matches no linear layer"):
        low_rank_param_groups(mlp(), ["attn"])


def test_late_param_group_is_validated():
    opt = GaLoreAdamW(_groups())
    m = mlp()
    with pytest.raises(ValueError, match=r"Invalid rank: 99"):
        opt.add_param_group({"params": [m[4].weight], "rank": 99})


def test_flat_partitions_swapped_in_are_refused():
    """What DeepSpeed ZeRO does to a client optimizer: its params replaced by one flat partition."""
    import copy

    model = mlp()
    opt = GaLoreAdamW(_groups())
    flat = torch.nn.Parameter(torch.zeros(100))
    flat.grad = torch.ones(100)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"slimtrain\.sharding\.initialize"):
        opt.step()
    assert torch.equal(flat, torch.zeros(100))
    # A deep copy knows its own (copied) parameters.
    clone = copy.deepcopy(GaLoreAdamW(model.parameters()))
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    clone.step()


def test_drop_in_keywords_at_their_meaning_are_accepted():
    """What torch.optim.AdamW and galore-torch users spell out, at the values that mean our behaviour."""
    m = mlp()
    GaLoreAdamW(m.parameters(), amsgrad=False, foreach=None, fused=None, capturable=False, differentiable=False,
                decoupled_weight_decay=True, correct_bias=True, no_deprecation_warning=True, maximize=False)
    FrugalAdamW(_groups(initial_lr=0.1, amsgrad=False), density=0.5, inactive_lr_scale=0.1)
    SSTAdamW(_groups(), uniform_mix=0.1, iterations_per_round=2)
    FiraAdamW(_groups(), gamma=1.02, residual="fira_code")


def test_optimizers_and_adapters_share_one_message_per_check():
    """One validation module (slimtrain/_validation.py): the same bad value gets the same words from an
    optimizer and from an adapter config."""
    from slimtrain.adapters import NolaConfig, RandLoraConfig

    with pytest.raises(ValueError) as optimizer:
        GaLoreAdamW(_groups(rank=0))
    with pytest.raises(ValueError) as adapter:
        NolaConfig(target_modules=["lin0"], r=0)
    assert str(optimizer.value).split(": ", 1)[1] == str(adapter.value).split(": ", 1)[1] == "0 (expected an integer >= 1)"
    with pytest.raises(ValueError) as optimizer:
        FrugalAdamW(_groups(), inactive_update_rule="fast")
    with pytest.raises(ValueError) as adapter:
        RandLoraConfig(target_modules=["lin0"], forward_mode="fast")
    assert str(optimizer.value).endswith("'fast' (expected one of 'sign_sgd', 'sgd', 'none')")
    assert str(adapter.value).endswith("'fast' (expected one of 'auto', 'factored', 'dense')")
