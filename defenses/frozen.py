"""A frozen reference copy of a model (PAR's ``f_p``, InverTune's ``theta0``)."""

from __future__ import annotations

import copy

from torch import nn


class FrozenCopy(nn.Module):
    """A deep copy of ``model`` that never trains: every parameter has ``requires_grad=False`` and the
    copy stays in eval mode whatever ``train()`` is called with (so a Lightning ``model.train()`` does not
    let its BatchNorm statistics move). The copy is ``self.model``; calling the wrapper is not supported,
    use the copy's own methods (``frozen.model.encode_image(...)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenCopy:
        self.training = False
        self.model.eval()
        return self

    def forward(self, *args, **kwargs):  # pragma: no cover - guard
        raise TypeError("call the frozen copy's methods, e.g. frozen.model.encode_image(images)")
