"""How long does one optimizer step take, and how much state does it keep, on a LLaMA-shaped model?

Question: what do slimtrain's optimizers cost per ``optimizer.step()`` and in state bytes next to torch
AdamW and the published galore-torch GaLoreAdamW, on the GaLore paper's model shapes?

Method, all in one process:

- one model of the given shape (default: the paper's 60M LLaMA, vocabulary 32000, fp32 on CPU) and one
  set of gradients from a real forward and backward pass on random tokens;
- every optimizer steps the same parameters with exactly those gradients (set before each step, outside
  the timer). Optimizers take turns: each round steps every optimizer once, in the same order, so
  the load of other jobs on a shared machine falls on all of them alike;
- projected optimizers refresh their subspace every ``--gap`` steps (steps 0, gap, 2 gap, ...).
  Step 0 (state allocation and the first refresh) and the next ``--warmup`` steps are not timed.
  **Ordinary steps** and **refresh steps** are reported separately, each as the median of its
  samples; "per step at T=200" amortizes one refresh over the papers' default gap:
  ``(199 x ordinary + refresh) / 200``. AdamW has no refresh: all its timed steps are ordinary;
- state: bytes of every distinct tensor reachable from ``optimizer.state`` after the last step
  (``recipes.optim.state_tensor_bytes``, which also counts galore-torch's projector objects).

    python -m benchmarks.step_time                  # 60M shapes: 6 minutes on an idle 2-core CPU, one thread
    python -m benchmarks.step_time --model 130m     # the 130M shapes at the paper's rank 256 (not run here)
    python -m benchmarks.step_time --quick          # tiny model, byte vocabulary: seconds
    python -m benchmarks.step_time --device cuda --model 1b --optimizers adamw adamw-fused galore-torch \
        galore fira frugal dct galore8bit bnb-adamw8bit --kernel-backends auto torch     # on a GPU

Writes ``step_time.md`` into ``--out-dir`` with the command and the machine on top; on CUDA
``step_time_gpu.md``, naming the GPU and the versions of CUDA, Triton, bitsandbytes and galore-torch.

**On a GPU** each step is timed between two ``torch.cuda.synchronize()`` calls, and the table adds the step's
transient memory: ``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it (the
temporaries a step needs beyond the state it keeps; the target is at most 0.1x the state). Two peers exist
only here: ``adamw-fused`` (``torch.optim.AdamW(fused=True)``) and ``bnb-adamw8bit`` (bitsandbytes'
``AdamW8bit``). ``--kernel-backends auto torch`` adds a row per slimtrain optimizer stepped with
``slimtrain.kernels.use_backend("torch")``: its Triton path beside its torch path.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain.memory import LLAMA_VOCAB, PAPER_RANKS
from slimtrain.recipes.models import MODEL_SHAPES, build_model, model_config, smallest_matrix_dim
from slimtrain.recipes.optim import (
    OPTIMIZER_NAMES,
    REFERENCE_NAMES,
    build_optimizer,
    check_optimizer_name,
    default_rank,
    state_tensor_bytes,
)

DEFAULT_OPTIMIZERS = ["adamw", "galore-torch", "galore", "fira", "frugal", "dct", "sst", "galore8bit", "dct8bit"]
IMPLEMENTATION = {"adamw": "torch.optim.AdamW", "galore-torch": "galore_torch.GaLoreAdamW 1.0",
                  "adamw-fused": "torch.optim.AdamW(fused=True)", "bnb-adamw8bit": "bitsandbytes.optim.AdamW8bit"}
# Peers this benchmark builds itself (the recipes do not train with them).
LOCAL_PEERS = ("adamw-fused", "bnb-adamw8bit")
KERNEL_BACKENDS = ("auto", "torch", "triton")
DENSE = ("adamw",) + LOCAL_PEERS


def build_local_peer(name: str, params, lr: float):
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr)
AMORTIZE_GAP = 200  # the papers' default update_proj_gap


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--model", default="60m", help=f"shape: {', '.join(MODEL_SHAPES)} (default: 60m)")
    p.add_argument("--vocab", type=int, default=LLAMA_VOCAB, help=f"vocabulary (default: {LLAMA_VOCAB}, the paper's)")
    p.add_argument("--rank", type=int, default=None, help="projection rank (default: the paper's, else a quarter)")
    p.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS)
    p.add_argument("--steps", type=int, default=25, help="steps per optimizer, step 0 included (default: 25)")
    p.add_argument("--gap", type=int, default=10, help="steps between refreshes (default: 10; samples at 10, 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after step 0 (default: 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence of the gradient's batch")
    p.add_argument("--batch-size", type=int, default=2, help="sequences in the gradient's batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the shape's); e.g. 4 layers of the 1B shape")
    p.add_argument("--kernel-backends", nargs="+", default=["auto"], choices=KERNEL_BACKENDS,
                   help="slimtrain's kernels: auto (default: Triton on CUDA, torch elsewhere); each other one adds a "
                        "row per slimtrain optimizer")
    p.add_argument("--quick", action="store_true", help="tiny model, byte vocabulary, 6 steps, refresh every 2")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: runs/benchmarks-quick)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or results_dir(args.quick)
    if args.quick:
        args.model, args.vocab, args.steps, args.gap, args.warmup, args.seq_len = "tiny", 256, 6, 2, 1, 32
    for name in args.optimizers:  # fail before building a 60M model, not after
        if name not in LOCAL_PEERS:
            check_optimizer_name(name, OPTIMIZER_NAMES + REFERENCE_NAMES + LOCAL_PEERS)
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"Invalid --layers: {args.layers} (expected an integer >= 1)")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid --device: {args.device} (CUDA is not available here)")
    if not 1 <= args.warmup < args.gap < args.steps:
        raise ValueError(f"Invalid --warmup/--gap/--steps: {args.warmup}/{args.gap}/{args.steps} "
                         "(expected 1 <= warmup < gap < steps, so both kinds of step get samples)")
    return args


def machine(device: torch.device) -> str:
    """The GPU and the versions that matter there, or: CPU model, core count, torch version and threads, and the
    load when the run started."""
    if device.type == "cuda":
        from slimtrain.recipes.runtime import package_version

        return (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
                + ", ".join(f"{d} {package_version(d)}" for d in ("triton", "bitsandbytes", "galore-torch"))
                + f", Python {platform.python_version()}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"Python {platform.python_version()}; load average at start (1, 5, 15 min): {load}")


def gradients(model: torch.nn.Module, batch_size: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    """One real gradient per parameter: next-token loss on seeded random tokens."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(next(model.parameters()).device)
    logits = model(input_ids=tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def time_steps(optimizers: dict, params: list, grads: list, steps: int,
               device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds of each ``optimizer.step()``, taking turns step by step, and on CUDA each step's transient bytes
    (peak allocated during the step minus allocated before it). ``optimizers``: name -> (optimizer, kernel
    backend or None)."""
    from slimtrain import kernels

    cuda = device.type == "cuda"
    times = {name: [] for name in optimizers}
    transient = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, (opt, backend) in optimizers.items():
            for p, grad in zip(params, grads):
                p.grad = grad
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            if backend is None:
                opt.step()
            else:
                with kernels.use_backend(backend):
                    opt.step()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                transient[name].append(torch.cuda.max_memory_allocated(device) - before)
    return times, transient


def summarize(name: str, seconds: list[float], state_bytes: int, args, transient: list[int] = ()) -> dict:
    """Median ordinary and refresh step, amortized step, spread, from the timed steps."""
    timed = range(args.warmup + 1, args.steps)
    dense = name in DENSE  # never refreshes: every timed step is ordinary
    refresh = [seconds[i] for i in timed if not dense and i % args.gap == 0]
    ordinary = [seconds[i] for i in timed if dense or i % args.gap]
    step = statistics.median(ordinary)
    refresh_step = statistics.median(refresh) if refresh else step
    q1, _, q3 = statistics.quantiles(ordinary, n=4) if len(ordinary) > 1 else (step, step, step)
    ordinary_transient = [transient[i] for i in timed if dense or i % args.gap] if transient else []
    return dict(name=name, step=step, iqr=(q1, q3), n=len(ordinary), refresh=refresh_step if refresh else None,
                n_refresh=len(refresh), amortized=((AMORTIZE_GAP - 1) * step + refresh_step) / AMORTIZE_GAP,
                state=state_bytes, transient=max(ordinary_transient) if ordinary_transient else None)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    host = machine(args.device)
    config = model_config(args.model, args.vocab, args.seq_len)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    rank = args.rank or PAPER_RANKS.get(args.model.upper(), default_rank(smallest_matrix_dim(config)))
    model = build_model(config, seed=0).to(args.device)
    params = list(model.parameters())
    grads = gradients(model, args.batch_size, args.seq_len, args.vocab)
    # A tiny lr keeps the shared weights (every optimizer steps them) near their start.
    optimizers = {}
    for name in args.optimizers:
        if name in LOCAL_PEERS:
            optimizers[name] = (build_local_peer(name, params, lr=1e-6), None)
            continue
        ours = name in OPTIMIZER_NAMES and name != "adamw"
        for backend in args.kernel_backends:
            if backend == "auto" or ours:
                label = name if backend == "auto" else f"{name} [{backend} kernels]"
                opt = build_optimizer(name, model, lr=1e-6, rank=rank, update_proj_gap=args.gap)
                optimizers[label] = (opt, None if backend == "auto" else backend)
    t0 = time.perf_counter()
    times, transient = time_steps(optimizers, params, grads, args.steps, args.device)
    rows = [summarize(name, times[name], state_tensor_bytes(opt), args, transient[name])
            for name, (opt, _) in optimizers.items()]
    n_params = sum(p.numel() for p in params)
    write_report(args, command, host, rows, n_params, rank, time.perf_counter() - t0)
    return rows


def _ratio(value: float, ref: dict | None, key: str) -> str:
    return f"{value / ref[key]:.2f}" if ref else "-"


def write_report(args, command: str, host: str, rows: list[dict], n_params: int, rank: int, total_s: float) -> None:
    cuda = args.device.type == "cuda"
    adamw = next((r for r in rows if r["name"] == "adamw"), None)
    galore = next((r for r in rows if r["name"] == "galore-torch"), None)
    ms, mib = 1e3, 2**20
    lines = [
        "# Optimizer step time and state memory",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {host}. Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"the timed loop took {total_s / 60:.1f} min.",
        "",
        f"Model `{args.model}`{'' if args.layers is None else f' with {args.layers} layers'} LLaMA "
        f"({n_params / 1e6:.1f}M parameters, vocabulary {args.vocab}, fp32, on "
        f"{args.device}); low-rank "
        f"optimizers project the attention and MLP matrices at rank {rank} (FRUGAL: density 0.25), embeddings, "
        f"norms and lm_head get AdamW inside the same optimizer. All optimizers step the same parameters with the "
        f"same gradients, taking turns. {args.steps} steps each, refresh every {args.gap}: step 0 and "
        f"{args.warmup} warm-up steps untimed; **step** = median of the ordinary steps (IQR beside it), "
        f"**refresh step** = median of the steps that refresh the subspace, reported separately; **per step at "
        f"T={AMORTIZE_GAP}** = (199 x step + refresh step) / 200. State: distinct tensors reachable from "
        "`optimizer.state` after the last step.",
        "",
        "| optimizer | implementation | step ms | IQR ms | vs AdamW | vs galore-torch | refresh step ms "
        f"| per step at T={AMORTIZE_GAP}, ms | vs AdamW | vs galore-torch | state MiB | vs AdamW | vs galore-torch |"
        + (" step transient MiB | transient / state |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""),
    ]
    for r in rows:
        impl = IMPLEMENTATION.get(r["name"], f"slimtrain {r['name']}")
        refresh = "-" if r["refresh"] is None else f"{r['refresh'] * ms:.0f} (n={r['n_refresh']})"
        lines.append(
            f"| {r['name']} | {impl} | {r['step'] * ms:.1f} | {r['iqr'][0] * ms:.1f}-{r['iqr'][1] * ms:.1f} | "
            f"{_ratio(r['step'], adamw, 'step')} | {_ratio(r['step'], galore, 'step')} | {refresh} | "
            f"{r['amortized'] * ms:.1f} | {_ratio(r['amortized'], adamw, 'amortized')} | "
            f"{_ratio(r['amortized'], galore, 'amortized')} | {r['state'] / mib:.1f} | "
            f"{_ratio(r['state'], adamw, 'state')} | {_ratio(r['state'], galore, 'state')} |"
            + (f" {r['transient'] / mib:.1f} | {r['transient'] / r['state']:.3f} |" if cuda else "")
        )
    lines += [
        "",
        f"Ordinary steps timed per projected optimizer: {min(r['n'] for r in rows)} (AdamW, which never refreshes: "
        f"{max(r['n'] for r in rows)}). Ratios are of medians. "
        + ("Each step is timed between two CUDA synchronizations; transient = the peak allocated during an ordinary "
         "step (the largest over the timed ones) minus what was allocated before it." if cuda else
         "Other jobs shared the cores (see the load average above), so absolute times are indicative; taking turns "
         "step by step keeps the comparison between rows fair."),
        "",
    ]
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "step_time_gpu.md" if cuda else "step_time.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
