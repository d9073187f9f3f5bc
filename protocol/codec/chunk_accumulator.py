"""The sum and count of SparseLoCo updates in the codec's chunk layout (``SparseLoCoCodec.accumulator``)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
from safetensors.torch import load as st_load

from protocol.codec.accumulate import check_room, count_dtype, divide_by_count
from protocol.codec.chunks import Geometry, Layout, RowTable
from protocol.errors import CodecError
from protocol.payload import ParamSpec, PayloadHeader


class RowCodec(Geometry, Protocol):
    """What the accumulator needs of its codec: the chunk geometry, the row table of a model, and a payload
    decoded into chunk rows."""

    def table(self, spec: ParamSpec) -> RowTable: ...

    def decode_rows(
        self, data: bytes, spec: ParamSpec
    ) -> tuple[PayloadHeader, RowTable, torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ChunkAccumulator:
    """Sum and count of SparseLoCo updates, kept in the codec's chunk layout.

    A payload's chunks come in order and its indices sorted within each, so adding one is a sequential
    pass over the accumulator, and padding needs no masking (it is dropped when the mean is laid out as
    parameters). Memory: 4 bytes per parameter for the sum, and 1 for the count up to 255 contributors
    (4 beyond), whatever their number.
    """

    def __init__(self, codec: RowCodec, spec: ParamSpec, max_contributors: int = 255) -> None:
        self.codec, self.spec = codec, [(n, tuple(s)) for n, s in spec]
        self.table = codec.table(spec)
        chunk = codec.tile * codec.tile
        counts = count_dtype(max_contributors)
        self.sum = torch.zeros(self.table.rows, chunk)
        self.count = torch.zeros(self.table.rows, chunk, dtype=counts)
        self.one = torch.ones(1, 1, dtype=counts).expand(self.table.rows, codec.k)
        self.dense = torch.zeros(sum(self.table.dense_sizes))
        self.contributors = 0

    @torch.no_grad()
    def add(self, payload: bytes, scale: float = 1.0) -> None:
        """Add a payload as it came over the wire (decoded and checked here)."""
        check_room(self.contributors, self.count.dtype)
        _, _, idx, vals, dense = self.codec.decode_rows(payload, self.spec)
        self._add(idx, vals, dense, scale)

    @torch.no_grad()
    def add_stored(self, stored: bytes, scale: float = 1.0) -> None:
        """Add a payload unpacked by ``SparseLoCoCodec.examine`` (the coordinator's own file, read back by
        hash)."""
        check_room(self.contributors, self.count.dtype)
        parts = st_load(stored)
        shape = (self.table.rows, self.codec.k)
        idx, vals, dense = parts["idx"], parts["vals"], parts["dense"]
        if idx.shape != shape or vals.shape != shape or dense.shape != self.dense.shape:
            raise CodecError("unpacked payload does not fit this model", code="wrong_shape")
        self._add(idx.long(), vals, dense, scale)

    def _add(self, idx: torch.Tensor, vals: torch.Tensor, dense: torch.Tensor, scale: float) -> None:
        self.sum.scatter_add_(1, idx, vals if scale == 1.0 else vals * scale)  # chunk by chunk, in order
        self.count.scatter_add_(1, idx, self.one)
        self.dense.add_(dense, alpha=scale)
        self.contributors += 1

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """The mean over the contributors that selected each coordinate, laid out as parameters. The
        accumulator is spent afterwards."""
        divide_by_count(self.sum.view(-1), self.count.view(-1))
        self.count = torch.zeros(0, dtype=self.count.dtype)
        self.dense.div_(max(1, self.contributors))
        flat = self.sum.view(-1)
        out: dict[str, torch.Tensor] = {}
        chunk = self.codec.tile * self.codec.tile
        row = di = 0
        for name, shape in self.spec:
            if self.codec.is_dense(shape):
                n = math.prod(shape)
                out[name] = self.dense[di : di + n].view(shape)
                di += n
                continue
            layout = Layout(shape, self.codec.tile)
            chunks = flat[row * chunk : (row + layout.rows) * chunk].view(layout.rows, chunk)
            out[name] = layout.from_chunks(chunks)
            row += layout.rows
        self.sum = torch.zeros(0)
        return out
