"""Value quantisation of the SparseLoCo codec: centre, bin by spread, send the codes and a table of bin
means."""

from __future__ import annotations

import torch

from protocol.payload import FP32_MAX


def quantize_2bit(vals: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` to 2 bits: 4 bins over 6 sigma."""
    return quantize(vals, valid, 2)


def quantize(
    vals: torch.Tensor, valid: torch.Tensor | None = None, bits: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre, bin by spread (6 sigma into 2**bits equal bins, the outer ones open); return the table of
    bin means (an empty bin: its centre) and the codes.

    Statistics come from the ``valid`` values only (padding selected in short chunks is not data); they
    are taken in float64, so any finite input gives a finite table.
    """
    levels = 1 << bits
    flat = vals.reshape(-1).float()
    data = flat if valid is None else flat[valid.reshape(-1)]
    if data.numel() == 0:
        data = flat
    wide = data.double()
    mu, sigma = wide.mean(), wide.std(correction=0).clamp_min(1e-30)
    grid = torch.linspace(-3.0, 3.0, levels + 1, dtype=torch.float64, device=flat.device)
    edges = (mu + sigma * grid[1:-1]).float()
    codes = torch.bucketize(flat, edges, right=True)  # the number of edges <= value: 0 .. levels - 1
    data_codes = codes if valid is None or data is flat else codes[valid.reshape(-1)]
    sums = torch.zeros(levels, dtype=torch.float64, device=flat.device).index_add_(0, data_codes, wide)
    counts = torch.bincount(data_codes, minlength=levels).double()
    centres = mu + sigma * (grid[1:] + grid[:-1]) / 2
    lut = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return lut.clamp(-FP32_MAX, FP32_MAX).float(), codes
