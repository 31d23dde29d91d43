"""How many bytes of optimizer state does each optimizer keep, in fp32 and in 8 bits, and what does
8-bit storage cost in convergence?

    python -m benchmarks.state_memory_8bit                  # about 30 minutes on 2 CPU cores (10 training runs)
    python -m benchmarks.state_memory_8bit --steps 0        # bytes only, under a minute

1. The tiny LLaMA of the pretrain recipe (byte vocabulary, fp32 weights), after one step: state bytes
   *measured* for slimtrain's optimizers (fp32 and 8-bit), torch AdamW, bitsandbytes ``AdamW8bit``,
   galore-torch ``GaLoreAdamW`` and ``GaLoreAdamW8bit``, next to what ``slimtrain.memory`` computes.
   galore-torch's 8-bit class calls ``torch.cuda.synchronize()`` and cannot run on CPU; it is counted
   analytically, and the formula is checked here against a run with ``torch.cuda.synchronize``
   replaced by a no-op for the duration of that one measurement.
2. LLaMA-7B shapes (GaLore's rank 1024, bf16 weights): computed by ``slimtrain.memory`` on the meta
   device and by the same analytic formulas for the peers (checked exactly on the tiny model in 1);
   the calculator is cross-checked on one real 7B-shaped decoder layer.
3. Convergence: each 8-bit optimizer against its fp32 self, the convergence benchmark's run (tiny
   LLaMA on Shakespeare, same steps, batches, initial weights), final validation loss.

Writes ``state_memory_8bit.md`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
import warnings

import torch

from benchmarks import convergence
from benchmarks._cli import command_line, invocation
from slimtrain.memory import estimate_memory, llama_config
from slimtrain.optimizers import LowRankAdamW, low_rank_param_groups
from slimtrain.optimizers.base import matrix_shape
from slimtrain.recipes import pretrain
from slimtrain.recipes.models import build_model, model_config, smallest_matrix_dim
from slimtrain.recipes.optim import TARGET_MODULES, build_optimizer, default_rank, state_tensor_bytes

METHODS = ("galore", "fira", "frugal", "dct", "sst")


# ----------------------------------------------------------------------------------------------
# Peers' state, analytically (checked against measurements on the tiny model)


def bnb_param_bytes(numel: int, min_8bit_size: int = 4096) -> int:
    """bnb 8-bit blockwise Adam, one parameter: uint8 state1/state2 + fp32 absmax per 256 elements,
    or fp32 states under ``min_8bit_size``. Its 256-entry qmaps are shared by all parameters (counted
    once, see ``BNB_QMAPS``) and its step is a Python int."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 8 * math.ceil(numel / 256)


BNB_QMAPS = 2 * 256 * 4


def torch_adamw_bytes(params) -> int:
    """torch AdamW: two moments in the parameter's dtype and an fp32 scalar step per tensor."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def galore_torch_8bit_bytes(projected, plain, rank: int, grad_bytes: int) -> int:
    """galore-torch 1.0 ``GaLoreAdamW8bit`` on bitsandbytes 0.50: bnb 8-bit Adam on the projected
    gradient (``max(m, n) x r``), the projector's ``ortho_matrix`` (``r x min(m, n)``, gradient dtype),
    and a 1-element fp32 ``unorm_vec`` per parameter: galore-torch passes ``percentile_clipping`` and
    ``block_wise`` positionally into bnb's newer ``max_unorm``/``skip_zeros`` slots, so bnb keeps an
    update-norm buffer (and clips updates at max_unorm=100)."""
    total = BNB_QMAPS
    for p in projected:
        m, n = matrix_shape(p)
        total += bnb_param_bytes(max(m, n) * rank) + rank * min(m, n) * grad_bytes + 4
    for p in plain:
        total += bnb_param_bytes(p.numel()) + 4
    return total


def _check_formula(what: str, measured: int, formula: int) -> None:
    if measured != formula:
        raise RuntimeError(f"{what}: measured {measured:,} state bytes, the formula gives {formula:,}")


def _split(model, rank: int):
    plain, proj = low_rank_param_groups(model, TARGET_MODULES, rank=rank)
    return proj["params"], plain["params"]


# ----------------------------------------------------------------------------------------------
# 1. The tiny model, measured


def _one_step(model, opt) -> None:
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def measure_tiny(model_name: str, rank: int) -> tuple[list[dict], int]:
    config = model_config(model_name, pretrain.VOCAB_SIZE)
    rows = []

    def run(label, impl, make, estimate=None):
        model = build_model(config, 0)
        opt = make(model)
        _one_step(model, opt)
        rows.append(dict(label=label, impl=impl, bytes=state_tensor_bytes(opt), estimate=estimate(model) if estimate else None))
        return model, opt

    model, _ = run("AdamW", "torch.optim.AdamW", lambda m: build_optimizer("adamw", m))
    n_params = sum(p.numel() for p in model.parameters())
    import bitsandbytes as bnb

    model, _ = run("AdamW8bit", "bitsandbytes 0.50 AdamW8bit", lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-3))
    _check_formula("bitsandbytes AdamW8bit", rows[-1]["bytes"], BNB_QMAPS + sum(bnb_param_bytes(p.numel()) for p in model.parameters()))
    for bits in (32, 8):
        run(f"AdamW {'8-bit' if bits == 8 else 'fp32'}", "slimtrain (no rank: dense path)",
            lambda m, b=bits: LowRankAdamW(m.parameters(), lr=1e-3, state_bits=b),
            lambda m, b=bits: estimate_memory(config, "adamw", state_bits=b, weight_dtype="fp32", model=m).total.state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("GaLore fp32", "galore-torch 1.0 GaLoreAdamW", lambda m: build_optimizer("galore-torch", m, rank=rank))
        import galore_torch

        sync = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: None  # galore-torch's only CUDA call; nothing else changes
        try:
            model, _ = run("GaLore 8-bit", "galore-torch 1.0 GaLoreAdamW8bit (measured: cuda.synchronize no-op'd)",
                           lambda m: galore_torch.GaLoreAdamW8bit(
                               low_rank_param_groups(m, TARGET_MODULES, rank=rank, update_proj_gap=200, scale=0.25), lr=1e-2))
        finally:
            torch.cuda.synchronize = sync
    proj, plain = _split(model, rank)
    _check_formula("galore-torch GaLoreAdamW8bit", rows[-1]["bytes"], galore_torch_8bit_bytes(proj, plain, rank, 4))
    for method in METHODS:
        for suffix in ("", "8bit"):
            bits = 8 if suffix else 32
            run(f"{method} {'8-bit' if bits == 8 else 'fp32'}", f"slimtrain {method}{suffix}",
                lambda m, n=method + suffix: build_optimizer(n, m, rank=rank),
                lambda m, n=method, b=bits: estimate_memory(
                    config, n, rank=rank, state_bits=b, weight_dtype="fp32", target_modules=TARGET_MODULES, model=m
                ).total.state)
    return rows, n_params


# ----------------------------------------------------------------------------------------------
# 2. LLaMA-7B shapes, computed


def compute_7b(rank: int) -> tuple[list[dict], int]:
    est32 = estimate_memory("7B", "adamw", weight_dtype="bf16")
    from slimtrain.memory import meta_model

    model = meta_model(llama_config("7B"))
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    proj, plain = _split(model, rank)
    rows = [
        dict(label="AdamW", impl="torch.optim.AdamW, fp32 moments (fp32 master weights)", bytes=8 * n + 4 * len(params)),
        dict(label="AdamW", impl="torch.optim.AdamW, bf16 params (moments in bf16)", bytes=4 * n + 4 * len(params)),
        dict(label="AdamW8bit", impl="bitsandbytes AdamW8bit", bytes=BNB_QMAPS + sum(bnb_param_bytes(p.numel()) for p in params)),
        dict(label="GaLore 8-bit", impl="galore-torch GaLoreAdamW8bit (analytic, bf16 grads)",
             bytes=galore_torch_8bit_bytes(proj, plain, rank, 2)),
        dict(label="AdamW fp32", impl="slimtrain (dense path)", bytes=est32.total.state),
        dict(label="AdamW 8-bit", impl="slimtrain (dense path)", bytes=estimate_memory("7B", "adamw", state_bits=8).total.state),
    ]
    for method in METHODS:
        for bits in (32, 8):
            est = estimate_memory("7B", method, rank=rank, state_bits=bits, target_modules=TARGET_MODULES)
            rows.append(dict(label=f"{method} {'8-bit' if bits == 8 else 'fp32'}", impl=f"slimtrain {method}{'8bit' if bits == 8 else ''}",
                             bytes=est.total.state, basis=est.total.projector))
    return rows, n


def check_7b_slice(rank: int) -> str:
    """One real LLaMA-7B decoder layer (4 x 4096^2 attention, 3 x 4096 x 11008 MLP, 2 norms) in fp32:
    DCTAdamW8bit steps once on random gradients; its state must equal the calculator's count for that
    layer. (DCT because an SVD or randomized refresh of seven 7B matrices takes minutes on 2 CPU cores;
    the fp32-basis formula they need is checked exactly on the tiny model and in tests/test_memory.py.)"""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from slimtrain.optimizers import DCTAdamW8bit

    torch.manual_seed(0)
    layer = LlamaDecoderLayer(llama_config("7B"), layer_idx=0)
    groups = low_rank_param_groups(layer, TARGET_MODULES, rank=rank)
    opt = DCTAdamW8bit(groups, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    t0 = time.perf_counter()
    opt.step()
    took = time.perf_counter() - t0
    measured = opt.state_bytes()
    est = estimate_memory(llama_config("7B"), "dct", rank=rank, state_bits=8,
                          target_modules=TARGET_MODULES, weight_dtype="fp32", model=layer).total.state
    if measured != est:
        raise RuntimeError(f"7B slice: optimizer holds {measured} bytes, calculator says {est}")
    return (f"Cross-check on one real 7B-shaped decoder layer ({sum(p.numel() for p in layer.parameters()) / 1e6:.1f}M "
            f"parameters, fp32, `DCTAdamW8bit(rank={rank})`, one step in {took:.0f} s): "
            f"`opt.state_bytes()` = {measured:,} bytes = calculator, exactly.")


# ----------------------------------------------------------------------------------------------
# 3. Convergence, 8-bit vs fp32


def train_pairs(args) -> tuple[dict[str, dict], argparse.Namespace]:
    """Each method and its 8-bit twin, trained as ``benchmarks.convergence`` trains them (its settings exactly)."""
    conv_args = convergence.parse_args(["--model", args.model] + (["--steps", str(args.steps)] if args.steps else []))
    out = {}
    data = None
    for method in METHODS:
        for name in (method, method + "8bit"):
            cfg = convergence.recipe_config(conv_args, name, None)
            if data is None:
                data = pretrain.load_data(cfg)
            print(f"[state_memory_8bit] training {name} ...", flush=True)
            out[name] = pretrain.run(cfg, data)
            print(f"[state_memory_8bit]   val loss {out[name]['final_val_loss']:.4f}", flush=True)
    return out, conv_args


# ----------------------------------------------------------------------------------------------


def _fmt(b: int) -> str:
    return f"{b / 1e9:.3f} GB" if b >= 1e8 else (f"{b / 1e6:.3f} MB" if b >= 1e5 else f"{b:,} B")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per convergence run (default: benchmarks.convergence's; 0: skip training)")
    p.add_argument("--rank-7b", type=int, default=1024)
    p.add_argument("--skip-slice", action="store_true", help="skip the real 7B-layer cross-check (about 1.6 GB, a minute)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    command = command_line(__file__, argv)
    t0 = time.perf_counter()
    rank = default_rank(smallest_matrix_dim(model_config(args.model, pretrain.VOCAB_SIZE)))
    tiny, n_tiny = measure_tiny(args.model, rank)
    big, n_big = compute_7b(args.rank_7b)
    slice_note = "" if args.skip_slice else check_7b_slice(args.rank_7b)
    runs, conv_args = train_pairs(args) if args.steps != 0 else ({}, None)

    base_tiny = tiny[0]["bytes"]
    base_big = big[0]["bytes"]
    lines = [
        "# Optimizer state in fp32 and 8 bits",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}. Total {(time.perf_counter() - t0) / 60:.1f} min.",
        "",
        "State bytes count every distinct tensor an optimizer holds after its first step (moments, 8-bit codes and",
        "absmax, projector bases and indices, counters; bitsandbytes' shared 256-entry maps once). Low-rank",
        "optimizers project the attention and MLP matrices; embeddings, norms and lm_head get AdamW in the same",
        "optimizer. 8-bit: moments of >= 4096 elements as uint8 codes + one fp32 absmax per 256 (bitsandbytes'",
        "blockwise dynamic quantization), smaller ones fp32.",
        "",
        f"## 1. Tiny LLaMA ({n_tiny / 1e6:.2f}M parameters, fp32 weights, rank {rank}): measured",
        "",
        "| optimizer | implementation | state | / torch AdamW | 8-bit / fp32 self | slimtrain.memory |",
        "|---|---|---|---|---|---|",
    ]
    by_label = {r["label"]: r for r in tiny}
    for r in tiny:
        fp32 = by_label.get(r["label"].replace("8-bit", "fp32")) if "8-bit" in r["label"] else None
        self_ratio = f"{r['bytes'] / fp32['bytes']:.3f}" if fp32 else "-"
        est = "-" if r["estimate"] is None else ("= measured" if r["estimate"] == r["bytes"] else f"{r['estimate']:,} (differs)")
        lines.append(f"| {r['label']} | {r['impl']} | {r['bytes']:,} B | {r['bytes'] / base_tiny:.3f} | {self_ratio} | {est} |")
    lines += [
        "",
        "galore-torch's `GaLoreAdamW8bit` calls `torch.cuda.synchronize()` and fails on CPU; its row was measured with",
        "that call replaced by a no-op, and equals the analytic formula used for 7B below "
        "(`galore_torch_8bit_bytes`, asserted).",
        "",
        f"## 2. LLaMA-7B shapes ({n_big / 1e9:.2f}B parameters, rank {args.rank_7b}, bf16 weights): computed",
        "",
        "On the meta device with `slimtrain.memory.estimate_memory` (slimtrain) and the formulas above (peers),",
        "no 7B allocation.",
        "",
        "| optimizer | implementation | state | / torch AdamW (fp32 moments) | 8-bit / fp32 self | of which projector |",
        "|---|---|---|---|---|---|",
    ]
    by_label = {r["label"]: r for r in big if r["impl"].startswith("slimtrain")}
    for r in big:
        fp32 = by_label.get(r["label"].replace("8-bit", "fp32")) if "8-bit" in r["label"] and r["impl"].startswith("slimtrain") else None
        self_ratio = f"{r['bytes'] / fp32['bytes']:.3f}" if fp32 else "-"
        basis = _fmt(r["basis"]) if r.get("basis") else "-"
        lines.append(f"| {r['label']} | {r['impl']} | {_fmt(r['bytes'])} | {r['bytes'] / base_big:.3f} | {self_ratio} | {basis} |")
    lines += ["", slice_note, ""] if slice_note else [""]
    lines += [
        "slimtrain keeps projector bases in fp32 whatever the weight dtype (galore-torch keeps them in the",
        "gradient's dtype, bf16 here), so at rank 1024 the SVD basis is about half of 8-bit GaLore's state;",
        "DCT and FRUGAL-columns store indices instead. SST's state holds the weight's singular factors (see",
        "`SSTAdamW`), which 8 bits do not touch.",
        "",
    ]
    if runs:
        lines += [
            f"## 3. Convergence: 8-bit vs fp32 ({args.model} LLaMA on Shakespeare, {conv_args.steps} steps of "
            f"{conv_args.batch_size} x {conv_args.seq_len} bytes)",
            "",
            "Each run is `benchmarks.convergence`'s (its `recipe_config`, defaults unchanged: same initial weights,",
            f"batch order, paper-default hyperparameters, rank {rank}, validation on {conv_args.eval_batches} batches of",
            "held-out plays). Final validation loss in nats per byte; the fp32 rows are that benchmark's own runs",
            "repeated here.",
            "",
            "| method | val loss fp32 | val loss 8-bit | 8-bit - fp32 | state fp32 | state 8-bit | 8-bit / fp32 state |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            a, b = runs[method], runs[method + "8bit"]
            lines.append(
                f"| {method} | {a['final_val_loss']:.4f} | {b['final_val_loss']:.4f} | "
                f"{b['final_val_loss'] - a['final_val_loss']:+.4f} | {a['optimizer_state_bytes']:,} | "
                f"{b['optimizer_state_bytes']:,} | {b['optimizer_state_bytes'] / a['optimizer_state_bytes']:.3f} |"
            )
        lines += [
            "",
            "One seed per row: differences of a few hundredths of a nat are within what another seed or batch",
            "order moves, so read this as \"8-bit states cost no visible convergence here\", not as 8-bit being better.",
            "",
        ]
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "state_memory_8bit.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
