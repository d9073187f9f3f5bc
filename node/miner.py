"""The mining daemon: per round, catch up, fetch the assigned sequences, train, compress, sign, upload."""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from node.client import CoordinatorClient
from node.distributed import leave, local_device, share, share_params, share_trainer_state
from node.errors import ProtocolMismatch, Refused, RoundClosed, StaleVersion, Unavailable
from node.follower import Follower
from node.metrics import MinerMetrics
from node.overlap import NextVersion, OverlapRound
from node.settings import MinerSettings
from node.state import MinerState, load_state, save_state, state_digest
from node.trainer import InnerResult, InnerTrainer, NonFiniteLoss
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, SparseTensor, make_codec
from protocol.codec.feedback import ErrorFeedback
from protocol.data import assignment
from protocol.errors import CodecError
from protocol.model import build_model
from protocol.params import (
    get_params,
    param_spec,
    set_params,
)
from protocol.signing import public_key_hex
from protocol.wire import RoundInfo, RunInfo

log = logging.getLogger(__name__)


def backoff(attempt: int, cap_s: float) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, ... up to ``cap_s``."""
    return float(min(cap_s, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0))


@contextlib.contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[dict[str, float]], None]]:
    """A progress bar on a terminal; nothing otherwise (log lines say what happened)."""
    if not sys.stderr.isatty():
        yield lambda _: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total, loss="")
        yield lambda metrics: bar.update(task, advance=1, loss=f"loss {metrics['loss']:.4f}")


class Miner(Follower):
    def __init__(
        self,
        settings: MinerSettings,
        client: CoordinatorClient,
        info: RunInfo,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings, self.client, self.info = settings, client, info
        self.stop = stop or threading.Event()
        self.pubkey = public_key_hex(client.key)
        self.device = local_device(settings.device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.model = build_model(info.architecture, seed=info.seed).to(self.device)
        self.spec = param_spec(self.model)
        self.codec = make_codec(info.codec.name, info.codec.k, info.codec.tile)
        self.ef = ErrorFeedback(info.recipe.ef_beta)
        self.trainer = InnerTrainer(self.model, info.recipe, self.device, settings.micro_batch)
        self.params = get_params(self.model)  # theta_v, the base of the next round
        self.version = -1  # unknown until caught up
        self.verified = False  # whether self.params were checked against the published hash
        self.partial_dir = settings.state_dir
        self.rounds_done = 0
        self.watch: NextVersion | None = None  # overlapped rounds: the version being made, watched for
        self.last: tuple[int, int, dict[str, SparseTensor]] | None = None  # round, base, decoded upload
        self.metrics = MinerMetrics()
        if client.trust is not None:
            client.trust.on_refusal = lambda what: self.metrics.untrusted.labels(what).inc()
        if settings.metrics_port is not None:
            port = self.metrics.serve(settings.metrics_port, settings.metrics_host)
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
        saved = load_state(settings.state_dir, self.ef, self.trainer.optimizer, info.run_id, self.device)
        if saved is not None:
            self.trainer.step, self.rounds_done = saved.inner_step, saved.rounds_done
            if saved.params is not None and set(saved.params) == {n for n, _ in self.spec}:
                self.params = {n: t.to(self.device) for n, t in saved.params.items()}
                self.version = saved.version
            log.info(
                "resumed state from %s: version %d, %d rounds done, error feedback %s",
                settings.state_dir,
                saved.version,
                saved.rounds_done,
                state_digest(self.ef.state_dict()),
            )
        if self.world > 1:  # the other ranks start from this rank's optimizer state
            share({"cmd": "state"})
            share_trainer_state(self.trainer)

    # -- one round ----------------------------------------------------------------------------------------
    def mine_round(self, ri: RoundInfo) -> bool:
        """Train on round ``ri`` and upload; True when the upload was taken."""
        t0 = time.perf_counter()
        down0, up0, transfer0 = self.client.bytes_down, self.client.bytes_up, self.client.transfer_s
        base_version, base_hash = self.base_for(ri)
        self.catch_up(base_version, base_hash)
        recipe = self.info.recipe
        tokens = self.client.sequences(self.training_ids(ri))
        set_params(self.model, self.params)
        if self.world > 1:  # the other ranks train this round with us
            share({"cmd": "train", "tokens": tokens, "round": ri.round})
            share_params(self.model)
        rnd = self._overlap(ri, base_version)
        steps = 0
        with progress(f"round {ri.round}", recipe.inner_steps) as advance:

            def on_step(metrics: dict[str, float]) -> None:
                nonlocal base_version, steps
                advance(metrics)
                steps += 1
                if (new := rnd.merge(self.params)) is not None:
                    self.params, self.version, base_version = new, base_version + 1, base_version + 1
                    self.metrics.merged.inc()
                    log.info(
                        "round %d: merged version %d after %d of %d inner steps",
                        ri.round,
                        base_version,
                        steps,
                        recipe.inner_steps,
                    )

            try:
                result = self.trainer.run(tokens, on_step=on_step, round_=ri.round)
            finally:
                rnd.close()
        delta = self.pseudo_gradient(ri, rnd.delta(self.params))
        candidate = self.ef.copy()
        header = PayloadHeader(
            format_version=PAYLOAD_FORMAT_VERSION,
            codec=self.codec.name,
            round=ri.round,
            base_version=base_version,
            stats=result.stats(),
        )
        made = self.make_payload(ri, header, candidate.accumulate(delta))
        if made is None:
            return False
        payload, decoded = made
        self._upload(ri.round, payload)
        self._record(base_version, result)
        candidate.subtract(decoded)  # commit error feedback only for an update the coordinator took
        self.ef = candidate
        self.last = (ri.round, base_version, decoded)
        self.rounds_done += 1
        save_state(
            self.settings.state_dir,
            MinerState(self.version, self.trainer.step, self.rounds_done, self.params),
            self.ef,
            self.trainer.optimizer,
            self.info.run_id,
        )
        log.info(
            "round %d: version %d, loss %.4f -> %.4f, up %d B, down %d B, %.2f s (compute %.2f s, "
            "transfer %.2f s)",
            ri.round,
            base_version,
            result.loss_before,
            result.loss_after,
            self.client.bytes_up - up0,
            self.client.bytes_down - down0,
            time.perf_counter() - t0,
            result.compute_s,
            self.client.transfer_s - transfer0,
        )
        return True

    def _overlap(self, ri: RoundInfo, base_version: int) -> OverlapRound:
        """Overlapped rounds (node/overlap.py): start from the base minus this miner's last upload when that
        is not in the base yet, and merge the version being made when it comes mid-round (one process only:
        the other ranks of a torchrun group would need it at the same step). Otherwise, neither."""
        self.watch, guess = None, None
        if self.info.overlap and self.world == 1:
            if ri.closing is not None and base_version == ri.version:
                self.watch = NextVersion(self.client, self.spec, ri)
            if self.last is not None and self.last[0] == ri.round - 1 and self.last[1] == base_version:
                guess = self.last[2]
        return OverlapRound(self.model, self.spec, self.info.evaluation.outer_lr, guess, self.watch)

    # The four steps an adversarial miner (node/adversary.py, for simulations) does differently.
    def base_for(self, ri: RoundInfo) -> tuple[int, str]:
        """The version to train from, and its parameter hash: the round's, or (overlapped rounds) the one
        published since it opened."""
        if ri.newest is not None and ri.newest_hash is not None:
            return ri.newest, ri.newest_hash
        return ri.version, ri.param_hash

    def training_ids(self, ri: RoundInfo) -> list[int]:
        """The sequences to train on: this miner's assignment."""
        return self.assigned(ri, self.pubkey)

    def assigned(self, ri: RoundInfo, key: str) -> list[int]:
        """The assignment of the miner with public key ``key`` in round ``ri``."""
        r, info = self.info.recipe, self.info
        n = r.inner_steps * r.batch_size
        return assignment(info.seed, ri.round, key, n, info.num_sequences, info.eval_every)

    def pseudo_gradient(self, ri: RoundInfo, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the round's training gives: where it started minus where it ended."""
        return delta

    def make_payload(
        self, ri: RoundInfo, header: PayloadHeader, vector: dict[str, torch.Tensor]
    ) -> tuple[bytes, dict[str, SparseTensor]] | None:
        """The payload of the error-feedback vector, and what the coordinator will decode from it."""
        return self.codec.encode(vector, self.spec, header)

    def _record(self, version: int, result: InnerResult) -> None:
        m = self.metrics
        m.rounds.inc()
        m.version.set(version)
        m.loss.set(result.loss_after)
        m.compute.inc(result.compute_s)
        m.count_transfers(self.client.bytes_up, self.client.bytes_down)

    def _upload(self, round_: int, payload: bytes) -> None:
        """Upload, retrying transient failures with backoff until the coordinator answers: a closed round
        then comes back as RoundClosed and the work is abandoned."""
        end = time.monotonic() + self.settings.upload_retry_s
        for attempt in itertools.count():
            try:
                receipt = self.client.submit(round_, payload)
                via = " (sent straight to the object store)" if self.client.direct_uploads else ""
                log.info("round %d: upload taken%s, sha256 %s", round_, via, receipt.payload_sha256)
                return
            except Unavailable as e:
                delay = backoff(attempt, self.settings.max_backoff_s)
                if self.stop.is_set() or time.monotonic() + delay > end:
                    raise
                log.warning("round %d: upload failed (%s); retrying in %.1f s", round_, e, delay)
                self.stop.wait(delay)

    # -- the daemon ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Mine until stopped or ``max_rounds`` uploads were taken; returns the number of rounds mined."""
        try:
            return self._run()
        finally:
            if self.watch is not None:
                self.watch.join()
            if self.world > 1:
                share({"cmd": "stop"})
                leave()

    def _register(self) -> None:
        """Register, retrying with backoff while the coordinator cannot be reached (it may be restarting)."""
        for attempt in itertools.count():
            try:
                self.client.register()
                return
            except Unavailable as e:
                delay = backoff(attempt, self.settings.max_backoff_s)
                log.warning("registering failed (%s); retrying in %.1f s", e, delay)
                if self.stop.wait(delay):
                    raise

    def _run(self) -> int:
        self._register()
        last_done, mined, failures = -1, 0, 0
        while not self.stop.is_set():
            if self.settings.max_rounds is not None and mined >= self.settings.max_rounds:
                break
            try:
                ri = self.client.round(after=last_done, wait_s=2.0)
                if ri.round <= last_done:
                    continue
                if ri.status != "open":
                    self.stop.wait(0.2)
                    continue
                if self.mine_round(ri):
                    mined += 1
                last_done, failures = ri.round, 0
            except (RoundClosed, StaleVersion) as e:
                log.info("round abandoned (%s); resynchronising", e.code)
                self.metrics.abandoned.inc()
            except Unavailable as e:
                failures += 1
                delay = backoff(failures, self.settings.max_backoff_s)
                log.warning("%s; retrying in %.1f s", e, delay)
                self.stop.wait(delay)
            except ProtocolMismatch:
                raise
            except NonFiniteLoss as e:
                log.error("%s; skipping this round", e)
                self.version = -1  # reload clean parameters
            except (Refused, CodecError) as e:
                failures += 1
                log.error("round failed (%s); starting again from a clean base", e)
                self.version = -1
                self.stop.wait(min(self.settings.max_backoff_s, 1.0 * failures))
        return mined
