"""The ``slimtrain`` command: one subcommand per recipe.

    slimtrain pretrain --out runs/galore [--optimizer galore --rank 48 ...]

A new subcommand (``memory``, ``finetune``) is a module with ``add_arguments(parser)`` and
``run_cli(args)``, and one line in :data:`SUBCOMMANDS`. Only the subcommand given is imported: ``slimtrain
pretrain`` does not load PEFT for ``finetune``, and a subcommand whose optional dependency is missing
fails alone, with one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments/run_cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("slimtrain.recipes.pretrain", "pre-train a small LLaMA on Shakespeare with a low-rank optimizer"),
    "memory": ("slimtrain.memory", "weights, gradients and optimizer state in GB per model component"),
    "finetune": ("slimtrain.recipes.finetune", "fine-tune MiniLM (or your local model) with a PEFT adapter to tell Shakespeare's comedies, histories and tragedies apart (or your labelled text)"),
    "deepspeed": ("slimtrain.recipes.deepspeed", "launch the pretrain recipe on N ranks under DeepSpeed ZeRO 1, 2 or 3"),
    "fsdp": ("slimtrain.recipes.fsdp", "launch the pretrain recipe on N ranks under FSDP2 (torch's fully_shard)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``slimtrain`` parser, with the options of subcommand ``command`` (the others: name and help only)."""
    from slimtrain import __version__

    parser = argparse.ArgumentParser(prog="slimtrain", description="Memory-efficient training of transformers.")
    parser.add_argument("--version", action="version", version=f"slimtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no valued options
    if command in SUBCOMMANDS:
        try:
            importlib.import_module(SUBCOMMANDS[command][0])
        except ImportError as e:
            print(f"error: slimtrain {command} cannot start: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    args = build_parser(command).parse_args(argv)
    recipe = importlib.import_module(SUBCOMMANDS[args.command][0])
    del args.command  # the recipe validates exactly its own arguments (e.g. against a resumed run's)
    recipe.run_cli(args)


if __name__ == "__main__":
    main()
