"""The pretrain recipe under FSDP2 (``torch.distributed.fsdp.fully_shard``): same model, data, optimizers and
outputs, on N ranks.

    torchrun --standalone --nproc_per_node 2 -m slimtrain.recipes.fsdp --optimizer galore --out runs/fsdp
    slimtrain fsdp --ranks 2 --optimizer galore --out runs/fsdp        # checks, prints the torchrun command, runs it

Every argument of ``slimtrain pretrain`` works here (:mod:`.fsdp_options`). Each decoder layer and then the
whole model is sharded with ``fully_shard`` on a 1-D mesh of all ranks, and the optimizer is built on the
sharded model, as torch's AdamW would be; ``--placement low-rank`` (default) shards the matrices a projection
compresses by rows along their columns (:func:`slimtrain.sharding.low_rank_placement`), so that every
projection stays on its rank's rows; ``--placement rows`` keeps FSDP2's default, every parameter by rows.
``--device`` is ``auto`` (each rank's GPU under NCCL when torch sees GPUs, else the CPU under gloo), ``cpu`` or
``cuda``; ``--dtype bf16`` is FSDP2's mixed precision: fp32 sharded weights and optimizer, bf16 forward and
backward, fp32 gradient reduction. ``bf16-autocast`` is refused (use ``bf16``).

``--batch-size`` is the global batch: each step, rank ``r`` takes the ``r``-th of ``N`` equal slices of the
batch the single-process recipe would use, and FSDP2 averages the gradients, so the updates are the
single-process ones up to fp32 rounding (a mean of per-rank means; ``docs/fsdp.md``). The logged train loss
is the whole batch's. Validation runs the same batches on every rank (each forward pass gathers the
weights collectively).

Only rank 0 shows progress and writes ``config.json``, ``metrics.csv``, ``loss.png`` and ``summary.json``
(optimizer state per rank and in total, tokens/s, rank 0's peak memory); it holds the lock on ``--out``
(:func:`slimtrain.recipes.outputs.own`) from before the process group starts. Checkpoints are
``torch.distributed.checkpoint`` directories, ``OUT/checkpoint/step<N>/`` (model and optimizer, sharded: each
rank writes its pieces), with the schedule, the RNG and the step in its ``recipe.pt``; ``OUT/checkpoint/latest``
names the newest, and older ones are removed. ``--resume`` continues from it exactly; on another number of
ranks the checkpoint reshards.

``slimtrain fsdp`` runs ``torchrun`` (``python -m torch.distributed.run`` with the interpreter it runs in, so
the ranks use the same Python, torch and slimtrain) with ``--standalone``: one machine, a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys

import torch

from ..sharding.process_group import leave_process_group
from . import metrics, outputs, pretrain, runtime
from .data import VOCAB_SIZE
# The recipe's options and checks; `slimtrain fsdp` finds add_arguments and run_cli here.
from .fsdp_options import (  # noqa: F401
    CHECKPOINT_DIR, LATEST, MODULE, RECIPE_STATE, add_arguments, add_recipe_arguments, checkpoint_path, parse_args,
    validate,
)
from .models import build_model, model_config
from .optim import build_optimizer, optimizer_state_bytes


def init_distributed(device: str) -> None:
    """Join torchrun's process group: NCCL with this rank's GPU, or gloo on the CPU."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))


def shard(model: torch.nn.Module, cfg: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the model, on a 1-D mesh of every rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from slimtrain.sharding import low_rank_placement

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = dict(mesh=mesh)
    if cfg.placement == "low-rank":
        kwargs["shard_placement_fn"] = low_rank_placement(mesh=mesh)
    if cfg.dtype == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FSDPSteps:
    """:func:`pretrain.train`'s backend under FSDP2: the sharded model and its optimizer, DCP checkpoints, rank 0
    writing the files."""

    recipe = "fsdp"
    checkpoint = CHECKPOINT_DIR

    def __init__(self, cfg: argparse.Namespace):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
        self.dtype = "fp32"  # FSDP2 casts for the forward itself: no autocast around it
        self.placement = cfg.placement
        model = build_model(model_config(cfg.model, VOCAB_SIZE, cfg.seq_len), cfg.seed)
        if cfg.activation_checkpointing:
            runtime.enable_activation_checkpointing(model)
        self.model = shard(model.to(self.device), cfg, torch.device(self.device))
        # Built on the sharded model, as torch's AdamW is: every parameter is a DTensor here.
        self.optimizer = build_optimizer(
            cfg.optimizer, self.model, lr=cfg.lr, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
            scale=cfg.scale, weight_decay=cfg.weight_decay, density=cfg.density,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, pretrain.lr_schedule(cfg))

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on this rank's slice of the global batch; returns the whole batch's loss."""
        import torch.distributed as dist

        x, y = x.chunk(self.world)[self.rank].to(self.device), y.chunk(self.world)[self.rank].to(self.device)
        loss = pretrain.next_byte_loss(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = loss.detach().float().reshape(1)
        dist.all_reduce(total)  # a sum: gloo has no average
        return total.item() / self.world

    def save(self, out: str, step: int, elapsed: float, train_time: float) -> None:
        """A sharded DCP checkpoint (collective); ``latest`` then names it and older ones are removed."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        where, tag = os.path.join(out, CHECKPOINT_DIR), f"step{step}"
        path = os.path.join(where, tag)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
        if self.is_main:  # dcp.save ends with a barrier: every rank has written its pieces of `tag`
            recipe = dict(step=step, elapsed_s=elapsed, train_s=train_time, scheduler=self.scheduler.state_dict(),
                          rng=torch.get_rng_state(), world_size=self.world)
            outputs.write_atomic(os.path.join(path, RECIPE_STATE), lambda f: torch.save(recipe, f), sync=True)
            outputs.write_atomic(os.path.join(out, LATEST), lambda f: f.write(tag.encode()), sync=True)
            for name in os.listdir(where):
                if name != tag and name.startswith("step") and os.path.isdir(os.path.join(where, name)):
                    shutil.rmtree(os.path.join(where, name))
        dist.barrier()

    def load(self, out: str) -> tuple[int, float, float]:
        """Restore the checkpoint ``latest`` names (on any number of ranks); returns (step, elapsed, train seconds)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = checkpoint_path(out)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        recipe = torch.load(os.path.join(path, RECIPE_STATE), weights_only=True)
        self.scheduler.load_state_dict(recipe["scheduler"])
        torch.set_rng_state(recipe["rng"])
        return recipe["step"], recipe["elapsed_s"], recipe["train_s"]

    def summary(self) -> dict:
        """Optimizer state per rank and in total (collective), with the number of ranks and the placement."""
        import torch.distributed as dist

        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, optimizer_state_bytes(self.optimizer))
        return dict(optimizer_state_bytes=sum(per_rank), optimizer_state_bytes_per_rank=per_rank,
                    world_size=self.world, placement=self.placement)


def main(argv: list[str] | None = None) -> dict:
    """One rank's run: validate (one-line error from rank 0, exit status 2), own ``--out`` (rank 0), join the
    group, train. A full disk is a one-line error, exit status 1, from each rank it stops."""
    cfg = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as held:
        try:
            validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            splits, batches = pretrain.load_data(cfg)
            if is_main:
                held.enter_context(pretrain.own_out(cfg, LATEST, splits.sha256))
        except (ValueError, FileNotFoundError, ImportError) as e:
            if is_main:
                print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        torch.set_num_threads(cfg.threads)
        init_distributed(cfg.device)
        try:
            summary = pretrain.train(cfg, splits, batches, FSDPSteps(cfg))
        except outputs.WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        leave_process_group()  # the sharded model is unreferenced by now: freed with its pending collectives
    if is_main:
        metrics.print_summary(cfg, summary)
    return summary


def launch_command(recipe_argv: list[str], ranks: int) -> list[str]:
    """The ``torchrun`` command that runs this recipe on ``ranks`` processes of this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", MODULE, *recipe_argv]


def run_cli(args: argparse.Namespace) -> None:
    """``slimtrain fsdp``: check the arguments here (``--out`` not in use included), print the torchrun command,
    run it."""
    parser = add_recipe_arguments(argparse.ArgumentParser())
    cfg, argv = runtime.recipe_args(parser, args), runtime.changed_options(parser, args)
    ranks, dry_run = args.ranks, args.dry_run

    def checks() -> None:
        if ranks < 1:
            raise ValueError(f"Invalid --ranks: {ranks} (expected an integer >= 1)")
        validate(cfg, ranks)

    runtime.check_and_launch(checks, cfg.out, dry_run, launch_command(argv, ranks))


if __name__ == "__main__":
    main()
