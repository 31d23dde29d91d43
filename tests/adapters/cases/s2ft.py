"""S²FT rows of the shared adapter matrix.

Trainable per block, with k = num_heads_per_block KV heads, c = num_channels_per_block channels,
n_rep = heads / kv_heads and hd = head_dim: ``k·hd·in`` for each targeted v (rows), ``out·k·n_rep·hd`` for
each targeted o (columns of every query head in the selected KV groups), ``c·in`` for up/gate rows and
``out·c`` for down columns. The int64 index vectors are the only other saved tensors.
"""

from __future__ import annotations

from slimtrain.adapters import S2FTConfig

from . import AdapterCase

# The tiny models of cases/__init__.py: llama hidden 32, 4 heads, 2 KV heads (head_dim 8), FFN 48, 2 blocks;
# bert hidden 32, 4 heads (head_dim 8), FFN 48, 2 blocks; mlp lin0 16->32, lin1 32->24; conv1d c_fc 16->32,
# c_proj 32->16.


def _llama_trainable(model, cfg) -> int:
    hidden, hd, n_rep, blocks = 32, 8, 2, 2
    k, c = cfg.num_heads_per_block, cfg.num_channels_per_block
    t = cfg.target_modules
    per_block = 0
    per_block += ("v_proj" in t) * k * hd * hidden + ("o_proj" in t) * hidden * k * n_rep * hd
    per_block += (("up_proj" in t) + ("gate_proj" in t) + ("down_proj" in t)) * c * hidden
    return blocks * per_block


def _bert_trainable(model, cfg) -> int:
    hidden, hd, blocks = 32, 8, 2
    k, c = cfg.num_heads_per_block, cfg.num_channels_per_block
    return blocks * (2 * k * hd * hidden + 2 * c * hidden)


BAD_CONFIGS = [
    (lambda: S2FTConfig(selection="norm"), ValueError, r"Invalid selection: 'norm' \(expected one of"),
    (lambda: S2FTConfig(num_heads_per_block=-1), ValueError, r"Invalid num_heads_per_block: -1"),
    (
        lambda: S2FTConfig(num_heads_per_block=0, num_channels_per_block=0),
        ValueError,
        r"Invalid num_heads_per_block=0 and num_channels_per_block=0",
    ),
    (lambda: S2FTConfig(module_roles={"v_proj": "value"}), ValueError, r"Invalid module_roles\['v_proj'\]: 'value'"),
    (lambda: S2FTConfig(seed=2**70), ValueError, r"Invalid seed: 1180591620717411303424 \(expected an integer in \[0, 9223372036854775807\]\)"),
]

_LLAMA_ALL = ["v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]

CASES = [
    AdapterCase(
        id="s2ft-llama-gqa",
        model="llama",
        config=lambda: S2FTConfig(num_heads_per_block=1, num_channels_per_block=4, target_modules=_LLAMA_ALL),
        trainable=_llama_trainable,
        bad_configs=BAD_CONFIGS,
    ),
    AdapterCase(
        id="s2ft-llama-weight-norm",
        model="llama",
        config=lambda: S2FTConfig(
            num_heads_per_block=2,
            num_channels_per_block=3,
            selection="weight_norm",
            target_modules=["o_proj", "down_proj"],
        ),
        trainable=_llama_trainable,
    ),
    AdapterCase(
        id="s2ft-llama-regex",
        model="llama",
        config=lambda: S2FTConfig(
            num_heads_per_block=1,
            num_channels_per_block=2,
            seed=3,
            target_modules=r".*\.(v_proj|o_proj|up_proj|down_proj)",
        ),
        # 2 blocks x (v 8x32 + o 32x(1 KV head x 2 query heads x 8) + up 2x32 + down 32x2)
        trainable=lambda m, cfg: 2 * (1 * 8 * 32 + 32 * 1 * 2 * 8 + 2 * 2 * 32),
    ),
    AdapterCase(
        id="s2ft-bert",
        model="bert",
        config=lambda: S2FTConfig(
            num_heads_per_block=1,
            num_channels_per_block=4,
            target_modules=["attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"],
        ),
        trainable=_bert_trainable,
    ),
    AdapterCase(
        id="s2ft-mlp",
        model="mlp",
        # a plain MLP is one "block" whose hidden channels couple lin0's rows with lin1's columns
        config=lambda: S2FTConfig(
            num_heads_per_block=0,
            num_channels_per_block=5,
            target_modules=["lin0", "lin1"],
            module_roles={"lin0": "ffn_rows", "lin1": "ffn_cols"},
        ),
        trainable=lambda m, cfg: 5 * 16 + 24 * 5,
    ),
    AdapterCase(
        id="s2ft-conv1d",
        model="conv1d",
        config=lambda: S2FTConfig(
            num_heads_per_block=0,
            num_channels_per_block=6,
            target_modules=["c_fc", "c_proj"],
            module_roles={"c_fc": "ffn_rows", "c_proj": "ffn_cols"},
        ),
        trainable=lambda m, cfg: 6 * 16 + 16 * 6,
    ),
]
