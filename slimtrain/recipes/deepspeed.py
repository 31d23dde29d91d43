"""The pretrain recipe under DeepSpeed ZeRO: same model, data, optimizers and outputs, on N ranks.

    deepspeed --num_gpus 2 --module slimtrain.recipes.deepspeed --zero 2 --out runs/zero2
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module slimtrain.recipes.deepspeed --zero 3 --out runs/cpu
    slimtrain deepspeed --ranks 2 --zero 2 --out runs/zero2        # checks, prints the launch command, runs it

DeepSpeed's launcher spells ``python -m`` as ``--module``; the script-path form
(``deepspeed path/to/deepspeed.py``) cannot work, because the file would shadow the ``deepspeed``
package. On a machine without GPUs, ``--num_gpus N`` (alias ``--num_accelerators``) starts N CPU
ranks that talk over gloo (checked with DeepSpeed 0.19.8 on 2 CPU cores); without it the launcher
starts one rank per NUMA node, usually one.

Every argument of ``slimtrain pretrain`` works here, plus the DeepSpeed config: ``--zero 1|2|3`` picks
one of the configs shipped in ``slimtrain/recipes/ds_configs/`` (fp32, no clipping, like the
single-process recipe), ``--ds-config PATH`` takes yours (no ``optimizer`` or ``scheduler`` section:
the recipe builds both; batch sizes ``"auto"`` or consistent with ``--batch-size``). Torch AdamW goes
through ``deepspeed.initialize``, slimtrain's optimizers through :func:`slimtrain.sharding.initialize`.

``--batch-size`` is the global batch: each step, rank ``r`` takes the ``r``-th of ``N`` equal slices
of the batch the single-process recipe would use (and splits it again into the config's
``gradient_accumulation_steps``), and DeepSpeed averages the gradients. The updates are therefore the
single-process ones up to fp32 rounding (a mean of per-rank means, not one mean), and the logged train
loss is the whole batch's (averaged over ranks). A projector refresh can amplify that rounding: on the
tiny model at 2 ranks, losses equal to 1e-6 at ``--rank 8`` but up to 1.6e-3 apart at the default rank 48
(``benchmarks/zero_vs_one_process.py``). That holds for configs that set ``"gradient_clipping": 0.0`` as the shipped ones do: a config
without the key gets DeepSpeed's default, clipping the gradient norm at 1.0 (DeepSpeed 0.19.8).
Validation runs the same batches on every rank: under ZeRO-3 each forward pass gathers the weights
collectively, so all ranks must run it.

``--device`` is not taken (each rank runs on its DeepSpeed accelerator). ``--dtype bf16`` enables the
config's ``bf16`` section: bf16 weights and gradients with fp32 master weights in ZeRO's partitions, so
unlike the one-process ``--dtype bf16`` no update is lost to rounding; it needs ZeRO stage 1-3 with
slimtrain's optimizers (at stage 0 DeepSpeed hands them flat fp32 copies). ``bf16-autocast`` is refused
(use ``bf16``), and so is a ``--ds-config`` enabling bf16 without ``--dtype bf16``, or enabling fp16 (the
recipe has no fp16 mode). The config also passes :func:`slimtrain.sharding.api.check_config` (no
offload, no elastic checkpoints) in every process that checks the arguments, the ``slimtrain deepspeed``
launcher included, on the optimizer built on the meta device. ``--activation-checkpointing`` works as in
the pretrain recipe.

Only rank 0 shows progress and writes ``config.json``, ``metrics.csv``, ``loss.png`` and
``summary.json`` (optimizer state summed over ranks, and per rank; tokens/s of the whole run; peak
memory of rank 0); it holds the lock on ``--out`` (:func:`slimtrain.recipes.outputs.own`) from before
the process group starts, and a rank 0 that cannot take it exits, which makes DeepSpeed's launcher stop
the other ranks. Checkpoints are DeepSpeed's (``engine.save_checkpoint``: every rank saves its own
partition and low-rank state) in ``OUT/checkpoint/``, the latest one kept; ``--resume`` loads it on the
same number of ranks and continues exactly.

``slimtrain deepspeed`` runs the launcher as ``python -m deepspeed.launcher.runner`` (the module behind
the ``deepspeed`` command) with the interpreter it runs in, so the ranks use the same Python, slimtrain
and DeepSpeed, whether or not that environment's ``bin/`` is on ``PATH``.
"""

from __future__ import annotations

if not __package__:  # run as a file: `import deepspeed` below would import this file
    raise SystemExit("error: run this recipe as a module: "
                     "deepspeed --num_gpus N --module slimtrain.recipes.deepspeed ...")

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import warnings

import torch

from ..sharding.process_group import leave_process_group
from . import metrics, outputs, pretrain, runtime
# The recipe's options and checks; `slimtrain deepspeed` finds add_arguments and run_cli here.
from .deepspeed_options import (  # noqa: F401
    CHECKPOINT_DIR, LATEST, MODULE, add_arguments, add_recipe_arguments, parse_args, validate,
)
from .optim import optimizer_state_bytes

LAUNCHER = "deepspeed.launcher.runner"  # what the `deepspeed` command runs


def init_distributed() -> None:
    """Join the launcher's process group (gloo on CPU, NCCL on GPUs)."""
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as e:
        raise ImportError("the deepspeed recipe needs DeepSpeed: pip install 'slimtrain[deepspeed]'") from e

    # DeepSpeed JIT-compiles a shared-memory all-reduce at init (~100 s of g++ on 2 CPU cores) that only
    # inference uses; training collectives go through gloo or NCCL.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, warning once per kind and rank in the
    # middle of the progress bar; nothing a user of the recipe can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    deepspeed.init_distributed(verbose=False)


class DeepSpeedSteps:
    """:func:`pretrain.train`'s backend under DeepSpeed: one engine, its checkpoints, rank 0 writing files."""

    recipe = "deepspeed"
    checkpoint = CHECKPOINT_DIR

    def __init__(self, cfg: argparse.Namespace, config: dict):
        import deepspeed
        import torch.distributed as dist

        from slimtrain import sharding

        model, optimizer = pretrain.build_model_and_optimizer(cfg, place=False)  # DeepSpeed places and casts it
        schedule = pretrain.lr_schedule(cfg)
        # torch AdamW is on ZeRO's own list; slimtrain optimizers need the sharded low-rank step.
        initialize = deepspeed.initialize if cfg.optimizer == "adamw" else sharding.initialize
        # A factory: the scheduler must drive the optimizer DeepSpeed steps, which exists only after this call.
        self.engine, *_ = initialize(model=model, optimizer=optimizer, config=config,
                                     lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = self.engine.module
        # The config's bf16 casts the weights themselves (fp32 masters in ZeRO's partitions): no autocast.
        self.device, self.dtype = str(self.engine.device), cfg.dtype
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.accum = self.engine.gradient_accumulation_steps()
        self.stage = int((config.get("zero_optimization") or {}).get("stage", 0))

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on this rank's slice of the global batch; returns the whole batch's loss."""
        import torch.distributed as dist

        x, y = x.to(self.device), y.to(self.device)
        total = torch.zeros((), device=self.device)
        mine = zip(x.chunk(self.world)[self.rank].chunk(self.accum), y.chunk(self.world)[self.rank].chunk(self.accum))
        for xm, ym in mine:
            loss = pretrain.next_byte_loss(self.engine, xm, ym)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer and the scheduler at the last micro-batch
            total += loss.detach().float()
        dist.all_reduce(total)  # a sum: gloo has no average
        return total.item() / (self.world * self.accum)

    def save(self, out: str, step: int, elapsed: float, train_time: float) -> None:
        """A DeepSpeed checkpoint (collective: every rank saves its partition); older ones are removed."""
        where, tag = os.path.join(out, CHECKPOINT_DIR), f"step{step}"
        state = dict(step=step, elapsed_s=elapsed, train_s=train_time, rng=torch.get_rng_state())
        self.engine.save_checkpoint(where, tag=tag, client_state=state)
        if self.is_main:  # save_checkpoint ends with a barrier: every rank has finished writing `tag`
            for name in os.listdir(where):
                if name != tag and name.startswith("step") and os.path.isdir(os.path.join(where, name)):
                    shutil.rmtree(os.path.join(where, name))

    def load(self, out: str) -> tuple[int, float, float]:
        """Restore the latest checkpoint in ``out``; returns (step, elapsed seconds, training seconds)."""
        where = os.path.join(out, CHECKPOINT_DIR)
        path, state = self.engine.load_checkpoint(where)
        if path is None:
            raise FileNotFoundError(f"Invalid --resume: DeepSpeed found no checkpoint in {where}")
        torch.set_rng_state(state["rng"])
        return state["step"], state["elapsed_s"], state["train_s"]

    def summary(self) -> dict:
        """Optimizer state per rank and in total (collective), with the stage and the number of ranks."""
        import torch.distributed as dist

        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # under ZeRO's wrapper
        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, optimizer_state_bytes(inner))
        return dict(optimizer_state_bytes=sum(per_rank), optimizer_state_bytes_per_rank=per_rank,
                    zero_stage=self.stage, world_size=self.world)


def main(argv: list[str] | None = None) -> dict:
    """One rank's run: validate (one-line error from rank 0, exit status 2), own ``--out`` (rank 0), join
    the group, train. A full disk is a one-line error, exit status 1, from each rank it stops."""
    cfg = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as held:
        try:
            config = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            splits, batches = pretrain.load_data(cfg)
            if is_main:
                held.enter_context(pretrain.own_out(cfg, LATEST, splits.sha256))
            init_distributed()
        except (ValueError, FileNotFoundError, ImportError) as e:
            if is_main:
                print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        torch.set_num_threads(cfg.threads)
        try:
            summary = pretrain.train(cfg, splits, batches, DeepSpeedSteps(cfg, config))
        except outputs.WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        leave_process_group()  # the engine is unreferenced by now: freed with its pending collectives
    if is_main:
        metrics.print_summary(cfg, summary)
    return summary


def launch_command(recipe_argv: list[str], ranks: int, master_port: int) -> list[str]:
    """The DeepSpeed launcher command that runs this recipe on ``ranks`` processes of this machine."""
    return [sys.executable, "-m", LAUNCHER, "--num_gpus", str(ranks), "--master_port", str(master_port),
            "--module", MODULE, *recipe_argv]


def run_cli(args: argparse.Namespace) -> None:
    """``slimtrain deepspeed``: check the arguments here (``--out`` not in use included), print the
    launcher command, run it."""
    parser = add_recipe_arguments(argparse.ArgumentParser())
    cfg, argv = runtime.recipe_args(parser, args), runtime.changed_options(parser, args)
    ranks, port, dry_run = args.ranks, args.master_port, args.dry_run

    def checks() -> None:
        if ranks < 1:
            raise ValueError(f"Invalid --ranks: {ranks} (expected an integer >= 1)")
        validate(cfg, ranks)
        if not dry_run and importlib.util.find_spec("deepspeed") is None:
            raise ImportError(f"the deepspeed recipe needs DeepSpeed in this Python ({sys.executable}): "
                              "pip install 'slimtrain[deepspeed]'")

    runtime.check_and_launch(checks, cfg.out, dry_run, launch_command(argv, ranks, port))


if __name__ == "__main__":
    main()
