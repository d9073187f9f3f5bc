"""A published update with as many values in each chunk as it deserves, for the convergence benchmark: an
estimate of what a sparseloco format with a count per chunk would buy, not a format (nothing is encoded).

The sparseloco downlink keeps the same k values in every chunk, as many where the uploads agree on a few
coordinates as where their union fills the chunk. Here one threshold for the whole model keeps every
value of ``u = delta + ef_beta * e`` larger than it, so a chunk keeps what it holds above it (none, or
all); the threshold is the lowest whose bytes fit what the fixed-k format's tensors take at the same
``[publish]`` settings (``Downlink``), so that both publish the same bytes. Values are quantised to ``bits``
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

from coordinator.publishing.publisher import Downlink
from coordinator.settings import PublishSettings
from protocol.codec import Codec
from protocol.codec.chunks import Layout
from protocol.codec.quantize import quantize
from protocol.codec.sparseloco import _ef_params
from protocol.params import Params, compress_update
from protocol.payload import ParamSpec, framed_bytes

COUNT_BYTES = 2  # a chunk's count of kept values (0 .. 4096)


def chunk_bytes(chunk: int, bits: int) -> torch.Tensor:
    """Bytes of a chunk by its count of kept values (0 .. ``chunk``): Elias-Fano low bits and upper bitmap
    as the codec sizes them (``_ef_params``), ``bits`` per value, each part in whole bytes, and the count
    (0 values: the count alone)."""
    sizes = [0]
    for k in range(1, chunk + 1):
        low, high = _ef_params(chunk, k)
        sizes.append(-(-k * low // 8) + -(-high // 8) + -(-k * bits // 8))
    return torch.tensor(sizes, dtype=torch.float64) + COUNT_BYTES


class WaterFilledDownlink:
    """``Downlink.step``'s interface (coordinator/publishing/publisher.py) over the estimate above, at the
    bytes of the fixed-k downlink that ``settings`` make."""

    def __init__(self, settings: PublishSettings, upload: Codec, spec: ParamSpec) -> None:
        fixed_k = Downlink(settings, upload, spec).compressor
        if fixed_k is None:
            raise ValueError("a count per chunk is an estimate for the sparseloco format")
        self.spec, self.tile, self.bits, self.beta = spec, fixed_k.tile, fixed_k.bits, settings.ef_beta
        self.geometry = fixed_k  # which tensors go dense
        self.budget_bytes = fixed_k.max_payload_bytes(spec) - framed_bytes(0)
        zeros = {n: torch.zeros(s) for n, s in spec}
        self.frame_bytes = len(compress_update(fixed_k, zeros, spec)) - self.budget_bytes  # reported beside
        self.sizes = chunk_bytes(self.tile * self.tile, self.bits)
        self.residual: dict[str, torch.Tensor] = {}

    def step(self, delta: Mapping[str, torch.Tensor]) -> tuple[bytes, Params, dict[str, torch.Tensor]]:
        residual = self.residual
        u = {n: d + self.beta * residual[n] if n in residual else d.clone() for n, d in delta.items()}
        dense = [n for n, s in self.spec if self.geometry.is_dense(tuple(s))]
        sparse = [(n, Layout(tuple(s), self.tile)) for n, s in self.spec if n not in dense]
        fixed = sum(2.0 * u[n].numel() for n in dense) + 4 * (1 << self.bits) * len(sparse)
        mags = [lay.abs_chunks(u[n].float()) for n, lay in sparse]
        order = torch.cat([m.reshape(-1) for m in mags]).sort(descending=True).values

        def threshold(kept: int) -> torch.Tensor:
            return order[kept - 1] if kept else torch.tensor(float("inf"))

        def size(kept: int) -> float:
            t = threshold(kept)
            return fixed + sum(float(self.sizes[(m >= t).sum(dim=1)].sum()) for m in mags)

        lo, hi, fits = 0, int((order > 0).sum()), size(0)
        while lo < hi:  # the most values whose bytes fit
            mid = (lo + hi + 1) // 2
            if (need := size(mid)) <= self.budget_bytes:
                lo, fits = mid, need
            else:
                hi = mid - 1
        applied: Params = {n: u[n].half().float() for n in dense}
        for (n, lay), m in zip(sparse, mags, strict=True):
            keep = m >= threshold(lo)
            chunks = lay.to_chunks(u[n].float())
            out = torch.zeros_like(chunks)
            if bool(keep.any()):
                lut, codes = quantize(chunks[keep], bits=self.bits)
                out[keep] = lut[codes]
            applied[n] = lay.from_chunks(out)
        return bytes(math.ceil(fits) + self.frame_bytes), applied, {n: u[n] - applied[n] for n in u}
