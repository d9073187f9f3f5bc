"""A published update with as many values in each chunk as it deserves, for the convergence benchmark: an
estimate of what a sparseloco format with a count per chunk would buy, not a format (nothing is encoded).

The sparseloco downlink keeps the same k values in every chunk, as many where the uploads agree on a few
coordinates as where their union fills the chunk. Here one threshold for the whole model keeps every
value of ``u = delta + ef_beta * e`` larger than it, so a chunk keeps what it holds above it (none, or
all); the threshold is the lowest whose estimated bytes fit ``budget`` uploads. Values are quantised to
``bits`` per tensor exactly as the codec does (``protocol/codec/quantize.py``), and what is left out goes
to the residual. The bytes are the codec's Elias-Fano indices at each chunk's own count, ``bits`` per
value, a 12-bit count per chunk and a table per tensor; tensors the codec sends dense in fp16 go dense.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from protocol.codec import Codec, SparseLoCoCodec
from protocol.codec.chunks import Layout
from protocol.codec.quantize import quantize
from protocol.params import Params
from protocol.payload import ParamSpec, framed_bytes

COUNT_BITS = 12  # a chunk's count of kept values (0 .. 4096)


def index_bits(counts: torch.Tensor, chunk: int) -> torch.Tensor:
    """Elias-Fano bits for ``counts`` sorted indices below ``chunk``, per chunk (0 for none)."""
    k = counts.clamp_min(1).double()
    low = torch.floor(torch.log2(chunk / k)).clamp_min(0)
    bits = k * low + k + torch.floor((chunk - 1) / torch.pow(2.0, low)) + 1
    return torch.where(counts > 0, bits, torch.zeros_like(bits))


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
        self.budget_bytes = budget * (upload.max_payload_bytes(spec) - framed_bytes(0))
        self.residual: dict[str, torch.Tensor] = {}

    def step(self, delta: Mapping[str, torch.Tensor]) -> tuple[bytes, Params, dict[str, torch.Tensor]]:
        residual = self.residual
        u = {n: d + self.beta * residual[n] if n in residual else d.clone() for n, d in delta.items()}
        dense = [n for n, s in self.spec if self.geometry.is_dense(tuple(s))]
        sparse = [(n, Layout(tuple(s), self.tile)) for n, s in self.spec if n not in dense]
        fixed = sum(2.0 * u[n].numel() for n in dense) + 4 * (1 << self.bits) * len(sparse)
        fixed += sum(COUNT_BITS * lay.rows for _, lay in sparse) / 8
        mags = [lay.abs_chunks(u[n].float()) for n, lay in sparse]
        every = torch.cat([m.reshape(-1) for m in mags])
        order = every.sort(descending=True).values

        def size(kept: int) -> float:
            if kept == 0:
                return fixed
            threshold = order[kept - 1]
            total = fixed
            for m in mags:
                counts = (m >= threshold).sum(dim=1)
                total += float((index_bits(counts, m.shape[1]) + self.bits * counts.double()).sum()) / 8
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
        return bytes(int(size(lo))), applied, {n: u[n] - applied[n] for n in u}
