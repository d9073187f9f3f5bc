"""The SparseLoCo codec: top-k per chunk, 2-bit values, Elias-Fano indices.

A payload is a safetensors file with a small JSON header (``PayloadHeader``) in its metadata. Its
tensors hold the update of every model parameter, concatenated in the model's parameter order, so the
receiver derives every length from the model's shapes and checks it before use. Nothing from the wire
picks a dtype, a shape or a function.

SparseLoCo layout, per parameter tensor:

- A matrix whose sides are both at least ``tile`` is cut into ``tile x tile`` tiles (zero-padded at the
  edges); any other tensor into flat chunks of ``tile**2`` elements. Each chunk keeps its ``k`` largest
  magnitudes.
- Indices within a chunk are sorted and Elias-Fano coded (``elias_fano.py``): at k=64 of 4096 exactly 8 bits
  an index; every chunk has the same size, which keeps encode and decode vectorised.
- Values are centred by the mean of the kept values, binned by their spread (6 sigma into 4 bins) and sent
  as 2-bit codes, four to a byte, with a per-tensor table of the mean original value in each bin.
- A tensor whose fp16 form is no larger than its sparse form (at most a few dozen elements) goes dense in
  fp16: top-k would keep all of it anyway.

The chunk layout is in ``chunks.py``, the value bins in ``quantize.py`` and the running
sum of payloads in their chunk layout in ``protocol/codec/chunk_accumulator.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from safetensors.torch import save as st_save

from protocol.codec.bits import pack_2bit, pack_uint, unpack_2bit, unpack_uint
from protocol.codec.chunk_accumulator import ChunkAccumulator
from protocol.codec.chunks import Layout, RowTable
from protocol.codec.elias_fano import ef_bytes, ef_decode, ef_encode
from protocol.codec.measure import kept_sample, sketch_flat
from protocol.codec.quantize import quantize
from protocol.errors import CodecError
from protocol.payload import (
    FP16_MAX,
    CodecName,
    Examined,
    ParamSpec,
    PayloadHeader,
    SparseTensor,
    cat_or_empty,
    content_digest,
    expect_len,
    frame,
    framed_bytes,
    unframe,
)

VALUE_BITS = (2, 4, 8)


class SparseLoCoCodec:
    name: CodecName = "sparseloco"
    outer_lr, outer_momentum = 1.0, 0.0  # plain SGD: error feedback stands in for momentum

    def __init__(self, k: int = 64, tile: int = 64, bits: int = 2) -> None:
        if not 1 <= k <= tile * tile:
            raise ValueError(f"k must be in 1..{tile * tile}, got {k}")
        if k % 4:
            raise ValueError(f"k must be a multiple of 4, got {k}")
        if bits not in VALUE_BITS:
            raise ValueError(f"bits must be one of {VALUE_BITS}, got {bits}")
        self.k, self.tile, self.bits, self.levels = k, tile, bits, 1 << bits
        self.val_bytes = k * bits // 8
        self.low_bytes, self.high_bytes = ef_bytes(tile * tile, k)
        self._tables: dict[tuple[tuple[str, tuple[int, ...]], ...], RowTable] = {}

    # -- sizes, all derived from the shapes -------------------------------------------------------------
    def sparse_bytes(self, layout: Layout) -> int:
        return layout.rows * (self.low_bytes + self.high_bytes + self.val_bytes) + 4 * self.levels

    def is_dense(self, shape: tuple[int, ...]) -> bool:
        layout = Layout(tuple(shape), self.tile)
        return 2 * layout.numel <= self.sparse_bytes(layout)

    def max_payload_bytes(self, spec: ParamSpec) -> int:
        """The size of the largest valid payload for this model: every length is fixed by the shapes."""
        table = self.table(spec)
        tensors = table.rows * (self.low_bytes + self.high_bytes + self.val_bytes)
        return framed_bytes(tensors + 4 * self.levels * len(table.names) + 2 * sum(table.dense_sizes))

    def accumulator(self, spec: ParamSpec, max_contributors: int = 255) -> ChunkAccumulator:
        return ChunkAccumulator(self, spec, max_contributors)

    # -- encode ---------------------------------------------------------------------------------------
    def encode(
        self, tensors: Mapping[str, torch.Tensor], spec: ParamSpec, header: PayloadHeader
    ) -> tuple[bytes, dict[str, SparseTensor]]:
        """Compress; return the payload and exactly what the receiver will decode from it (for error
        feedback: ``e <- e - decoded``)."""
        idx_parts, val_parts, luts, dense_parts = [], [], [], []
        decoded: dict[str, SparseTensor] = {}
        for name, shape in spec:
            t = tensors[name].detach()
            t = t if t.dtype == torch.float32 else t.float()
            if self.is_dense(shape):
                half = t.reshape(-1).clamp(-FP16_MAX, FP16_MAX).half()
                dense_parts.append(half.cpu())
                decoded[name] = SparseTensor(None, half.float())
                continue
            layout = Layout(tuple(shape), self.tile)
            mag = layout.abs_chunks(t)  # (rows, U)
            idx = mag.topk(self.k, dim=1, sorted=False).indices.sort(dim=1).values  # (rows, k)
            flat, valid = layout.flat_indices(idx)
            if layout.padded:
                vals = t.reshape(-1)[flat.clamp(max=layout.numel - 1)].float() * valid
            else:
                vals = t.reshape(-1)[flat].float()
            lut, codes = quantize(vals, valid if layout.padded else None, self.bits)
            idx_parts.append(ef_encode(idx, layout.chunk).reshape(-1).cpu())
            packed = pack_2bit(codes) if self.bits == 2 else pack_uint(codes.view(-1, self.k), self.bits)
            val_parts.append(packed.reshape(-1).cpu())
            luts.append(lut.cpu())
            sent = lut[codes].view_as(vals)
            decoded[name] = (
                SparseTensor(flat[valid], sent[valid])
                if layout.padded
                else SparseTensor(flat.view(-1), sent.view(-1))
            )
        fields = {"codec": self.name, "k": self.k, "tile": self.tile, "bits": self.bits}
        header = header.model_copy(update=fields)
        payload = {
            "idx": cat_or_empty(idx_parts, torch.uint8),
            "val": cat_or_empty(val_parts, torch.uint8),
            "lut": torch.stack(luts) if luts else torch.zeros(0, self.levels),
            "dense": cat_or_empty(dense_parts, torch.float16),
        }
        return frame(payload, header), decoded

    # -- decode (hostile input) -----------------------------------------------------------------------
    def decode(self, data: bytes, spec: ParamSpec) -> tuple[PayloadHeader, dict[str, SparseTensor]]:
        """Payload -> header and, per parameter, the flat indices and values it carries."""
        header, table, flat, vals, dense = self._decode_all(data, spec)
        out: dict[str, SparseTensor] = {}
        sparse_parts = zip(
            table.names,
            torch.split(flat, table.counts),
            torch.split(vals, table.counts),
            table.offsets,
            strict=True,
        )
        for name, idx, v, offset in sparse_parts:
            out[name] = SparseTensor(idx - offset, v)
        do = 0
        for name, shape in spec:
            if self.is_dense(shape):
                n = math.prod(shape)
                out[name] = SparseTensor(None, dense[do : do + n])
                do += n
        return header, {name: out[name] for name, _ in spec}

    def decode_flat(
        self,
        data: bytes,
        spec: ParamSpec,
        out: torch.Tensor | None = None,
    ) -> tuple[PayloadHeader, torch.Tensor]:
        """Payload -> every parameter's dense update concatenated in spec order (into ``out`` if given)."""
        header, table, flat, vals, dense = self._decode_all(data, spec)
        if out is None:
            out = torch.zeros(table.total, dtype=torch.float32)
        else:
            if out.shape != (table.total,) or out.dtype != torch.float32:
                raise ValueError(f"out must be float32 of shape ({table.total},)")
            out.zero_()
        out[flat] = vals
        at = 0
        for offset, n in zip(table.dense_offsets, table.dense_sizes, strict=True):
            out[offset : offset + n] = dense[at : at + n]
            at += n
        return header, out

    def _decode_all(
        self,
        data: bytes,
        spec: ParamSpec,
    ) -> tuple[PayloadHeader, RowTable, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every chunk of every sparse tensor decoded at once: flat indices (into the concatenated
        parameters, spec order) and values; plus the dense part. Checks everything before use."""
        header, table, idx, vals, dense = self.decode_rows(data, spec)
        flat, valid = table.coordinates(idx, self.tile)
        if valid is not None:
            counts = valid.sum(dim=1)
            per_tensor = torch.zeros(len(table.names), dtype=torch.int64)
            per_tensor.index_add_(0, table.tensor_of_row, counts)
            table = table.with_counts(per_tensor.tolist())
            return header, table, flat[valid], vals[valid], dense
        return header, table, flat.view(-1), vals.view(-1), dense

    def decode_rows(
        self, data: bytes, spec: ParamSpec
    ) -> tuple[PayloadHeader, RowTable, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The payload in the codec's own layout: chunk-local indices and values, (chunks, k) each, for
        every chunk of every sparse tensor in spec order; plus the dense part. Checks everything."""
        header, tensors = unframe(
            data, {"idx": torch.uint8, "val": torch.uint8, "lut": torch.float32, "dense": torch.float16}
        )
        if (header.codec, header.k, header.tile, header.bits) != (self.name, self.k, self.tile, self.bits):
            raise CodecError(
                f"payload is {header.codec} k={header.k} tile={header.tile} bits={header.bits}; this run "
                f"expects {self.name} k={self.k} tile={self.tile} bits={self.bits}",
                code="wrong_codec",
            )
        table = self.table(spec)
        expect_len(tensors, "idx", (table.rows * (self.low_bytes + self.high_bytes),))
        expect_len(tensors, "val", (table.rows * self.val_bytes,))
        expect_len(tensors, "lut", (len(table.names), self.levels))
        expect_len(tensors, "dense", (sum(table.dense_sizes),))
        luts = tensors["lut"]
        if not torch.isfinite(luts).all():
            raise CodecError("value table holds NaN or Inf", code="non_finite")
        dense = tensors["dense"].float()
        if not torch.isfinite(dense).all():
            raise CodecError("dense values hold NaN or Inf", code="non_finite")
        idx = tensors["idx"].view(table.rows, self.low_bytes + self.high_bytes)
        idx = ef_decode(idx, self.tile**2, self.k, table.where)  # (rows, k), checked
        if self.bits == 2:
            codes = unpack_2bit(tensors["val"], table.rows * self.k).view(table.rows, self.k)
        else:
            codes = unpack_uint(tensors["val"].view(table.rows, self.val_bytes), self.k, self.bits)
        vals = luts.view(-1)[table.lut_base + codes]  # (rows, k)
        return header, table, idx, vals, dense

    def examine(self, data: bytes, spec: ParamSpec, unpack: bool = True) -> Examined:
        """One decode for intake: the header, the digest, the norm and sketch of the update (padding dropped,
        dense tensors included), and (``unpack``) the payload unpacked for ``ChunkAccumulator.add_stored``:
        indices as int16 and values as float32, (chunks, k) each, plus the dense part, so that closing the
        round only adds them."""
        header, table, idx, vals, dense = self.decode_rows(data, spec)
        unpacked = _unpacked(idx, vals, dense) if unpack else b""
        flat, valid = table.coordinates(idx, self.tile)
        if valid is not None:
            flat, vals = flat[valid], vals[valid]
        coords = torch.cat(
            [
                flat.reshape(-1),
                *(
                    torch.arange(o, o + n)
                    for o, n in zip(table.dense_offsets, table.dense_sizes, strict=True)
                ),
            ]
        )
        values = torch.cat([vals.reshape(-1), dense])
        norm = float(values.double().square().sum().sqrt())
        sketched = sketch_flat(coords, values)
        return Examined(header, content_digest(data), norm, sketched, unpacked, kept_sample(flat.reshape(-1)))

    def unpack(self, data: bytes, spec: ParamSpec) -> bytes:
        _, _, idx, vals, dense = self.decode_rows(data, spec)
        return _unpacked(idx, vals, dense)

    def table(self, spec: ParamSpec) -> RowTable:
        key = tuple((n, tuple(s)) for n, s in spec)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = RowTable.build(self, key)
        return table


def _unpacked(idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor) -> bytes:
    """A payload's rows as ``ChunkAccumulator.add_stored`` reads them back."""
    return st_save({"idx": idx.to(torch.int16), "vals": vals.contiguous(), "dense": dense})
