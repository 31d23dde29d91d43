"""Peak GPU memory of whole LLaMA-7B training steps: slimtrain's leanest configurations beside bitsandbytes'
AdamW8bit and galore-torch's per-layer 8-bit GaLore, each next to what ``slimtrain memory`` predicts.

    python -m benchmarks.llama7b_memory        # on a GPU: writes benchmarks/results/llama7b_memory_gpu.md
    python -m benchmarks.llama7b_memory --shape tiny --device cpu --out /tmp/m.md     # smoke run, seconds

**Setting.** A LLaMA with GaLore's 7B shape (hidden 4096, intermediate 11008, 32 heads, 32
layers, vocabulary 32000; 6.74B parameters), random initialization, bf16 weights and gradients, sequence 256,
batch 1, activation checkpointing, layer-wise updates: every parameter is stepped in its post-accumulate-grad
hook and its gradient freed, so one gradient is alive at a time. slimtrain does this with
:class:`~slimtrain.optimizers.LayerwiseStepper`. The peers use one optimizer per parameter, stepped from the
same hook, as galore-torch's ``torchrun_main.py --optimizer galore_adamw8bit_per_layer`` does. Rank 1024, T =
200, scale 0.25 for the projected optimizers, the attention and MLP matrices projected.

**Configurations**, in run order (slimtrain's first: the target is about them):

- ``slimtrain-dct8bit``: ``DCTAdamW8bit``. It stores r indices per matrix instead of a basis.
- ``slimtrain-galore8bit-bf16``: ``GaLoreAdamW8bit`` with ``RandomizedProjector(basis_dtype="bf16")``: the basis
  in bf16, as galore-torch keeps it. Randomized, not exact SVD: the same state bytes, and 224 SVDs of 7B matrices
  would take minutes.
- ``bnb-adamw8bit``: ``bitsandbytes.optim.AdamW8bit``, one per parameter.
- ``galore-torch-8bit``: ``galore_torch.GaLoreAdamW8bit``, one per parameter. Its refresh is an exact SVD.

**Measured.** Each configuration gets a fresh model and optimizer. On CUDA the peak is
``torch.cuda.max_memory_allocated`` over ``--steps`` steps (default 3; the first computes every basis), reset
after the model is built. ``max_memory_reserved`` is shown beside it. The optimizer state after the last step
is counted tensor by tensor on every device. **Predicted**: ``slimtrain.memory.estimate_memory`` (weights +
one gradient + state, ``--layerwise``) for slimtrain and the AdamW8bit row, and galore-torch's state by the
analytic formula of ``benchmarks.state_memory_8bit``. Activations, the refresh's temporaries, cuBLAS
workspaces and the CUDA context are not predicted: the table shows how much they add.

On the CPU there is no allocator peak to read. The smoke run checks the code path and the predicted state
against the state each optimizer really holds.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time

import torch

from benchmarks._cli import command_line, invocation
from benchmarks.state_memory_8bit import galore_torch_8bit_bytes
from slimtrain.memory import LLAMA_SHAPES, estimate_memory, llama_from_shape
from slimtrain.optimizers import DCTAdamW8bit, GaLoreAdamW8bit, LayerwiseStepper, low_rank_param_groups
from slimtrain.optimizers.projectors import RandomizedProjector
from slimtrain.optimizers.rule import matrix_shape
from slimtrain.recipes import runtime
from slimtrain.recipes.optim import TARGET_MODULES

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "llama7b_memory_gpu.md")
SHAPES = {"7b": LLAMA_SHAPES["7B"], "tiny": (64, 160, 4, 2)}  # hidden, intermediate, heads, layers
CONFIGS = ("slimtrain-dct8bit", "slimtrain-galore8bit-bf16", "bnb-adamw8bit", "galore-torch-8bit")
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="7b", choices=tuple(SHAPES), help="model shape (tiny: smoke run)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=None, help="projection rank (default: 1024 at 7b, 16 at tiny)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration (default 3)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"some of {', '.join(CONFIGS)}")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; no configuration starts after this much has passed (default 540)")
    p.add_argument("--out", default=None, help=f"results file (default on CUDA: {os.path.relpath(RESULTS)})")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {', '.join(unknown)} (expected some of {', '.join(CONFIGS)})")
    for name in ("steps", "seq_len", "batch_size", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    args.rank = args.rank or (1024 if args.shape == "7b" else 16)
    if args.out is None:
        if args.device.type != "cuda":
            p.error("--out is required off CUDA (the default results file holds GPU measurements only)")
        args.out = RESULTS
    return args


# ----------------------------------------------------------------------------------------------
# Model and optimizers


def build_model(args) -> torch.nn.Module:
    """The LLaMA in bf16 directly on the device (a 7B fp32 copy would need 27 GB first)."""
    from transformers import LlamaForCausalLM

    config = llama_from_shape(SHAPES[args.shape], vocab_size=args.vocab, max_position_embeddings=args.seq_len,
                              use_cache=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with args.device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    runtime.enable_activation_checkpointing(model)
    model.train()
    return model


def _per_parameter(model, make) -> tuple[dict, list]:
    """One optimizer per parameter, stepped and zeroed in the parameter's post-accumulate-grad hook."""
    optimizers = {p: make(p) for p in model.parameters() if p.requires_grad}

    def hook(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in optimizers]
    return optimizers, handles


def _projected(model) -> set[int]:
    groups = low_rank_param_groups(model, TARGET_MODULES)
    return {id(p) for p in groups[0]["params"] if matrix_shape(p) is not None}


def build_optimizer(name: str, model, args):
    """(the thing whose state to count, a cleanup callable)."""
    groups = dict(rank=args.rank, update_proj_gap=200, scale=0.25)
    if name == "slimtrain-dct8bit":
        opt = DCTAdamW8bit(low_rank_param_groups(model, TARGET_MODULES, **groups), lr=1e-3)
    elif name == "slimtrain-galore8bit-bf16":
        opt = GaLoreAdamW8bit(low_rank_param_groups(model, TARGET_MODULES, **groups), lr=1e-3,
                              projector=RandomizedProjector(basis_dtype="bf16"))
    if name.startswith("slimtrain-"):
        stepper = LayerwiseStepper(opt)
        return [opt], stepper.remove
    if name == "bnb-adamw8bit":
        import bitsandbytes as bnb

        optimizers, handles = _per_parameter(model, lambda p: bnb.optim.AdamW8bit([p], lr=1e-3))
    else:
        from galore_torch import GaLoreAdamW8bit as PeerGaLore8bit

        projected = _projected(model)

        def make(p):
            if id(p) in projected:
                return PeerGaLore8bit([{"params": [p], "rank": args.rank, "update_proj_gap": 200, "scale": 0.25,
                                        "proj_type": "std"}], lr=1e-3)
            return PeerGaLore8bit([p], lr=1e-3)

        optimizers, handles = _per_parameter(model, make)
    return list(optimizers.values()), lambda: [h.remove() for h in handles]


def state_bytes(optimizers) -> int:
    """Every distinct tensor in the optimizers' state (shared tensors, e.g. bnb's code maps, once)."""
    seen, total = set(), 0
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    total += v.numel() * v.element_size()
    return total


def predicted(name: str, model, args) -> dict:
    """slimtrain memory's prediction: weights, one gradient, state (bytes)."""
    config = model.config
    kwargs = dict(rank=args.rank, state_bits=8, weight_dtype="bf16", layerwise=True, target_modules=TARGET_MODULES)
    if name == "slimtrain-dct8bit":
        est = estimate_memory(config, "dct", **kwargs)
    elif name == "slimtrain-galore8bit-bf16":
        est = estimate_memory(config, "galore", projector="randomized", basis_dtype="bf16", **kwargs)
    elif name == "bnb-adamw8bit":
        est = estimate_memory(config, "adamw", state_bits=8, weight_dtype="bf16", layerwise=True)
    else:
        est = estimate_memory(config, "adamw", weight_dtype="bf16", layerwise=True)  # weights and one gradient
        projected = _projected(model)
        params = [p for p in model.parameters()]
        state = galore_torch_8bit_bytes([p for p in params if id(p) in projected],
                                        [p for p in params if id(p) not in projected], args.rank, 2)
        return dict(weights=est.total.weights, grads=est.total.grads, state=state)
    return dict(weights=est.total.weights, grads=est.total.grads, state=est.total.state)


# ----------------------------------------------------------------------------------------------
# Running


def run_config(name: str, args) -> dict:
    cuda = args.device.type == "cuda"
    row = dict(config=name)
    model = build_model(args)
    row["predicted"] = predicted(name, model, args)
    synchronize = torch.cuda.synchronize
    if name == "galore-torch-8bit" and not cuda:
        torch.cuda.synchronize = lambda *a, **k: None  # its one CUDA call, in an 8-bit step; nothing else changes
    try:
        _train(name, model, row, args)
    finally:
        torch.cuda.synchronize = synchronize
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _train(name: str, model, row: dict, args) -> None:
    cuda = args.device.type == "cuda"
    optimizers, cleanup = build_optimizer(name, model, args)
    row["n_optimizers"] = len(optimizers)
    gen = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(args.device)
        start_allocated = torch.cuda.memory_allocated(args.device)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(args.device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()  # parameters are stepped inside the backward
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row["state"] = state_bytes(optimizers)
    row["step_s"] = times
    if cuda:
        row["peak_allocated"] = torch.cuda.max_memory_allocated(args.device)
        row["peak_reserved"] = torch.cuda.max_memory_reserved(args.device)
        row["model_allocated"] = start_allocated
    cleanup()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    command = command_line(__file__, argv)
    t_start = time.perf_counter()
    rows, skipped = [], []
    for name in args.configs:
        if time.perf_counter() - t_start > args.time_budget:
            skipped.append(name)
            continue
        print(f"[llama7b_memory] {name} ...", flush=True)
        try:
            rows.append(run_config(name, args))
        except torch.cuda.OutOfMemoryError as e:  # a result too: this configuration does not fit
            rows.append(dict(config=name, error=f"out of memory: {str(e).splitlines()[0]}"))
        except ImportError as e:
            rows.append(dict(config=name, error=f"not installed: {e}"))
        gc.collect()  # outside the handler: its traceback no longer holds the failed run's model
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(args, command, rows, skipped, time.perf_counter() - t_start)
    write_report(args, command, rows, skipped, time.perf_counter() - t_start)
    return rows


# ----------------------------------------------------------------------------------------------
# The results file


def _env(args) -> str:
    if args.device.type == "cuda":
        where = f"{torch.cuda.get_device_name(args.device)} ({args.device}), CUDA {torch.version.cuda}"
    else:
        where = f"the CPU ({os.cpu_count()} cores)"
    versions = ", ".join(f"{d} {runtime.package_version(d)}" for d in ("transformers", "bitsandbytes", "galore-torch"))
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}, {versions}"


def _fmt(b: int) -> str:
    return f"{b / GB:.3f} GB" if b >= 1e8 else f"{b / 1e6:.3f} MB"


def write_report(args, command: str, rows: list[dict], skipped: list[str], total_s: float) -> None:
    cuda = args.device.type == "cuda"
    hidden, inter, heads, layers = SHAPES[args.shape]
    lines = [
        "# LLaMA-7B training memory on one GPU" if args.shape == "7b" else f"# LLaMA ({args.shape}) training memory",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {_env(args)}. "
        f"Total {total_s / 60:.1f} min.",
        "",
        f"LLaMA hidden {hidden}, intermediate {inter}, {heads} heads, {layers} layers, vocabulary {args.vocab}; bf16 "
        f"weights, random init; {args.batch_size} x {args.seq_len} tokens; activation checkpointing; layer-wise "
        f"updates; rank {args.rank}, T = 200; {args.steps} steps per configuration (the first computes every "
        "projection). GB = 10^9 bytes.",
        "",
        "| configuration | predicted: weights + 1 grad + state | state: predicted | state: held | "
        + ("allocated before step 1 | peak allocated | peak / predicted | peak reserved | step s (last) |"
           if cuda else "step s (last) |"),
        "|---|---|---|---|" + ("---|---|---|---|---|" if cuda else "---|"),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['error']} |")
            continue
        pred = r["predicted"]
        total = pred["weights"] + pred["grads"] + pred["state"]
        diff = r["state"] - pred["state"]
        held = _fmt(r["state"]) + (" (= predicted)" if diff == 0 else f" ({diff:+,} B)")
        cells = [r["config"], _fmt(total), _fmt(pred["state"]), held]
        if cuda:
            cells += [_fmt(r["model_allocated"]), _fmt(r["peak_allocated"]), f"{r['peak_allocated'] / total:.3f}",
                      _fmt(r["peak_reserved"])]
        cells.append(f"{r['step_s'][-1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"Not run (time budget of {args.time_budget:.0f} s spent): {', '.join(skipped)}."]
    if not cuda:
        lines += ["", "CPU run: no allocator peak (a smoke run of the code path; the state columns are real)."]
    lines += ["", "State held beyond the prediction, for the peers: bitsandbytes' 2 KiB of quantization maps per 8-bit "
              "optimizer, one optimizer per parameter here (counted once in the prediction)."]
    lines += ["", "What the peak holds beyond the prediction: activations (checkpointed: one layer's recomputed "
              "activations plus every layer's input), logits and their gradient, a refresh's temporaries (an SVD's "
              "or FFT's workspace for one matrix), cuBLAS workspaces. The target: the best slimtrain peak "
              "at most 18 GB, and `slimtrain memory` within 5% of each measured peak."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
