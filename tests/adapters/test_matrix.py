"""The shared adapter matrix: every row of ``tests/adapters/cases/*.py`` x every behaviour of the issue.

Rows are documented in ``cases/__init__.py``. Behaviours: trainable count = formula, identity at init,
a training step changes only adapter parameters (fp32, bf16, fp16), merge / unmerge / merge_and_unload equal
the unmerged forward, disable_adapter, two named adapters + set_adapter, save_pretrained holds no dense frozen
bases and reloads (in this process and in a fresh one), bitsandbytes 8-bit bases, bad configs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peft  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

import slimtrain.adapters  # noqa: E402,F401  (registers our methods)
from cases import IMPORT_ERRORS, MODELS, all_cases  # noqa: E402

CASES = all_cases()
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# max |a - b| <= TOL * max(1, max |b|). fp32: a few roundings at 2^-24. fp16 (unit roundoff 4.9e-4) and bf16
# (3.9e-3): merging rounds W + dW into the dtype once per layer, and the llama/bert logits pass ~10 such
# layers plus softmax/norms, so allow a few units of roundoff times that depth.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def close(a: torch.Tensor, b: torch.Tensor, dtype=torch.float32, tol=None) -> None:
    a, b = a.detach().float(), b.detach().float()
    tol = TOL[dtype] if tol is None else tol
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert torch.isfinite(a).all(), "non-finite output"
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol} * {scale:.3g}"


def build(case, dtype=torch.float32):
    spec = MODELS[case.model]
    model = spec.build().to(dtype)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in spec.batch().items()}
    return model, batch, spec.output


def run(model, batch, output):
    model.eval()  # freshly created adapter dropouts start in train mode, as in PEFT
    with torch.no_grad():
        return output(model(**batch))


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output: sum(out^2) would be ~constant after BERT's LayerNorm."""
    g = torch.Generator().manual_seed(7)
    return (out.float() * torch.randn(out.shape, generator=g)).sum()


def perturb(model, adapter="default", seed=0, std=0.1):
    """Make an adapter non-trivial (methods starting at dW = 0 would pass merge/save checks vacuously)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(f".{adapter}") or f".{adapter}." in name:
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def adapter_param_names(model, adapter="default"):
    return {n for n, _ in model.named_parameters() if n.endswith(f".{adapter}") or f".{adapter}." in n}


def make_peft(case, dtype=torch.float32, perturbed=False):
    model, batch, output = build(case, dtype)
    base_out = run(model, batch, output)
    pm = get_peft_model(model, case.config())
    if perturbed:
        (case.init_perturb or perturb)(pm)
    return pm, batch, output, base_out


def ids(cases):
    return [c.id for c in cases]


def dtype_params(cases):
    return [pytest.param(c, d, id=f"{c.id}-{DTYPES[d]}", marks=c.marks) for c in cases for d in c.dtypes]


# ------------------------------------------------------------------------------------------------ tests
def test_case_modules_import():
    assert not IMPORT_ERRORS, f"case modules failed to import: {IMPORT_ERRORS}"
    assert CASES, "no adapter cases collected"


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_trainable_count_matches_formula(case, capsys):
    model, _, _ = build(case)
    expected = case.trainable(model, case.config())
    pm = get_peft_model(copy.deepcopy(model), case.config())
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == expected
    pm.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("case,dtype", dtype_params(CASES))
def test_identity_at_init(case, dtype):
    if not case.init_is_identity:
        pytest.skip("method does not promise identity at init")
    pm, batch, output, base_out = make_peft(case, dtype)
    # exact: a zero update adds exact zeros (and DoRA's g is m / ||W|| = 1 exactly)
    torch.testing.assert_close(run(pm, batch, output), base_out, rtol=0, atol=0)


@pytest.mark.parametrize("case,dtype", dtype_params(CASES))
def test_train_step_changes_only_adapter(case, dtype):
    pm, batch, output, _ = make_peft(case, dtype)
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapter_param_names(pm)
    # Adam: every parameter with a non-zero gradient moves by ~lr, however small its gradient (tiny llama's
    # q_proj gradients are ~1e-9, which SGD would lose in fp32 rounding)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=case.lr)
    for _ in range(2):  # step 1 moves B-like factors off 0; step 2 then reaches A-like ones too
        opt.zero_grad()
        loss = loss_fn(output(pm(**batch)))
        loss.backward()
        for n, p in pm.named_parameters():
            if p.requires_grad:
                assert torch.isfinite(p.grad).all(), n
        opt.step()
    for n, p in pm.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"
        if n in trainable:
            assert p.dtype == torch.float32, f"{n} adapter parameters are kept in fp32"


@pytest.mark.parametrize("case,dtype", dtype_params([c for c in CASES if c.supports_merge]))
def test_merge_unmerge(case, dtype):
    pm, batch, output, base_out = make_peft(case, dtype, perturbed=True)
    y = run(pm, batch, output)
    assert not torch.allclose(y.float(), base_out.float()), "perturbed adapter must change the output"
    pm.merge_adapter()
    close(run(pm, batch, output), y, dtype)
    pm.unmerge_adapter()
    close(run(pm, batch, output), y, dtype)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    close(run(merged, batch, output), y, dtype)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_disable_adapter(case):
    pm, batch, output, base_out = make_peft(case, perturbed=True)
    y = run(pm, batch, output)
    with pm.disable_adapter():
        close(run(pm, batch, output), base_out)
    close(run(pm, batch, output), y)


MULTI_CASES = [c for c in CASES if c.supports_multi_adapter]


@pytest.mark.parametrize("case", MULTI_CASES, ids=ids(MULTI_CASES))
def test_two_named_adapters(case):
    pm, batch, output, _ = make_peft(case, perturbed=True)
    pm.add_adapter("other", case.config())
    perturb(pm, "other", seed=1, std=0.2)
    y_default = run(pm, batch, output)
    pm.set_adapter("other")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapter_param_names(pm, "other")
    y_other = run(pm, batch, output)
    assert not torch.allclose(y_default, y_other)
    pm.set_adapter("default")
    close(run(pm, batch, output), y_default)


def _saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _targeted_weight_numels(pm) -> list[int]:
    return [m.get_base_layer().weight.numel() for m in pm.modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_save_holds_no_frozen_bases_and_reloads(case, tmp_path):
    pm, batch, output, _ = make_peft(case, perturbed=True)
    y = run(pm, batch, output)
    pm.save_pretrained(tmp_path)
    tensors = _saved_tensors(tmp_path)
    base_model, _, _ = build(case)
    float_numel = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    expected = (case.saved_float_numel or case.trainable)(base_model, case.config())
    assert float_numel == expected, sorted((k, tuple(t.shape)) for k, t in tensors.items())
    smallest = min(_targeted_weight_numels(pm))
    for k, t in tensors.items():
        if not t.is_floating_point():
            assert t.numel() < smallest, f"{k}: integer tensor as large as a weight"
    reloaded = PeftModel.from_pretrained(build(case)[0], tmp_path)
    close(run(reloaded, batch, output), y)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import slimtrain.adapters
    from peft import PeftModel
    sys.path.insert(0, {here!r})
    from cases import MODELS
    jobs = json.loads(sys.argv[1])
    result = {{}}
    for job in jobs:
        spec = MODELS[job["model"]]
        model = PeftModel.from_pretrained(spec.build(), job["path"])
        with torch.no_grad():
            out = spec.output(model(**spec.batch()))
        expected = torch.load(job["path"] + "/expected.pt")
        result[job["id"]] = (out - expected).abs().max().item()
    print(json.dumps(result))
    """
)


def test_fresh_process_reload_all_cases(tmp_path):
    """save_pretrained here, PeftModel.from_pretrained in a new interpreter that only imported slimtrain."""
    jobs = []
    for case in CASES:
        pm, batch, output, _ = make_peft(case, perturbed=True)
        path = tmp_path / case.id
        pm.save_pretrained(path)
        torch.save(run(pm, batch, output), path / "expected.pt")
        jobs.append({"id": case.id, "model": case.model, "path": str(path)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT.format(here=str(HERE)), json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {c.id for c in CASES}
    bad = {k: v for k, v in errors.items() if not v <= 1e-6}
    assert not bad, f"outputs differ after a fresh-process reload: {bad}"


# ------------------------------------------------------------------------------------------------ bnb
def _quantize_linears(model: nn.Module) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Linear):
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            setattr(model, name, q.to("cpu"))
        else:
            _quantize_linears(module)
    return model


MLP_CASES = [c for c in CASES if c.model == "mlp"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", MLP_CASES, ids=ids(MLP_CASES))
def test_bnb_8bit_base(case, tmp_path):
    spec = MODELS["mlp"]
    batch = spec.batch()
    qmodel = _quantize_linears(spec.build())
    if not case.supports_bnb8bit:
        with pytest.raises((TypeError, ValueError), match=r"(?i)8-?bit|bitsandbytes|Linear8bitLt"):
            get_peft_model(qmodel, case.config())
        return
    base_out = run(qmodel, batch, spec.output)
    pm = get_peft_model(qmodel, case.config())
    if case.init_is_identity:
        torch.testing.assert_close(run(pm, batch, spec.output), base_out, rtol=0, atol=0)
    int8_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.dtype == torch.int8}
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=case.lr)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(spec.output(pm(**batch))).backward()
        opt.step()
    assert all(torch.equal(p, int8_before[n]) for n, p in pm.named_parameters() if p.dtype == torch.int8)
    pm.eval()
    (case.init_perturb or perturb)(pm)
    y = run(pm, batch, spec.output)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_quantize_linears(spec.build()), tmp_path)
    close(run(reloaded, batch, spec.output), y)
    if case.supports_merge:
        # merging re-quantizes W + dW to int8 (row-wise absmax / 127): ~1 % of each row's scale per layer
        pm.merge_adapter()
        close(run(pm, batch, spec.output), y, tol=5e-2)
        pm.unmerge_adapter()
        close(run(pm, batch, spec.output), y, tol=5e-2)


# ------------------------------------------------------------------------------------------------ errors
BAD_ROWS = [pytest.param(factory, exc, msg, id=f"{c.id}-{i}") for c in CASES
            for i, (factory, exc, msg) in enumerate(c.bad_configs)]


@pytest.mark.parametrize("factory,exc,msg", BAD_ROWS)
def test_bad_config_raises(factory, exc, msg):
    with pytest.raises(exc, match=msg):
        factory()


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_unknown_target_module_raises(case):
    model, _, _ = build(case)
    cfg = case.config()
    cfg.target_modules = {"no_such_module"}
    with pytest.raises(ValueError, match="no_such_module"):
        get_peft_model(model, cfg)


# ------------------------------------------------------------------ layers no method supports
class _ConvEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)[..., None]
        return self.lin(self.conv(h)[..., 0].transpose(1, 2))


_UNSUPPORTED_CONFIGS = {
    "nola": lambda t: slimtrain.adapters.NolaConfig(target_modules=t),
    "randlora": lambda t: slimtrain.adapters.RandLoraConfig(target_modules=t),
    "dora": lambda t: slimtrain.adapters.DoraConfig(target_modules=t, r=1),
    "loldu": lambda t: slimtrain.adapters.LoLDUConfig(target_modules=t, r=1),
    "s2ft": lambda t: slimtrain.adapters.S2FTConfig(target_modules=t, num_heads_per_block=0,
                                                    num_channels_per_block=1,
                                                    module_roles={"conv": "ffn_rows", "emb": "ffn_rows"}),
}


@pytest.mark.parametrize("target,layer", [("conv", "Conv2d"), ("emb", "Embedding")])
@pytest.mark.parametrize("method", sorted(_UNSUPPORTED_CONFIGS))
def test_unsupported_layer_types_raise_type_error(method, target, layer):
    """docs/adapters.md: every method refuses a layer it cannot wrap with a TypeError naming it, rather than
    wrap nothing and train 0 parameters on a Conv2d or Embedding target."""
    with pytest.raises(TypeError, match=f"cannot wrap {layer}"):
        get_peft_model(_ConvEmb(), _UNSUPPORTED_CONFIGS[method]([target]))
