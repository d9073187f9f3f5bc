"""Error feedback: the miner-local residual that keeps what compression did not send."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from protocol.payload import SparseTensor


class ErrorFeedback:
    """e <- beta * e + delta before compression; e <- e - decode(c) after it."""

    def __init__(self, beta: float = 0.95) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def accumulate(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, d in delta.items():
            e = self.buffers.get(name)
            if e is None or e.shape != d.shape:
                self.buffers[name] = d.detach().float().clone()
            else:
                torch.add(d.float(), e, alpha=self.beta, out=e)  # one pass: e = d + beta * e
        return self.buffers

    @torch.no_grad()
    def subtract(self, decoded: Mapping[str, SparseTensor]) -> None:
        """Remove what was sent: only the transmitted coordinates change."""
        for name, d in decoded.items():
            e = self.buffers[name]
            values = d.values.to(e.device)
            if d.indices is None:
                e.sub_(values.view_as(e))
            else:
                e.view(-1).index_add_(0, d.indices.to(e.device), values, alpha=-1)

    def copy(self) -> ErrorFeedback:
        """An independent copy, on the buffers' own device."""
        other = ErrorFeedback(self.beta)
        other.buffers = {name: e.clone() for name, e in self.buffers.items()}
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: e.detach().cpu().contiguous() for name, e in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.buffers = {name: t.detach().float().to(device).clone() for name, t in state.items()}
