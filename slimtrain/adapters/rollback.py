"""Undo a refused model change: a snapshot of a module tree, put back exactly if the change raises.

PEFT builds an adapter by replacing or updating one target module after another, so a target refused halfway (a
layer type the method cannot wrap, a rank too large for one layer, a module another method already wraps) would
leave the targets before it changed, and PEFT's ``BaseTuner`` records the new config in the model's
``peft_config`` before it injects anything. :func:`restored_on_failure` keeps, for every module of the tree, its
attributes (sub-modules, parameters and buffers included) and the contents of the dicts, lists and sets among them,
plus each parameter's ``requires_grad``; if the block raises, all of it is put back before the error propagates.
Tensors are referenced, not copied: building an adapter creates tensors but never writes into existing ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

_CONTAINERS = (dict, list, set)


@contextmanager
def restored_on_failure(root: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, restore ``root``'s module tree as it was when the block began."""
    modules = [(module, dict(vars(module))) for module in root.modules()]
    contents = {
        id(value): (value, list(value.items()) if isinstance(value, dict) else list(value))
        for _, attributes in modules
        for value in attributes.values()
        if isinstance(value, _CONTAINERS)
    }
    trainable = [(p, p.requires_grad) for p in root.parameters()]
    try:
        yield
    except BaseException:
        for module, attributes in modules:
            vars(module).clear()
            vars(module).update(attributes)
        for value, items in contents.values():
            if isinstance(value, list):
                value[:] = items
            else:
                value.clear()
                value.update(items)
        for p, requires_grad in trainable:
            p.requires_grad_(requires_grad)
        raise
