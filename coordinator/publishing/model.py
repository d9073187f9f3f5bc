"""The coordinator's copy of the model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from protocol.evaluation import UpdateEvaluator
from protocol.model import CausalLM, evaluate_loss
from protocol.params import Params, set_params


class Model:
    """The coordinator's copy of the model: the current version's parameters (the closer replaces them
    when it publishes) and the held-out set every version is measured on. Only the closer uses it once the
    run has started."""

    def __init__(
        self,
        module: CausalLM,
        params: Params,
        held_out: torch.Tensor,
        batch_size: int = 16,
        autocast: torch.dtype | None = None,
    ) -> None:
        """``module`` on the device evaluation runs on; ``params`` fp32 on the CPU, whatever that device
        (a version's hash follows from them alone); forward passes ``batch_size`` sequences at a time,
        under autocast to ``autocast`` when given."""
        self.module, self.params, self.held_out = module, params, held_out
        self.batch_size, self.autocast = batch_size, autocast

    def held_out_loss(self, params: Params) -> float:
        set_params(self.module, params)
        return evaluate_loss(self.module, self.held_out, self.batch_size, self.autocast)

    def evaluator(self, params: Params, fetch: Callable[[list[int]], torch.Tensor]) -> UpdateEvaluator:
        """Measures updates to ``params`` on this model's device, on sequences from ``fetch``."""
        return UpdateEvaluator(self.module, params, fetch, self.batch_size, self.autocast)
