"""A published update with as many values in each chunk as it deserves, for the convergence benchmark: an
estimate of what a sparseloco format with a count per chunk would buy, not a format (nothing is encoded).

The sparseloco downlink keeps the same k values in every chunk, as many where the uploads agree on a few
coordinates as where their union fills the chunk. Here one threshold for the whole model keeps every
value of ``u = delta + ef_beta * e`` larger than it, so a chunk keeps what it holds above it (none, or
all); the threshold is the lowest whose bytes fit what the fixed-k format's tensors take at the same
``[publish] budget`` (``budget_k``), so that both publish the same bytes. Values are quantised to ``bits``
per tensor exactly as the codec does (``protocol/codec/quantize.py``), and what is left out goes to the
residual. The bytes are counted as a byte-aligned format would lay them out: per chunk, the codec's
Elias-Fano low bits and upper bitmap at that chunk's count and its ``bits``-bit values, each rounded up
to whole bytes as the codec rounds them, and a 2-byte count; a table per tensor; tensors the codec sends
dense go dense in fp16. The bytes reported add the fixed-k format's frame (names, offsets, header).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from coordinator.publishing.publisher import budget_k
from protocol.codec import Codec, SparseLoCoCodec
from protocol.codec.chunks import Layout
from protocol.codec.quantize import quantize
from protocol.params import Params, compress_update
from protocol.payload import ParamSpec, framed_bytes

COUNT_BYTES = 2  # a chunk's count of kept values (0 .. 4096)


def chunk_bytes(counts: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Bytes per chunk for ``counts`` values below ``chunk``: Elias-Fano low bits and upper bitmap (as
    ``protocol/codec/sparseloco.py`` sizes them), ``bits`` per value, each part in whole bytes, and the
    count (0 values: the count alone)."""
    k = counts.clamp_min(1).double()
    low = torch.floor(torch.log2(chunk / k)).clamp_min(0)
    upper = k + torch.floor((chunk - 1) / torch.pow(2.0, low)) + 1
    parts = torch.ceil(k * low / 8) + torch.ceil(upper / 8) + torch.ceil(k * bits / 8)
    return torch.where(counts > 0, parts, torch.zeros_like(parts)) + COUNT_BYTES


class WaterFilledDownlink:
    """``Downlink.step``'s interface (coordinator/publishing/publisher.py) over the estimate above."""

    def __init__(
        self,
        budget: float,
        upload: Codec,
        spec: ParamSpec,
        tile: int = 64,
        bits: int = 2,
        ef_beta: float = 0.95,
    ) -> None:
        self.spec, self.tile, self.bits, self.beta = spec, tile, bits, ef_beta
        self.geometry = SparseLoCoCodec(64, tile, bits)  # which tensors go dense
        fixed_k = SparseLoCoCodec(budget_k(budget, upload, spec, tile, bits), tile, bits)  # at this budget
        self.budget_bytes = fixed_k.max_payload_bytes(spec) - framed_bytes(0)
        zeros = {n: torch.zeros(s) for n, s in spec}
        self.frame_bytes = len(compress_update(fixed_k, zeros, spec)) - self.budget_bytes  # reported beside
        self.residual: dict[str, torch.Tensor] = {}

    def step(self, delta: Mapping[str, torch.Tensor]) -> tuple[bytes, Params, dict[str, torch.Tensor]]:
        residual = self.residual
        u = {n: d + self.beta * residual[n] if n in residual else d.clone() for n, d in delta.items()}
        dense = [n for n, s in self.spec if self.geometry.is_dense(tuple(s))]
        sparse = [(n, Layout(tuple(s), self.tile)) for n, s in self.spec if n not in dense]
        fixed = sum(2.0 * u[n].numel() for n in dense) + 4 * (1 << self.bits) * len(sparse)
        mags = [lay.abs_chunks(u[n].float()) for n, lay in sparse]
        every = torch.cat([m.reshape(-1) for m in mags])
        order = every.sort(descending=True).values

        def size(kept: int) -> float:
            threshold = order[kept - 1] if kept else torch.tensor(float("inf"))
            total = fixed
            for m in mags:
                counts = (m >= threshold).sum(dim=1)
                total += float(chunk_bytes(counts, m.shape[1], self.bits).sum())
            return total

        lo, hi = 0, int((order > 0).sum())
        while lo < hi:  # the most values whose bytes fit
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid) <= self.budget_bytes else (lo, mid - 1)
        threshold = order[lo - 1] if lo else torch.tensor(float("inf"))
        applied: Params = {}
        for n, shape in self.spec:
            if self.geometry.is_dense(tuple(shape)):
                applied[n] = u[n].half().float()
        for (n, lay), m in zip(sparse, mags, strict=True):
            keep = m >= threshold
            chunks = lay.to_chunks(u[n].float())
            out = torch.zeros_like(chunks)
            if bool(keep.any()):
                lut, codes = quantize(chunks[keep], bits=self.bits)
                out[keep] = lut[codes]
            applied[n] = lay.from_chunks(out)
        return bytes(math.ceil(size(lo)) + self.frame_bytes), applied, {n: u[n] - applied[n] for n in u}
