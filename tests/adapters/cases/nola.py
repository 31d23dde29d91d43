"""NOLA rows of the adapter matrix: trainable = (k + l) per adapted layer (+ out per layer with DoRA)."""

from slimtrain.adapters import NolaConfig

from . import AdapterCase, linear_shapes

MLP = ["lin0", "lin1", "lin2"]
LLAMA_RE = r".*\.(q_proj|v_proj|down_proj)"
BERT = ["query", "value", "dense"]


def nola_count(model, cfg):
    shapes = linear_shapes(model, cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules))
    return sum(cfg.num_basis_A + cfg.num_basis_B + (out if cfg.use_dora else 0) for out, _ in shapes)


BAD = [
    (lambda: NolaConfig(target_modules=MLP, r=0), ValueError, r"Invalid r: 0 \(expected an integer >= 1\)"),
    (lambda: NolaConfig(target_modules=MLP, num_basis_A=0), ValueError, r"Invalid num_basis_A: 0"),
    (lambda: NolaConfig(target_modules=MLP, num_basis_B=2.5), ValueError, r"Invalid num_basis_B: 2.5"),
    (lambda: NolaConfig(target_modules=MLP, nola_dropout=1.0), ValueError, r"Invalid nola_dropout: 1.0"),
    (lambda: NolaConfig(target_modules=[]), ValueError, r"Invalid target_modules: \[\]"),
    (lambda: NolaConfig(target_modules=MLP, seed=2**70), ValueError, r"Invalid seed: 1180591620717411303424 \(expected an integer in \[0, 9223372036854775807\]\)"),
    (lambda: NolaConfig(target_modules=MLP, generator_version=99), ValueError, r"Invalid generator_version: 99"),
    (lambda: NolaConfig(target_modules=MLP, cache_bases="yes"), ValueError,
     r"Invalid cache_bases: 'yes' \(expected True or False\)"),
]

CASES = [
    # k = 40 crosses the 32-basis block boundary, so the blocked generator is exercised
    AdapterCase(id="nola-mlp", model="mlp", supports_bnb8bit=True, bad_configs=BAD, trainable=nola_count,
                config=lambda: NolaConfig(target_modules=MLP, r=4, num_basis_A=40, num_basis_B=20)),
    AdapterCase(id="nola-conv1d", model="conv1d", trainable=nola_count,
                config=lambda: NolaConfig(target_modules=["c_fc", "c_proj"], r=4, num_basis_A=16, num_basis_B=8)),
    AdapterCase(id="nola-llama-regex", model="llama", trainable=nola_count,
                config=lambda: NolaConfig(target_modules=LLAMA_RE, r=4, num_basis_A=8, num_basis_B=8, seed=3)),
    AdapterCase(id="nola-bert-dora", model="bert", trainable=nola_count,
                config=lambda: NolaConfig(target_modules=BERT, r=4, num_basis_A=8, num_basis_B=8, use_dora=True)),
]
