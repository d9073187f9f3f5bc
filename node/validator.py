"""The validating daemon: per closed round, catch up to its base version, fetch the uploads that passed
the cheap checks, evaluate each exactly as the coordinator does (protocol/evaluation.py), and post the
signed verdicts. The coordinator shows them on its leaderboard beside its own evaluation.

Where the coordinator shares its evaluation (``/v1/info``'s ``evaluation.assign``), a validator evaluates
only the uploads it was assigned (``GET /v1/rounds/{round}/tasks``) and decodes the other sampled ones
into the round's mean update, so that its verdicts are paired as the coordinator's would be
(protocol/pairing.py); the coordinator settles each upload from its validators' verdicts
(coordinator/rounds/sharing.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time

from node.client import CoordinatorClient
from node.distributed import local_device
from node.errors import Refused, Unavailable
from node.follower import Follower
from node.miner import backoff
from node.settings import ValidatorSettings
from protocol.codec import make_codec
from protocol.device import autocast_dtype
from protocol.errors import CodecError
from protocol.evaluation import Losses, UpdateEvaluator, round_salt
from protocol.model import build_model
from protocol.pairing import RoundEvaluation
from protocol.params import get_params, param_spec
from protocol.signing import public_key_hex
from protocol.wire import RunInfo, Verdict, Verdicts

log = logging.getLogger(__name__)
TASKS_POLL_S = 0.25  # how often a validator asks for a round's tasks until they are drawn


class Validator(Follower):
    def __init__(
        self, settings: ValidatorSettings, client: CoordinatorClient, info: RunInfo, stop: threading.Event
    ) -> None:
        self.settings, self.client, self.info, self.stop = settings, client, info, stop
        self.pubkey = public_key_hex(client.key)
        self.device = local_device(settings.device)
        self.model = build_model(info.architecture, seed=info.seed).to(self.device)
        self.spec = param_spec(self.model)
        self.codec = make_codec(info.codec.name, info.codec.k, info.codec.tile)
        self.params, self.version, self.verified = get_params(self.model), -1, False
        self.partial_dir = settings.state_dir
        self.progress = settings.state_dir / "validator.json"

    def _next_round(self) -> int:
        """The first round not yet evaluated: from the progress file of this run, else the last closed
        round."""
        try:
            saved = json.loads(self.progress.read_text())
            if saved["run_id"] == self.info.run_id:
                return int(saved["next_round"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return max(0, self.client.round().round - 1)

    def _save_progress(self, next_round: int) -> None:
        self.progress.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.progress.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.info.run_id, "next_round": next_round}))
        os.replace(tmp, self.progress)

    def run(self) -> int:
        """Evaluate closed rounds as they close, until stopped or ``max_rounds`` are done."""
        done, failures, after = 0, 0, self._next_round()
        while not self.stop.is_set():
            if self.settings.max_rounds is not None and done >= self.settings.max_rounds:
                break
            try:
                # wakes once round ``after`` has closed (in overlapped rounds the next opens before)
                current = self.client.round(after=after, wait_s=self.settings.poll_s, closed=after)
                if current.round <= after:
                    continue
                if self.validate_round(after) is None:
                    self.stop.wait(TASKS_POLL_S)  # closed, not yet drawn: the version comes first
                    continue
                after, failures, done = after + 1, 0, done + 1
                self._save_progress(after)
            except Unavailable as e:
                failures += 1
                delay = backoff(failures, self.settings.max_backoff_s)
                log.warning("%s; retrying in %.1f s", e, delay)
                self.stop.wait(delay)
            except (Refused, CodecError) as e:
                log.error("round %d: cannot evaluate (%s); skipping it", after, e)
                after += 1
                self.version = -1
        return done

    def validate_round(self, round_: int) -> dict[str, Losses] | None:
        """Evaluate one closed round's uploads and post the verdicts; returns them (None: the round has
        not closed yet)."""
        t0 = time.perf_counter()
        assigned: set[str] | None = None  # None: every sampled upload
        if self.info.evaluation.assign:
            tasks = self.client.tasks(round_, self.pubkey)
            if tasks.status == "waiting":
                return None
            if tasks.status == "settled" or not tasks.assigned:
                log.info("round %d: nothing assigned to this validator", round_)
                return {}
            if tasks.deadline is not None and tasks.deadline <= time.time():
                log.warning("round %d: its verdicts were due before this validator came to it", round_)
                return {}
            assigned = set(tasks.assigned)
        record = self.client.round_record(round_)
        if record.status != "closed":
            return None
        # exactly the uploads the coordinator evaluated, each with the clip scale aggregation gave it
        candidates = [s for s in record.submissions if s.evaluated and s.scale is not None]
        if not candidates:
            log.info("round %d: nothing to evaluate", round_)
            return {}
        if assigned is not None and not assigned <= {s.miner for s in candidates}:
            raise CodecError(f"round {round_}: assigned uploads that the round's record did not sample")
        on = record.evaluated_on()
        self.catch_up(on, self.client.version(on).param_hash)
        salt = round_salt(s.sha256 for s in record.submissions)
        evaluator = UpdateEvaluator(
            self.model,
            self.params,
            self.client.sequences,
            self.settings.batch_size,
            autocast_dtype(self.device, self.settings.precision),
        )
        evaluation = RoundEvaluation(evaluator, self.info, round_, salt, [s.miner for s in candidates])
        for s in candidates:  # one decoded update held at a time
            data = self.client.payload(round_, s.miner)
            if hashlib.sha256(data).hexdigest() != s.sha256:
                raise CodecError(f"the upload of {s.miner[:12]} does not match the round's record of it")
            update = self.codec.decode(data, self.spec)[1]
            if assigned is None or s.miner in assigned:
                evaluation.measure(s.miner, update, float(s.scale or 0.0))
            else:  # another validator's share: in the round's mean only
                evaluation.include(update, float(s.scale or 0.0))
        out = evaluation.losses()
        receipt = self.client.post_verdicts(
            round_, Verdicts(verdicts=[_verdict(m, x) for m, x in out.items()])
        )
        log.info(
            "round %d: posted %d verdicts (%d recorded) in %.2f s; gains %s",
            round_,
            len(out),
            receipt.recorded,
            time.perf_counter() - t0,
            {m[:12]: round(x.gain, 4) for m, x in out.items()},
        )
        return out


def _verdict(miner: str, x: Losses) -> Verdict:
    return Verdict(miner=miner, **dataclasses.asdict(x.bounded()))
