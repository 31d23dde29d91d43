"""PEFT's own conformance tests (``tests/test_custom_models.py`` of the installed peft's sdist) run over rows
for our five configs, on the model types each method supports.

The sdist is brought in by ``scripts/test.sh`` (unpacked into the ignored ``.peft-sdist/``) and never copied
into this repo; without it this module skips, saying how to fetch it. Its ``tests`` folder is loaded as the
package ``peft_sdist_tests`` (ours is ``tests`` too), and each PEFT test function that is parametrized over
``TEST_CASES`` / ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` is re-parametrized with :data:`ROWS` /
:data:`MULTI_ROWS` below, unchanged otherwise.

Seeding. PEFT's tests make two "same config" adapters differ through the global RNG (``torch.manual_seed``
between two ``init_weights=False`` adapters). Ours never read the global RNG: bases and the test-only
``init_weights=False`` draws are functions of ``seed`` and the module name, so two adapters with the same
config are identical by design (that is what makes a NOLA/RandLoRA checkpoint reload its bases). The rows
therefore give a second adapter its own ``seed`` (:data:`MULTI_ROWS`), which is the option a user has too.

Unsupported cases (:data:`UNSUPPORTED`) are not run through PEFT's tests: each is listed with the reason and
checked to raise a clear error instead.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
import types
from pathlib import Path

import peft
import pytest

import slimtrain.adapters  # noqa: F401  (registers our methods)
from slimtrain.adapters import DoraConfig, LoLDUConfig, NolaConfig, RandLoraConfig, S2FTConfig

REPO = Path(__file__).resolve().parents[2]
SDIST_TESTS = Path(
    os.environ.get("SLIMTRAIN_PEFT_TESTS", REPO / ".peft-sdist" / f"peft-{peft.__version__}" / "tests")
)
if not (SDIST_TESTS / "test_custom_models.py").is_file():
    pytest.skip(
        f"PEFT's test suite is not at {SDIST_TESTS}: run `bash scripts/test.sh`, or fetch it with "
        f"`pip download --no-deps --no-binary :all: peft=={peft.__version__} -d .peft-sdist && "
        f"tar -xzf .peft-sdist/peft-{peft.__version__}.tar.gz -C .peft-sdist` (or set SLIMTRAIN_PEFT_TESTS)",
        allow_module_level=True,
    )


def _absent_module(package: str) -> types.ModuleType:
    module = types.ModuleType(package)

    def __getattr__(attr):
        if attr.startswith("__"):  # module protocol (__file__, __spec__, ...): absent, as for a real module
            raise AttributeError(attr)

        def absent(*args, **kwargs):
            raise ImportError(f"{package}.{attr} is needed by this PEFT test: pip install {package}")

        return absent

    module.__getattr__ = __getattr__
    return module


def _load_peft_tests():
    """Import the sdist's ``tests/test_custom_models.py`` as ``peft_sdist_tests.test_custom_models``.

    ``testing_utils``/``testing_common`` import ``datasets`` and ``diffusers`` at module level for hub and
    Stable Diffusion tests that are not run here; when those packages are absent they are replaced by modules
    whose every name raises ImportError when called (loudly, should a test we run ever need one).
    """
    stubs = []
    for name in ("datasets", "diffusers"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _absent_module(name)
            stubs.append(name)
    package = types.ModuleType("peft_sdist_tests")
    package.__path__ = [str(SDIST_TESTS)]
    sys.modules["peft_sdist_tests"] = package
    try:
        return importlib.import_module("peft_sdist_tests.test_custom_models")
    finally:
        # PEFT's modules keep their references; the rest of the test run must not see a fake package
        # (importlib.util.find_spec would raise on its missing __spec__).
        for name in stubs:
            del sys.modules[name]


peft_tests = _load_peft_tests()

# ----------------------------------------------------------------------------------------------- rows
# PEFT's custom models: MLP = lin0 (10 -> 20), lin1 (20 -> 2); EmbConv1D = emb, conv1d (transformers Conv1D
# 5 -> 1), lin0 (10 -> 2). S²FT needs a role per target: lin0's rows and lin1's columns are the 20 channels
# of one "FFN".
S2FT_MLP = {"module_roles": {"lin0": "ffn_rows", "lin1": "ffn_cols"}, "num_heads_per_block": 0,
            "num_channels_per_block": 4}
ROWS = [
    ("NOLA lin0", "MLP", NolaConfig, {"target_modules": ["lin0"], "r": 2, "num_basis_A": 8, "num_basis_B": 4}),
    ("NOLA lin0 lin1", "MLP", NolaConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "num_basis_A": 8,
                                            "num_basis_B": 4}),
    ("NOLA DoRA", "MLP", NolaConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "num_basis_A": 8,
                                       "num_basis_B": 4, "use_dora": True}),
    ("NOLA modules_to_save", "MLP", NolaConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2,
                                                  "num_basis_A": 8, "num_basis_B": 4}),
    ("NOLA Conv1D", "EmbConv1D", NolaConfig, {"target_modules": ["conv1d"], "r": 2, "num_basis_A": 8,
                                               "num_basis_B": 4}),
    ("RandLoRA lin0", "MLP", RandLoraConfig, {"target_modules": ["lin0"], "r": 4, "randlora_alpha": 1.0}),
    ("RandLoRA lin0 lin1", "MLP", RandLoraConfig, {"target_modules": ["lin0", "lin1"], "r": 4,
                                                    "randlora_alpha": 1.0}),
    ("RandLoRA DoRA", "MLP", RandLoraConfig, {"target_modules": ["lin0", "lin1"], "r": 4, "randlora_alpha": 1.0,
                                               "use_dora": True}),
    ("RandLoRA Conv1D", "EmbConv1D", RandLoraConfig, {"target_modules": ["conv1d"], "r": 1,
                                                       "randlora_alpha": 1.0}),
    ("DoRA lin0", "MLP", DoraConfig, {"target_modules": ["lin0"], "r": 4}),
    ("DoRA lin0 lin1", "MLP", DoraConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("DoRA modules_to_save", "MLP", DoraConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 4}),
    ("DoRA Conv1D", "EmbConv1D", DoraConfig, {"target_modules": ["conv1d"], "r": 1}),
    ("LoLDU lin0", "MLP", LoLDUConfig, {"target_modules": ["lin0"], "r": 4}),
    ("LoLDU lin0 lin1 train_scale", "MLP", LoLDUConfig, {"target_modules": ["lin0", "lin1"], "r": 2,
                                                          "train_scale": True}),
    ("LoLDU Conv1D", "EmbConv1D", LoLDUConfig, {"target_modules": ["conv1d"], "r": 1}),
    ("S2FT lin0 lin1", "MLP", S2FTConfig, dict(S2FT_MLP, target_modules=["lin0", "lin1"])),
    ("S2FT lin0 rows", "MLP", S2FTConfig, dict(S2FT_MLP, target_modules=["lin0"])),
]

# Two adapters on one model (PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, model MLP): the second gets its own
# seed (see the module docstring); LoLDU and S²FT draw their test-only init from the module name, so their
# "Same" rows target the same layer with another r / channel count instead.
MULTI_ROWS = [
    ("NOLA Same", "nola", NolaConfig, {"target_modules": ["lin0"], "init_weights": False, "seed": 1},
     {"target_modules": ["lin0"], "init_weights": False, "seed": 2}),
    ("NOLA Different", "nola", NolaConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
    ("NOLA DoRA Same", "nola", NolaConfig, {"target_modules": ["lin0"], "init_weights": False, "use_dora": True,
                                            "seed": 1},
     {"target_modules": ["lin0"], "init_weights": False, "use_dora": True, "seed": 2}),
    ("RandLoRA Same", "randlora", RandLoraConfig, {"target_modules": ["lin0"], "init_weights": False, "seed": 1},
     {"target_modules": ["lin0"], "init_weights": False, "seed": 2}),
    ("RandLoRA Different", "randlora", RandLoraConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
    ("RandLoRA DoRA Same", "randlora", RandLoraConfig, {"target_modules": ["lin0"], "init_weights": False,
                                                        "use_dora": True, "seed": 1},
     {"target_modules": ["lin0"], "init_weights": False, "use_dora": True, "seed": 2}),
    ("DoRA Same", "dora", DoraConfig, {"target_modules": ["lin0"], "init_weights": False, "r": 4},
     {"target_modules": ["lin0"], "init_weights": False, "r": 2}),
    ("DoRA Different", "dora", DoraConfig, {"target_modules": ["lin0"], "init_weights": False, "r": 4},
     {"target_modules": ["lin1"], "init_weights": False, "r": 2}),
    ("LoLDU Same", "loldu", LoLDUConfig, {"target_modules": ["lin0"], "init_weights": False, "r": 4},
     {"target_modules": ["lin0"], "init_weights": False, "r": 2}),
    ("LoLDU Different", "loldu", LoLDUConfig, {"target_modules": ["lin0"], "init_weights": False, "r": 4},
     {"target_modules": ["lin1"], "init_weights": False, "r": 2}),
    ("S2FT Same", "s2ft", S2FTConfig, dict(S2FT_MLP, target_modules=["lin0"], init_weights=False),
     dict(S2FT_MLP, target_modules=["lin0"], init_weights=False, num_channels_per_block=6, seed=1)),
    ("S2FT Different", "s2ft", S2FTConfig, dict(S2FT_MLP, target_modules=["lin0"], init_weights=False),
     dict(S2FT_MLP, target_modules=["lin1"], init_weights=False)),
]

# Model types a method does not support, with the reason; each must raise the error given, never wrap nothing.
_DENSE_ONLY = "wraps nn.Linear and transformers Conv1D only (a 2-D weight whose rows are outputs)"
UNSUPPORTED = [
    (cls, model_id, kwargs, reason)
    for cls, kw in [
        (NolaConfig, {}), (RandLoraConfig, {}), (DoraConfig, {"r": 1}), (LoLDUConfig, {"r": 1}),
        (S2FTConfig, {"module_roles": {"conv2d": "ffn_rows", "conv1d": "ffn_rows", "emb": "ffn_rows"},
                      "num_heads_per_block": 0, "num_channels_per_block": 1}),
    ]
    for model_id, kwargs, reason in [
        ("Conv2d", dict(kw, target_modules=["conv2d"]), f"nn.Conv2d: {_DENSE_ONLY}"),
        ("Conv1d", dict(kw, target_modules=["conv1d"]), f"nn.Conv1d: {_DENSE_ONLY}"),
        ("EmbConv1D", dict(kw, target_modules=["emb"]), f"nn.Embedding: {_DENSE_ONLY}"),
    ]
]


def _row_id(row) -> str:
    return row.__name__ if isinstance(row, type) else row[0].replace(" ", "-")


# ----------------------------------------------------------------------------------------------- tests
def _reparametrized(fn, argnames: str, rows) -> callable:
    """A copy of PEFT test ``fn`` with its parametrization over PEFT's rows replaced by ``rows``."""

    @functools.wraps(fn)
    def test(*args, **kwargs):
        return fn(*args, **kwargs)

    marks = [m for m in getattr(fn, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] == argnames)]
    test.pytestmark = marks
    return pytest.mark.parametrize(argnames, rows, ids=[_row_id(r) for r in rows])(test)


def _conformance_class(peft_cls, argnames: str, rows) -> type:
    """``peft_cls`` with exactly its tests parametrized by ``argnames``, run over ``rows``; others removed."""
    attrs = {}
    for name in dir(peft_cls):
        if not name.startswith("test_"):
            continue
        fn = getattr(peft_cls, name)
        if any(m.name == "parametrize" and m.args[0] == argnames for m in getattr(fn, "pytestmark", [])):
            attrs[name] = _reparametrized(fn, argnames, rows)
        else:
            attrs[name] = None  # hidden: not parametrized over configs (LoRA-specific or PEFT-internal)
    return type(f"Slim{peft_cls.__name__}", (peft_cls,), attrs)


TestCustomModels = _conformance_class(
    peft_tests.TestPeftCustomModel, "test_name, model_id, config_cls, config_kwargs", ROWS
)



@dataclasses.dataclass
class S2FTConfigForMLP(S2FTConfig):
    """S2FTConfig with roles for PEFT's MLP as defaults: the tests below build ``config_cls(target_modules=...)``
    and S²FT needs a role per target (a module without one is a ValueError, by design)."""

    module_roles: dict = dataclasses.field(default_factory=lambda: dict(S2FT_MLP["module_roles"]))
    num_heads_per_block: int = 0
    num_channels_per_block: int = 4


# PEFT's tests parametrized over every config class (they build ``config_cls(target_modules=[...])``)
TestCustomModelsPerConfigClass = _conformance_class(
    peft_tests.TestPeftCustomModel, "config_cls",
    [NolaConfig, RandLoraConfig, DoraConfig, LoLDUConfig, S2FTConfigForMLP],
)
TestMultipleActiveAdapters = _conformance_class(
    peft_tests.TestMultipleActiveAdapters, "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2",
    MULTI_ROWS,
)


@pytest.mark.parametrize(
    "config_cls, model_id, kwargs, reason", UNSUPPORTED,
    ids=[f"{c.__name__}-{m}-{k['target_modules'][0]}" for c, m, k, _ in UNSUPPORTED],
)
def test_unsupported_model_types_raise(config_cls, model_id, kwargs, reason):
    model = peft_tests.MockTransformerWrapper.from_pretrained(model_id)
    module = dict(model.named_modules())[kwargs["target_modules"][0]]
    with pytest.raises(TypeError, match=type(module).__name__):
        peft.get_peft_model(model, config_cls(**kwargs))
