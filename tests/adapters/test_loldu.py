"""LoLDU: factor math against float64 references, PEFT behaviours on a tiny GQA Llama, exact reload in a
fresh process without re-deriving pivots, and MiniLM end to end.

The shared matrix (tests/adapters/test_matrix.py, rows in cases/loldu.py) covers the generic behaviours on
every tiny model and dtype; this file checks what is specific to LoLDU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from slimtrain.adapters import LoLDUConfig
from slimtrain.adapters.loldu import ldu_factors, loldu_coefficients, loldu_delta_output, loldu_delta_weight

REPO_ROOT = Path(__file__).resolve().parents[2]
F64_TOL = dict(rtol=1e-12, atol=1e-12)  # float64 recomputation of the same products: only reassociation error


def tiny_llama(dtype=torch.float32, seed=0):
    """hidden 64, 4 query heads, 2 KV heads (GQA), FFN 96, 2 blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
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


def dense_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Reference only: the dense P with ``P @ (L D U) == W`` for ``W[perm] == L D U``."""
    P = torch.zeros(perm.numel(), perm.numel(), dtype=torch.float64)
    P[perm, torch.arange(perm.numel())] = 1.0
    return P


# ------------------------------------------------------------------------------------------ factor math
@pytest.mark.parametrize("shape", [(12, 12), (9, 16), (16, 9)])
def test_ldu_factors_reconstruct_weight(shape):
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = min(shape)
    perm, L, d, U = ldu_factors(w, k)
    assert sorted(perm.tolist()) == list(range(shape[0]))
    torch.testing.assert_close(dense_permutation(perm) @ L @ torch.diag(d) @ U, w, **F64_TOL)
    torch.testing.assert_close(L[:k].diagonal(), torch.ones(k, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(U.diagonal(), torch.ones(k, dtype=torch.float64), rtol=0, atol=0)
    assert torch.equal(L, torch.tril(L)) and torch.equal(U, torch.triu(U))
    # partial pivoting: |L| <= 1, the property that makes the leading pivots the "dominant" ones
    assert L.abs().max() <= 1.0 + 1e-12


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_ldu_top_r_is_the_leading_block_of_the_exact_factorization(out, inp, seed, data):
    """For any shape and r: the top-r product equals W minus the trailing factors' contribution (float64)."""
    r = data.draw(st.integers(1, min(out, inp)))
    w = torch.randn(out, inp, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    perm, L, d, U = ldu_factors(w, min(out, inp))
    perm_r, L_r, d_r, U_r = ldu_factors(w, r)
    assert torch.equal(perm_r, perm)
    P = dense_permutation(perm)
    head = P @ L[:, :r] @ torch.diag(d[:r]) @ U[:r]
    tail = P @ L[:, r:] @ torch.diag(d[r:]) @ U[r:]
    torch.testing.assert_close(P @ L_r @ torch.diag(d_r) @ U_r, head, **F64_TOL)
    torch.testing.assert_close(head + tail, w, **F64_TOL)


def test_ldu_factors_rank_deficient_weight_stays_finite():
    """A zero pivot must not divide by zero (the official code can produce inf there)."""
    w = torch.zeros(6, 5, dtype=torch.float64)
    w[:, 0] = torch.arange(1.0, 7.0, dtype=torch.float64)  # rank 1: pivots 2..5 are exactly zero
    perm, L, d, U = ldu_factors(w, 4)
    assert torch.isfinite(L).all() and torch.isfinite(U).all() and torch.isfinite(d).all()
    assert torch.equal(d[1:], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(dense_permutation(perm) @ L[:, :1] * d[0] @ U[:1], w, **F64_TOL)


def test_ldu_factors_bad_rank():
    with pytest.raises(ValueError, match=r"Invalid r: 7 \(expected 1 <= r <= 6 for a weight of shape \(6, 9\)\)"):
        ldu_factors(torch.randn(6, 9), 7)


def test_delta_output_and_weight_match_dense_reference():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(10, 7, dtype=torch.float64, generator=g)
    perm, L, d, U = ldu_factors(w, 3)
    z = d * (1 + 0.3 * torch.randn(3, dtype=torch.float64, generator=g))
    tau = torch.tensor(0.2, dtype=torch.float64)
    coef = loldu_coefficients(z, d, 0.5, tau)
    torch.testing.assert_close(coef, 0.5 * (z - d) + 0.2 * z, **F64_TOL)
    reference = dense_permutation(perm) @ L @ torch.diag(coef) @ U
    torch.testing.assert_close(loldu_delta_weight(perm, L, coef, U), reference, **F64_TOL)
    x = torch.randn(4, 5, 7, dtype=torch.float64, generator=g)
    torch.testing.assert_close(loldu_delta_output(x, perm, L, coef, U), x @ reference.T, **F64_TOL)


# ------------------------------------------------------------------------------------------ PEFT behaviour
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_init_output_is_bitwise_the_base_output(dtype):
    base = tiny_llama(dtype)
    ids = tokens()
    with torch.no_grad():
        expected = base(ids).logits.clone()
        model = get_peft_model(base, LoLDUConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        # ΔW = P L diag(s·(z − d0)) U with z == d0 exactly: the added term is exactly zero, in every dtype
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_only_the_diagonal_trains_and_factors_stay_frozen():
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("loldu_diag.default") for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 4  # 2 blocks x (q, v) x r
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=tokens(), labels=tokens()).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    model.set_adapter("default")  # PEFT re-enables grads here; the factors must stay frozen
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_train_scale_adds_one_trainable_scalar_with_gradient():
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=2, train_scale=True, target_modules=["v_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * (2 + 1)
    model(input_ids=tokens(), labels=tokens()).loss.backward()
    scale = model.base_model.model.model.layers[0].self_attn.v_proj.loldu_scale["default"]
    assert scale.grad is not None and scale.grad.abs() > 0  # d/dτ = <G, P L diag(z) U> != 0 at init


def test_unsupported_layer_and_rank_errors():
    # v_proj maps 64 -> 2 KV heads x 16 = 32 features: at most 32 pivots
    with pytest.raises(ValueError, match=r"Invalid r: 33 \(expected 1 <= r <= 32 for .*v_proj"):
        get_peft_model(tiny_llama(), LoLDUConfig(r=33, target_modules=["v_proj"]))
    with pytest.raises(TypeError, match=r"cannot wrap Embedding"):
        get_peft_model(tiny_llama(), LoLDUConfig(r=2, target_modules=["embed_tokens"]))


def _trained(model, steps=3, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
def test_merge_unmerge_and_merge_and_unload(dtype, tol):
    # tol: fp32 merge is a float32 sum (1e-5 on O(1) logits); bf16 rounds W + ΔW to 8 mantissa bits per weight
    config = LoLDUConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    model = _trained(get_peft_model(tiny_llama(dtype), config))
    ids = tokens()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        w0 = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits.float(), unmerged, rtol=tol, atol=tol)
        model.unmerge_adapter()
        w1 = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
        # one rounding each way: within one ulp of the base dtype
        torch.testing.assert_close(w1, w0, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
        torch.testing.assert_close(model(input_ids=ids).logits.float(), unmerged, rtol=tol, atol=tol)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits.float(), unmerged, rtol=tol, atol=tol)


def test_disable_adapter_and_two_named_adapters():
    base = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    model = get_peft_model(base, LoLDUConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", LoLDUConfig(r=2, init_weights=False, target_modules=["v_proj", "down_proj"]))
    with torch.no_grad():
        out_default = model(input_ids=ids).logits.clone()
        model.set_adapter("other")
        out_other = model(input_ids=ids).logits.clone()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(out_default, out_other)
    assert not torch.allclose(out_default, expected)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"other"}


def test_saved_file_holds_factors_not_weights(tmp_path):
    model = _trained(get_peft_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "down_proj"])))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert saved[f"{q}.loldu_perm"].dtype == torch.int64 and saved[f"{q}.loldu_perm"].shape == (64,)
    assert saved[f"{q}.loldu_L"].shape == (64, 4) and saved[f"{q}.loldu_U"].shape == (4, 64)
    floats = sum(t.numel() for t in saved.values() if t.is_floating_point())
    # per matrix r·(out + in + 2): q 64x64, down 64x96, 2 blocks
    assert floats == 2 * (4 * (64 + 64 + 2) + 4 * (64 + 96 + 2))
    assert all(t.numel() < 64 * 64 for t in saved.values())  # nothing the size of a weight


FRESH_RELOAD = r"""
import json, sys, torch
import slimtrain.adapters  # registers LOLDU with PEFT
import slimtrain.adapters.loldu.layer as layer
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

real = layer.ldu_factors
def other_pivots(weight, r):
    # A different machine/LAPACK could pivot differently: hand back a wrong row order and scaled factors.
    perm, L, d, U = real(weight, r)
    return perm.flip(0), 2 * L, d + 1, U / 3
layer.ldu_factors = other_pivots

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
base = LlamaForCausalLM(cfg).eval()
model = PeftModel.from_pretrained(base, sys.argv[1] if len(sys.argv) > 1 else "{path}").eval()
ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    out = model(input_ids=ids).logits
    merged = model.merge_and_unload()(input_ids=ids).logits
torch.save({"out": out, "merged": merged}, "{path}/fresh.pt")
print(json.dumps({"ok": True}))
"""


def test_fresh_process_reload_is_exact_without_rederiving_pivots(tmp_path):
    model = _trained(get_peft_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])))
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert run_fresh_python(FRESH_RELOAD.replace("{path}", str(tmp_path)))["ok"]
    fresh = torch.load(tmp_path / "fresh.pt")
    # Same fp32 ops on the same saved tensors: bit-identical even though the fresh process's LU was sabotaged.
    torch.testing.assert_close(fresh["out"], expected, rtol=0, atol=0)
    torch.testing.assert_close(fresh["merged"], expected, rtol=1e-5, atol=1e-5)  # fp32 merge rounding


def test_checkpoint_without_factors_fails_clearly(tmp_path):
    model = _trained(get_peft_model(tiny_llama(), LoLDUConfig(r=2, target_modules=["v_proj"])))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("loldu_U")}, path)
    with pytest.raises(ValueError, match=r"Invalid LoLDU checkpoint: .*v_proj has a trained diagonal but lacks"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_checkpoint_with_corrupt_permutation_fails_clearly(tmp_path):
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("loldu_perm"))
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"loldu_perm is not a permutation"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_bnb_8bit_base_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    with pytest.raises(TypeError, match=r"LoLDU does not support bitsandbytes 8-bit"):
        get_peft_model(model, LoLDUConfig(r=2, target_modules=["0"]))


# ------------------------------------------------------------------------ PEFT bookkeeping, FSDP, bad weights
def test_frozen_factors_are_buffers_not_adapter_layer_names():
    """PEFT treats every tensor named in adapter_layer_names as trainable adapter state (its requires_grad
    helpers thaw them); the frozen factors are persistent buffers, saved under the same keys."""
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["v_proj"], train_scale=True))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert set(layer.adapter_layer_names) == {"loldu_diag", "loldu_scale"}
    assert {"loldu_L", "loldu_U", "loldu_d0", "loldu_perm"} <= set(layer.other_param_names)
    model.base_model.set_requires_grad("default", True)  # PEFT's helper: thaws adapter_layer_names
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"loldu_diag", "loldu_scale"}
    assert {n.rsplit(".", 2)[-2] for n, _ in model.named_buffers() if "loldu" in n} == {
        "loldu_L", "loldu_U", "loldu_d0", "loldu_perm", "loldu_fingerprint"}


def test_train_scale_parameter_is_not_zero_dimensional():
    """FSDP flattens parameters and refuses 0-d ones; the scale offset is shape (1,)."""
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=2, train_scale=True, target_modules=["v_proj"]))
    assert all(p.dim() >= 1 for p in model.parameters() if p.requires_grad)


def test_checkpoint_saved_before_the_changes_loads_exactly(tmp_path):
    """Checkpoints written by the code before (0-d loldu_scale; factors under the same keys as frozen
    Parameters) load and give the same output as the model that saved them."""
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=2, train_scale=True, target_modules=["v_proj"],
                                                     init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "loldu_scale" in name:
                p.fill_(0.25)
        expected = model(input_ids=tokens()).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    saved = load_file(path)
    old = {k: (v.reshape(()) if k.endswith("loldu_scale") else v) for k, v in saved.items()}
    assert any(v.dim() == 0 for v in old.values())
    save_file(old, path)  # the old format, explicitly
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_base_weight_is_refused_naming_the_module(bad):
    """One NaN in the weight made every output of the layer NaN at init (48/48 where the base had 3/48)."""
    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].self_attn.v_proj.weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"Invalid base weight of model\.layers\.1\.self_attn\.v_proj: 1 "
                                         r"non-finite entries \(first at row 3, column 5"):
        get_peft_model(base, LoLDUConfig(r=2, target_modules=["v_proj"]))


# ------------------------------------------------------------------------ checkpoint_mode="fingerprint"
def _fingerprint_model():
    cfg = LoLDUConfig(r=4, target_modules=["q_proj", "down_proj"], train_scale=True, checkpoint_mode="fingerprint")
    return _trained(get_peft_model(tiny_llama(), cfg))


def test_fingerprint_mode_saves_the_trained_numbers_only_and_reloads_exactly(tmp_path):
    """The paper's promise: r trained numbers (+ tau) per matrix; the factors come from a new LU on load."""
    model = _fingerprint_model()
    with torch.no_grad():
        expected = model(input_ids=tokens()).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {k.rsplit(".", 1)[-1] for k in saved}
    assert kinds == {"loldu_diag", "loldu_scale", "loldu_fingerprint"}
    assert sum(t.numel() for t in saved.values() if t.is_floating_point()) == 2 * 2 * (4 + 1)  # 2 blocks x 2
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens()).logits, expected, rtol=0, atol=0)


def test_fingerprint_mode_refuses_other_factors_and_loads_nothing(tmp_path, monkeypatch):
    """Another base weight, or the same weight pivoted differently (another LAPACK build, simulated by
    handing back other factors), gives another fingerprint: a ValueError naming the module, nothing loaded."""
    import slimtrain.adapters.loldu.layer as layer

    _fingerprint_model().save_pretrained(tmp_path)
    other_base = tiny_llama(seed=1)
    with pytest.raises(ValueError, match=r"Invalid LoLDU checkpoint for base_model\.model\.model\.layers\.\d\."
                                         r"(self_attn\.q_proj|mlp\.down_proj): the factors recomputed .* have "
                                         r"fingerprint [0-9a-f]{16}"):
        PeftModel.from_pretrained(other_base, tmp_path)

    real = layer.ldu_factors

    def other_pivots(weight, r):
        perm, L, d, U = real(weight, r)
        return perm, L, d, U * (1 + 1e-7)  # a last-bit difference is enough

    monkeypatch.setattr(layer, "ldu_factors", other_pivots)
    model = get_peft_model(tiny_llama(), LoLDUConfig(r=4, target_modules=["q_proj", "down_proj"], train_scale=True,
                                                     checkpoint_mode="fingerprint"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"Nothing was loaded"):
        model.load_adapter(tmp_path, adapter_name="default")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_fingerprint_mode_is_a_checked_choice():
    with pytest.raises(ValueError, match=r"Invalid checkpoint_mode: 'diag' \(expected one of 'factors', 'fingerprint'\)"):
        LoLDUConfig(checkpoint_mode="diag")
