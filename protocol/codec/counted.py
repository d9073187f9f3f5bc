"""The published update with a count per chunk: as many values in each chunk as it deserves.

SparseLoCo keeps the same k values in every chunk, as many where the uploads agree on a few coordinates as
where their union fills the chunk. The published update is one tensor set, not one per miner, so it can
spend its bytes where the aggregate's energy is: one threshold for the whole model, each chunk keeping
every value above it (none, or all of it), the lowest threshold whose bytes fit a budget (the bytes the
same-k format takes at the [publish] settings).

Layout, in the chunk rows of the same-k format it replaces (``geometry``: its tile, its dense tensors, its
``RowTable``):

- ``count``: the values kept in each chunk row (int16; int32 for chunks of more than 32767);
- ``idx``: per chunk row with values, its Elias-Fano low bits and upper bitmap (``elias_fano.py``) at its
  count, each in whole bytes; ``val``: its ``bits``-bit codes in whole bytes;
- ``lut``: per sparse tensor, the table of bin means (``quantize.py``) its codes index;
- ``dense``: the tensors the same-k format sends dense, in fp16.

Chunks with the same count are encoded and decoded together, so both stay vectorised. Decoding checks
everything before use: a kept value in a chunk's padding is refused like one outside its chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

from protocol.codec.bits import pack_uint, unpack_uint
from protocol.codec.chunks import Layout, RowTable
from protocol.codec.elias_fano import ef_bytes_by_count, ef_decode, ef_encode
from protocol.codec.quantize import quantize
from protocol.codec.sparseloco import SparseLoCoCodec
from protocol.errors import CodecError
from protocol.payload import FP16_MAX, ParamSpec, cat_or_empty, expect_len, framed_bytes

SAMPLE_STRIDE = 17  # prime to the tile grids' widths, which are mostly powers of two


class CountedCodec:
    """The count-per-chunk format in the chunk rows of ``geometry`` (the same-k format at the budget)."""

    name = "sparseloco_counted"

    def __init__(self, geometry: SparseLoCoCodec, sample_rows: int = 256) -> None:
        """``sample_rows``: models of ``SAMPLE_STRIDE`` times this many chunk rows or more (and at least
        twice that) first guess the threshold from every ``SAMPLE_STRIDE``-th chunk row."""
        self.sample_rows = sample_rows
        self.geometry, self.tile, self.bits, self.levels = (
            geometry,
            geometry.tile,
            geometry.bits,
            geometry.levels,
        )
        self.chunk = self.tile * self.tile
        self.count_dtype = torch.int16 if self.chunk < 1 << 15 else torch.int32
        self.count_bytes = 2 if self.count_dtype == torch.int16 else 4
        self.dtypes = {
            "count": self.count_dtype,
            "idx": torch.uint8,
            "val": torch.uint8,
            "lut": torch.float32,
            "dense": torch.float16,
        }

    @property
    def sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bytes of a chunk's indices and of its values, by its count (0 .. chunk)."""
        return count_sizes(self.chunk, self.bits)

    def budget(self, spec: ParamSpec) -> int:
        """The bytes of tensors this format fills: the same-k format's at its k."""
        return self.geometry.max_payload_bytes(spec) - framed_bytes(0)

    # -- encode -------------------------------------------------------------------------------------------
    def encode(self, u: Mapping[str, torch.Tensor], spec: ParamSpec) -> dict[str, torch.Tensor]:
        """The tensors of ``u`` published at this format's budget."""
        dense, sparse = [], []
        for name, shape in spec:
            t = u[name].detach().float()
            if self.geometry.is_dense(tuple(shape)):
                dense.append(t.reshape(-1).clamp(-FP16_MAX, FP16_MAX).half().cpu())
            else:
                sparse.append((t, Layout(tuple(shape), self.tile)))
        mags = [lay.abs_chunks(t) for t, lay in sparse]  # padding is -1: never kept
        rows = sum(lay.rows for _, lay in sparse)
        fixed = 2 * sum(d.numel() for d in dense) + 4 * self.levels * len(sparse) + self.count_bytes * rows
        threshold = self._threshold(mags, self.budget(spec) - fixed)
        counts, cols, codes, luts = [], [], [], []
        for (t, lay), m in zip(sparse, mags, strict=True):
            keep = m >= threshold
            r, c = keep.nonzero(as_tuple=True)  # row-major: by chunk, then index
            vals = lay.to_chunks(t)[r, c]
            if vals.numel():
                lut, code = quantize(vals, bits=self.bits)
            else:
                lut, code = torch.zeros(self.levels, device=t.device), c
            counts.append(keep.sum(dim=1).cpu())
            cols.append(c.cpu())
            codes.append(code.cpu())
            luts.append(lut.cpu())
        count = cat_or_empty(counts, torch.int64)
        idx, val = self._pack(count, cat_or_empty(cols, torch.int64), cat_or_empty(codes, torch.int64))
        return {
            "count": count.to(self.count_dtype),
            "idx": idx,
            "val": val,
            "lut": torch.stack(luts) if luts else torch.zeros(0, self.levels),
            "dense": cat_or_empty(dense, torch.float16),
        }

    def _threshold(self, mags: list[torch.Tensor], room: int) -> torch.Tensor:
        """The lowest threshold (a positive float32) whose kept values' bytes fit ``room``; above every
        magnitude when not even the largest fit. A bisection on the float's bits (positive floats order as
        their bits do); every fourth step keeps only the values still between its bounds, so that most
        steps count a small part of the model."""
        if not mags or (top := max(float(m.max()) for m in mags)) <= 0:
            return torch.tensor(float("inf"))
        device = mags[0].device
        # a chunk's bytes by its count, or the most a smaller count takes: at some tiles a count's index
        # bits fall by one where the next count drops a low bit, and the bisection needs them monotone
        per_count = torch.cummax(self.sizes[0] + self.sizes[1], 0).values.to(device)
        narrowed = _Narrowed(mags)

        def fits(bits: int) -> bool:
            return int(per_count[narrowed.kept(_float(bits, device))].sum()) <= room

        lo, hi = 1, _bits(top)  # the smallest positive float32, and the largest magnitude
        if fits(lo):
            return _float(lo, device)
        if not fits(hi):
            return torch.tensor(float("inf"), device=device)
        rows = sum(m.shape[0] for m in mags)
        if rows >= SAMPLE_STRIDE * max(self.sample_rows, 2):  # a first guess from a sample of the rows
            sample = [m[::SAMPLE_STRIDE] for m in mags]
            guess = float(self._threshold(sample, room * sum(m.shape[0] for m in sample) // rows))
            if 0 < guess < top:
                below = guess
                for _ in range(8):  # a bound that does not fit, so that narrowing leaves few values
                    below /= 1.5
                    if not fits(_bits(below)):
                        lo = max(lo, _bits(below))
                        break
                if fits(above := _bits(guess * 1.5)):
                    hi = min(hi, above)
                if lo > 1:
                    narrowed.narrow(_float(lo, device), _float(hi, device))
        steps = 0
        while hi - lo > 1:  # fits(hi), not fits(lo)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
            steps += 1
            if steps % 4 == 0:
                narrowed.narrow(_float(lo, device), _float(hi, device))
        return _float(hi, device)

    def _pack(self, count: torch.Tensor, cols: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every chunk row's indices and values in its place in the ``idx`` and ``val`` streams."""
        idx_sizes, val_sizes = (s[count] for s in self.sizes)
        idx_out = torch.empty(int(idx_sizes.sum()), dtype=torch.uint8)
        val_out = torch.empty(int(val_sizes.sum()), dtype=torch.uint8)
        starts = torch.cumsum(count, 0) - count
        for k, rows, at_idx, at_val in self._groups(count, idx_sizes, val_sizes):
            at = starts[rows].unsqueeze(1) + torch.arange(k)
            idx_out[at_idx] = ef_encode(cols[at], self.chunk)
            val_out[at_val] = pack_uint(codes[at], self.bits)
        return idx_out, val_out

    def _groups(
        self, count: torch.Tensor, idx_sizes: torch.Tensor, val_sizes: torch.Tensor
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per count k > 0 present: k, its chunk rows, and where their index and value bytes lie in the
        streams ((rows, bytes) positions each)."""
        idx_at = torch.cumsum(idx_sizes, 0) - idx_sizes
        val_at = torch.cumsum(val_sizes, 0) - val_sizes
        out = []
        for k in torch.unique(count).tolist():
            if k == 0:
                continue
            rows = (count == k).nonzero().squeeze(1)
            i, v = self.sizes[0][k], self.sizes[1][k]
            out.append(
                (
                    int(k),
                    rows,
                    idx_at[rows].unsqueeze(1) + torch.arange(int(i)),
                    val_at[rows].unsqueeze(1) + torch.arange(int(v)),
                )
            )
        return out

    # -- decode (what a miner downloads: checked before use) -----------------------------------------------
    def decode_flat(self, tensors: Mapping[str, torch.Tensor], spec: ParamSpec) -> torch.Tensor:
        """The published tensors -> every parameter's update concatenated in spec order."""
        if set(tensors) != set(self.dtypes):
            raise CodecError(f"update tensors must be exactly {sorted(self.dtypes)}", code="wrong_tensors")
        for name, dtype in self.dtypes.items():
            if tensors[name].dtype != dtype:
                raise CodecError(f"update tensor {name!r} is {tensors[name].dtype}", code="wrong_dtype")
        table = self.geometry.table(spec)
        expect_len(tensors, "count", (table.rows,))
        count = tensors["count"].to(torch.int64)
        if bool(((count < 0) | (count > self.chunk)).any()):
            raise CodecError(f"a chunk's count lies outside 0..{self.chunk}", code="wrong_k")
        idx_sizes, val_sizes = (s[count] for s in self.sizes)
        expect_len(tensors, "idx", (int(idx_sizes.sum()),))
        expect_len(tensors, "val", (int(val_sizes.sum()),))
        expect_len(tensors, "lut", (len(table.names), self.levels))
        expect_len(tensors, "dense", (sum(table.dense_sizes),))
        luts, dense = tensors["lut"], tensors["dense"].float()
        if not (torch.isfinite(luts).all() and torch.isfinite(dense).all()):
            raise CodecError("update values hold NaN or Inf", code="non_finite")
        out = torch.zeros(table.total, dtype=torch.float32)
        for k, rows, at_idx, at_val in self._groups(count, idx_sizes, val_sizes):
            idx = ef_decode(tensors["idx"][at_idx], self.chunk, k, _where(table, rows))
            flat, real = table.coordinates(idx, self.tile, rows)
            if real is not None and bool((bad := ~real.all(dim=1)).any()):
                place = _where(table, rows)(bad)
                raise CodecError(
                    f"{place}: a kept value lies in a chunk's padding", code="index_out_of_range"
                )
            codes = unpack_uint(tensors["val"][at_val], k, self.bits)
            out[flat] = luts.view(-1)[table.lut_base[rows] + codes]
        at = 0
        for offset, n in zip(table.dense_offsets, table.dense_sizes, strict=True):
            out[offset : offset + n] = dense[at : at + n]
            at += n
        return out


class _Narrowed:
    """The chunk rows' counts of magnitudes at or above a threshold, from every magnitude of the model
    until ``narrow``, then from those between the bounds given plus the counts above them."""

    def __init__(self, mags: list[torch.Tensor]) -> None:
        self.mags = mags
        self.rows = sum(m.shape[0] for m in mags)
        self.above = torch.zeros(self.rows, dtype=torch.int64, device=mags[0].device)
        self.between: tuple[torch.Tensor, torch.Tensor] | None = None  # (chunk rows, magnitudes)

    def kept(self, t: torch.Tensor) -> torch.Tensor:
        if self.between is None:
            return torch.cat([(m >= t).sum(dim=1) for m in self.mags])
        rows, vals = self.between
        return self.above + torch.bincount(rows[vals >= t], minlength=self.rows)

    def narrow(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Only thresholds in (lo, hi] are asked from now on."""
        if self.between is None:
            parts, above, first = [], [], 0
            for m in self.mags:
                r, c = ((m >= lo) & (m < hi)).nonzero(as_tuple=True)
                parts.append((r + first, m[r, c]))
                above.append((m >= hi).sum(dim=1))
                first += m.shape[0]
            self.above = torch.cat(above)
            self.between = (torch.cat([r for r, _ in parts]), torch.cat([v for _, v in parts]))
            return
        rows, vals = self.between
        self.above = self.above + torch.bincount(rows[vals >= hi], minlength=self.rows)
        inside = (vals >= lo) & (vals < hi)
        self.between = (rows[inside], vals[inside])


@functools.lru_cache(maxsize=8)
def count_sizes(chunk: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of a chunk's Elias-Fano indices and of its ``bits``-bit values, by its count (0 .. chunk)."""
    val = (torch.arange(chunk + 1, dtype=torch.int64) * bits + 7) // 8
    return ef_bytes_by_count(chunk), val


def _where(table: RowTable, rows: torch.Tensor) -> Callable[[torch.Tensor], str]:
    """``RowTable.where`` for a mask over ``rows`` (a subset of the table's chunk rows)."""

    def where(bad: torch.Tensor) -> str:
        mask = torch.zeros(table.rows, dtype=torch.bool)
        mask[rows[bad]] = True
        return table.where(mask)

    return where


def _bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _float(bits: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(device)
