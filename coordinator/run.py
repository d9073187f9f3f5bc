"""The run: the canonical model, the open round, intake, aggregation and publishing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

from coordinator.blobs import make_blob_store
from coordinator.errors import Conflict, Forbidden, NotFound, Unprocessable
from coordinator.judge import Upload, aggregate_uploads, examine, judge, reclip, refuse_by_evaluation
from coordinator.metrics import Metrics
from coordinator.outer import OuterOptimizer
from coordinator.scoring import (
    COORDINATOR,
    INSERT_VERDICT,
    evaluate_uploads,
    leaderboard,
    record_verdicts,
    verdict_rows,
)
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
from protocol.codec import make_codec
from protocol.data import Dataset, build_dataset, eval_ids
from protocol.errors import CodecError
from protocol.evaluation import Losses, RoundResult, round_results, round_salt
from protocol.model import build_model, evaluate_loss
from protocol.params import (
    UpdateHeader,
    apply_update,
    encode_update,
    get_params,
    load_checkpoint,
    param_spec,
    params_hash,
    save_checkpoint,
    set_params,
)
from protocol.wire import (
    PROTOCOL_VERSION,
    EvaluationConfig,
    LeaderboardEntry,
    RoundInfo,
    RoundRecord,
    RoundReport,
    RunInfo,
    SubmissionReceipt,
    SubmissionRecord,
    Verdict,
    VersionInfo,
)

log = logging.getLogger(__name__)
FAULT_ENV = "GRADPOOL_FAULT_PUBLISH_DELAY_S"
FAULT_DELAY_S = float(os.environ.get(FAULT_ENV, "0") or 0)


@dataclass
class _Built:
    """A version made from a round's accepted updates, not yet committed."""

    version: int
    params: dict[str, torch.Tensor]
    param_hash: str
    eval_loss: float
    update_sha: str
    update_bytes: int
    checkpoint_sha: str
    checkpoint_bytes: int
    outer_buffers: dict[str, torch.Tensor]
    outer_sha: str | None


@dataclass
class Current:
    round: int
    version: int
    status: str
    param_hash: str


class Run:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        root = settings.state_dir
        root.mkdir(parents=True, exist_ok=True)
        self.store = Store(root / "state.db")
        try:
            self._check_fingerprint()
        except ValueError:
            self.store.close()
            raise
        self.blobs = make_blob_store(settings.blobs, root / "blobs")
        self.model = build_model(settings.model, seed=settings.seed)
        self.model.eval()
        self.spec = param_spec(self.model)
        d = settings.data
        self.data_meta = build_dataset(
            root / "data",
            d.corpus,
            seq_len=self.model.cfg.block_size,
            max_tokens=d.max_tokens,
            eval_every=d.eval_every,
        )
        self.dataset = Dataset(root / "data")
        self.eval_batch = self.dataset.sequences(eval_ids(self.data_meta, d.eval_sequences))
        self.codec = make_codec(settings.codec.name, settings.codec.k, settings.codec.tile)
        self.outer = OuterOptimizer(settings.outer_lr(), settings.outer_momentum())
        self.info = RunInfo(
            protocol_version=PROTOCOL_VERSION,
            run_id=settings.run_id,
            seed=settings.seed,
            model=settings.model,
            seq_len=self.model.cfg.block_size,
            num_sequences=self.data_meta.num_sequences,
            eval_every=self.data_meta.eval_every,
            codec=settings.codec,
            recipe=settings.recipe,
            max_payload_bytes=settings.max_payload_bytes,
            max_catchup_versions=settings.max_catchup_versions,
            evaluation=EvaluationConfig(
                own_sequences=settings.validation.own_sequences,
                other_sequences=settings.validation.other_sequences,
                step=settings.outer_lr(),
            ),
        )
        self.lock = threading.RLock()
        self.metrics = Metrics()
        # Intake decodes off the event loop in a pool as wide as the machine: more threads than cores
        # only trade places on the interpreter lock.
        self.intake_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="intake")
        self.force_close = False
        self._check_data()
        self.params, self.current = self._resume_or_start()
        self.deadline_s = self._next_deadline()
        self._update_gauges()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.keeping = False
        self._changed: asyncio.Event | None = None
        self._poke: asyncio.Event | None = None
        self._scores_changed = 0  # bumped when a round closes or verdicts arrive: the leaderboard's cache key
        self._board: tuple[tuple[int | None, int], list[LeaderboardEntry]] | None = None

    # -- start and resume ---------------------------------------------------------------------------------
    def _check_fingerprint(self) -> None:
        """Refuse, before touching anything, a state directory made by a run with other settings."""
        s = self.settings
        fields = {"run_id", "seed", "model", "codec", "recipe"}
        data = s.data.model_dump(mode="json", include={"corpus", "max_tokens", "eval_every"})
        mine = json.dumps({"run": s.model_dump(mode="json", include=fields), "data": data}, sort_keys=True)
        stored = self.store.get_meta("fingerprint")
        if stored is None:
            self.store.set_meta("fingerprint", mine)
        elif stored != mine:
            raise ValueError(
                f"state directory {s.state_dir} belongs to a run with other settings "
                "(run_id, model, codec, recipe, seed or data); use a new --state-dir"
            )

    def _check_data(self) -> None:
        stored = self.store.get_meta("data_sha256")
        if stored is None:
            self.store.set_meta("data_sha256", self.data_meta.sha256)
        elif stored != self.data_meta.sha256:
            raise ValueError(f"the dataset in {self.settings.state_dir / 'data'} changed since the run began")

    def _resume_or_start(self) -> tuple[dict[str, torch.Tensor], Current]:
        latest = self.store.one("SELECT * FROM versions ORDER BY version DESC LIMIT 1")
        if latest is None:
            params = get_params(self.model)
            h = params_hash(params, self.spec)
            ckpt = save_checkpoint(params, {"version": "0", "param_hash": h})
            sha = self.blobs.put(ckpt)
            loss = self.evaluate(params)
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO versions (version, round, param_hash, eval_loss, checkpoint_sha, "
                    "checkpoint_bytes, created_at) VALUES (0, NULL, ?, ?, ?, ?, ?)",
                    (h, loss, sha, len(ckpt), time.time()),
                )
                db.execute(
                    "INSERT INTO rounds (round, version, status, opened_at) VALUES (0, 0, 'open', ?)",
                    (time.time(),),
                )
            log.info(
                "run %s started: model %s, version 0, held-out loss %.4f",
                self.info.run_id,
                self.settings.model,
                loss,
            )
            return params, Current(0, 0, "open", h)
        params, _ = load_checkpoint(self.blobs.get(latest["checkpoint_sha"]), self.spec)
        if params_hash(params, self.spec) != latest["param_hash"]:
            raise ValueError(f"checkpoint of version {latest['version']} does not match its hash")
        outer_sha = self.store.get_meta("outer_state")
        if outer_sha:
            self.outer.load_state_dict(st_load(self.blobs.get(outer_sha)))
        row = self.store.one("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        assert row is not None
        self.store.execute("UPDATE rounds SET status = 'open' WHERE round = ?", row["round"])
        log.info("run %s resumed at round %d, version %d", self.info.run_id, row["round"], latest["version"])
        return params, Current(int(row["round"]), int(latest["version"]), "open", str(latest["param_hash"]))

    def close(self) -> None:
        self.intake_pool.shutdown(wait=True)
        self.store.close()

    # -- queries ------------------------------------------------------------------------------------------
    def round_info(self) -> RoundInfo:
        with self.lock:
            cur = self.current
            row = self.store.one("SELECT first_upload_at FROM rounds WHERE round = ?", cur.round)
            n = self.store.one("SELECT COUNT(*) AS n FROM submissions WHERE round = ?", cur.round)
            first = row["first_upload_at"] if row else None
            left = None if first is None else max(0.0, first + self.deadline_s - time.time())
            return RoundInfo(
                round=cur.round,
                version=cur.version,
                status=cur.status,  # type: ignore[arg-type]
                param_hash=cur.param_hash,
                submissions=int(n["n"]) if n else 0,
                expected=len(self._expected_miners(cur.round)),
                deadline_s=left,
            )

    def version_info(self, version: int) -> VersionInfo | None:
        row = self.store.one("SELECT * FROM versions WHERE version = ?", version)
        if row is None:
            return None
        return VersionInfo(
            version=row["version"],
            round=row["round"],
            param_hash=row["param_hash"],
            eval_loss=row["eval_loss"],
            update_bytes=row["update_bytes"],
            checkpoint_bytes=row["checkpoint_bytes"],
        )

    def reports(self) -> list[RoundReport]:
        rows = self.store.all("SELECT * FROM rounds ORDER BY round")
        after = {r["round"] - 1: r["version"] for r in rows}  # a round's result is the next round's base
        return [
            RoundReport(
                round=r["round"],
                version=after[r["round"]],
                eval_loss=r["eval_loss"],
                accepted=r["accepted"],
                rejected=r["rejected"],
                bytes_up=r["bytes_up"],
                bytes_down=r["bytes_down"],
                wall_s=round(r["closed_at"] - r["opened_at"], 3),
                compute_s=round(r["compute_s"], 3),
            )
            for r in rows
            if r["status"] == "closed"
        ]

    def initial_eval_loss(self) -> float | None:
        row = self.store.one("SELECT eval_loss FROM versions WHERE version = 0")
        return None if row is None else row["eval_loss"]

    def count_miners(self) -> int:
        row = self.store.one("SELECT COUNT(*) AS n FROM miners")
        return int(row["n"]) if row else 0

    def _expected_miners(self, round_: int) -> list[str]:
        since = round_ - self.settings.rounds.drop_after_rounds
        return [
            r["pubkey"] for r in self.store.all("SELECT pubkey FROM miners WHERE last_seen_round >= ?", since)
        ]

    # -- writes -------------------------------------------------------------------------------------------
    def check_nonce(self, nonce: str) -> bool:
        """True if the nonce is new. Nonces are kept (durably) for twice the signature window, after
        which the timestamp check alone refuses a replay."""
        now = time.time()
        return self.store.remember_nonce(nonce, now + 2 * self.settings.signature_window_s, now)

    def register(self, miner: str) -> bool:
        allow = self.settings.allowlist
        if allow is not None and miner not in {k.lower() for k in allow}:
            raise Forbidden("not_allowed", "this coordinator only takes miners on its allowlist")
        with self.lock:
            known = self.store.one("SELECT 1 FROM miners WHERE pubkey = ?", miner) is not None
            self.store.execute(
                "INSERT INTO miners (pubkey, registered_at, last_seen_round) VALUES (?, ?, ?) "
                "ON CONFLICT(pubkey) DO UPDATE SET last_seen_round = excluded.last_seen_round",
                miner,
                time.time(),
                self.current.round,
            )
        if not known:
            log.info("round %d: miner %s registered", self.current.round, miner[:12])
        return not known

    def count_download(self, nbytes: int) -> None:
        self.store.add_bytes_down(self.current.round, nbytes)
        self.metrics.bytes_out.inc(nbytes)

    def _next_deadline(self) -> float:
        """Seconds after a round's first upload before it may close without its missing miners: twice the
        median spread of arrivals in the last five rounds, plus a second, within [min_deadline_s,
        deadline_s]. A miner that is merely slow thus still makes it; a dead one costs little time."""
        r = self.settings.rounds
        if not r.adaptive_deadline:
            return r.deadline_s
        rows = self.store.all(
            "SELECT MAX(received_at) - MIN(received_at) AS spread FROM submissions WHERE round >= ? "
            "AND round < ? GROUP BY round HAVING COUNT(*) > 1", self.current.round - 5, self.current.round,
        )  # fmt: skip
        if not rows:
            return r.deadline_s
        spread = statistics.median(float(row["spread"]) for row in rows)
        return min(r.deadline_s, max(r.min_deadline_s, 2 * spread + 1.0))

    def _update_gauges(self) -> None:
        self.metrics.round.set(self.current.round)
        self.metrics.version.set(self.current.version)
        row = self.store.one("SELECT eval_loss FROM versions WHERE version = ?", self.current.version)
        if row is not None and row["eval_loss"] is not None:
            self.metrics.eval_loss.set(row["eval_loss"])

    def audit(self, round_: int) -> list[dict[str, object]]:
        """Every upload of a round: miner, payload hash, size, and accepted or refused with the reason."""
        rows = self.store.all(
            "SELECT miner, sha256, content_sha256, bytes, status, reason, compute_s, received_at "
            "FROM submissions WHERE round = ? ORDER BY received_at", round_,
        )  # fmt: skip
        return [dict(r) for r in rows]

    def request_close(self) -> int:
        """Close the open round as soon as it has an upload (operator's command); returns its number."""
        with self.lock:
            n = self.store.one("SELECT COUNT(*) AS n FROM submissions WHERE round = ?", self.current.round)
            if not n or not n["n"]:
                raise Conflict("nothing_to_aggregate", f"round {self.current.round} has no uploads yet")
            self.force_close = True
        self.poke()
        return self.current.round

    def submit(self, miner: str, round_: int, body: bytes) -> SubmissionReceipt:
        """Check and store one upload (runs in a worker thread: decoding is CPU work). A registered miner's
        refused upload (malformed, wrong round or version) is recorded against it for the leaderboard."""
        if self.store.one("SELECT 1 FROM miners WHERE pubkey = ?", miner) is None:
            raise Forbidden("unknown_miner", "register (POST /v1/miners) before uploading")
        self._check_round(round_)
        try:
            return self._intake(miner, round_, body)
        except (Unprocessable, Conflict) as e:
            if e.code not in ("round_closed", "round_not_open", "already_submitted"):
                self.store.execute(
                    "INSERT INTO refusals (round, miner, code, at) VALUES (?, ?, ?, ?)",
                    round_, miner, e.code, time.time(),
                )  # fmt: skip
            raise

    def _intake(self, miner: str, round_: int, body: bytes) -> SubmissionReceipt:
        sha = hashlib.sha256(body).hexdigest()
        if (receipt := self._earlier_upload(miner, round_, sha, len(body))) is not None:
            return receipt
        try:
            seen = examine(body, self.codec, self.spec)
        except CodecError as e:
            raise Unprocessable(e.code, e.message) from None
        header = seen.header
        if header.round != round_:
            raise Unprocessable("round_mismatch", f"payload says round {header.round}, URL says {round_}")
        self._check_version(header.base_version, round_)
        # Content-addressed files, written before taking the lock (at worst an orphan file): the slow
        # part of intake does not serialise the uploads.
        self.blobs.put(body, durable=False)  # as durable as the SQLite row that points to it (WAL, NORMAL)
        unpacked_sha = None if seen.unpacked is None else self.blobs.put(seen.unpacked, durable=False)
        with self.lock:
            self._check_round(round_)
            if (receipt := self._earlier_upload(miner, round_, sha, len(body))) is not None:
                return receipt  # a concurrent upload of the same miner won the race
            self._check_version(header.base_version, round_)
            now = time.time()
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO submissions (round, miner, sha256, content_sha256, bytes, status, "
                    "compute_s, received_at, norm, sketch, unpacked_sha256) "
                    "VALUES (?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?)",
                    (
                        round_,
                        miner,
                        sha,
                        seen.content_sha256,
                        len(body),
                        header.stats.compute_s,
                        now,
                        seen.norm,
                        seen.sketch.numpy().tobytes(),
                        unpacked_sha,
                    ),
                )
                db.execute(
                    "UPDATE rounds SET bytes_up = bytes_up + ?, first_upload_at = "
                    "COALESCE(first_upload_at, ?) WHERE round = ?",
                    (len(body), now, round_),
                )
                db.execute("UPDATE miners SET last_seen_round = ? WHERE pubkey = ?", (round_, miner))
        log.info(
            "round %d: upload from miner %s, %d bytes, base version %d",
            round_,
            miner[:12],
            len(body),
            header.base_version,
        )
        self.metrics.bytes_in.inc(len(body))
        self.poke()
        return SubmissionReceipt(round=round_, miner=miner, payload_sha256=sha, bytes=len(body))

    def _earlier_upload(self, miner: str, round_: int, sha: str, size: int) -> SubmissionReceipt | None:
        """The receipt of an identical earlier upload (idempotent); a different one is a conflict."""
        prev = self.store.one("SELECT sha256 FROM submissions WHERE round = ? AND miner = ?", round_, miner)
        if prev is None:
            return None
        if prev["sha256"] != sha:
            raise Conflict(
                "already_submitted", f"miner already uploaded a different payload in round {round_}"
            )
        return SubmissionReceipt(round=round_, miner=miner, payload_sha256=sha, bytes=size, duplicate=True)

    def _check_version(self, base_version: int, round_: int) -> None:
        if base_version != self.current.version:
            raise Conflict(
                "stale_version",
                f"payload was trained on version {base_version}; "
                f"round {round_} is for version {self.current.version}",
            )

    def _check_round(self, round_: int) -> None:
        cur = self.current
        if round_ < cur.round or (round_ == cur.round and cur.status != "open"):
            raise Conflict("round_closed", f"round {round_} is closed; the current round is {cur.round}")
        if round_ > cur.round:
            raise Conflict("round_not_open", f"round {round_} is not open; the current round is {cur.round}")

    # -- the round keeper ---------------------------------------------------------------------------------
    def poke(self) -> None:
        if self._poke is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._poke.set)

    async def keep_rounds(self) -> None:
        """Close rounds when they are complete or past their deadline; aggregate off the event loop."""
        self._loop = asyncio.get_running_loop()
        self._changed, self._poke = asyncio.Event(), asyncio.Event()
        self.keeping = True
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=0.25)
            self._poke.clear()
            if not self._should_close():
                continue
            with self.lock:
                self.current.status = "aggregating"
            try:
                await asyncio.to_thread(self.aggregate_and_publish)
            except Exception:
                log.exception("round %d: aggregation failed; the round stays open", self.current.round)
                with self.lock:
                    self.current.status = "open"
                await asyncio.sleep(1.0)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait_for_round(self, after: int, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.current.round <= after and self._changed is not None:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                return

    def _should_close(self) -> bool:
        cur = self.current
        rows = self.store.all("SELECT miner FROM submissions WHERE round = ?", cur.round)
        if cur.status != "open" or not rows:
            return False
        if self.force_close:
            self.force_close = False
            return True
        if len(rows) < self.settings.rounds.min_quorum:
            return False
        if set(self._expected_miners(cur.round)) <= {r["miner"] for r in rows}:
            return True
        first = self.store.one("SELECT first_upload_at FROM rounds WHERE round = ?", cur.round)
        return bool(
            first and first["first_upload_at"] and time.time() >= first["first_upload_at"] + self.deadline_s
        )

    # -- aggregation and publishing -----------------------------------------------------------------------
    def aggregate_and_publish(self) -> None:
        """Close the current round: judge its uploads, publish the next version if any is accepted, and
        open the next round, all in one transaction. Idempotent: a crash before the commit leaves the
        round open with its uploads, and running it again gives the same version."""
        cur = self.current
        t0 = time.time()
        subs = self.store.all("SELECT * FROM submissions WHERE round = ? ORDER BY received_at", cur.round)
        uploads = [
            Upload(s["miner"], s["sha256"], s["content_sha256"], s["norm"],
                   torch.frombuffer(bytearray(s["sketch"]), dtype=torch.float32), s["unpacked_sha256"])
            for s in subs
        ]  # fmt: skip
        checks = self.settings.checks
        verdicts, accepted = judge(uploads, checks.max_norm_ratio, checks.copy_cosine)
        losses: dict[str, Losses] = {}
        if accepted and self.settings.validation.builtin:
            accepted, losses = self._evaluate(cur.round, subs, verdicts, accepted)
        built = self._build_version(cur, accepted) if accepted else None
        compute = [s["compute_s"] for s in subs if verdicts.get(s["miner"]) is None]
        if FAULT_DELAY_S:  # failure injection for crash tests: a window in which to kill before the commit
            log.warning(
                "round %d: pausing %.1f s before publishing (%s)", cur.round, FAULT_DELAY_S, FAULT_ENV
            )
            time.sleep(FAULT_DELAY_S)
        now = time.time()
        with self.store.transaction() as db:
            if built is not None:
                db.execute(
                    "INSERT INTO versions (version, round, param_hash, eval_loss, update_sha, update_bytes, "
                    "checkpoint_sha, checkpoint_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (built.version, cur.round, built.param_hash, built.eval_loss, built.update_sha,
                     built.update_bytes, built.checkpoint_sha, built.checkpoint_bytes, now),
                )  # fmt: skip
                if built.outer_sha is not None:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('outer_state', ?)",
                               (built.outer_sha,))  # fmt: skip
            db.executemany(INSERT_VERDICT, verdict_rows(cur.round, COORDINATOR, losses, now))
            for s in subs:
                reason = verdicts.get(s["miner"])
                db.execute(
                    "UPDATE submissions SET status = ?, reason = ? WHERE round = ? AND miner = ?",
                    ("accepted" if reason is None else "rejected", reason, cur.round, s["miner"]),
                )
            db.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, accepted = ?, rejected = ?, "
                "compute_s = ?, eval_loss = ? WHERE round = ?",
                (now, len(accepted), len(subs) - len(accepted), statistics.fmean(compute) if compute else 0.0,
                 None if built is None else built.eval_loss, cur.round),
            )  # fmt: skip
            new_version = cur.version if built is None else built.version
            db.execute(
                "INSERT INTO rounds (round, version, status, opened_at) VALUES (?, ?, 'open', ?)",
                (cur.round + 1, new_version, now),
            )
        with self.lock:
            if built is not None:
                self.params = built.params
                self.outer.buffers = built.outer_buffers
            self.current = Current(cur.round + 1, new_version, "open", self.current.param_hash
                                   if built is None else built.param_hash)  # fmt: skip
        self._scores_changed += 1
        self._prune_checkpoints()
        for s in subs:  # the unpacked payloads served their one purpose; the payloads themselves stay
            if s["unpacked_sha256"] is not None:
                self.blobs.delete(s["unpacked_sha256"])
        self.deadline_s = self._next_deadline()
        self._update_gauges()
        self.metrics.round_closed(
            subs, verdicts, time.time() - t0, None if built is None else built.eval_loss
        )
        rejected = {m[:12]: r for m, r in verdicts.items() if r is not None}
        log.info(
            "round %d closed: version %d, accepted %d, rejected %d %s, held-out loss %s, %.2f s",
            cur.round, new_version, len(accepted), len(subs) - len(accepted), rejected or "",
            "n/a" if built is None else f"{built.eval_loss:.4f}", time.time() - t0,
        )  # fmt: skip

    def _evaluate(
        self,
        round_: int,
        subs: list[sqlite3.Row],
        verdicts: dict[str, str | None],
        accepted: list[tuple[Upload, float]],
    ) -> tuple[list[tuple[Upload, float]], dict[str, Losses]]:
        """Evaluate the uploads that passed the cheap checks; refuse (in ``verdicts``) harmful and useless
        ones, and weight the rest by score if asked. Returns the accepted uploads with their scales."""
        t0 = time.time()
        salt = round_salt(s["sha256"] for s in subs)
        losses = evaluate_uploads(self.model, self.params, self.dataset, self.info, round_, salt, accepted,
                                  self.blobs.get, self.codec, self.spec)  # fmt: skip
        v = self.settings.validation
        accepted = refuse_by_evaluation(verdicts, accepted, losses, v.refuse_harmful, v.min_gain_fraction)
        if v.weight_by_score and accepted:
            extra = round_results(round_, losses, {u.miner for u, _ in accepted})
            scores = {e.miner: e.score for e in self.leaderboard(round_ - 1, extra)}
            for u, _ in accepted:
                if scores.get(u.miner, 0.0) <= 0:
                    verdicts[u.miner] = "low_score"
            accepted = reclip([u for u, _ in accepted if verdicts[u.miner] is None])
            if accepted:
                mean = statistics.fmean(scores[u.miner] for u, _ in accepted)
                accepted = [(u, scale * scores[u.miner] / mean) for u, scale in accepted]
        elapsed = time.time() - t0
        self.metrics.evaluation.observe(elapsed)
        log.info(
            "round %d: evaluated %d uploads in %.2f s; gains %s", round_, len(losses), elapsed,
            {m[:12]: round(x.gain, 4) for m, x in losses.items()},
        )  # fmt: skip
        return accepted, losses

    def _build_version(self, cur: Current, accepted: list[tuple[Upload, float]]) -> _Built:
        """The next version from the accepted updates: parameters, published update, checkpoint, loss.
        Writes only content-addressed blobs; nothing is visible until the caller commits."""
        a = self.settings.aggregation
        method = None if a.method == "mean" else a.method
        agg = aggregate_uploads(accepted, self.blobs.get, self.codec, self.spec, method=method,
                                trim_fraction=a.trim_fraction)  # fmt: skip
        delta, outer_buffers = self.outer.step(agg)
        params = {n: p.clone() for n, p in self.params.items()}
        apply_update(params, delta)
        version, param_hash = cur.version + 1, params_hash(params, self.spec)
        header = UpdateHeader(base_version=cur.version, version=version, param_hash=param_hash)
        update = encode_update(delta, self.spec, header)
        ckpt = save_checkpoint(params, {"version": str(version), "param_hash": param_hash})
        outer_sha = self.blobs.put(save_checkpoint(outer_buffers, {})) if outer_buffers else None
        return _Built(
            version=version, params=params, param_hash=param_hash, eval_loss=self.evaluate(params),
            update_sha=self.blobs.put(update), update_bytes=len(update), checkpoint_sha=self.blobs.put(ckpt),
            checkpoint_bytes=len(ckpt), outer_buffers=outer_buffers, outer_sha=outer_sha,
        )  # fmt: skip

    def _prune_checkpoints(self) -> None:
        keep = self.settings.keep_checkpoints
        old = self.store.all(
            "SELECT version, checkpoint_sha FROM versions WHERE checkpoint_sha IS NOT NULL "
            "AND version > 0 ORDER BY version DESC LIMIT -1 OFFSET ?",
            keep,
        )
        for row in old:
            self.store.execute("UPDATE versions SET checkpoint_sha = NULL WHERE version = ?", row["version"])
            self.blobs.delete(row["checkpoint_sha"])

    def evaluate(self, params: dict[str, torch.Tensor]) -> float:
        set_params(self.model, params)
        return evaluate_loss(self.model, self.eval_batch)

    def checkpoint_sha(self, version: int | None = None) -> tuple[int, str] | None:
        if version is None:
            row = self.store.one(
                "SELECT version, checkpoint_sha FROM versions WHERE checkpoint_sha IS NOT NULL "
                "ORDER BY version DESC LIMIT 1"
            )
        else:
            row = self.store.one("SELECT version, checkpoint_sha FROM versions WHERE version = ?", version)
        if row is None or row["checkpoint_sha"] is None:
            return None
        return int(row["version"]), str(row["checkpoint_sha"])

    def update_sha(self, version: int) -> str | None:
        row = self.store.one("SELECT update_sha FROM versions WHERE version = ?", version)
        return None if row is None or row["update_sha"] is None else str(row["update_sha"])

    # -- scores and validators -----------------------------------------------------------------------------
    def leaderboard(
        self, through: int | None = None, extra: dict[str, RoundResult] | None = None
    ) -> list[LeaderboardEntry]:
        """The leaderboard as of round ``through`` (None: the last closed one); kept until scores change."""
        if extra is not None:
            return leaderboard(self.store, self.settings.validation, through, extra)
        key = (self.last_closed_round() if through is None else through, self._scores_changed)
        cached = self._board
        if cached is not None and cached[0] == key:
            return cached[1]
        board = leaderboard(self.store, self.settings.validation, key[0], None)
        self._board = (key, board)
        return board

    def last_closed_round(self) -> int | None:
        return self.current.round - 1 if self.current.round > 0 else None

    def round_record(self, round_: int) -> RoundRecord | None:
        row = self.store.one("SELECT version, status FROM rounds WHERE round = ?", round_)
        if row is None:
            return None
        status = self.current.status if round_ == self.current.round else row["status"]
        subs = self.store.all(
            "SELECT miner, sha256, bytes, status, reason FROM submissions WHERE round = ? "
            "ORDER BY received_at", round_,
        )  # fmt: skip
        return RoundRecord(
            round=round_, version=row["version"], status=status,  # type: ignore[arg-type]
            submissions=[SubmissionRecord(**dict(s)) for s in subs],
        )  # fmt: skip

    def payload_sha(self, round_: int, miner: str) -> str | None:
        """A round's upload, once the round no longer takes uploads (so nobody copies an open round's)."""
        if round_ == self.current.round and self.current.status == "open":
            raise Conflict(
                "round_open", f"round {round_} is still open; its uploads are served once it closes"
            )
        row = self.store.one("SELECT sha256 FROM submissions WHERE round = ? AND miner = ?", round_, miner)
        return None if row is None else str(row["sha256"])

    def record_verdicts(self, validator: str, round_: int, verdicts: list[Verdict]) -> int:
        allowed = self.settings.validation.validators
        if allowed is not None and validator not in {k.lower() for k in allowed}:
            raise Forbidden("not_a_validator", "this coordinator only takes verdicts from its validators")
        if validator == COORDINATOR:
            raise Forbidden("not_a_validator", "that name is reserved")
        row = self.store.one("SELECT status FROM rounds WHERE round = ?", round_)
        if row is None:
            raise NotFound("not_found", f"round {round_} does not exist")
        if row["status"] != "closed":
            raise Conflict("round_open", f"round {round_} has not closed; evaluate closed rounds")
        n = record_verdicts(self.store, round_, validator, verdicts, time.time())
        self._scores_changed += 1
        log.info("round %d: %d verdicts from validator %s", round_, n, validator[:12])
        return n
