"""Prometheus metrics of one coordinator (a registry per run, so tests can build many)."""

from __future__ import annotations

import math
from dataclasses import astuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.storage.records import HEALTH_FIELDS, RoundClose


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("gradpool_rounds", "Rounds closed", registry=r)
        self.submissions = Counter(
            "gradpool_submissions", "Uploads judged at aggregation", ["status", "reason"], registry=r
        )
        self.refusals = Counter(
            "gradpool_refusals", "Requests refused with a 4xx, by error code", ["code"], registry=r
        )
        self.bytes_in = Counter("gradpool_uploaded_bytes", "Payload bytes taken at intake", registry=r)
        self.checked_elsewhere = Counter(
            "gradpool_replica_checked_uploads",
            "Uploads recorded from the check of the replica their commit reached, the payload unread here",
            registry=r,
        )
        self.passed_batches = Counter(
            "gradpool_passed_commit_batches", "Batches of commits a standby checked and passed on", registry=r
        )
        self.passed_commits = Counter(
            "gradpool_passed_commits", "Commits a standby checked and passed on in a batch", registry=r
        )
        self.bytes_out = Counter(
            "gradpool_served_bytes",
            "Bytes served, by kind: model (updates, checkpoints, uploads) or data",
            ["kind"],
            registry=r,
        )
        self.miners = Gauge("gradpool_miners", "Registered miners", registry=r)
        self.uploads = Gauge("gradpool_round_uploads", "Uploads taken in the open round", registry=r)
        self.aggregation = Histogram(
            "gradpool_aggregation_seconds",
            "Time to judge, aggregate, publish and evaluate a round",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.evaluation = Histogram(
            "gradpool_evaluation_seconds",
            "Time to evaluate a round's uploads (loss before and after)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.scoring = Histogram(
            "gradpool_scoring_seconds",
            "Overlapped rounds: time to evaluate a round's uploads once its version is published",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.tasks = Counter(
            "gradpool_validator_tasks",
            "[validation] assign: uploads assigned to validators, settled, by validator and outcome "
            "(agreed, outvoted, missed, undecided)",
            ["validator", "outcome"],
            registry=r,
        )
        self.eval_loss = Gauge("gradpool_eval_loss", "Held-out loss of the latest version", registry=r)
        self.version = Gauge("gradpool_version", "Latest published model version", registry=r)
        self.round = Gauge("gradpool_round", "The open round", registry=r)
        self.stalled_rounds = Gauge(
            "gradpool_stalled_rounds",
            "Closed rounds in a row whose versions did not lower the held-out loss",
            registry=r,
        )
        self.redirects = Counter(
            "gradpool_download_redirects",
            "Downloads answered with a redirect to the object store",
            registry=r,
        )
        self.health = Gauge(
            "gradpool_training_health",
            "Training health of the last closed round's accepted uploads, as their miners report it: "
            "grad_norm_mean, grad_norm_max (before clipping), clipped_fraction, lr",
            ["stat"],
            registry=r,
        )
        self.rounds_failed = Counter(
            "gradpool_rounds_failed",
            "Rounds closed without a version because closing failed",
            ["reason"],
            registry=r,
        )

    def round_closed(
        self, close: RoundClose, seconds: float, open_round: int, uploads: int, version: int
    ) -> None:
        self.rounds.inc()
        self.aggregation.observe(seconds)
        for o in close.outcomes.values():
            self.submissions.labels("accepted" if o.reason is None else "rejected", o.reason or "").inc()
        if close.version is not None:
            self.eval_loss.set(close.version.eval_loss)
        for name, value in zip(HEALTH_FIELDS, astuple(close.health), strict=True):
            self.health.labels(name).set(math.nan if value is None else value)  # NaN: not reported
        self.round.set(open_round)
        self.uploads.set(uploads)
        self.version.set(version)

    def render(self) -> bytes:
        return generate_latest(self.registry)
