"""The ``slimtrain`` command: one subcommand per recipe.

    slimtrain pretrain --out runs/galore [--optimizer galore --rank 48 ...]

A new subcommand (``memory``, ``finetune``) is a module with ``add_arguments(parser)`` and
``run_cli(args)``, and one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module with add_arguments/run_cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("slimtrain.recipes.pretrain", "pre-train a small LLaMA on Shakespeare with a low-rank optimizer"),
    "memory": ("slimtrain.memory", "weights, gradients and optimizer state in GB per model component"),
    "finetune": ("slimtrain.recipes.finetune", "fine-tune MiniLM (or your local model) with a PEFT adapter to tell Shakespeare's comedies, histories and tragedies apart (or your labelled text)"),
    "deepspeed": ("slimtrain.recipes.deepspeed", "launch the pretrain recipe on N ranks under DeepSpeed ZeRO 1, 2 or 3"),
    "fsdp": ("slimtrain.recipes.fsdp", "launch the pretrain recipe on N ranks under FSDP2 (torch's fully_shard)"),
}


def build_parser() -> argparse.ArgumentParser:
    from slimtrain import __version__

    parser = argparse.ArgumentParser(prog="slimtrain", description="Memory-efficient training of transformers.")
    parser.add_argument("--version", action="version", version=f"slimtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        recipe = importlib.import_module(module)
        recipe.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    recipe = importlib.import_module(SUBCOMMANDS[args.command][0])
    del args.command  # the recipe validates exactly its own arguments (e.g. against a resumed run's)
    recipe.run_cli(args)


if __name__ == "__main__":
    main()
