"""RandLoRA rows: trainable = r*n + n*d per layer, d = min(in, out), n = ceil(d / r) (+ out with DoRA)."""

import math

from slimtrain.adapters import RandLoraConfig

from . import AdapterCase, linear_shapes

MLP = ["lin0", "lin1", "lin2"]
LLAMA_RE = r".*\.(k_proj|o_proj|up_proj)"
BERT = ["query", "key", "dense"]


def randlora_count(model, cfg):
    tm = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    total = 0
    for out, inp in linear_shapes(model, tm):
        d = min(out, inp)
        n = math.ceil(d / cfg.r)
        total += cfg.r * n + n * d + (out if cfg.use_dora else 0)
    return total


BAD = [
    (lambda: RandLoraConfig(target_modules=MLP, r=0), ValueError, r"Invalid r: 0"),
    (lambda: RandLoraConfig(target_modules=MLP, forward_mode="fast"), ValueError,
     r"Invalid forward_mode: 'fast' \(expected one of 'auto', 'factored', 'dense'\)"),
    (lambda: RandLoraConfig(target_modules=MLP, randlora_dropout=-0.1), ValueError, r"Invalid randlora_dropout"),
    (lambda: RandLoraConfig(target_modules=MLP, seed=-1), ValueError, r"Invalid seed: -1"),
    # seeds reach torch.Generator.manual_seed and Philox as is: [0, 2**63 - 1]
    (lambda: RandLoraConfig(target_modules=MLP, seed=2**70), ValueError, r"Invalid seed: 1180591620717411303424 \(expected an integer in \[0, 9223372036854775807\]\)"),
    (lambda: RandLoraConfig(target_modules=MLP, cache_bases="no"), ValueError,
     r"Invalid cache_bases: 'no' \(expected True or False\)"),
    (lambda: RandLoraConfig(target_modules=MLP, cache_bases=False, generator_version=1), ValueError,
     r"Invalid cache_bases: False with generator_version 1"),
]

# randlora_alpha = r keeps the scaling at 1 so the perturbed adapters give O(1) outputs in fp16
CASES = [
    AdapterCase(id="randlora-mlp", model="mlp", supports_bnb8bit=True, bad_configs=BAD, trainable=randlora_count,
                config=lambda: RandLoraConfig(target_modules=MLP, r=4, randlora_alpha=4.0)),
    AdapterCase(id="randlora-conv1d", model="conv1d", trainable=randlora_count,
                config=lambda: RandLoraConfig(target_modules=["c_fc", "c_proj"], r=8, randlora_alpha=8.0,
                                              forward_mode="factored")),
    AdapterCase(id="randlora-llama-regex", model="llama", trainable=randlora_count,
                config=lambda: RandLoraConfig(target_modules=LLAMA_RE, r=8, randlora_alpha=8.0, forward_mode="dense")),
    AdapterCase(id="randlora-bert-dora", model="bert", trainable=randlora_count,
                config=lambda: RandLoraConfig(target_modules=BERT, r=8, randlora_alpha=8.0, use_dora=True)),
    # B generated inside the basis-matmul kernels, never stored
    AdapterCase(id="randlora-mlp-generated", model="mlp", supports_bnb8bit=True, trainable=randlora_count,
                config=lambda: RandLoraConfig(target_modules=MLP, r=4, randlora_alpha=4.0, cache_bases=False)),
]
