"""Standalone DoRA rows: trainable = r (in + out) + out per layer."""

from slimtrain.adapters import DoraConfig

from . import AdapterCase, linear_shapes

MLP = ["lin0", "lin1", "lin2"]
LLAMA_RE = r".*\.(q_proj|gate_proj|down_proj)"
BERT = ["query", "value", "dense"]


def dora_count(model, cfg):
    tm = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return sum(cfg.r * (inp + out) + out for out, inp in linear_shapes(model, tm))


BAD = [
    (lambda: DoraConfig(target_modules=MLP, r=-1), ValueError, r"Invalid r: -1"),
    (lambda: DoraConfig(target_modules=MLP, dora_dropout=2.0), ValueError, r"Invalid dora_dropout: 2.0"),
    (lambda: DoraConfig(target_modules=MLP, dora_eps=-1.0), ValueError, r"Invalid dora_eps: -1.0"),
    (lambda: DoraConfig(target_modules=42), ValueError, r"Invalid target_modules: 42"),
]

CASES = [
    AdapterCase(id="dora-mlp", model="mlp", supports_bnb8bit=True, bad_configs=BAD, trainable=dora_count,
                config=lambda: DoraConfig(target_modules=MLP, r=4)),
    AdapterCase(id="dora-conv1d", model="conv1d", trainable=dora_count,
                config=lambda: DoraConfig(target_modules=["c_fc", "c_proj"], r=4)),
    AdapterCase(id="dora-llama-regex", model="llama", trainable=dora_count,
                config=lambda: DoraConfig(target_modules=LLAMA_RE, r=4)),
    # dropout > 0: training recomputes W x on the dropped-out input (eval reuses the base output)
    AdapterCase(id="dora-bert-dropout", model="bert", trainable=dora_count,
                config=lambda: DoraConfig(target_modules=BERT, r=4, dora_dropout=0.1)),
]
