"""A run: builds the coordinator's parts from its settings, starts a new run or resumes one from its state
directory, and hands the parts to the HTTP layer.

    Run ─┬─ Intake   identities, registrations, uploads      (intake threads)
         ├─ Closer   judging, aggregating, publishing         (its own thread)
         └─ Queries  everything the API reads                 (the event loop)
    over a Store (SQLite or PostgreSQL), a BlobStore, and one RoundCell (coordinator/rounds/state.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from coordinator.data.corpus import build_dataset
from coordinator.data.tokenizer import RunTokenizer
from coordinator.describe import check_fingerprint, keep_for_export, run_info
from coordinator.errors import Conflict
from coordinator.hooks import Clock, Hooks
from coordinator.metrics import Metrics
from coordinator.publishing.history import History, coordinator_key
from coordinator.publishing.model import Model
from coordinator.publishing.outer import OuterOptimizer
from coordinator.publishing.publisher import Downlink, Publisher
from coordinator.rounds.admission import Admission
from coordinator.rounds.checks import Check, default_pipeline
from coordinator.rounds.closer import Closer
from coordinator.rounds.direct import DirectUploads, bucket_threads, checker_id, payload_cap
from coordinator.rounds.intake import Intake, IntakeSettings
from coordinator.rounds.judging import Judge
from coordinator.rounds.modes import RoundMode, mode_for
from coordinator.rounds.opening import RoundOpener, deadline_for
from coordinator.rounds.queries import Queries
from coordinator.rounds.reading import Evaluations, UploadReader
from coordinator.rounds.scoring import Scores
from coordinator.rounds.sharing import Sharing
from coordinator.rounds.state import Downloads, RoundCell, RoundState
from coordinator.settings import CoordinatorSettings
from coordinator.storage.base import Store
from coordinator.storage.blob_stores import make_blob_store
from coordinator.storage.blobs import BlobStore, FileBlobStore, kept_checkpoint
from coordinator.storage.lease import LeaderLease, holder_name
from coordinator.storage.lineage import Lineage
from coordinator.storage.lock import StateLock
from coordinator.storage.s3 import S3BlobStore
from coordinator.storage.sql import embedded
from coordinator.storage.store import STARTING_PATIENCE_S, open_store
from protocol.codec import ParamSpec, make_codec
from protocol.data import Dataset, eval_ids
from protocol.device import autocast_dtype, pick_device
from protocol.model import CausalLM, build_model, resolve
from protocol.params import get_params, param_spec, params_hash, write_checkpoint

log = logging.getLogger(__name__)


class Run:
    def __init__(
        self,
        settings: CoordinatorSettings,
        checks: Sequence[Check] | None = None,
        hooks: Hooks | None = None,
        clock: Clock | Callable[[], float] = time.time,
        mode: RoundMode | None = None,
    ) -> None:
        """``checks``, ``hooks``, ``clock`` and ``mode`` replace the defaults (the pipeline the settings
        make, no hooks, the system clock, the round mode ``[rounds] overlap`` names)."""
        self.settings = settings
        self.device = pick_device(settings.device)  # before anything is made: a missing GPU makes nothing
        root, url = settings.state_dir, settings.store_url()
        root.mkdir(parents=True, exist_ok=True)
        self.lock = StateLock(root)
        try:
            self.store: Store = open_store(root, url, STARTING_PATIENCE_S)  # PostgreSQL may be restarting
        except BaseException:
            self.lock.release()
            raise
        # the embedded store's file is this process's alone (the state directory's lock): no waiting
        name, lease_s = holder_name(settings.cluster.name), settings.cluster.lease_s
        self.lease = LeaderLease(self.store, name, lease_s, force=embedded(url))
        try:
            self.lease.acquire()  # and renewed from then on: building the run may take longer than the lease
            self.tokenizer = RunTokenizer(settings.data.tokenizer)
            check_fingerprint(self.store, settings, self.tokenizer)
            self._build(
                settings, checks, hooks or Hooks(), clock if isinstance(clock, Clock) else Clock(clock), mode
            )
        except BaseException:
            self.lease.release()
            self.store.close()
            self.lock.release()
            raise

    def _build(
        self,
        settings: CoordinatorSettings,
        checks: Sequence[Check] | None,
        hooks: Hooks,
        clock: Clock,
        mode: RoundMode | None,
    ) -> None:
        root = settings.state_dir
        blobs = make_blob_store(settings.blobs, root / "blobs")
        if isinstance(blobs, FileBlobStore) and (stale := blobs.clear_temporaries()):
            log.info("removed %d temporary files left by writes cut short", stale)
        architecture = resolve(settings.model, self.tokenizer.vocab_size)
        module = build_model(architecture, seed=settings.seed).to(self.device)  # evaluation's copy
        module.eval()
        spec = param_spec(module)
        d = settings.data
        self.data_meta = build_dataset(
            root / "data",
            d.corpus,
            seq_len=architecture.block_size,
            tokenizer=self.tokenizer,
            max_tokens=d.max_tokens,
            eval_every=d.eval_every,
        )
        keep_for_export(root, self.store, architecture, self.tokenizer)
        dataset = Dataset(root / "data")
        codec = make_codec(settings.codec.name, settings.codec.k, settings.codec.tile)
        downlink = Downlink(settings.publish, codec, spec)  # a [publish] budget no k fits: an error here
        self.max_payload_bytes = payload_cap(settings, codec, spec)
        self.info = run_info(settings, architecture, self.tokenizer, self.data_meta, self.max_payload_bytes)
        self.history = History(
            coordinator_key(settings.identity_key(), self.store), settings.run_id, self.store
        )
        self.info = self.history.signed_info(self.info)
        v = settings.validation
        held_out = dataset.sequences(eval_ids(self.data_meta, d.eval_sequences))
        self.model = Model(module, {}, held_out, v.batch_size, autocast_dtype(self.device, v.precision))
        outer = OuterOptimizer(settings.outer_lr(), settings.outer_momentum())
        self.metrics = Metrics()
        publisher = Publisher(
            codec,
            spec,
            blobs,
            outer,
            downlink,
            settings.aggregation,
            self.model.held_out_loss,
            settings.checks.max_loss_increase,
            checkpoint_every=settings.publish.checkpoint_every,
        )
        self.lineage = Lineage(self.store, blobs, spec, settings.max_catchup_versions)
        state = self._resume_or_start(blobs, module, spec, publisher, clock.now)
        self.history.backfill()
        self.blobs, self.dataset, self.codec, self.spec, self.publisher = (
            blobs,
            dataset,
            codec,
            spec,
            publisher,
        )
        self.vocab = architecture.vocab
        self.cell = RoundCell(state)
        self.scores = Scores(self.store, settings.validation)
        self.downloads = Downloads()
        stop = threading.Event()  # the closer's: the judging and the sharing stop with it
        self.sharing = Sharing(self.store, v, clock, stop, self.metrics) if v.assign else None
        self.closer = self._closer(settings, checks, hooks, clock, mode, stop)
        self.intake = Intake(
            self.cell,
            self.store,
            blobs,
            codec,
            spec,
            self.scores,
            self.metrics,
            IntakeSettings.of(settings),
            Admission(settings),
            hooks,
            clock.now,
            self.sharing,
        )
        self.direct: DirectUploads | None = None  # [blobs] direct_uploads: the payloads go to the bucket
        if settings.blobs.direct_uploads:
            assert isinstance(blobs, S3BlobStore), "the settings hold direct uploads to the s3 backend"
            expiry = settings.blobs.redirect_expiry_s
            checker = checker_id(settings.codec, self.max_payload_bytes, spec)  # as the replicas check
            self.direct = DirectUploads(
                blobs, self.intake, self.max_payload_bytes, expiry, clock.now, checker
            )
        self.queries = Queries(self.cell, self.store, self.history, clock.now)
        # Intake decodes off the event loop in a pool as wide as the machine: more threads than cores only
        # trade places on the interpreter lock, unless they wait on a bucket's answers.
        threads = bucket_threads() if isinstance(blobs, S3BlobStore) else os.cpu_count() or 1
        self.intake_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="intake")
        self.metrics.round.set(state.round)
        self.metrics.version.set(state.version)
        self.metrics.miners.set(self.store.count_miners())
        self.metrics.uploads.set(len(state.uploaded))
        if (loss := self.store.eval_loss(state.version)) is not None:
            self.metrics.eval_loss.set(loss)

    def _closer(
        self,
        settings: CoordinatorSettings,
        checks: Sequence[Check] | None,
        hooks: Hooks,
        clock: Clock,
        mode: RoundMode | None,
        stop: threading.Event,
    ) -> Closer:
        """The closer and the judging it runs, over the parts ``_build`` made."""
        v = settings.validation
        reader = UploadReader(self.blobs, hooks, self.codec, self.spec)
        pipeline = default_pipeline(settings.checks, v) if checks is None else checks
        judge = Judge(
            self.store,
            self.blobs,
            reader,
            self.codec,
            self.spec,
            Evaluations(self.model, self.dataset, self.info),
            self.scores,
            self.metrics,
            settings.checks,
            v,
            pipeline,
            stop,
            self.lineage,
            self.sharing,
        )
        return Closer(
            self.cell,
            self.store,
            self.blobs,
            mode_for(settings.rounds.overlap, v.assign) if mode is None else mode,
            RoundOpener(self.cell, self.store, settings.rounds, clock.now),
            judge,
            self.publisher,
            self.history,
            self.model,
            reader,
            self.scores,
            self.metrics,
            self.downloads,
            settings.rounds,
            settings.keep_checkpoints,
            hooks,
            clock,
            stop,
        )

    def _resume_or_start(
        self,
        blobs: BlobStore,
        module: CausalLM,
        spec: ParamSpec,
        publisher: Publisher,
        clock: Callable[[], float],
    ) -> RoundState:
        """Version 0 and round 0 of a new run; or the open round of a resumed one, with its deadline
        counting from now (a restart gives the round its time back)."""
        store, rounds, now = self.store, self.settings.rounds, clock()
        if store.latest_round() is None:
            params = {n: t.cpu() for n, t in get_params(module).items()}  # canonical: fp32 on the CPU
            h = params_hash(params, spec)
            loss = self.model.held_out_loss(params)
            ckpt_sha, ckpt_bytes = blobs.put_written(
                functools.partial(write_checkpoint, params, {"version": "0", "param_hash": h})
            )
            store.start(h, loss, ckpt_sha, ckpt_bytes, now, self.history.first(h, ckpt_sha, now))
            log.info(
                "run %s started: model %s, version 0, held-out loss %.4f",
                self.info.run_id,
                self.settings.model,
                loss,
            )
            self.model.params = params
            return RoundState(0, 0, h, clock_from=now, deadline_s=deadline_for(store, rounds, 0))
        version, param_hash = store.head()
        row = store.version(version)
        if row is None:
            raise ValueError(f"version {version}, the current one, is not in the store")
        # its checkpoint, or the newest before it and the published updates since (checkpoint_every)
        params = self.lineage.params_at(version)
        legacy = store.get_meta("outer_state") if version == store.latest_version() else None
        if state_sha := row.state_sha or legacy:
            publisher.restore(kept_checkpoint(blobs, state_sha))  # read tensor by tensor, as checkpoints
        self.model.params = params
        *behind, current = store.unclosed_rounds()  # overlapped rounds: one may be behind the open one
        log.info("run %s resumed at round %d, version %d", self.info.run_id, current.round, version)
        state = None
        for r in [*behind, current]:
            round_ = r.round
            base = store.version(r.version)
            assert base is not None  # a round's version exists
            state = RoundState(
                round=round_,
                version=r.version,
                param_hash=base.param_hash,
                status="open" if r is current else "aggregating",
                uploaded=frozenset(store.uploaded_miners(round_)),
                expected=frozenset(store.active_miners(round_ - rounds.drop_after_rounds)),
                first_upload_at=r.first_upload_at,
                clock_from=now,
                deadline_s=deadline_for(store, rounds, round_),
                behind=state,
                newest=None if r is not current or behind else version,
                newest_hash=None if r is not current or behind else param_hash,
            )
        assert state is not None
        return state

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.closer.start()

    def close(self) -> None:
        """Stop the closer (a round it is closing stays open), then the intake threads, then the store."""
        self.closer.stop()
        self.intake_pool.shutdown(wait=True)
        model, data = self.downloads.take()
        if (model or data) and not self.lease.lost.is_set():
            self.store.add_bytes_down(self.cell.state.round, model, data)
        self.lease.release()
        self.store.close()
        self.lock.release()

    def request_close(self) -> int:
        """Close the open round as soon as it has an upload (operator's command); returns its number."""
        state = self.cell.state
        if not state.uploaded:
            raise Conflict("nothing_to_aggregate", f"round {state.round} has no uploads yet")
        self.cell.update(force_close=True)
        return state.round

    def count_download(self, nbytes: int, kind: str = "model") -> None:
        self.downloads.add(nbytes, kind)
        self.metrics.bytes_out.labels(kind).inc(nbytes)
