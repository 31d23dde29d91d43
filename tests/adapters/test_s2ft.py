"""S²FT: GQA head coupling checked against transformers' own attention, gradients against a dense float64
reference, partial backprop's saved tensors, seeded/weight-norm selection, exact reload from the saved
indices in a fresh process, slice-only merge, and MiniLM end to end.

The shared matrix (tests/adapters/test_matrix.py, rows in cases/s2ft.py) covers the generic behaviours on
every tiny model and dtype; this file checks what is specific to S²FT.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from slimtrain.adapters import S2FTConfig
from slimtrain.adapters.s2ft import head_group_cols, head_rows, s2ft_delta_output, s2ft_delta_weight

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA_TARGETS = ["v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
F64_TOL = dict(rtol=1e-10, atol=1e-12)  # float64, same math reassociated (dense vs sliced matmuls)


def tiny_llama(dtype=torch.float32, num_key_value_heads=2, seed=0):
    """hidden 64, 4 query heads of 16, ``num_key_value_heads`` KV heads, FFN 96, 2 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tokens(batch=2, length=7):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def run_fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter (repo on sys.path) and parse the JSON on its last stdout line."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def s2ft_layers(model):
    from slimtrain.adapters.s2ft import S2FTLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, S2FTLayer)}


# ------------------------------------------------------------------------------------------ coupling
@pytest.mark.parametrize("num_kv", [1, 2, 4])  # MQA, GQA, MHA
def test_head_coupling_matches_transformers_attention(num_kv):
    """Perturb the v rows of one KV head: exactly the o_proj input columns we couple to it must change."""
    model = tiny_llama(torch.float64, num_key_value_heads=num_kv)
    attn = model.model.layers[0].self_attn
    captured = []
    attn.o_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().clone()))
    ids = tokens()
    head_dim, n_rep = 16, 4 // num_kv
    for kv in range(num_kv):
        captured.clear()
        with torch.no_grad():
            model(input_ids=ids)
            rows = head_rows(torch.tensor([kv]), head_dim)
            attn.v_proj.weight[rows] += 1.0
            model(input_ids=ids)
            attn.v_proj.weight[rows] -= 1.0
        changed = (captured[1] - captured[0]).abs().amax(dim=(0, 1)) > 1e-9
        expected = torch.zeros(4 * head_dim, dtype=torch.bool)
        expected[head_group_cols(torch.tensor([kv]), n_rep, head_dim)] = True
        assert torch.equal(changed, expected), f"kv head {kv}: changed o columns {changed.nonzero().flatten().tolist()}"


def test_gqa_selection_couples_v_rows_with_all_query_heads_of_the_group():
    model = get_peft_model(tiny_llama(), S2FTConfig(num_heads_per_block=1, num_channels_per_block=3,
                                                    target_modules=LLAMA_TARGETS))
    layers = s2ft_layers(model)
    for block in (0, 1):
        prefix = f"base_model.model.model.layers.{block}"
        v_rows = layers[f"{prefix}.self_attn.v_proj"].s2ft_index["default"]
        o_cols = layers[f"{prefix}.self_attn.o_proj"].s2ft_index["default"]
        kv = int(v_rows[0]) // 16
        assert v_rows.tolist() == list(range(16 * kv, 16 * kv + 16))
        assert o_cols.tolist() == list(range(32 * kv, 32 * kv + 32))  # query heads 2kv and 2kv+1
        channels = layers[f"{prefix}.mlp.down_proj"].s2ft_index["default"]
        for name in ("up_proj", "gate_proj"):
            assert torch.equal(layers[f"{prefix}.mlp.{name}"].s2ft_index["default"], channels)
        assert layers[f"{prefix}.self_attn.v_proj"].s2ft_delta["default"].shape == (16, 64)
        assert layers[f"{prefix}.self_attn.o_proj"].s2ft_delta["default"].shape == (64, 32)
    # per block: v 16x64 + o 64x32 + (up, gate) 3x64 each + down 64x3
    assert model.get_nb_trainable_parameters()[0] == 2 * (16 * 64 + 64 * 32 + 3 * 64 * 3)


# ------------------------------------------------------------------------------------------ gradients
def test_gradients_equal_dense_reference_restricted_to_selection():
    torch.manual_seed(0)
    base = tiny_llama(torch.float64)
    reference = copy.deepcopy(base)
    config = S2FTConfig(num_heads_per_block=1, num_channels_per_block=5, init_weights=False,
                        target_modules=LLAMA_TARGETS)
    model = get_peft_model(base, config)
    layers = s2ft_layers(model)
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():  # the reference holds W + ΔW densely, every weight trainable
        for name, layer in layers.items():
            ref_modules[name.removeprefix("base_model.model.")].weight += layer.get_delta_weight("default")
    for p in reference.parameters():
        p.requires_grad_(True)
    ids = tokens()
    loss = model(input_ids=ids, labels=ids).loss
    ref_loss = reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, **F64_TOL)
    loss.backward()
    ref_loss.backward()
    for name, layer in layers.items():
        grad = layer.s2ft_delta["default"].grad
        index = layer.s2ft_index["default"]
        dense = ref_modules[name.removeprefix("base_model.model.")].weight.grad
        expected = dense[index] if layer.s2ft_axis["default"] == 0 else dense[:, index]
        torch.testing.assert_close(grad, expected, **F64_TOL)


def test_selected_columns_function_gradcheck_and_saved_tensors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=g, requires_grad=True)
    delta = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([9, 2, 4])
    assert torch.autograd.gradcheck(lambda a, b: s2ft_delta_output(a, b, index, 1), (x, delta))

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = s2ft_delta_output(x, delta, index, 1)
    torch.testing.assert_close(out, x @ s2ft_delta_weight(delta, index, 1, (7, 12)).T, **F64_TOL)
    # partial backprop: the selected 3 of 12 input columns (a copy, not a view of x), Δ and the index only
    assert sorted(tuple(t.shape) for t in saved) == sorted([(2, 5, 3), (7, 3), (3,)])
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)


# ------------------------------------------------------------------------------------------ selection
def _indices(model):
    return {n: layer.s2ft_index["default"].clone() for n, layer in s2ft_layers(model).items()}


def test_random_selection_is_seeded():
    def build(seed):
        return _indices(get_peft_model(tiny_llama(), S2FTConfig(num_heads_per_block=1, num_channels_per_block=4,
                                                                 seed=seed, target_modules=LLAMA_TARGETS)))

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_readding_a_deleted_adapter_selects_afresh():
    config = dict(num_heads_per_block=1, num_channels_per_block=4, target_modules=LLAMA_TARGETS)
    model = get_peft_model(tiny_llama(), S2FTConfig(seed=0, **config))
    model.add_adapter("x", S2FTConfig(seed=0, **config))
    first = _indices(model)
    model.delete_adapter("x")
    model.add_adapter("x", S2FTConfig(seed=1, **config))
    second = {n: layer.s2ft_index["x"] for n, layer in s2ft_layers(model).items()}
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_weight_norm_selection_picks_the_largest_heads_and_channels():
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[0].self_attn.o_proj.weight[:, 32:64] *= 10  # query heads 2, 3 -> KV group 1
        base.model.layers[0].mlp.down_proj.weight[:, [5, 70]] *= 10
    model = get_peft_model(base, S2FTConfig(num_heads_per_block=1, num_channels_per_block=2, selection="weight_norm",
                                            target_modules=LLAMA_TARGETS))
    layers = s2ft_layers(model)
    prefix = "base_model.model.model.layers.0"
    assert layers[f"{prefix}.self_attn.v_proj"].s2ft_index["default"].tolist() == list(range(16, 32))
    assert layers[f"{prefix}.mlp.up_proj"].s2ft_index["default"].tolist() == [5, 70]


def test_bad_selection_inputs_raise_value_errors():
    with pytest.raises(ValueError, match=r"Invalid num_heads_per_block: 3 \(expected 0 <= value <= "
                                         r"num_key_value_heads = 2\)"):
        get_peft_model(tiny_llama(), S2FTConfig(num_heads_per_block=3, target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match=r"Invalid num_channels_per_block: 97 \(expected 0 <= value <= 96"):
        get_peft_model(tiny_llama(), S2FTConfig(num_channels_per_block=97, target_modules=LLAMA_TARGETS))
    with pytest.raises(ValueError, match=r"Invalid target module .*q_proj: no S²FT role"):
        get_peft_model(tiny_llama(), S2FTConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Invalid target module .*v_proj: out_features=32 \(expected "
                                         r"num_key_value_heads \* head_dim = 2 \* 8"):
        get_peft_model(tiny_llama(), S2FTConfig(head_dim=8, target_modules=["v_proj"]))


def test_bnb_8bit_base_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    with pytest.raises(TypeError, match=r"S2FT does not support bitsandbytes 8-bit"):
        get_peft_model(model, S2FTConfig(num_heads_per_block=0, num_channels_per_block=2, target_modules=["0"],
                                         module_roles={"0": "ffn_rows"}))


# ------------------------------------------------------------------------------------------ merge, reload
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_touches_only_selected_slices_and_unmerges(dtype):
    model = get_peft_model(tiny_llama(dtype), S2FTConfig(num_heads_per_block=1, num_channels_per_block=4,
                                                         init_weights=False, target_modules=LLAMA_TARGETS))
    layers = s2ft_layers(model)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    ids = tokens()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        model.merge_adapter()
        for name, layer in layers.items():
            diff = layer.base_layer.weight.float() - before[name].float()
            mask = s2ft_delta_weight(torch.ones_like(layer.s2ft_delta["default"]), layer.s2ft_index["default"],
                                     layer.s2ft_axis["default"], tuple(diff.shape)).bool()
            assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))  # untouched outside the selection
            # inside: exactly Δ up to rounding W + Δ once to the weight dtype (indices are sorted, so the
            # masked entries come out in Δ's row-major order for rows and for columns alike)
            atol = torch.finfo(dtype).eps * (before[name].float().abs().max().item() + 1)
            torch.testing.assert_close(diff[mask], layer.s2ft_delta["default"].float().flatten(), rtol=0, atol=atol)
        tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: merged weights rounded to 8 mantissa bits
        torch.testing.assert_close(model(input_ids=ids).logits.float(), unmerged, rtol=tol, atol=tol)
        model.unmerge_adapter()
        for name, layer in layers.items():
            torch.testing.assert_close(layer.base_layer.weight, before[name], rtol=torch.finfo(dtype).eps,
                                       atol=torch.finfo(dtype).eps)


def test_disable_adapter_and_two_named_adapters():
    base = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    model = get_peft_model(base, S2FTConfig(num_heads_per_block=1, num_channels_per_block=4, init_weights=False,
                                            target_modules=LLAMA_TARGETS))
    model.add_adapter("other", S2FTConfig(num_heads_per_block=2, num_channels_per_block=2, seed=5,
                                          init_weights=False, target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():
        out_default = model(input_ids=ids).logits.clone()
        model.set_adapter("other")
        out_other = model(input_ids=ids).logits.clone()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(out_default, out_other) and not torch.allclose(out_other, expected)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}


FRESH_RELOAD = r"""
import json, torch
import slimtrain.adapters  # registers S2FT with PEFT
import slimtrain.adapters.s2ft.model as s2ft_model
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

# The selector must not matter on reload: make it pick different heads and channels than at training time.
real = s2ft_model.select_units
s2ft_model.select_units = lambda n, k, *args, **kwargs: (real(n, k, *args, **kwargs) + 1) % n

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
base = LlamaForCausalLM(cfg).eval()
model = PeftModel.from_pretrained(base, "{path}").eval()
ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    out = model(input_ids=ids).logits
    model.merge_adapter()
    merged = model(input_ids=ids).logits
    model.unmerge_adapter()
    unmerged = model(input_ids=ids).logits
torch.save({"out": out, "merged": merged, "unmerged": unmerged}, "{path}/fresh.pt")
print(json.dumps({"ok": True}))
"""


def test_fresh_process_reload_uses_saved_indices(tmp_path):
    model = get_peft_model(tiny_llama(), S2FTConfig(num_heads_per_block=1, num_channels_per_block=4,
                                                    target_modules=LLAMA_TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens()).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for k, t in saved.items() if k.endswith("s2ft_index")} == {torch.int64}
    assert run_fresh_python(FRESH_RELOAD.replace("{path}", str(tmp_path)))["ok"]
    fresh = torch.load(tmp_path / "fresh.pt")
    torch.testing.assert_close(fresh["out"], expected, rtol=0, atol=0)  # same fp32 ops on the same tensors
    torch.testing.assert_close(fresh["merged"], expected, rtol=1e-5, atol=1e-5)  # fp32 merge rounding
    torch.testing.assert_close(fresh["unmerged"], expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_without_indices_fails_clearly(tmp_path):
    model = get_peft_model(tiny_llama(), S2FTConfig(num_channels_per_block=2, target_modules=["down_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("s2ft_index")}, path)
    with pytest.raises(ValueError, match=r"Invalid S²FT checkpoint: .*down_proj has a trained block but no s2ft_"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
