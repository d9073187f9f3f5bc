"""Overlapped rounds on the miner's side: a round opens while the one before it is still being closed, so a
miner trains from the version before the one being made, and its upload is applied to that one.

Two things keep the staleness from costing quality (benchmarks/convergence.py measures each):

- **eager start**: training starts from the base minus ``GUESS_SCALE`` x this miner's own last contribution
  (outer lr x what the coordinator decodes from its last upload), its guess of the version being made;
- **merge**: when that version is published mid-round, the model being trained moves to where training
  would stand had it started from it (by the published update, and back by the guess), and the
  pseudo-gradient is taken from the new version, which the upload declares as its base.

The base itself is always a published version, checked by its hash: only where training starts is a guess.
"""

from __future__ import annotations

import logging
import threading

import torch

from node.client import CoordinatorClient
from node.errors import Refused, Unavailable, Untrusted
from protocol.errors import CodecError
from protocol.params import Params, apply_update, decode_update, params_hash
from protocol.payload import ParamSpec, SparseTensor
from protocol.wire import RoundInfo

log = logging.getLogger(__name__)
WAIT_S = 5.0  # each long-poll for the round behind to close
POLL_S = 0.25  # between long-polls that came back with nothing new
# The eager start's guess: the miner's own last contribution times this. The version being made moves the
# model by the mean of every miner's upload, each of which points about where this one does; 1.5 trained
# best of 0.5 .. 2.5, and better than 1 when the version comes half way or not at all, at 4 and 10
# miners (BENCHMARKS.md, Overlapped rounds).
GUESS_SCALE = 1.5


class NextVersion:
    """Watches, in a thread of its own (a long-poll until the round behind ``ri`` closes), for the version
    that round publishes, and fetches its update and its hash; ``take`` hands them over once (None
    before, or when none will come)."""

    def __init__(self, client: CoordinatorClient, spec: ParamSpec, ri: RoundInfo) -> None:
        self.client, self.spec, self.ri = client, spec, ri
        self.version = ri.version + 1
        self._done = threading.Event()
        self._result: tuple[Params, str] | None = None
        self._thread = threading.Thread(target=self._watch, name="next-version", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            while not self._done.is_set():
                now = self.client.round(closed=self.ri.round - 1, wait_s=WAIT_S)  # the round making it
                if now.round != self.ri.round:
                    return  # the round moved on: whatever comes now is for the next one
                if self._done.is_set():
                    return  # stopped while the long-poll was out
                if now.newest == self.version:
                    header, delta = decode_update(self.client.update(self.version), self.spec)
                    if header.base_version != self.ri.version or header.version != self.version:
                        return
                    self._result = (delta, self.client.version(self.version).param_hash)
                    return
                if now.closing is None:
                    return  # the round behind closed without a version
                self._done.wait(POLL_S)
        except (Unavailable, Refused, CodecError) as e:
            log.info("round %d: not merging version %d (%s)", self.ri.round, self.version, e)
        except Untrusted as e:  # the main thread meets it too when it catches up, and stops
            log.error("round %d: not merging version %d (%s)", self.ri.round, self.version, e)
        finally:
            self._done.set()

    def wait(self, timeout_s: float) -> bool:
        """Until the watch ended (the version came, or will not); whether it did within ``timeout_s``."""
        return self._done.wait(timeout_s)

    def take(self) -> tuple[Params, str] | None:
        if not self._done.is_set():
            return None
        result, self._result = self._result, None
        return result

    def stop(self) -> None:
        self._done.set()

    def join(self, timeout_s: float = 2 * WAIT_S) -> None:
        """Stop, and wait for the thread to end (a process must not exit while it is inside torch)."""
        self.stop()
        self._thread.join(timeout_s)


class OverlapRound:
    """One round's start, merge and pseudo-gradient. ``guess``: the miner's last upload as the
    coordinator decodes it, when it is not in the base yet (None: start from the base); ``watch``: the
    version being made, when one may come."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ParamSpec,
        outer_lr: float,
        guess: dict[str, SparseTensor] | None,
        watch: NextVersion | None,
    ) -> None:
        self.model, self.spec, self.guess, self.watch = model, spec, guess, watch
        self.step = GUESS_SCALE * outer_lr  # the guess is the last upload times this
        self.merged = False
        if guess is not None:
            params: dict[str, torch.Tensor] = dict(model.named_parameters())
            shift(params, guess, -self.step, spec)

    def merge(self, base: Params) -> Params | None:
        """The new base once the version being made came and matched its hash (the model being trained
        moved with it), else None."""
        got = None if self.watch is None else self.watch.take()
        if got is None:
            return None
        self.watch = None
        update, param_hash = got
        new = {n: t.clone() for n, t in base.items()}
        apply_update(new, update)
        if params_hash(new, self.spec) != param_hash:
            log.warning("the published version does not match its hash; not merged")
            return None
        with torch.no_grad():
            params: dict[str, torch.Tensor] = dict(self.model.named_parameters())
            apply_update(params, update)
            if self.guess is not None:
                shift(params, self.guess, self.step, self.spec)
        self.merged = True
        return new

    def delta(self, base: Params) -> dict[str, torch.Tensor]:
        """The pseudo-gradient: where training started minus where it ended."""
        with torch.no_grad():
            local = dict(self.model.named_parameters())
            out: dict[str, torch.Tensor] = {n: base[n] - local[n].detach().float() for n, _ in self.spec}
            if self.guess is not None and not self.merged:
                shift(out, self.guess, -self.step, self.spec)
        return out

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()


@torch.no_grad()
def shift(
    tensors: dict[str, torch.Tensor], update: dict[str, SparseTensor], by: float, spec: ParamSpec
) -> None:
    """``tensors += by x update``, in place."""
    for name, _ in spec:
        u, flat = update[name], tensors[name].view(-1)
        values = u.values.to(flat.device, flat.dtype) * by
        if u.indices is None:
            flat.add_(values.view(-1))
        else:
            flat.index_add_(0, u.indices.to(flat.device), values)
