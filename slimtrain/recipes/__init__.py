"""Runnable training recipes; no library logic lives here.

Each recipe is a driver (build, train, evaluate, write) beside its options and their checks:

- ``pretrain`` / ``pretrain_options``: ``python -m slimtrain.recipes.pretrain --out DIR`` (or
  ``slimtrain pretrain``), a small LLaMA on Shakespeare with any optimizer of the family;
- ``deepspeed`` / ``deepspeed_options``: the same recipe on N ranks under DeepSpeed ZeRO 1, 2 or 3
  (``slimtrain deepspeed``, or ``deepspeed --num_gpus N --module slimtrain.recipes.deepspeed --zero 2 --out
  DIR``); its configs are in ``ds_configs/``;
- ``fsdp`` / ``fsdp_options``: the same recipe on N ranks under FSDP2, torch's ``fully_shard`` (``slimtrain fsdp``,
  or ``torchrun --standalone --nproc_per_node N -m slimtrain.recipes.fsdp --out DIR``), with DCP checkpoints;
- ``finetune`` / ``finetune_options``: PEFT fine-tuning, MiniLM on the play genres or your model directory
  (``hf_model``) and labelled text (``labelled``), with an adapter preset of :mod:`slimtrain.adapters.presets`.

The tasks' data: ``shakespeare`` (the corpus, the First Folio's genres, passages), ``data`` (bytes, split
by document, seeded batches, fingerprints), ``labelled`` (your ``--data`` file). The models: ``models``
(LLaMA shapes by ``--model`` name, from :mod:`slimtrain.models`), ``hf_model``. What a run writes:
``outputs`` (the ``--out`` directory: lock, marker, recorded config and data fingerprint, atomic writes)
and ``metrics`` (``metrics.csv``, ``loss.png``, ``summary.json``). Shared by all: ``optim``
(``build_optimizer(name, model, ...)``, the one place an optimizer is built from a name) and ``runtime``
(``--device``, ``--dtype``, activation checkpointing, peak memory).
"""
