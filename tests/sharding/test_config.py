"""Configurations the sharded step cannot serve are refused before DeepSpeed builds anything."""

import pytest

from slimtrain.optimizers import FrugalAdamW, GaLoreAdamW, SSTAdamW
from slimtrain.sharding.api import check_config

from ..optimizers.helpers import groups, mlp

pytest.importorskip("deepspeed")


def _opt(cls=GaLoreAdamW, **kw):
    return cls(groups(mlp()), **kw)


BAD = [
    ("offload-optimizer", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, _opt,
     r"Unsupported zero_optimization\.offload_optimizer\.device: 'cpu'.*set it to 'none'"),
    ("offload-param", {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, _opt,
     r"Unsupported zero_optimization\.offload_param\.device: 'nvme'"),
    ("optimizer-section", {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 1}}, _opt,
     r"it has an 'optimizer' section"),
    ("elastic", {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, _opt,
     r"Unsupported zero_optimization\.elastic_checkpoint: true"),
    ("fp16", {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, _opt, r"Unsupported fp16\.enabled: true.*use bf16"),
    ("stage", {"zero_optimization": {"stage": 4}}, _opt, r"Invalid zero_optimization\.stage: 4 \(expected 0, 1, 2 or 3\)"),
    ("sst", {"zero_optimization": {"stage": 2}}, lambda: _opt(SSTAdamW), r"SSTAdamW rewrites whole weights"),
    ("frugal-block", {"zero_optimization": {"stage": 1}}, lambda: _opt(FrugalAdamW, mode="block"), r"under zero_optimization\.stage 1: FrugalAdamW\(mode='block'\) chooses the active matrices"),
    ("not-ours", {"zero_optimization": {"stage": 1}}, lambda: __import__("torch").optim.AdamW(mlp().parameters()), r"Invalid optimizer: AdamW"),
    ("stage-word", {"zero_optimization": {"stage": "two"}}, _opt, r"Invalid zero_optimization\.stage: 'two' \(expected 0, 1, 2 or 3\)"),
    ("stage-bool", {"zero_optimization": {"stage": True}}, _opt, r"Invalid zero_optimization\.stage: True"),
    ("zero-null", {"zero_optimization": None}, _opt, r"Invalid zero_optimization: None \(expected an object"),
    # ZeRO steps fp32 partitions: the option would be silently ignored (measured: 0 roundings at stages 1-3).
    ("bf16-sr", {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, lambda: _opt(bf16_stochastic_round=True),
     r"Unsupported bf16_stochastic_round=True under zero_optimization\.stage 2: ZeRO steps fp32 partitions"),
    # DeepSpeed's BF16_Optimizer swaps flat fp32 copies in at stage 0: measured RuntimeError at initialize.
    ("bf16-stage0", {"bf16": {"enabled": True}}, _opt, r"Unsupported bf16\.enabled: true at zero_optimization\.stage 0.*use stage 1, 2 or 3"),
    ("bfloat16-stage0", {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 0}}, lambda: _opt(SSTAdamW),
     r"Unsupported bfloat16\.enabled: true at zero_optimization\.stage 0"),
]


@pytest.mark.parametrize("config,make,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_refused_with_the_setting_named(config, make, match):
    with pytest.raises(ValueError, match=match):
        check_config(config, make())


def test_supported_configs_pass():
    assert check_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}, "bf16": {"enabled": True}}, _opt()) == 3
    assert check_config({}, _opt(SSTAdamW)) == 0  # stage 0: the optimizer sees whole matrices
    assert check_config({"bf16": {"enabled": False}}, _opt(SSTAdamW)) == 0
