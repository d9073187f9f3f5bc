"""Evaluating a round's uploads together: each one's margin paired with the round's mean update.

The plain margin (protocol/evaluation.py) compares an update's gain on its own sequences with its gain on
others. Those are different sequences, so each one's difficulty is in the noise, and early in a run an
honest margin stands only one or two standard errors from 0. Pairing takes that noise out: the mean of
the round's evaluated updates (each times its clip scale, as evaluated) is measured once on every sampled
sequence, and each upload's per-sequence gain is taken less the mean update's gain on the same sequence,
scaled by its least-squares slope against the upload's gains on the other sample (where neither holds
anything specific). The paired margin is the own mean of that residual less its other mean. The mean
update's general help cancels, and each sequence's difficulty with it; what is left is what the upload
learned of its own sequences. The upload's own share of the mean only rescales the residual (to first
order), which leaves its ``t`` unchanged.

It costs one more evaluation, of the mean update, on the round's samples (the losses before it are those
the uploads' measurements computed): about 1.2x the close of a round (``benchmarks.close``). It needs
``MIN_PAIRED`` updates in the mean; a smaller round keeps the plain margin (``paired_se`` 0).

An evaluator given a share of a round's sample (a validator assigned some of its uploads) measures its
share and ``include``s the others: each one decoded and added into the mean, no forward pass. Its verdicts
are then the whole round's, on the sequences of its share only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from protocol.evaluation import Losses, UpdateEvaluator, samples, summarise, var_of_mean
from protocol.payload import SparseTensor
from protocol.wire import RunInfo

MIN_PAIRED = 3  # measured uploads a round needs for its mean to be a reference and not one peer


class RoundEvaluation:
    """Measures a round's uploads one at a time (``measure``), keeping each one's per-sequence gains and the
    running sum of the updates, then pairs them with the mean update (``losses``). The coordinator and
    validators run exactly this."""

    def __init__(
        self, evaluator: UpdateEvaluator, info: RunInfo, round_: int, salt: str, miners: Sequence[str]
    ) -> None:
        self.evaluator, self.info = evaluator, info
        self.outer_lr = info.evaluation.outer_lr
        self.drawn = {m: samples(info, round_, m, salt) for m in miners}
        self._measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # losses before, after; own, other
        self._sum: dict[str, torch.Tensor] = {}  # of the updates in the mean, each times its scale
        self._count = 0  # the updates in the mean: those measured and those included
        self._reference: dict[int, float] | None = None  # the mean update's gain on each sampled sequence

    def gain(self, miner: str, update: Mapping[str, SparseTensor], scale: float, n: int) -> Losses:
        """The losses before and after the upload on the first ``n`` sequences of its own sample only: what
        refusing it needs, at a fraction of ``measure``'s cost (the other sample's losses are 0 here; the
        losses before are kept for ``measure``)."""
        own = self.drawn[miner][0][:n]
        before, after = self.evaluator.per_sequence(update, scale * self.outer_lr, own)
        return Losses(float(before.mean()), float(after.mean()), 0.0, 0.0)

    def measure(self, miner: str, update: Mapping[str, SparseTensor], scale: float) -> Losses:
        """One upload's losses before and after it is applied alone (``scale``: its clip scale): the plain
        margin until ``losses`` pairs it."""
        own, other = self.drawn[miner]
        before, after = self.evaluator.per_sequence(update, scale * self.outer_lr, own + other)
        self._add(update, scale)
        self._measured[miner], self._reference = (before, after), None
        return summarise(before, after, len(own))

    def include(self, update: Mapping[str, SparseTensor], scale: float) -> None:
        """A sampled upload that is not measured here (another evaluator's share) into the round's mean."""
        self._add(update, scale)
        self._reference = None

    def gain_se(self, miner: str) -> float:
        """The standard error of a measured upload's gain (over its own sample): what makes a verdict on
        the gain sure or not."""
        n_own, before, after, _ = self._head(miner, None)
        return math.sqrt(var_of_mean(before[:n_own] - after[:n_own]))

    def losses(self, sizes: tuple[int, int] | None = None) -> dict[str, Losses]:
        """Every measured upload's losses, with its paired margin when the mean holds at least
        ``MIN_PAIRED`` updates.
        ``sizes`` (own, other): on the first that many sequences of each sample only. A sample is the head
        of one salted order, so that is what smaller ``own_sequences`` and ``other_sequences`` would have
        drawn and measured (benchmarks/resample.py)."""
        cut = {m: self._head(m, sizes) for m in self._measured}
        out = {m: summarise(before, after, n_own) for m, (n_own, before, after, _) in cut.items()}
        if self._count < MIN_PAIRED:
            return out
        reference = self._reference_gains()
        for m, (n_own, before, after, ids) in cut.items():
            ref = torch.tensor([reference[i] for i in ids], dtype=torch.float64)
            paired = _paired(before - after, ref, n_own)
            if paired is not None:
                out[m] = dataclasses.replace(out[m], paired_margin=paired[0], paired_se=paired[1])
        return out

    def _head(
        self, miner: str, sizes: tuple[int, int] | None
    ) -> tuple[int, torch.Tensor, torch.Tensor, list[int]]:
        """A measured upload's own sample size, losses before and after, and sequence ids, on the first
        ``sizes`` of its samples (None: all)."""
        own, other = self.drawn[miner]
        before, after = self._measured[miner]
        if sizes is None:
            return len(own), before, after, own + other
        n_own, n_other = min(sizes[0], len(own)), min(sizes[1], len(other))
        keep = list(range(n_own)) + list(range(len(own), len(own) + n_other))
        return n_own, before[keep], after[keep], own[:n_own] + other[:n_other]

    def _reference_gains(self) -> dict[int, float]:
        """The gain of the round's mean update (each times its scale) on every sequence the measured uploads'
        samples hold, once."""
        if self._reference is None:
            ids = sorted({i for m in self._measured for i in self.drawn[m][0] + self.drawn[m][1]})
            mean = {name: SparseTensor(None, total / self._count) for name, total in self._sum.items()}
            before, after = self.evaluator.per_sequence(mean, self.outer_lr, ids)
            self._reference = dict(zip(ids, (before - after).tolist(), strict=True))
        return self._reference

    def _add(self, update: Mapping[str, SparseTensor], scale: float) -> None:
        self._count += 1
        base, device = self.evaluator.base, self.evaluator.device
        for name, t in update.items():
            total = self._sum.get(name)
            if total is None:
                total = self._sum[name] = torch.zeros(base[name].numel(), dtype=torch.float32, device=device)
            values = t.values.to(total.device, torch.float32)
            if t.indices is None:
                total.add_(values.reshape(-1), alpha=scale)
            else:
                total.index_add_(0, t.indices.to(total.device), values, alpha=scale)


def _paired(gains: torch.Tensor, ref: torch.Tensor, n_own: int) -> tuple[float, float] | None:
    """The paired margin and its standard error: ``gains - beta * ref`` (beta the slope of gains on ref over
    the other sample), own mean less other mean. None when the samples are too small to say."""
    x, y = ref[n_own:], gains[n_own:]
    if n_own < 2 or len(x) < 2:
        return None
    spread = float(((x - x.mean()) ** 2).sum())
    beta = float(((x - x.mean()) * (y - y.mean())).sum()) / spread if spread > 0 else 0.0
    r = gains - beta * ref
    own, other = r[:n_own], r[n_own:]
    se = math.sqrt(float(own.var() / len(own) + other.var() / len(other)))
    margin = float(own.mean() - other.mean())
    if not (se > 0 and math.isfinite(se) and math.isfinite(margin)):
        return None
    return margin, se


__all__ = ["MIN_PAIRED", "RoundEvaluation"]
