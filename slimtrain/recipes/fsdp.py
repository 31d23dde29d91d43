"""The pretrain recipe under FSDP2 (``torch.distributed.fsdp.fully_shard``): same model, data, optimizers and
outputs, on N ranks.

    torchrun --standalone --nproc_per_node 2 -m slimtrain.recipes.fsdp --optimizer galore --out runs/fsdp
    slimtrain fsdp --ranks 2 --optimizer galore --out runs/fsdp        # prints that command, then runs it

Every argument of ``slimtrain pretrain`` works here. Each decoder layer and then the whole model is
sharded with ``fully_shard`` on a 1-D mesh of all ranks, and the optimizer is built on the sharded model;
``--placement low-rank`` (default) shards the matrices a projection compresses by rows along their columns
(:func:`slimtrain.sharding.low_rank_placement`), so that every projection stays on its rank's rows;
``--placement rows`` keeps FSDP2's default, every parameter by rows. ``--device`` is ``auto`` (each rank's
GPU under NCCL when torch sees GPUs, else the CPU under gloo), ``cpu`` or ``cuda``; ``--dtype bf16`` is
FSDP2's mixed precision: fp32 sharded weights and optimizer, bf16 forward and backward, fp32 gradient
reduction. ``bf16-autocast`` is refused (use ``bf16``).

``--batch-size`` is the global batch: each step, rank ``r`` takes the ``r``-th of ``N`` equal slices of the
batch the single-process recipe would use, and FSDP2 averages the gradients, so the updates are the
single-process ones up to fp32 rounding (a mean of per-rank means; ``docs/fsdp.md``). The logged train loss
is the whole batch's. Validation runs the same batches on every rank (each forward pass gathers the
weights collectively).

Only rank 0 shows progress and writes ``config.json``, ``metrics.csv``, ``loss.png`` and ``summary.json``
(optimizer state per rank and in total, tokens/s, rank 0's peak memory). Checkpoints are
``torch.distributed.checkpoint`` directories, ``OUT/checkpoint/step<N>/`` (model and optimizer, sharded:
each rank writes its pieces), with the scheduler and counters in its ``recipe.pt``; ``OUT/checkpoint/latest``
names the newest, and older ones are removed. ``--resume`` continues from it exactly, on any number of
ranks (the checkpoint reshards).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys

import torch

from . import outputs, pretrain, runtime
from .data import VOCAB_SIZE
from .models import build_model, model_config
from .optim import build_optimizer, optimizer_state_bytes

MODULE = "slimtrain.recipes.fsdp"
CHECKPOINT_DIR = "checkpoint"
LATEST = "latest"
PLACEMENTS = ("low-rank", "rows")
DEVICES = ("auto", "cpu", "cuda")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What each rank parses: the pretrain recipe's options and how parameters are sharded."""
    pretrain.add_arguments(parser)
    parser.add_argument("--placement", default="low-rank", choices=PLACEMENTS,
                        help="low-rank: matrices projected by rows are sharded by columns, so every projection is "
                             "local (slimtrain.sharding.low_rank_placement); rows: FSDP2's default (default: low-rank)")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``slimtrain fsdp``: the recipe's options, and how many ranks to launch."""
    add_recipe_arguments(parser)
    parser.add_argument("--ranks", type=int, default=2, help="processes to launch: GPUs, or CPU ranks (default: 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command without running it")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node N -m {MODULE}", description=__doc__.split("\n")[0])
    return add_recipe_arguments(parser).parse_args(argv)


def validate(cfg: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Check every argument, as the pretrain recipe does (``ValueError``/``FileNotFoundError`` naming it, before
    anything heavy). ``--device auto`` becomes the kind the ranks run on (``cuda`` or ``cpu``)."""
    if cfg.device not in DEVICES:
        raise ValueError(f"Invalid --device: {cfg.device!r} with the fsdp recipe (expected one of "
                         f"{', '.join(DEVICES)}: each rank takes the GPU of its local rank, or the CPU)")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and torch.cuda.device_count() < 1:
        raise ValueError("Invalid --device: 'cuda' (torch sees no GPU on this machine)")
    runtime.check_dtype(cfg.dtype, cfg.device)
    if cfg.dtype == "bf16-autocast":
        raise ValueError("Invalid --dtype: 'bf16-autocast' with the fsdp recipe (FSDP2's mixed precision already keeps "
                         "fp32 sharded weights of a bf16 forward); use --dtype bf16")
    if cfg.batch_size % world_size:
        raise ValueError(f"Invalid --batch-size: {cfg.batch_size} (expected a multiple of the {world_size} ranks)")
    pretrain.validate(cfg, checkpoint=os.path.join(CHECKPOINT_DIR, LATEST), resolve_device=False)
    if cfg.optimizer == "spectral-sst":
        raise ValueError("Invalid --optimizer spectral-sst with the fsdp recipe: SpectralSSTAdamW steps the factors of "
                         "to_spectral's layers, which are not FSDP2 matrices; run it with slimtrain pretrain")
    if cfg.resume:
        checkpoint_path(cfg.out)
    return cfg


def checkpoint_path(out: str) -> str:
    """The checkpoint directory ``OUT/checkpoint/latest`` names (``ValueError`` if it names none)."""
    where = os.path.join(out, CHECKPOINT_DIR)
    with open(os.path.join(where, LATEST)) as f:
        tag = f.read().strip()
    path = os.path.join(where, tag)
    if not tag or os.sep in tag or not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"Invalid --resume: {os.path.join(where, LATEST)} names {tag!r}, which is not a checkpoint "
                         f"directory in {where}")
    outputs.check_checkpoint_file(os.path.join(path, "recipe.pt"))
    return path


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
        if cfg.device == "cuda":
            self.device = f"cuda:{torch.cuda.current_device()}"
        else:
            self.device = "cpu"
        self.dtype = "fp32"  # FSDP2 casts for the forward itself: no autocast around it
        self.cfg = cfg
        model = build_model(model_config(cfg.model, VOCAB_SIZE, cfg.seq_len), cfg.seed)
        if cfg.activation_checkpointing:
            runtime.enable_activation_checkpointing(model)
        model.to(self.device)
        self.model = shard(model, cfg, torch.device(self.device))
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
        if self.is_main:
            recipe = dict(step=step, elapsed_s=elapsed, train_s=train_time, scheduler=self.scheduler.state_dict(),
                          rng=torch.get_rng_state(), world_size=self.world)
            torch.save(recipe, os.path.join(path, "recipe.pt.tmp"))
            os.replace(os.path.join(path, "recipe.pt.tmp"), os.path.join(path, "recipe.pt"))
            with open(os.path.join(where, LATEST + ".tmp"), "w") as f:
                f.write(tag)
            os.replace(os.path.join(where, LATEST + ".tmp"), os.path.join(where, LATEST))
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
        recipe = torch.load(os.path.join(path, "recipe.pt"), weights_only=True)
        self.scheduler.load_state_dict(recipe["scheduler"])
        torch.set_rng_state(recipe["rng"])
        return recipe["step"], recipe["elapsed_s"], recipe["train_s"]

    def summary(self) -> dict:
        """Optimizer state per rank and in total (collective), with the number of ranks and the placement."""
        import torch.distributed as dist

        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, optimizer_state_bytes(self.optimizer))
        return dict(optimizer_state_bytes=sum(per_rank), optimizer_state_bytes_per_rank=per_rank,
                    world_size=self.world, placement=self.cfg.placement)


def main(argv: list[str] | None = None) -> dict:
    """One rank's run: validate (one-line error from rank 0, exit status 2), join the group, train."""
    cfg = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        splits, batches = pretrain.load_data(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(cfg.threads)
    init_distributed(cfg.device)
    import torch.distributed as dist

    try:
        summary = pretrain.train(cfg, splits, batches, FSDPSteps(cfg))
    finally:
        dist.destroy_process_group()
    if is_main:
        pretrain.print_summary(cfg, summary)
    return summary


def launch_command(recipe_argv: list[str], ranks: int) -> list[str]:
    """The ``torchrun`` command that runs this recipe on ``ranks`` processes of this machine."""
    launcher = ["torchrun"] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(ranks), "-m", MODULE, *recipe_argv]


def recipe_argv(args: argparse.Namespace) -> list[str]:
    """The recipe options in ``args`` that differ from their defaults, as a command line."""
    return runtime.changed_options(add_recipe_arguments(argparse.ArgumentParser()), args)


def run_cli(args: argparse.Namespace) -> None:
    """``slimtrain fsdp``: check the arguments here, print the torchrun command, run it."""
    argv = recipe_argv(args)
    ranks, dry_run = args.ranks, args.dry_run
    # What each rank will parse: the launcher's own options are not the run's (a --resume compares the rest).
    cfg = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("ranks", "dry_run")})
    try:
        if ranks < 1:
            raise ValueError(f"Invalid --ranks: {ranks} (expected an integer >= 1)")
        validate(cfg, ranks)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    command = launch_command(argv, ranks)
    print(shlex.join(command), flush=True)
    if dry_run:
        return
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
