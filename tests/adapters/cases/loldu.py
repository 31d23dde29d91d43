"""LoLDU rows of the shared adapter matrix.

Trainable per adapted matrix: ``r`` diagonal entries (+1 with ``train_scale``). Saved floats per matrix:
the diagonal, ``d0`` (r each), ``L_r`` (out x r) and ``U_r`` (r x in), plus τ with ``train_scale``; the
row-order index vector is an int tensor of length ``out``. Never the out x in weight.
"""

from __future__ import annotations

from slimtrain.adapters import LoLDUConfig

from . import AdapterCase, linear_shapes


def _trainable(model, cfg) -> int:
    return len(linear_shapes(model, cfg.target_modules)) * (cfg.r + int(cfg.train_scale))


def _saved_floats(model, cfg) -> int:
    return sum(
        cfg.r * (out + inp + 2) + int(cfg.train_scale) for out, inp in linear_shapes(model, cfg.target_modules)
    )


def _row(id, model, **cfg):
    return AdapterCase(
        id=id,
        model=model,
        config=lambda: LoLDUConfig(**cfg),
        trainable=_trainable,
        saved_float_numel=_saved_floats,
        bad_configs=BAD_CONFIGS,
    )


BAD_CONFIGS = [
    (lambda: LoLDUConfig(r=0, target_modules=["lin0"]), ValueError, r"Invalid r: 0 \(expected an integer >= 1\)"),
    (lambda: LoLDUConfig(r=2, alpha=-1.0, target_modules=["lin0"]), ValueError, r"Invalid alpha: -1\.0"),
    (lambda: LoLDUConfig(r=2, bias="some", target_modules=["lin0"]), ValueError, r"Invalid bias: 'some'"),
]

CASES = [
    _row("loldu-mlp", "mlp", r=4, target_modules=["lin0", "lin1", "lin2"]),
    _row("loldu-mlp-train-scale", "mlp", r=3, train_scale=True, target_modules=["lin0", "lin2"]),
    _row("loldu-conv1d", "conv1d", r=4, target_modules=["c_fc", "c_proj"]),
    _row("loldu-llama", "llama", r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    _row("loldu-llama-regex", "llama", r=2, target_modules=r".*\.layers\.1\.self_attn\.(k_proj|o_proj)"),
    _row("loldu-bert", "bert", r=4, target_modules=["query", "value"]),
]
