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
            "gradpool_miner_loss", "Training loss after the last round's inner steps", registry=r
        )
        self.compute = Counter("gradpool_miner_compute_seconds", "Time spent in inner steps", registry=r)
        self.bytes_up = Gauge("gradpool_miner_bytes_up", "Bytes uploaded since start", registry=r)
        self.bytes_down = Gauge("gradpool_miner_bytes_down", "Bytes downloaded since start", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve on ``port`` (0: a free one); the port it listens on."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = server.server_port
        return bound
