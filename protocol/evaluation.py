"""What a miner's update is worth: the loss before and after applying it alone, on the miner's own data and
on data it was not given. The coordinator and the ``validate`` role run exactly this.

Per round and upload: the update, decoded and scaled as aggregation would scale it (clip to the median
norm, times the outer step), is applied alone to the round's base parameters. The loss is measured before
and after on a sample of the sequences assigned to that miner ("own") and on a sample of training
sequences it was not assigned ("other"), ``early_factor`` times larger in the run's first ``early_rounds``
(``EvaluationConfig.sequences``), where the margins below are smallest. Which sequences are sampled depends
on a salt made from every payload of the round, so nobody knows them until the round has closed.

- ``gain`` (nats per token) = own loss before - own loss after: how much the update helps on its data.
- ``margin`` = gain - the gain on other data: the part of the help that is specific to the miner's own
  sequences. Training on them leaves a small margin; an update trained on other data, copied or made of
  noise has none. ``assigned`` (the indicator) is ``margin > 0``. ``margin_se`` is its standard error over
  the sampled sequences, so ``t = margin / margin_se`` says how sure the margin is: early in a run, when the
  model learns what all text shares, even an honest margin is within its noise; later it stands out.
  In a round of 3 or more evaluated uploads the margin that scores is the *paired* one
  (``paired_margin``, ``paired_se``, protocol/pairing.py): each upload's per-sequence gains less those of
  the round's mean update on the same sequences, which takes each sequence's difficulty out of the noise;
  ``margin`` and ``t`` below mean that one where it exists.
- A round's score credits the gain, in units of G (the median gain of the round's accepted uploads, so that
  early rounds, where gains are large, weigh no more than later ones), as far as the margin backs it:
  ``clip(gain / G, -1, 1) * clip(t / 2, 0, 1)`` (full credit from t = 2, none at t <= 0: a gain without a
  margin on the miner's own data pays nothing); a gain of 0 or less is not discounted. A stale update
  learned its data but helps little; an update trained on other data, or copied from another key's work,
  helps but has no margin; both fall behind. An upload refused before it could be evaluated (at
  upload, or as copied, outlier, empty or non-finite) scores -1, the least.
- A miner's standing is the average of its round scores over its rounds in the last ``score_window``
  (the plain mean, or an exponential one when ``score_alpha`` is set), from the first round it took part
  in: a closed round that published a version and has nothing from it counts as a missed round, score 0,
  so that uploading now and then from many keys does not pay. The average carries its uncertainty: it is
  shrunk towards 0 by ``PRIOR_ROUNDS`` rounds of prior (standard deviation ``PRIOR_SD``), which also
  gives the standard error of a short record a floor, and the score that ranks and weights is the
  conservative bound ``mean - Z * stderr``. A miner with two lucky rounds cannot outrank one with a long
  good record, and one round's sampling noise moves a short record less than a plain mean would.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from protocol.data import assignment, num_eval_total, train_id
from protocol.device import forward_mode
from protocol.model import CausalLM
from protocol.params import set_params
from protocol.payload import SparseTensor
from protocol.wire import RunInfo


def round_salt(payload_sha256s: Iterable[str]) -> str:
    """The sampling salt of a round: a hash of all its payloads, unknown to anyone before it closed."""
    return hashlib.sha256("\n".join(sorted(payload_sha256s)).encode()).hexdigest()


def _rank(salt: str, label: str, i: int) -> bytes:
    return hashlib.sha256(f"gradpool-eval:{salt}:{label}:{i}".encode()).digest()


def own_sample(assigned: Sequence[int], salt: str, miner: str, n: int) -> list[int]:
    """``n`` distinct ids of the miner's assignment, chosen by the salt."""
    return sorted(set(assigned), key=lambda i: _rank(salt, miner.lower(), i))[:n]


def other_sample(
    assigned: Sequence[int], salt: str, n: int, num_sequences: int, eval_every: int
) -> list[int]:
    """``n`` training sequences not in the miner's assignment: the round's shared draw, minus any of its
    own (so most of the sample, and its losses before, are shared by every miner of the round)."""
    num_train = num_sequences - num_eval_total(num_sequences, eval_every)
    mine, out, seen = set(assigned), [], set()
    for j in range(4 * n + len(mine)):
        i = train_id(int.from_bytes(_rank(salt, "other", j)[:8], "little") % num_train, eval_every)
        if i not in mine and i not in seen:
            seen.add(i)
            out.append(i)
            if len(out) == n:
                break
    return out


MAX_LOSS = 1e4  # a verdict's losses are bounded; a non-finite loss is recorded as this


@dataclass(frozen=True)
class Losses:
    """Mean next-token loss (nats per token) on the two samples, before and after the update."""

    own_before: float
    own_after: float
    other_before: float
    other_after: float
    margin_se: float = 0.0  # the standard error of the margin; 0: exact
    paired_margin: float = 0.0  # the margin paired with the round's mean update (protocol/pairing.py)
    paired_se: float = 0.0  # its standard error; 0: not paired, the plain margin stands

    @property
    def gain(self) -> float:
        return self.own_before - self.own_after

    @property
    def other_gain(self) -> float:
        return self.other_before - self.other_after

    @property
    def margin(self) -> float:
        return self.gain - self.other_gain

    @property
    def specific(self) -> float:
        """The margin that scores: the paired one where there is one, else the plain one."""
        return self.paired_margin if self.paired_se > 0 else self.margin

    @property
    def t(self) -> float:
        """The scoring margin in units of its standard error."""
        if self.paired_se > 0:
            return self.paired_margin / self.paired_se
        if self.margin_se > 0:
            return self.margin / self.margin_se
        return math.copysign(math.inf, self.margin) if self.margin else 0.0

    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.astuple())

    def astuple(self) -> tuple[float, ...]:
        return tuple(getattr(self, f) for f in LOSS_FIELDS)

    def bounded(self) -> Losses:
        """Every loss within [0, MAX_LOSS], a non-finite one as MAX_LOSS: what a verdict carries and the
        store keeps (a NaN is no number to store)."""

        def bound(v: float, low: float = 0.0) -> float:
            return min(MAX_LOSS, max(low, v)) if math.isfinite(v) else MAX_LOSS

        values = {f: bound(getattr(self, f)) for f in LOSS_FIELDS[:5]}
        paired = (self.paired_margin, self.paired_se)
        if all(math.isfinite(v) for v in paired):  # else not paired
            values |= {"paired_margin": bound(paired[0], -MAX_LOSS), "paired_se": bound(paired[1])}
        return Losses(**values)


LOSS_FIELDS = tuple(f.name for f in fields(Losses))  # as verdicts carry and store them


class UpdateEvaluator:
    """Applies one update at a time to a model holding the base parameters, measures, and restores the
    touched coordinates exactly; losses before are computed once per sequence and reused."""

    def __init__(
        self,
        model: CausalLM,
        base: Mapping[str, torch.Tensor],
        fetch: Callable[[list[int]], torch.Tensor],
        batch_size: int = 16,
        autocast: torch.dtype | None = None,
    ) -> None:
        """``model`` on the device evaluation runs on; ``base`` anywhere (the canonical copy, untouched);
        forward passes ``batch_size`` sequences at a time, under autocast to ``autocast`` when given."""
        self.model, self.base, self.fetch, self.batch_size = model, base, fetch, batch_size
        set_params(model, base)
        model.eval()
        self.device = next(model.parameters()).device
        self.autocast = autocast
        self._params = dict(model.named_parameters())
        self._tokens: dict[int, torch.Tensor] = {}
        self._before_losses: dict[int, float] = {}

    def reset(self) -> None:
        """Put the base parameters back into the model, after something else used it."""
        set_params(self.model, self.base)

    def _sequences(self, ids: list[int]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._tokens]
        if missing:
            for i, row in zip(missing, self.fetch(missing), strict=True):
                self._tokens[i] = row
        return torch.stack([self._tokens[i] for i in ids])

    @torch.inference_mode()  # no autograd bookkeeping at all
    def _losses(self, ids: list[int]) -> torch.Tensor:
        """Per-sequence mean loss, (len(ids),)."""
        out = []
        for batch in self._sequences(ids).split(self.batch_size):
            batch = batch.to(self.device, non_blocking=True)
            with forward_mode(self.device, self.autocast):
                logits = self.model(batch[:, :-1])  # (B, T, vocab)
            loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T)
            out.append(loss.mean(dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _before(self, ids: list[int]) -> torch.Tensor:
        missing = [i for i in ids if i not in self._before_losses]
        if missing:
            self._before_losses.update(zip(missing, self._losses(missing).tolist(), strict=True))
        return torch.tensor([self._before_losses[i] for i in ids], dtype=torch.float64)

    @torch.no_grad()
    def per_sequence(
        self, update: Mapping[str, SparseTensor], step: float, ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's loss before and after theta <- theta - step * update, (len(ids),) each."""
        before = self._before(ids)
        self._apply(update, step)
        try:
            return before, self._losses(ids).double()
        finally:
            self._restore(update)

    def evaluate(
        self, update: Mapping[str, SparseTensor], step: float, own: list[int], other: list[int]
    ) -> Losses:
        """Losses before and after theta <- theta - step * update (``step`` includes the clip scale)."""
        before, after = self.per_sequence(update, step, own + other)
        return summarise(before, after, len(own))

    def _apply(self, update: Mapping[str, SparseTensor], step: float) -> None:
        for name, t in update.items():
            p = self._params[name]
            values = t.values.to(self.device, p.dtype)
            if t.indices is None:
                p.sub_(values.view_as(p), alpha=step)
            else:
                p.view(-1).index_add_(0, t.indices.to(self.device), values, alpha=-step)

    def _restore(self, update: Mapping[str, SparseTensor]) -> None:
        for name, t in update.items():
            p, base = self._params[name], self.base[name]
            if t.indices is None:
                p.copy_(base)
            else:  # only the touched coordinates cross to the device
                touched = base.view(-1)[t.indices.to(base.device)].to(self.device)
                p.view(-1).index_copy_(0, t.indices.to(self.device), touched)


def summarise(before: torch.Tensor, after: torch.Tensor, n_own: int) -> Losses:
    """The losses of per-sequence losses before and after, the first ``n_own`` on the own sample."""
    gains = before - after
    own_gains, other_gains = gains[:n_own], gains[n_own:]
    return Losses(
        _mean(before[:n_own]),
        _mean(after[:n_own]),
        _mean(before[n_own:]),
        _mean(after[n_own:]),
        math.sqrt(var_of_mean(own_gains) + var_of_mean(other_gains)),
    )


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if len(x) else math.nan


def var_of_mean(x: torch.Tensor) -> float:
    return float(x.var() / len(x)) if len(x) > 1 else 0.0


# -- scores ------------------------------------------------------------------------------------------------
FULL_CREDIT_T = 2.0  # a margin this many standard errors above 0 backs the whole gain
NO_CREDIT_T = 0.0  # and none at all without a margin: another key's work, copied, has none on this key's data


@dataclass(frozen=True)
class RoundResult:
    """One miner's outcome in one round: ``gain`` None when the upload was refused before evaluation or
    (``missed``) when there was no upload."""

    round: int
    score: float
    gain: float | None = None
    margin: float = 0.0
    missed: bool = False


def credit(t: float) -> float:
    """The share of a positive gain that a margin of ``t`` standard errors backs: 0 to 1."""
    return max(0.0, min(1.0, (t - NO_CREDIT_T) / (FULL_CREDIT_T - NO_CREDIT_T)))


def round_results(
    round_: int, losses: Mapping[str, Losses], accepted: Collection[str] | None = None
) -> dict[str, RoundResult]:
    """The round scores of a round's evaluated uploads (see the top of this module). G is the median gain
    of the ``accepted`` ones when given (and any were), so that a crowd of useless uploads cannot lower
    the bar; else of all."""
    useful = [x.gain for m, x in losses.items() if x.finite() and (accepted is None or m in accepted)]
    gains = useful or [x.gain for x in losses.values() if x.finite()]
    typical = max(statistics.median(gains), 1e-6) if gains else 1e-6
    out = {}
    for miner, x in losses.items():
        if not x.finite():
            out[miner] = RoundResult(round_, -1.0, -math.inf, 0.0)
            continue
        relative = max(-1.0, min(1.0, x.gain / typical))
        score = relative * credit(x.t) if relative > 0 else relative
        out[miner] = RoundResult(round_, score, x.gain, x.specific)
    return out


def refused(round_: int) -> RoundResult:
    """The result of an upload refused before it could be evaluated."""
    return RoundResult(round_, -1.0)


def missed(round_: int) -> RoundResult:
    """A round the miner took no part in, after its first: no credit, and no gain or indicator either."""
    return RoundResult(round_, 0.0, missed=True)


PRIOR_ROUNDS = 2.0  # rounds of prior belief at score 0 that a record is weighed against
PRIOR_SD = 0.5  # the spread of round scores assumed before any is seen (they lie in [-1, 1])
Z = 1.0  # the conservative score is this many standard errors below the mean


@dataclass(frozen=True)
class Score:
    score: float = 0.0
    gain_avg: float = 0.0
    assigned_avg: float = 0.0
    mean: float = 0.0
    stderr: float = PRIOR_SD / math.sqrt(PRIOR_ROUNDS)


def standing(results: Sequence[RoundResult], alpha: float | None = None) -> Score:
    """A miner's score from its round results (the caller keeps them to its window): the mean of the round
    scores, or an exponential average with weight ``alpha`` on the newest round, shrunk towards 0 by the
    prior; its standard error; the conservative ``score = mean - Z * stderr``; and the averages of the
    gain and of the indicator (+1 / -1; -1 for an upload refused before evaluation) over the rounds it
    uploaded in."""
    ordered = sorted(results, key=lambda r: r.round)
    if not ordered:  # the prior alone
        return Score(score=-Z * Score.stderr)
    n = len(ordered)
    w = [1.0] * n if alpha is None else [(1 - alpha) ** (n - 1 - i) * (alpha if i else 1.0) for i in range(n)]
    total = sum(w)
    n_eff = total * total / sum(x * x for x in w)
    raw = sum(wi * r.score for wi, r in zip(w, ordered, strict=True)) / total
    var = sum(wi * (r.score - raw) ** 2 for wi, r in zip(w, ordered, strict=True)) / total
    mean = n_eff * raw / (n_eff + PRIOR_ROUNDS)  # the prior: PRIOR_ROUNDS rounds at 0
    weight = n_eff + PRIOR_ROUNDS
    stderr = math.sqrt((n_eff * var + PRIOR_ROUNDS * PRIOR_SD**2) / weight / weight)
    taken = [r for r in ordered if not r.missed]
    gains = [r.gain if r.gain is not None and math.isfinite(r.gain) else 0.0 for r in taken]
    signs = [1.0 if r.gain is not None and r.margin > 0 else -1.0 for r in taken]
    return Score(
        score=mean - Z * stderr,
        gain_avg=_weighted_tail(gains, alpha),
        assigned_avg=_weighted_tail(signs, alpha),
        mean=mean,
        stderr=stderr,
    )


def _weighted_tail(xs: Sequence[float], alpha: float | None) -> float:
    """The plain mean of ``xs`` (oldest first), or its exponential average with weight ``alpha``."""
    avg = 0.0
    for i, x in enumerate(xs):
        a = 1.0 / (i + 1) if alpha is None or i == 0 else alpha
        avg += a * (x - avg)
    return avg


def samples(info: RunInfo, round_: int, miner: str, salt: str) -> tuple[list[int], list[int]]:
    """The own and other evaluation samples of ``miner`` in ``round_``: anyone can recompute them."""
    r, e = info.recipe, info.evaluation
    assigned = assignment(
        info.seed, round_, miner, r.inner_steps * r.batch_size, info.num_sequences, info.eval_every
    )
    n_own, n_other = e.sequences(round_)
    own = own_sample(assigned, salt, miner, n_own)
    return own, other_sample(assigned, salt, n_other, info.num_sequences, info.eval_every)


__all__ = [
    "LOSS_FIELDS",
    "MAX_LOSS",
    "Losses",
    "RoundResult",
    "Score",
    "UpdateEvaluator",
    "credit",
    "missed",
    "other_sample",
    "own_sample",
    "refused",
    "round_results",
    "round_salt",
    "samples",
    "standing",
    "summarise",
]
