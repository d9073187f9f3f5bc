"""Update codecs, one interface (``Codec``): what a miner sends, what the coordinator checks at intake,
and how aggregation reads it back.

- ``sparseloco``: top-k per chunk, 2-bit values, Elias-Fano indices (``protocol.codec.sparseloco``), ~205x
  smaller than fp32;
- ``dense_fp32`` / ``dense_bf16``: every element (the DiLoCo baseline);
- ``int8``: every element with an absmax scale per 4096 elements.

A new codec is one class with this interface and one line in ``CODECS``. Payload framing lives in
``protocol.payload``; this module is the public surface of both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import torch

from protocol.codec.accumulate import Accumulator, FlatAccumulator
from protocol.codec.chunks import Layout
from protocol.codec.measure import sketch, update_norm
from protocol.codec.quantize import quantize_2bit
from protocol.codec.sparseloco import SparseLoCoCodec
from protocol.errors import CodecError
from protocol.payload import (
    CODEC_NAMES,
    PAYLOAD_FORMAT_VERSION,
    CodecName,
    Examined,
    ParamSpec,
    PayloadHeader,
    PayloadStats,
    SparseTensor,
    content_digest,
    expect_len,
    frame,
    framed_bytes,
    unframe,
)

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "PAYLOAD_FORMAT_VERSION",
    "Codec",
    "CodecError",
    "CodecName",
    "DenseCodec",
    "Examined",
    "Int8Codec",
    "Layout",
    "ParamSpec",
    "PayloadHeader",
    "PayloadStats",
    "SparseLoCoCodec",
    "SparseTensor",
    "content_digest",
    "make_codec",
    "quantize_2bit",
]


class Codec(Protocol):
    """What every codec provides. ``outer_lr`` and ``outer_momentum`` are the outer optimizer's defaults for
    its updates (SGD for SparseLoCo, Nesterov for the dense DiLoCo baseline)."""

    name: CodecName
    outer_lr: float
    outer_momentum: float

    def encode(
        self, tensors: Mapping[str, torch.Tensor], spec: ParamSpec, header: PayloadHeader
    ) -> tuple[bytes, dict[str, SparseTensor]]:
        """The payload, and exactly what the receiver will decode from it (for error feedback)."""
        ...

    def decode(self, data: bytes, spec: ParamSpec) -> tuple[PayloadHeader, dict[str, SparseTensor]]:
        """Payload -> header and, per parameter, the indices and values it carries (CodecError if it is
        malformed: hostile input)."""
        ...

    def examine(self, data: bytes, spec: ParamSpec, unpack: bool = True) -> Examined:
        """One decode for intake: the checks, the norm, the sketch and the form aggregation reads back
        (``unpack=False``: not made, ``b""``, where it would not be kept; the payload itself for codecs
        whose stored form it is)."""
        ...

    def unpack(self, data: bytes, spec: ParamSpec) -> bytes:
        """The form aggregation reads back (``Examined.stored``) alone, for a payload whose form was not
        kept (CodecError if it is malformed)."""
        ...

    def accumulator(self, spec: ParamSpec, max_contributors: int = 255) -> Accumulator:
        """A running sum and count over examined payloads (``Examined.stored``)."""
        ...

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        """The size of the largest valid payload for this model: the upload cap."""
        ...


class _Decoding:
    """``examine`` and ``accumulator`` for codecs whose stored form is the payload itself."""

    def decode(self, data: bytes, spec: ParamSpec) -> tuple[PayloadHeader, dict[str, SparseTensor]]:
        raise NotImplementedError

    def examine(self, data: bytes, spec: ParamSpec, unpack: bool = True) -> Examined:
        header, update = self.decode(data, spec)
        return Examined(header, content_digest(data), update_norm(update), sketch(update, spec), data)

    def unpack(self, data: bytes, spec: ParamSpec) -> bytes:
        return data

    def accumulator(self, spec: ParamSpec, max_contributors: int = 255) -> Accumulator:
        return FlatAccumulator(
            spec, max_contributors=max_contributors, decode=lambda data: self.decode(data, spec)[1]
        )


class DenseCodec(_Decoding):
    """Every element, in fp32 or bf16: the DiLoCo baseline through the same interface."""

    outer_lr, outer_momentum = 0.7, 0.9  # Nesterov, as DiLoCo

    def __init__(self, dtype: Literal["fp32", "bf16"] = "fp32") -> None:
        self.name: CodecName = "dense_fp32" if dtype == "fp32" else "dense_bf16"
        self.dtype = torch.float32 if dtype == "fp32" else torch.bfloat16

    def encode(
        self, tensors: Mapping[str, torch.Tensor], spec: ParamSpec, header: PayloadHeader
    ) -> tuple[bytes, dict[str, SparseTensor]]:
        parts = [tensors[n].detach().reshape(-1).to(self.dtype, copy=True) for n, _ in spec]
        flat = torch.cat(parts).cpu()
        decoded = {n: SparseTensor(None, p.float()) for (n, _), p in zip(spec, parts, strict=True)}
        header = header.model_copy(update={"codec": self.name, "k": 0, "tile": 0})
        return frame({"dense": flat}, header), decoded

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        return framed_bytes(sum(math.prod(s) for _, s in spec) * self.dtype.itemsize)

    def decode(self, data: bytes, spec: ParamSpec) -> tuple[PayloadHeader, dict[str, SparseTensor]]:
        header, tensors = unframe(data, {"dense": self.dtype})
        if header.codec != self.name:
            raise CodecError(f"payload is {header.codec}; this run expects {self.name}", code="wrong_codec")
        total = sum(math.prod(s) for _, s in spec)
        expect_len(tensors, "dense", (total,))
        flat = tensors["dense"].float()
        if not torch.isfinite(flat).all():
            raise CodecError("dense values hold NaN or Inf", code="non_finite")
        out, o = {}, 0
        for name, shape in spec:
            n = math.prod(shape)
            out[name] = SparseTensor(None, flat[o : o + n])
            o += n
        return header, out


class Int8Codec(_Decoding):
    """Every element as int8 with one fp32 absmax scale per chunk of ``tile**2`` elements (4x smaller)."""

    name: CodecName = "int8"
    outer_lr, outer_momentum = 0.7, 0.9

    def __init__(self, tile: int = 64) -> None:
        self.chunk = tile * tile

    def _chunks(self, numel: int) -> int:
        return -(-numel // self.chunk)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        sizes = [math.prod(s) for _, s in spec]
        return framed_bytes(sum(sizes) + 4 * sum(self._chunks(n) for n in sizes))

    def encode(
        self, tensors: Mapping[str, torch.Tensor], spec: ParamSpec, header: PayloadHeader
    ) -> tuple[bytes, dict[str, SparseTensor]]:
        qs, scales, decoded = [], [], {}
        for name, _ in spec:
            flat = tensors[name].detach().float().reshape(-1)
            n = flat.numel()
            padded = torch.nn.functional.pad(flat, (0, self._chunks(n) * self.chunk - n))
            rows = padded.view(-1, self.chunk)
            scale = rows.abs().amax(dim=1) / 127.0  # (chunks,)
            q = torch.round(rows / scale.clamp_min(1e-30).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            qs.append(q.reshape(-1)[:n].cpu())
            scales.append(scale.cpu())
            decoded[name] = SparseTensor(None, (q.float() * scale.unsqueeze(1)).reshape(-1)[:n])
        header = header.model_copy(update={"codec": self.name, "k": 0, "tile": 0})
        return frame({"q": torch.cat(qs), "scale": torch.cat(scales)}, header), decoded

    def decode(self, data: bytes, spec: ParamSpec) -> tuple[PayloadHeader, dict[str, SparseTensor]]:
        header, tensors = unframe(data, {"q": torch.int8, "scale": torch.float32})
        if header.codec != self.name:
            raise CodecError(f"payload is {header.codec}; this run expects {self.name}", code="wrong_codec")
        sizes = [math.prod(s) for _, s in spec]
        expect_len(tensors, "q", (sum(sizes),))
        expect_len(tensors, "scale", (sum(self._chunks(n) for n in sizes),))
        scale = tensors["scale"]
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError("scales must be finite and non-negative", code="non_finite")
        out, qo, so = {}, 0, 0
        for (name, _), n in zip(spec, sizes, strict=True):
            c = self._chunks(n)
            per_elem = scale[so : so + c].repeat_interleave(self.chunk)[:n]
            out[name] = SparseTensor(None, tensors["q"][qo : qo + n].float() * per_elem)
            qo, so = qo + n, so + c
        return header, out


CODECS: dict[CodecName, Callable[[int, int], Codec]] = {
    "sparseloco": lambda k, tile: SparseLoCoCodec(k=k, tile=tile),
    "dense_fp32": lambda k, tile: DenseCodec("fp32"),
    "dense_bf16": lambda k, tile: DenseCodec("bf16"),
    "int8": lambda k, tile: Int8Codec(tile=tile),
}


def make_codec(name: CodecName, k: int = 64, tile: int = 64) -> Codec:
    try:
        make = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}") from None
    return make(k, tile)
