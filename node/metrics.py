"""A miner's Prometheus metrics, served on request (``--metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class MinerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("gradpool_miner_rounds", "Rounds whose upload the coordinator took", registry=r)
        self.abandoned = Counter(
            "gradpool_miner_rounds_abandoned", "Rounds given up (closed, stale)", registry=r
        )
        self.version = Gauge("gradpool_miner_version", "Model version the miner stands on", registry=r)
        self.loss = Gauge(
            "gradpool_miner_inner_loss", "Training loss after the last round's inner steps", registry=r
        )
        self.compute = Counter("gradpool_miner_compute_seconds", "Time spent in inner steps", registry=r)
        self.uploaded = Counter("gradpool_miner_uploaded_bytes", "Bytes uploaded since start", registry=r)
        self.downloaded = Counter(
            "gradpool_miner_downloaded_bytes", "Bytes downloaded since start", registry=r
        )
        self.merged = Counter(
            "gradpool_miner_versions_merged",
            "Overlapped rounds: versions published mid-round and merged into the training",
            registry=r,
        )
        self.untrusted = Counter(
            "gradpool_miner_untrusted_answers",
            "Answers of the coordinator refused: not backed by its pinned key and signed history",
            ["what"],
            registry=r,
        )
        self._counted = (0, 0)

    def count_transfers(self, up: int, down: int) -> None:
        """Bring the byte counters to the client's running totals."""
        self.uploaded.inc(up - self._counted[0])
        self.downloaded.inc(down - self._counted[1])
        self._counted = (up, down)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve on ``port`` (0: a free one); the port it listens on."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = server.server_port
        return bound
