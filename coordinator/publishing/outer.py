"""The outer step: theta_{v+1} = theta_v - D, with D from the aggregate A.

SparseLoCo: D = lr * A (plain SGD; error feedback stands in for momentum).
DiLoCo: Nesterov momentum, m <- mu * m + A; D = lr * (A + mu * m).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class OuterOptimizer:
    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(
        self, aggregate: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The delta to subtract from the parameters, and the momentum after this step. Pure: the caller
        stores the new momentum (``buffers``) only once the version it made is committed."""
        out, buffers = {}, {}
        for name, a in aggregate.items():
            if self.momentum == 0.0:
                out[name] = a if self.lr == 1.0 else a * self.lr  # no copy of the model for plain SGD
                continue
            m = self.buffers.get(name)
            m = a.clone() if m is None else m * self.momentum + a
            buffers[name] = m
            out[name] = (a + self.momentum * m) * self.lr
        return out, buffers

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu().contiguous() for n, t in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.buffers = {n: t.clone() for n, t in state.items()}
