"""Runnable training recipes; no library logic lives here.

- ``pretrain``: ``python -m slimtrain.recipes.pretrain --out DIR`` (or ``slimtrain pretrain``), a small
  LLaMA on Shakespeare with any optimizer of the family;
- ``deepspeed``: the same recipe on N ranks under DeepSpeed ZeRO 1, 2 or 3 (``deepspeed --num_gpus N
  --module slimtrain.recipes.deepspeed --zero 2 --out DIR``, or ``slimtrain deepspeed``); its configs
  are in ``ds_configs/``;
- ``data``: corpus discovery, byte tokenizer, split by play, seeded fixed-length batches;
- ``models``: LLaMA shapes from ``tiny`` to the GaLore paper's ``1b``;
- ``optim``: ``build_optimizer(name, model, ...)``, the one place an optimizer is built from a name;
- ``runtime``: ``--device``, ``--dtype`` (fp32, bf16, bf16-autocast), activation checkpointing and peak
  memory, the same in every recipe;
- ``finetune``: PEFT fine-tuning recipe, MiniLM on the play genres or your model directory and labelled
  text (see its docstring).
"""
