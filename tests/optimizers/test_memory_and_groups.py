"""State held is what each method promises; groups come out the way galore-torch expects."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtrain.optimizers import DCTAdamW, GaLoreAdamW, low_rank_param_groups

from .helpers import groups, mlp, train

COUNTERS = 8 * 5  # int64 scalars per projected matrix: step, iters, refresh_offset, proj_refreshes, proj_seed


def _dense_bytes(p):
    return 2 * p.numel() * 4 + 8  # AdamW: two fp32 moments + step


def test_galore_svd_state_is_moments_plus_basis():
    model = mlp()
    opt = GaLoreAdamW(groups(model, rank=4), lr=1e-2)
    train(model, opt, steps=2)
    expected = 0
    for p in model.parameters():
        if p.dim() == 2:
            m, n = p.shape
            expected += 2 * max(m, n) * 4 * 4 + 4 * min(m, n) * 4 + COUNTERS  # moments max(m,n) x r, basis r x min
        else:
            expected += _dense_bytes(p)
    assert opt.state_bytes() == expected


def test_dct_state_is_moments_plus_indices():
    model = mlp()
    opt = DCTAdamW(groups(model, rank=4), lr=1e-2)
    train(model, opt, steps=2)
    expected = sum(
        2 * max(p.shape) * 4 * 4 + 4 * 8 + COUNTERS if p.dim() == 2 else _dense_bytes(p) for p in model.parameters()
    )
    assert opt.state_bytes() == expected


def test_random_projector_state_is_a_seed():
    model = mlp()
    opt = GaLoreAdamW(groups(model, rank=4), lr=1e-2, projector="random")
    train(model, opt, steps=2)
    st = opt.state[model[0].weight]
    assert {k for k, v in st.items() if v.numel() > 1} == {"exp_avg", "exp_avg_sq"}


def test_groups_on_llama_by_list_regex_and_all_linear():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    plain, proj = low_rank_param_groups(model, ["self_attn", "mlp"], rank=8)
    assert len(proj["params"]) == 2 * 7 and proj["rank"] == 8 and proj["scale"] == 0.25
    assert len(plain["params"]) + len(proj["params"]) == len(list(model.parameters()))
    _, proj_re = low_rank_param_groups(model, r".*\.(q|v)_proj$", rank=8)
    assert len(proj_re["params"]) == 4
    _, proj_all = low_rank_param_groups(model, "all-linear", rank=8)
    assert all(p is not model.lm_head.weight for p in proj_all["params"])
    opt = GaLoreAdamW(low_rank_param_groups(model, "all-linear", rank=8, projector="dct"), lr=1e-3)
    x = torch.randint(0, 64, (2, 10))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert "proj_idx" in opt.state[q]
