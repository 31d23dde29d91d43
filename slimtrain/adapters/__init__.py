"""PEFT adapters: each method is a sub-package (``config.py``, ``layer.py``, ``model.py``, as in PEFT) and
is registered into Hugging Face PEFT on ``import slimtrain.adapters``, after which ``peft.get_peft_model``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work with our configs.

Config classes (``peft_type`` in adapter_config.json in brackets):

* :class:`NolaConfig` (``NOLA``): NOLA, k + l trainable coefficients per layer over seeded random bases.
* :class:`RandLoraConfig` (``SLIMRANDLORA``): RandLoRA with bases regenerated from a seed (never saved) and
  a dense-update forward. Same name as ``peft.RandLoraConfig`` on purpose; ``SlimRandLoraConfig`` is an
  alias for code that imports both.
* :class:`DoraConfig` (``DORA``): standalone DoRA (magnitude x normalized LoRA direction), numerically
  PEFT's ``LoraConfig(use_dora=True)`` plus a zero-norm-row guard.

* :class:`LoLDUConfig` (``LOLDU``): LoLDU, a frozen pivoted LDU of the weight whose leading diagonal trains.
* :class:`S2FTConfig` (``S2FT``): S²FT (Yang et al., NeurIPS 2024), dense blocks over selected attention
  heads and FFN channels, GQA-aware.

NOLA and RandLoRA also take ``use_dora=True``. The pieces the methods share: :mod:`.config` (the config base),
:mod:`.tuner` (the tuner base, with ``add_weighted_adapter``), :mod:`.delta_layer` (the layer base: merge, unmerge,
DoRA), :mod:`.dora_scaling` (DoRA's maths), :mod:`.base_layers` (which layers a method wraps), :mod:`.bases`
(random bases from seeds) and :mod:`.rollback` (a refused call changes nothing). The only module touching PEFT
internals is :mod:`slimtrain.adapters.registry`; supported PEFT versions: ``registry.SUPPORTED_PEFT_SPEC``.
"""

from . import registry  # noqa: F401  (first: version check, PeftType extension)
from .dora import DoraConfig, DoraModel
from .nola import NolaConfig, NolaModel
from .randlora import RandLoraConfig, RandLoraModel, SlimRandLoraConfig

from .loldu import LoLDUConfig, LoLDUModel
from .s2ft import S2FTConfig, S2FTModel

__all__ = [
    "NolaConfig",
    "NolaModel",
    "RandLoraConfig",
    "SlimRandLoraConfig",
    "RandLoraModel",
    "DoraConfig",
    "DoraModel",
    "LoLDUConfig",
    "LoLDUModel",
    "S2FTConfig",
    "S2FTModel",
]
