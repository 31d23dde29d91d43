"""The DeepSpeed fence (slimtrain/sharding/_deepspeed.py): a supported version range, and every DeepSpeed
internal read behind it. Single process, no DeepSpeed engine."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from slimtrain.optimizers import GaLoreAdamW
from slimtrain.sharding import ZeroLowRankOptimizer, _deepspeed, zero


@pytest.mark.parametrize("version", ["0.19.0", "0.19.8", "0.19.8+cpu", "0.19.9rc1"])
def test_supported_versions_pass(version):
    _deepspeed.check_deepspeed_version(version)


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0"])
def test_versions_outside_the_range_are_refused_with_the_range(version):
    with pytest.raises(ImportError, match=rf"supports deepspeed>=0\.19,<0\.20, found deepspeed=={re.escape(version)}"):
        _deepspeed.check_deepspeed_version(version)


def test_installed_deepspeed_is_supported_and_checked_when_the_wrapper_is_built(monkeypatch):
    pytest.importorskip("deepspeed")
    _deepspeed.check_deepspeed_version()
    opt = GaLoreAdamW([torch.nn.Parameter(torch.zeros(4, 4))])
    ZeroLowRankOptimizer(opt)
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.raises(ImportError, match=r"found deepspeed==0\.20\.1"):
        ZeroLowRankOptimizer(opt)


def test_a_missing_internal_is_named():
    assert _deepspeed.stage12_fragment(torch.zeros(3)) is None  # this rank holds no piece
    with pytest.raises(RuntimeError, match=r"DeepSpeed internal fp16_groups is missing on object"):
        list(_deepspeed.stage3_subgroups(object()))
    with pytest.raises(RuntimeError, match=r"DeepSpeed internal ds_tensor\.ds_numel is missing"):
        _deepspeed.stage3_partition_numel(torch.zeros(3))


def test_zero_reads_no_deepspeed_internal_and_no_private_optimizer_method():
    source = inspect.getsource(zero)
    assert not re.search(r"_hp_mapping|fp16_groups|ds_tensor|ds_numel|fp32_partitioned|sub_group_to_group_id", source)
    assert not re.search(r"\.inner\._", source)
