"""The module-selection fields every slimtrain tuner config shares (as in PEFT's ``LoraConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from .._validation import check_target_modules
from .registry import peft_api


@dataclass
class SlimConfig(peft_api.PeftConfig):
    """Fields every slimtrain tuner config shares (module selection as in PEFT's ``LoraConfig``)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-match regex (str); None: PEFT's LoRA defaults "
                          "for the model type."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def _check_common(self) -> None:
        check_target_modules("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            check_target_modules("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
