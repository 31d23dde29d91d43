"""Rows of the shared adapter test matrix (``tests/adapters/test_matrix.py``).

Adding a method = adding a module ``tests/adapters/cases/<method>.py`` that exports ``CASES``, a list of
:class:`AdapterCase`. Every module in this folder whose name does not start with ``_`` is imported by
:func:`all_cases`; a module whose import fails (e.g. the method's package is not written yet) is skipped
with its error recorded in ``IMPORT_ERRORS`` (the matrix turns each into one failing test, so a broken
case module is never silently ignored).

Row format (all fields keyword-only):

``id``            str, unique test id, e.g. ``"nola-mlp"``.
``config``        ``Callable[[], PeftConfig]``: a fresh config each call (tests mutate nothing, but two
                  adapters on one model need two objects). Target the module names of the chosen model.
``model``         str, a key of :data:`MODELS`: ``"mlp"`` (3 ``nn.Linear`` + ReLU, fp32),
                  ``"conv1d"`` (transformers ``Conv1D`` layers, GPT-2 style), ``"llama"`` (2-layer tiny
                  ``LlamaForCausalLM``), ``"bert"`` (2-layer tiny ``BertModel``). Each entry builds a seeded
                  model and a batch; see :class:`TinyModel`.
``trainable``     ``Callable[[nn.Module, PeftConfig], int]``: the formula for the number of trainable
                  parameters, given the *base* model (before wrapping) and the config. Compared exactly
                  with ``PeftModel.get_nb_trainable_parameters()``.
``init_is_identity``  bool, default True: output equals the base model's right after ``get_peft_model``.
``supports_merge``    bool, default True: ``merge_adapter``/``unmerge_adapter``/``merge_and_unload`` exact
                      (up to dtype tolerance) against the unmerged forward.
``supports_bnb8bit``  bool, default False: the method wraps ``bnb.nn.Linear8bitLt`` (only run on the
                      ``"mlp"`` model; the test quantizes its Linear layers). False rows check that wrapping
                      an 8-bit model raises ``TypeError``/``ValueError`` with a clear message instead.
``supports_multi_adapter`` bool, default True: two named adapters, ``set_adapter`` switches outputs.
``dtypes``        tuple of ``torch.dtype``, default fp32, bf16, fp16: base model dtype for the forward,
                  merge and train checks.
``saved_float_numel`` ``Callable[[nn.Module, PeftConfig], int] | None``: number of floating-point elements
                  the ``adapter_model.safetensors`` may hold (default: same as ``trainable``). Integer
                  tensors (seeds, indices) are allowed on top but each must be smaller than the smallest
                  targeted weight. This is the "no dense frozen bases in the file" check.
``lr``            float, default 1e-2: Adam learning rate of the two steps in the "only adapter params
                  change" test (after them every trainable tensor must have changed: pick it so it does).
``init_perturb``  ``Callable[[PeftModel], None] | None``: called under ``torch.no_grad()`` to make the
                  adapter non-trivial before merge/save/multi-adapter checks (methods that start at
                  ΔW = 0 would pass those vacuously). Default: add N(0, 0.1) noise to every trainable
                  parameter.
``bad_configs``   list of ``(Callable[[], object], exception type, message regex)``: construction must raise.
``marks``         tuple of pytest marks for the row.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


# --------------------------------------------------------------------------------------------- models
class TinyMLP(nn.Module):
    """3 Linear layers named lin0..lin2 (in 16 -> 32 -> 24 -> 8): in != out so orientation bugs show."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 24)
        self.lin2 = nn.Linear(24, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))


class TinyConv1D(nn.Module):
    """GPT-2 style: transformers ``Conv1D`` layers c_fc (16 -> 32) and c_proj (32 -> 16)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(32, 16)  # Conv1D(nf=out, nx=in); weight is (in, out)
        self.c_proj = Conv1D(16, 32)
        with torch.no_grad():
            for m in (self.c_fc, self.c_proj):
                m.weight.normal_(0, 0.2)
                m.bias.normal_(0, 0.1)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


@dataclass
class TinyModel:
    """A model factory: ``build()`` returns a seeded fp32 model in eval mode, ``batch(model)`` its inputs
    (kwargs for ``model(**batch)``), ``output(out)`` the tensor to compare."""

    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor]


def _mlp():
    torch.manual_seed(0)
    return TinyMLP().eval()


def _conv1d():
    torch.manual_seed(0)
    return TinyConv1D().eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _tokens():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


def _features(n):
    def make():
        g = torch.Generator().manual_seed(1)
        return {"x": torch.randn(4, n, generator=g)}

    return make


MODELS: dict[str, TinyModel] = {
    "mlp": TinyModel(_mlp, _features(16), lambda out: out),
    "conv1d": TinyModel(_conv1d, _features(16), lambda out: out),
    "llama": TinyModel(_llama, _tokens, lambda out: out.logits),
    "bert": TinyModel(_bert, _tokens, lambda out: out.last_hidden_state),
}


def linear_shapes(model: nn.Module, target_modules) -> list[tuple[int, int]]:
    """(out, in) of every Linear/Conv1D whose name matches ``target_modules`` (list of suffixes or a regex),
    with PEFT's matching rules. Handy for ``trainable`` formulas."""
    import re

    from transformers.pytorch_utils import Conv1D

    shapes = []
    for name, module in model.named_modules():
        if isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if not hit:
            continue
        if isinstance(module, nn.Linear):
            shapes.append((module.out_features, module.in_features))
        elif isinstance(module, Conv1D):
            shapes.append((module.weight.shape[1], module.weight.shape[0]))
    return shapes


# --------------------------------------------------------------------------------------------- rows
@dataclass(kw_only=True)
class AdapterCase:
    id: str
    config: Callable[[], Any]
    model: str
    trainable: Callable[[nn.Module, Any], int]
    init_is_identity: bool = True
    supports_merge: bool = True
    supports_bnb8bit: bool = False
    supports_multi_adapter: bool = True
    dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)
    saved_float_numel: Callable[[nn.Module, Any], int] | None = None
    lr: float = 1e-2
    init_perturb: Callable[[Any], None] | None = None
    bad_configs: list = field(default_factory=list)
    marks: tuple = ()


IMPORT_ERRORS: dict[str, str] = {}


def all_cases() -> list[AdapterCase]:
    """Import every case module in this package and concatenate their ``CASES``."""
    cases: list[AdapterCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # recorded, then reported as a failing test by the matrix
            IMPORT_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        cases.extend(getattr(module, "CASES", []))
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"Duplicate adapter case ids: {sorted(dupes)}")
    return cases
