"""The pretrain recipe under DeepSpeed ZeRO: same model, data, optimizers and outputs, on N ranks.

    deepspeed --num_gpus 2 --module slimtrain.recipes.deepspeed --zero 2 --out runs/zero2
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module slimtrain.recipes.deepspeed --zero 3 --out runs/cpu
    slimtrain deepspeed --ranks 2 --zero 2 --out runs/zero2        # prints that command, then runs it

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
(use ``bf16``), and so is a ``--ds-config`` enabling bf16 without ``--dtype bf16``.
``--activation-checkpointing`` works as in the pretrain recipe.

Only rank 0 shows progress and writes ``config.json``, ``metrics.csv``, ``loss.png`` and
``summary.json`` (optimizer state summed over ranks, and per rank; tokens/s of the whole run; peak
memory of rank 0). Checkpoints are DeepSpeed's
(``engine.save_checkpoint``: every rank saves its own partition and low-rank state) in
``OUT/checkpoint/``, the latest one kept; ``--resume`` loads it on the same number of ranks and
continues exactly.
"""

from __future__ import annotations

if not __package__:  # run as a file: `import deepspeed` below would import this file
    raise SystemExit("error: run this recipe as a module: "
                     "deepspeed --num_gpus N --module slimtrain.recipes.deepspeed ...")

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from importlib import resources

import torch

from . import outputs, pretrain, runtime
from .optim import capabilities, optimizer_state_bytes

MODULE = "slimtrain.recipes.deepspeed"
STAGES = (1, 2, 3)
CHECKPOINT_DIR = "checkpoint"

def stage0_only(name: str) -> str | None:
    """Why the recipe's optimizer ``name`` cannot run under ZeRO stages >= 1 (its rule is not shardable), or None."""
    rule = capabilities(name)
    return None if rule is None or rule.shardable else rule.reason


def not_under_deepspeed(name: str) -> str | None:
    """Why the recipe's optimizer ``name`` cannot run under this recipe at any ZeRO stage, or None."""
    if name == "spectral-sst":
        return ("SpectralSSTAdamW steps the factors of to_spectral's layers, not a LowRankAdamW rule that "
                "slimtrain.sharding can shard; run it with slimtrain pretrain")
    return None


# Config keys the recipe derives from --batch-size and the number of ranks.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What each rank parses: the pretrain recipe's options and the DeepSpeed config."""
    pretrain.add_arguments(parser)
    parser.add_argument("--zero", type=int, default=None, metavar="STAGE",
                        help="ZeRO stage 1, 2 or 3, with the config shipped in slimtrain/recipes/ds_configs "
                             "(default: 2)")
    parser.add_argument("--ds-config", default=None, metavar="JSON",
                        help="your DeepSpeed config instead of --zero (no optimizer or scheduler section)")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``slimtrain deepspeed``: the recipe's options, and how many ranks to launch."""
    add_recipe_arguments(parser)
    parser.add_argument("--ranks", type=int, default=2, help="processes to launch: GPUs, or CPU ranks (default: 2)")
    parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default: 29500)")
    parser.add_argument("--dry-run", action="store_true", help="print the deepspeed command without running it")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"deepspeed --num_gpus N --module {MODULE}",
                                     description=__doc__.split("\n")[0])
    add_recipe_arguments(parser)
    # The launcher appends --local_rank=I unless given --no_local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg = parser.parse_args(argv)
    del cfg.local_rank  # not a run argument: a resumed run may get other local ranks
    return cfg


def validate(cfg: argparse.Namespace, world_size: int) -> dict:
    """Check every argument, as the pretrain recipe does, and return the DeepSpeed config to use.

    Raises ``ValueError``/``FileNotFoundError`` naming the argument, before anything heavy. The config's
    batch sizes are filled in from ``--batch-size`` and ``world_size``.
    """
    if cfg.zero is not None and cfg.ds_config is not None:
        raise ValueError(f"Invalid --zero {cfg.zero} with --ds-config: pick one (--zero N uses the shipped zeroN.json)")
    if cfg.ds_config is None:
        cfg.zero = 2 if cfg.zero is None else cfg.zero
        if cfg.zero not in STAGES:
            raise ValueError(f"Invalid --zero: {cfg.zero} (expected 1, 2 or 3)")
    if cfg.device != "auto":
        raise ValueError(f"Invalid --device: {cfg.device!r} with the deepspeed recipe (each rank runs on the "
                         "accelerator DeepSpeed gives it: its GPU, or the CPU with DS_ACCELERATOR=cpu); leave it out")
    runtime.check_dtype(cfg.dtype, "cpu")  # the name only: DeepSpeed checks its accelerator
    if cfg.dtype == "bf16-autocast":
        raise ValueError("Invalid --dtype: 'bf16-autocast' with the deepspeed recipe (DeepSpeed's bf16 already keeps "
                         "fp32 master weights of bf16 ones); use --dtype bf16")
    pretrain.validate(cfg, checkpoint=os.path.join(CHECKPOINT_DIR, "latest"), resolve_device=False)
    if cfg.resume:
        check_checkpoint(os.path.join(cfg.out, CHECKPOINT_DIR))
    config = load_config(cfg.ds_config) if cfg.ds_config is not None else shipped_config(cfg.zero)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if not_under_deepspeed(cfg.optimizer):
        raise ValueError(f"Invalid --optimizer {cfg.optimizer} with the deepspeed recipe: {not_under_deepspeed(cfg.optimizer)}")
    if stage0_only(cfg.optimizer) and stage >= 1:
        raise ValueError(f"Invalid --optimizer {cfg.optimizer} at ZeRO stage {stage}: {stage0_only(cfg.optimizer)} "
                         "(stage 0: --ds-config)")
    if (config.get("bf16") or {}).get("enabled") and cfg.dtype != "bf16":
        raise ValueError(f"Invalid --dtype: {cfg.dtype!r} with --ds-config {cfg.ds_config} enabling bf16: pass "
                         "--dtype bf16 (the recipe sets the config's bf16 section from --dtype)")
    if cfg.dtype == "bf16":
        if stage == 0 and cfg.optimizer != "adamw":
            # slimtrain.sharding.check_config refuses it too, but only after the ranks have started.
            raise ValueError(f"Invalid --dtype bf16 at ZeRO stage 0 with --optimizer {cfg.optimizer}: DeepSpeed's "
                             "bf16 optimizer hands it flat fp32 copies of the weights, which cannot be projected; "
                             "use --zero 1, 2 or 3, or --dtype fp32")
        config = {**config, "bf16": {**(config.get("bf16") or {}), "enabled": True}}
    return with_batch_sizes(config, cfg.batch_size, world_size)


def shipped_config(stage: int) -> dict:
    """The config ``slimtrain/recipes/ds_configs/zero{stage}.json`` shipped with the package."""
    return json.loads((resources.files(__package__) / "ds_configs" / f"zero{stage}.json").read_text())


def load_config(path: str) -> dict:
    """A user's DeepSpeed JSON config, refused if it would override what the recipe sets."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid --ds-config: file not found: {path}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid --ds-config: {path} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"Invalid --ds-config: {path} holds a {type(config).__name__} (expected a JSON object)")
    for section, owner in (("optimizer", "--optimizer, --lr"), ("scheduler", "--warmup, --steps")):
        if section in config:
            raise ValueError(f"Invalid --ds-config: {path} sets '{section}', which the recipe builds from {owner}: "
                             "remove the section")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"Invalid --ds-config: zero_optimization is {zero!r} in {path} "
                         "(expected an object such as {\"stage\": 2}, or no key for stage 0)")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"Invalid --ds-config: zero_optimization.stage is {stage!r} in {path} (expected 0, 1, 2 or 3)")
    return config


def check_checkpoint(where: str) -> None:
    """Refuse a DeepSpeed checkpoint directory ``--resume`` cannot load: no tag in ``latest``, no such
    tag, or an empty or truncated file in it (``ValueError`` naming the path)."""
    with open(os.path.join(where, "latest")) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(where, tag)
    if not tag or not os.path.isdir(tag_dir) or os.path.dirname(os.path.normpath(tag_dir)) != os.path.normpath(where):
        raise ValueError(f"Invalid --resume: {os.path.join(where, 'latest')} names {tag!r}, which is not a "
                         f"checkpoint directory in {where}")
    files = sorted(n for n in os.listdir(tag_dir) if n.endswith(".pt"))
    if not files:
        raise ValueError(f"Invalid --resume: {tag_dir} holds no checkpoint files")
    for name in files:
        outputs.check_checkpoint_file(os.path.join(tag_dir, name))


def with_batch_sizes(config: dict, batch_size: int, world_size: int) -> dict:
    """``config`` with its batch keys set from the global ``--batch-size``; ``ValueError`` where they disagree.

    ``"auto"`` (or an absent key) is filled in; gradient accumulation defaults to 1.
    """
    accum = config.get("gradient_accumulation_steps", "auto")
    accum = 1 if accum == "auto" else accum
    if not (isinstance(accum, int) and accum >= 1):
        raise ValueError(f"Invalid --ds-config: gradient_accumulation_steps is {accum!r} "
                         "(expected an integer >= 1 or \"auto\")")
    if batch_size % (world_size * accum):
        raise ValueError(f"Invalid --batch-size: {batch_size} (expected a multiple of {world_size} ranks x "
                         f"{accum} accumulation steps = {world_size * accum})")
    wanted = dict(zip(BATCH_KEYS, (batch_size, batch_size // (world_size * accum), accum)))
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"Invalid --ds-config: {key} is {config[key]!r}, but --batch-size {batch_size} on "
                             f"{world_size} ranks needs {value} (or \"auto\")")
    return {**config, **wanted}


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
    """One rank's run: validate (one-line error from rank 0, exit status 2), join the group, train."""
    cfg = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        config = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        splits, batches = pretrain.load_data(cfg)
        init_distributed()
    except (ValueError, FileNotFoundError, ImportError) as e:
        if is_main:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(cfg.threads)
    summary = pretrain.train(cfg, splits, batches, DeepSpeedSteps(cfg, config))
    if is_main:
        pretrain.print_summary(cfg, summary)
    return summary


def launch_command(recipe_argv: list[str], ranks: int, master_port: int) -> list[str]:
    """The ``deepspeed`` launcher command that runs this recipe on ``ranks`` processes of this machine."""
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(master_port), "--module", MODULE, *recipe_argv]


def recipe_argv(args: argparse.Namespace) -> list[str]:
    """The recipe options in ``args`` that differ from their defaults, as a command line."""
    return runtime.changed_options(add_recipe_arguments(argparse.ArgumentParser()), args)


def run_cli(args: argparse.Namespace) -> None:
    """``slimtrain deepspeed``: check the arguments here, print the launcher command, run it."""
    argv = recipe_argv(args)
    ranks, port, dry_run = args.ranks, args.master_port, args.dry_run
    try:
        if ranks < 1:
            raise ValueError(f"Invalid --ranks: {ranks} (expected an integer >= 1)")
        validate(args, ranks)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    command = launch_command(argv, ranks, port)
    print(shlex.join(command), flush=True)
    if dry_run:
        return
    if shutil.which("deepspeed") is None:
        print("error: the deepspeed launcher is not on PATH: pip install 'slimtrain[deepspeed]'", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(subprocess.call(command))


if __name__ == "__main__":
    main()
