"""The memory calculator counts exactly what the optimizers allocate, and its command line works."""

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtrain.memory import estimate_memory, main
from slimtrain.optimizers import OPTIMIZERS, low_rank_param_groups
from slimtrain.optimizers.projectors import RandomizedProjector, SVDProjector

pytest.importorskip("bitsandbytes")

RANK = 8
# Small enough to build and step in a second, large enough that min_8bit_size=1024 splits it: the
# 64 x 160 MLP moments (160 x 8 = 1280 elements) and the 512 x 64 embedding/head go 8-bit, the
# 64 x 64 attention moments (512) and the norms stay fp32, so both storages are counted.
CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
MIN_8BIT = 1024

# (optimizer name, constructor kwargs, estimate kwargs)
SETTINGS = [
    ("galore", {}, {}),
    ("galore", {"projector": "random"}, {"projector": "random"}),
    ("galore", {"projector": SVDProjector(basis_dtype="bf16")}, {"basis_dtype": "bf16"}),
    ("fira", {"projector": RandomizedProjector(basis_dtype="bf16")}, {"projector": "randomized", "basis_dtype": "bf16"}),
    ("galore", {"projector": "columns", "proj_type": "reverse_std"}, {"projector": "columns", "proj_type": "reverse_std"}),
    ("fira", {}, {}),
    ("frugal", {}, {}),
    ("frugal", {"mode": "block", "density": 0.5}, {"mode": "block", "density": 0.5}),
    ("dct", {}, {}),
    ("sst", {}, {}),
]


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).to(dtype)


def _step(model, opt):
    x = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name,opt_kw,est_kw", SETTINGS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SETTINGS)])
def test_estimate_equals_allocated_state_exactly(name, opt_kw, est_kw, bits):
    model = _llama()
    opt_kw = dict(opt_kw)
    groups = low_rank_param_groups(model, "all-linear", rank=RANK, proj_type=opt_kw.pop("proj_type", "std"))
    opt = OPTIMIZERS[name](groups, lr=1e-4, state_bits=bits, min_8bit_size=MIN_8BIT, **opt_kw)
    _step(model, opt)
    est = estimate_memory(CONFIG, name, rank=RANK, state_bits=bits, min_8bit_size=MIN_8BIT,
                          weight_dtype="fp32", model=model, **est_kw)
    # Exact, counters included: the calculator counts every int64 step/seed/index the optimizers keep.
    assert est.total.state == opt.state_bytes()
    assert est.total.weights == est.total.grads == sum(p.numel() * 4 for p in model.parameters())
    if bits == 8:
        assert est.total.absmax > 0
        assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values())


def test_estimate_equals_state_with_bf16_stochastic_rounding():
    model = _llama(torch.bfloat16)
    opt = OPTIMIZERS["galore8bit"](low_rank_param_groups(model, "all-linear", rank=RANK), lr=1e-4,
                                   min_8bit_size=MIN_8BIT, bf16_stochastic_round=True)
    _step(model, opt)
    est = estimate_memory(CONFIG, "galore8bit", rank=RANK, min_8bit_size=MIN_8BIT, model=model,
                          bf16_stochastic_round=True)
    assert est.total.state == opt.state_bytes()
    assert est.total.weights == sum(p.numel() * 2 for p in model.parameters())


def test_estimate_from_meta_model_matches_built_model():
    built = estimate_memory(CONFIG, "galore", rank=RANK, model=_llama())
    meta = estimate_memory(CONFIG, "galore", rank=RANK)
    assert built.as_dict()["components"] == meta.as_dict()["components"]


def test_builtin_llama_shapes():
    # GaLore's 60M: 2 x 32000 x 512 (embeddings, head) + 8 x (4 x 512^2 + 3 x 512 x 1376 + 2 x 512) + 512
    est = estimate_memory("60M", "adamw", weight_dtype="fp32")
    rows = {c.name: c for c in est.components}
    assert est.total.params == 58_073_600
    assert rows["embeddings"].params == rows["head"].params == 32000 * 512
    assert rows["norms"].params == 17 * 512
    assert est.total.weights == 4 * 58_073_600
    # AdamW: two fp32 moments per weight, one int64 step per tensor
    n_tensors = 2 + 8 * 9 + 1
    assert est.total.state == 8 * 58_073_600 + 8 * n_tensors
    seven = estimate_memory("7b", "galore8bit")  # meta device: no 7B allocation
    assert 6.7e9 < seven.total.params < 6.8e9 and seven.total.moments < seven.total.weights


def test_8bit_state_is_about_a_quarter_of_moments():
    fp32 = estimate_memory("350M", "adamw", state_bits=32)
    int8 = estimate_memory("350M", "adamw", state_bits=8)
    # 1 byte + 4/256 bytes of absmax per element instead of 4: ratio 1.0156 / 4 = 0.254 (norms stay fp32)
    ratio = (int8.total.moments + int8.total.absmax) / fp32.total.moments
    assert 0.253 < ratio < 0.256


def test_layerwise_counts_one_gradient():
    est = estimate_memory("130M", "galore", layerwise=True)
    assert est.total.grads == 32000 * 768 * 2  # the largest tensor (embeddings or head), bf16


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"Invalid model: '13B' \(expected one of 60M, 130M, 350M, 1B, 7B"):
        estimate_memory("13B")
    with pytest.raises(ValueError, match=r"Invalid optimizer: 'lion'"):
        estimate_memory("60M", "lion")
    with pytest.raises(ValueError, match=r"Invalid rank: 600 \(expected 1 <= rank <= 512"):
        estimate_memory("60M", "galore", rank=600)
    with pytest.raises(ValueError, match=r"Invalid state_bits: 4"):
        estimate_memory("60M", "galore", state_bits=4)


def test_cli_and_config_path(tmp_path, capsys):
    path = tmp_path / "config.json"
    CONFIG.to_json_file(path)
    est = main([str(path), "--optimizer", "dct8bit", "--rank", str(RANK), "--min-8bit-size", str(MIN_8BIT)])
    out = capsys.readouterr().out
    assert "Assumptions:" in out and "8-bit moments" in out and "attention" in out
    model = _llama()
    assert est.total.state == estimate_memory(CONFIG, "dct", rank=RANK, state_bits=8, min_8bit_size=MIN_8BIT, model=model).total.state
    main(["60M", "--optimizer", "adamw", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["components"]["total"]["params"] == 58_073_600


def test_slimtrain_memory_subcommand(capsys):
    from slimtrain.cli import main as cli_main

    cli_main(["memory", "60M", "--optimizer", "galore", "--state-bits", "8"])
    assert "60M: galore rank 128, 8-bit states" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "frugal", "density": -1.0}, r"Invalid density: -1.0 \(expected 0 <= density <= 1\)"),
        ({"optimizer": "frugal", "density": 5.0}, r"Invalid density: 5.0"),
        ({"optimizer": "frugal", "density": float("nan")}, r"Invalid density: nan"),
        ({"optimizer": "frugal", "mode": "block", "density": None}, r"Invalid density: None \(block mode"),
        ({"state_bits": 8, "block_size": 7}, r"Invalid block_size: 7 \(expected one of 64, 128, 256"),
        ({"min_8bit_size": -1}, r"Invalid min_8bit_size: -1"),
        ({"rank": 0}, r"Invalid rank: 0 \(expected an integer >= 1\)"),
        ({"proj_type": "sideways"}, r"Invalid proj_type: 'sideways'"),
        ({"basis_dtype": "fp16"}, r"Invalid basis_dtype: 'fp16' \(expected one of 'fp32', 'bf16'\)"),
        ({"optimizer": "dct", "basis_dtype": "bf16"}, r"Invalid basis_dtype: 'bf16' \(only the svd and randomized"),
        ({"optimizer": "sst", "basis_dtype": "bf16"}, r"Invalid basis_dtype: 'bf16' \(only the svd and randomized"),
    ],
)
def test_settings_the_optimizers_refuse_are_not_estimated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory("60M", **kwargs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["60M", "--optimizer", "frugal", "--density", "-1"], r"^error: Invalid --density: -1.0 \(expected 0 <= density <= 1\)$"),
        (["60M", "--block-size", "7"], r"^error: Invalid --block-size: 7 \(expected one of 64, "),
        (["60M", "--density", "nan"], r"^error: Invalid --density: nan"),
        (["13B"], r"^error: Invalid model: '13B' \(expected one of 60M"),
        (["60M", "--optimizer", "dct", "--basis-dtype", "bf16"], r"^error: Invalid --basis-dtype: 'bf16' \(only the svd"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err.strip()), captured.err


def test_options_object_equals_keywords():
    from slimtrain.memory import MemoryOptions

    options = MemoryOptions(rank=RANK, state_bits=8, min_8bit_size=MIN_8BIT, method_options={"mode": "block", "density": 0.5})
    by_object = estimate_memory(CONFIG, "frugal", options)
    assert by_object.as_dict() == estimate_memory(CONFIG, "frugal", rank=RANK, state_bits=8, min_8bit_size=MIN_8BIT,
                                                  mode="block", density=0.5).as_dict()
    assert by_object.setting.startswith("frugal block, density 0.5, 8-bit states")
    with pytest.raises(TypeError, match="options or keyword settings, not both"):
        estimate_memory(CONFIG, "frugal", options, rank=RANK)
