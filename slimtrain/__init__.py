"""slimtrain: train and fine-tune transformers in less memory.

Sub-packages: ``optimizers`` (low-rank optimizer family), ``adapters`` (PEFT methods),
``recipes`` (runnable training scripts).
"""

__version__ = "0.1.0"
