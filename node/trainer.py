"""The inner loop: H AdamW steps on the miner's assigned sequences, written out in full, at the learning
rate the recipe gives each of the run's inner steps (``TrainingRecipe.lr_at``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protocol.model import CausalLM, next_token_loss
from protocol.payload import PayloadStats
from protocol.wire import TrainingRecipe


def make_optimizer(model: CausalLM, recipe: TrainingRecipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.beta1, recipe.beta2))


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class InnerResult:
    loss_before: float
    loss_after: float
    steps: int
    compute_s: float
    grad_norm_mean: float = math.nan  # the gradient's norm before clipping, over the inner steps
    grad_norm_max: float = math.nan
    clipped_fraction: float = 0.0  # of the steps whose gradient norm was above grad_clip
    lr: float = math.nan  # the learning rate of the round's last step

    def stats(self) -> PayloadStats:
        """What an upload reports of this work (its header's ``stats``)."""
        return PayloadStats(**{f: getattr(self, f) for f in PayloadStats.model_fields})


class InnerTrainer:
    def __init__(
        self, model: CausalLM, recipe: TrainingRecipe, device: torch.device, micro_batch: int | None = None
    ):
        self.model, self.recipe, self.device = model, recipe, device
        self.optimizer = make_optimizer(model, recipe)
        self.micro_batch = micro_batch
        self.step = 0  # the run's global inner step (round x inner_steps + i): drives the learning rate
        self.rank, self.world = 0, 1
        self.forward: torch.nn.Module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if recipe.batch_size % self.world:
                raise ValueError(
                    f"batch_size {recipe.batch_size} must divide evenly over {self.world} processes"
                )
            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(model, device_ids=ids)

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a (B, T+1) batch, in micro-batches if asked; refuses a non-finite loss."""
        self.model.train()
        if self.world > 1:  # this process's equal share; DDP averages the gradients over the shares
            batch = batch[self.rank :: self.world]
        parts = batch.split(self.micro_batch or len(batch))
        total = 0.0
        for i, part in enumerate(parts):
            sync = self.world == 1 or i == len(parts) - 1  # DDP: average gradients once per step
            with contextlib.nullcontext() if sync else self.forward.no_sync():  # type: ignore[operator]
                with torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
                ):
                    loss = next_token_loss(self.forward, part.to(self.device, non_blocking=True))
                if not torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(f"non-finite loss at inner step {self.step}")
                (loss * len(part) / len(batch)).backward()
            total += float(loss.detach()) * len(part) / len(batch)
        if self.world > 1:
            total = _mean_over_ranks(total)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip))
        lr = self.recipe.lr_at(0, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total, "lr": lr, "grad_norm": norm}

    def run(
        self,
        tokens: torch.Tensor,
        on_step: Callable[[dict[str, float]], None] | None = None,
        round_: int | None = None,
    ) -> InnerResult:
        """H steps over ``tokens`` (H * batch_size sequences, in assignment order), as round ``round_`` of
        the run trains (its learning rates); None: the steps after the last ones."""
        if round_ is not None:
            self.step = round_ * self.recipe.inner_steps
        t0 = time.perf_counter()
        steps = []
        for batch in tokens.split(self.recipe.batch_size):
            metrics = self.train_step(batch)
            steps.append(metrics)
            if on_step is not None:
                on_step(metrics)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        norms = [m["grad_norm"] for m in steps]
        return InnerResult(
            loss_before=steps[0]["loss"] if steps else math.nan,
            loss_after=steps[-1]["loss"] if steps else math.nan,
            steps=len(steps),
            compute_s=time.perf_counter() - t0,
            grad_norm_mean=sum(norms) / len(norms) if norms else math.nan,
            grad_norm_max=max(norms, default=math.nan),
            clipped_fraction=sum(n > self.recipe.grad_clip for n in norms) / len(norms) if norms else 0.0,
            lr=steps[-1]["lr"] if steps else math.nan,
        )
