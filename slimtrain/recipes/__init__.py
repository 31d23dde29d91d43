"""Runnable training recipes; no library logic lives here.

- ``pretrain``: ``python -m slimtrain.recipes.pretrain --out DIR`` (or ``slimtrain pretrain``), a small
  LLaMA on Shakespeare with any optimizer of the family;
- ``data``: corpus discovery, byte tokenizer, split by play, seeded fixed-length batches;
- ``models``: LLaMA shapes from ``tiny`` to the GaLore paper's ``1b``;
- ``optim``: ``build_optimizer(name, model, ...)``, the one place an optimizer is built from a name;
- ``finetune``: PEFT fine-tuning recipe (see its docstring).
"""
