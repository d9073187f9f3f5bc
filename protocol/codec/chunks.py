"""How SparseLoCo cuts tensors into chunks of ``tile**2`` elements: ``Layout`` for one tensor, ``RowTable``
for a whole model's chunk rows (derived from the shapes once; the codec caches it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Geometry(Protocol):
    """What a chunk layout needs of its codec: the tile side, the values kept per chunk, the levels of
    the value table, and which tensors go dense."""

    tile: int
    k: int
    levels: int

    def is_dense(self, shape: tuple[int, ...]) -> bool: ...


@dataclass(frozen=True)
class Layout:
    """How one tensor is cut into chunks of ``tile**2`` elements."""

    shape: tuple[int, ...]
    tile: int

    @property
    def tiled(self) -> bool:
        return len(self.shape) == 2 and min(self.shape) >= self.tile

    @property
    def chunk(self) -> int:
        return self.tile * self.tile

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def grid(self) -> tuple[int, int]:
        """(tile rows, tile columns) for a tiled matrix; (chunks, 1) otherwise."""
        if self.tiled:
            return -(-self.shape[0] // self.tile), -(-self.shape[1] // self.tile)
        return -(-self.numel // self.chunk), 1

    @property
    def rows(self) -> int:
        a, b = self.grid
        return a * b

    @property
    def padded(self) -> bool:
        if self.tiled:
            return self.shape[0] % self.tile != 0 or self.shape[1] % self.tile != 0
        return self.numel % self.chunk != 0

    def to_chunks(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(shape) -> (rows, chunk), padding with ``fill``."""
        s = self.tile
        if self.tiled:
            nr, nc = self.grid
            R, C = self.shape
            if self.padded:
                t = torch.nn.functional.pad(t, (0, nc * s - C, 0, nr * s - R), value=fill)
            return t.reshape(nr, s, nc, s).permute(0, 2, 1, 3).reshape(nr * nc, s * s)
        flat = t.reshape(-1)
        if self.padded:
            flat = torch.nn.functional.pad(flat, (0, self.rows * self.chunk - self.numel), value=fill)
        return flat.view(self.rows, self.chunk)

    def from_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """(rows, chunk) -> a new tensor of this layout's shape (padding dropped)."""
        s = self.tile
        if self.tiled:
            nr, nc = self.grid
            R, C = self.shape
            full = chunks.view(nr, nc, s, s).permute(0, 2, 1, 3).reshape(nr * s, nc * s)
            return full[:R, :C].contiguous() if self.padded else full
        return chunks.reshape(-1)[: self.numel].clone().view(self.shape)

    def abs_chunks(self, t: torch.Tensor) -> torch.Tensor:
        """|t| as (rows, chunk) in one pass where possible; padding is -1, so it is never preferred."""
        s = self.tile
        if self.tiled:
            nr, nc = self.grid
            R, C = self.shape
            out = torch.empty(nr, nc, s, s, device=t.device)
            fr, fc = R // s, C // s  # whole tiles: abs and the tile permutation in one pass
            torch.abs(t[: fr * s, : fc * s].reshape(fr, s, fc, s).permute(0, 2, 1, 3), out=out[:fr, :fc])
            if fr < nr:  # the partial last row of tiles
                edge = torch.full((s, nc * s), -1.0, device=t.device)
                torch.abs(t[fr * s :], out=edge[: R - fr * s, :C])
                out[fr] = edge.view(s, nc, s).permute(1, 0, 2)
            if fc < nc:  # the partial last column of tiles
                edge = torch.full((fr * s, s), -1.0, device=t.device)
                torch.abs(t[: fr * s, fc * s :], out=edge[:, : C - fc * s])
                out[:fr, fc] = edge.view(fr, s, s)
            return out.view(nr * nc, s * s)
        if self.padded:
            full = torch.full((self.rows * self.chunk,), -1.0, device=t.device)
            torch.abs(t.reshape(-1), out=full[: self.numel])
            return full.view(self.rows, self.chunk)
        return t.reshape(self.rows, self.chunk).abs()

    def flat_indices(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunk-local indices (rows, k) -> flat indices into the tensor and a mask of the real ones."""
        rows = torch.arange(self.rows, device=idx.device).unsqueeze(1)  # (rows, 1)
        if self.tiled:
            s = self.tile
            _, nc = self.grid
            r = (rows // nc) * s + idx // s
            c = (rows % nc) * s + idx % s
            valid = (r < self.shape[0]) & (c < self.shape[1])
            return r * self.shape[1] + c, valid
        flat = rows * self.chunk + idx
        return flat, flat < self.numel


@dataclass(frozen=True)
class RowTable:
    """Per-chunk facts of a model's sparse tensors, derived from the shapes once and cached.

    Chunk-local index p of a chunk row maps to ``base + (p // tile) * stride + p % tile`` in the
    concatenated parameters; it is real (not padding) when ``p < limit``, ``p // tile < row_limit`` and
    ``p % tile < col_limit``.
    """

    names: list[str]
    offsets: list[int]
    counts: list[int]  # decoded values per sparse tensor
    row_counts: list[int]
    total: int
    rows: int
    padded: bool
    base: torch.Tensor  # (rows, 1) int64
    stride: torch.Tensor
    limit: torch.Tensor
    row_limit: torch.Tensor
    col_limit: torch.Tensor
    lut_base: torch.Tensor  # (rows, 1): levels * tensor number
    tensor_of_row: torch.Tensor  # (rows,)
    dense_offsets: list[int]
    dense_sizes: list[int]

    def where(self, bad_rows: torch.Tensor) -> str:
        row = int(bad_rows.nonzero()[0, 0])
        return self.names[int(self.tensor_of_row[row])]

    def coordinates(
        self, idx: torch.Tensor, tile: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk-local indices of the chunk rows ``rows`` (every row when None) -> coordinates in the
        concatenated parameters, and the mask of those that are not padding (None when the model has no
        padding)."""
        at = slice(None) if rows is None else rows
        q, p = idx // tile, idx % tile
        flat = self.base[at] + q * self.stride[at] + p
        if not self.padded:
            return flat, None
        return flat, (idx < self.limit[at]) & (q < self.row_limit[at]) & (p < self.col_limit[at])

    def with_counts(self, counts: list[int]) -> RowTable:
        return dataclasses.replace(self, counts=counts)

    @staticmethod
    def build(codec: Geometry, spec: tuple[tuple[str, tuple[int, ...]], ...]) -> RowTable:
        s, chunk = codec.tile, codec.tile * codec.tile
        names: list[str] = []
        offsets: list[int] = []
        counts: list[int] = []
        row_counts: list[int] = []
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("base", "stride", "limit", "rl", "cl", "tid")}
        dense_offsets: list[int] = []
        dense_sizes: list[int] = []
        offset = 0
        padded = False
        for name, shape in spec:
            n = math.prod(shape)
            if codec.is_dense(shape):
                dense_offsets.append(offset)
                dense_sizes.append(n)
                offset += n
                continue
            lay = Layout(shape, s)
            r = torch.arange(lay.rows, dtype=torch.int64)
            full = torch.full((lay.rows,), chunk, dtype=torch.int64)
            if lay.tiled:
                _, nc = lay.grid
                R, C = shape
                r0, c0 = (r // nc) * s, (r % nc) * s
                cols["base"].append(offset + r0 * C + c0)
                cols["stride"].append(torch.full_like(r, C))
                cols["limit"].append(full)
                cols["rl"].append(R - r0)
                cols["cl"].append(C - c0)
            else:
                cols["base"].append(offset + r * chunk)
                cols["stride"].append(torch.full_like(r, s))
                cols["limit"].append(n - r * chunk)
                cols["rl"].append(full)
                cols["cl"].append(full)
            cols["tid"].append(torch.full_like(r, len(names)))
            padded = padded or lay.padded
            names.append(name)
            offsets.append(offset)
            counts.append(lay.rows * codec.k)
            row_counts.append(lay.rows)
            offset += n
        cat = {k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.int64)) for k, v in cols.items()}
        return RowTable(
            names=names,
            offsets=offsets,
            counts=counts,
            row_counts=row_counts,
            total=offset,
            rows=sum(row_counts),
            padded=padded,
            base=cat["base"].unsqueeze(1),
            stride=cat["stride"].unsqueeze(1),
            limit=cat["limit"].unsqueeze(1),
            row_limit=cat["rl"].unsqueeze(1),
            col_limit=cat["cl"].unsqueeze(1),
            lut_base=(cat["tid"] * codec.levels).unsqueeze(1),
            tensor_of_row=cat["tid"],
            dense_offsets=dense_offsets,
            dense_sizes=dense_sizes,
        )
