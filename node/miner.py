"""The mining daemon: per round, catch up, fetch the assigned sequences, train, compress, sign, upload."""

from __future__ import annotations

import logging
import random
import threading
import time

import torch

from node.client import CoordinatorClient, ProtocolMismatch, Refused, RoundClosed, StaleVersion, Unavailable
from node.settings import MinerSettings
from node.state import MinerState, load_state, save_state, state_digest
from node.trainer import InnerTrainer, NonFiniteLoss
from protocol.codec import PAYLOAD_FORMAT_VERSION, PayloadHeader, PayloadStats, make_codec
from protocol.data import assignment
from protocol.errors import CodecError
from protocol.feedback import ErrorFeedback
from protocol.model import build_model
from protocol.params import (
    apply_update,
    decode_update,
    get_params,
    load_checkpoint,
    param_spec,
    params_hash,
    set_params,
)
from protocol.signing import public_key_hex
from protocol.wire import RoundInfo, RunInfo

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Miner:
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
        self.device = pick_device(settings.device)
        self.model = build_model(info.model, seed=info.seed).to(self.device)
        self.spec = param_spec(self.model)
        self.codec = make_codec(info.codec.name, info.codec.k, info.codec.tile)
        self.ef = ErrorFeedback(info.recipe.ef_beta)
        self.trainer = InnerTrainer(self.model, info.recipe, self.device, settings.micro_batch)
        self.params = get_params(self.model)  # theta_v, the base of the next round
        self.version = -1  # unknown until caught up
        self.verified = False  # whether self.params were checked against the published hash
        self.rounds_done = 0
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

    # -- catching up --------------------------------------------------------------------------------------
    def catch_up(self, target: int, target_hash: str) -> None:
        """Bring the local parameters to version ``target``: by the published updates when at most
        max_catchup_versions behind, else (or when a hash does not match) by the checkpoint."""
        if self.version == target and self.verified:
            return
        start = self.version
        if 0 <= start <= target and target - start <= self.info.max_catchup_versions:
            try:
                for v in range(start + 1, target + 1):
                    self._apply_published(v)
                if params_hash(self.params, self.spec) == target_hash:
                    if target > start:
                        log.info("version %d: caught up from version %d by %d published updates", target,
                                 start, target - start)  # fmt: skip
                    self.verified = True
                    return
                log.warning(
                    "version %d: hash mismatch after applying updates; downloading checkpoint", target
                )
            except (CodecError, Refused) as e:
                log.warning(
                    "catching up to version %d by updates failed (%s); downloading checkpoint", target, e
                )
        self._download_checkpoint(target)
        self.verified = True

    def _apply_published(self, v: int) -> None:
        data = self.client.update(v)
        header, delta = decode_update(data, self.spec)
        if header.version != v or header.base_version != v - 1:
            raise CodecError(f"update for version {v} says {header.base_version} -> {header.version}")
        apply_update(self.params, delta)
        self.version = v

    def _download_checkpoint(self, target: int) -> None:
        partial = self.settings.state_dir / f"checkpoint-{target}.partial"
        version, data = self.client.checkpoint(target, partial)
        params, _ = load_checkpoint(data, self.spec)
        expected = self.client.version(version).param_hash
        if params_hash(params, self.spec) != expected:
            raise CodecError(f"checkpoint of version {version} does not match its published hash")
        self.params = {n: t.to(self.device) for n, t in params.items()}
        self.version = version
        log.info("version %d: loaded checkpoint (%d bytes)", version, len(data))

    # -- one round ----------------------------------------------------------------------------------------
    def mine_round(self, ri: RoundInfo) -> bool:
        """Train on round ``ri`` and upload; True when the upload was taken."""
        t0 = time.perf_counter()
        down0, up0 = self.client.bytes_down, self.client.bytes_up
        self.catch_up(ri.version, ri.param_hash)
        recipe = self.info.recipe
        ids = assignment(
            self.info.seed,
            ri.round,
            self.pubkey,
            recipe.inner_steps * recipe.batch_size,
            self.info.num_sequences,
            self.info.eval_every,
        )
        tokens = self.client.sequences(ids)
        set_params(self.model, self.params)
        result = self.trainer.run(tokens)
        with torch.no_grad():
            local = dict(self.model.named_parameters())
            delta = {n: self.params[n] - local[n].detach().float() for n, _ in self.spec}
        candidate = ErrorFeedback(self.ef.beta)
        candidate.load_state_dict(self.ef.state_dict(), self.device)
        header = PayloadHeader(
            format_version=PAYLOAD_FORMAT_VERSION,
            codec=self.codec.name,
            round=ri.round,
            base_version=ri.version,
            stats=PayloadStats(
                compute_s=result.compute_s, loss_before=result.loss_before, loss_after=result.loss_after
            ),
        )
        payload, decoded = self.codec.encode(candidate.accumulate(delta), self.spec, header)
        self.client.submit(ri.round, payload)
        candidate.subtract(decoded)  # commit error feedback only for an update the coordinator took
        self.ef = candidate
        self.rounds_done += 1
        save_state(
            self.settings.state_dir,
            MinerState(self.version, self.trainer.step, self.rounds_done, self.params),
            self.ef,
            self.trainer.optimizer,
            self.info.run_id,
        )
        log.info(
            "round %d: version %d, loss %.4f -> %.4f, up %d B, down %d B, %.2f s (compute %.2f s)",
            ri.round,
            ri.version,
            result.loss_before,
            result.loss_after,
            self.client.bytes_up - up0,
            self.client.bytes_down - down0,
            time.perf_counter() - t0,
            result.compute_s,
        )
        return True

    # -- the daemon ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Mine until stopped or ``max_rounds`` uploads were taken; returns the number of rounds mined."""
        self.client.register()
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
            except Unavailable as e:
                failures += 1
                delay = min(self.settings.max_backoff_s, 0.5 * 2 ** min(failures, 8)) * random.uniform(
                    0.5, 1.0
                )
                log.warning("%s; retrying in %.1f s", e, delay)
                self.stop.wait(delay)
            except ProtocolMismatch:
                raise
            except NonFiniteLoss as e:
                log.error("%s; skipping this round", e)
                self.version = -1  # reload clean parameters
            except (Refused, CodecError) as e:
                failures += 1
                log.error("round refused: %s", e)
                self.version = -1
                self.stop.wait(min(self.settings.max_backoff_s, 1.0 * failures))
        return mined
