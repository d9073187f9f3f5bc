"""The coordinator's copy of the model."""

from __future__ import annotations

import torch

from protocol.model import CausalLM, evaluate_loss
from protocol.params import Params, set_params


class Model:
    """The coordinator's copy of the model: the current version's parameters (the closer replaces them
    when it publishes) and the held-out set every version is measured on. Only the closer uses it once the
    run has started."""

    def __init__(self, module: CausalLM, params: Params, held_out: torch.Tensor) -> None:
        self.module, self.params, self.held_out = module, params, held_out

    def held_out_loss(self, params: Params) -> float:
        set_params(self.module, params)
        return evaluate_loss(self.module, self.held_out)
