"""Payload framing shared by every codec: a safetensors file whose metadata holds a ``PayloadHeader``.

The receiver derives every tensor's length from the model's shapes and checks it before use; nothing from
the wire picks a dtype, a shape or a function.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protocol.errors import CodecError

PAYLOAD_FORMAT_VERSION = 1
ParamSpec = Sequence[tuple[str, tuple[int, ...]]]
CodecName = str  # one of CODEC_NAMES
# the codecs a payload may name; protocol.codec builds each (its registry has exactly these keys)
CODEC_NAMES = ("sparseloco", "dense_fp32", "dense_bf16", "int8")
FP32_MAX = torch.finfo(torch.float32).max
FP16_MAX = torch.finfo(torch.float16).max
# A payload's safetensors header (tensor table and the JSON PayloadHeader) is a few hundred bytes; this is
# its cap, checked before it is parsed, and part of the largest payload a run takes.
MAX_HEADER_BYTES = 8192


class PayloadStats(BaseModel):
    """What the miner reports about its own work (untrusted; used for reporting only)."""

    model_config = ConfigDict(extra="forbid")
    compute_s: float = Field(default=0.0, ge=0.0, le=1e6)
    loss_before: float | None = None
    loss_after: float | None = None
    # training health: the gradient's norm before clipping (mean and max over the inner steps), the fraction
    # of steps it was clipped at, and the learning rate of the last step
    # (reported, never judged: the coordinator keeps a value only if it is a number in range)
    grad_norm_mean: float | None = None
    grad_norm_max: float | None = None
    clipped_fraction: float | None = None
    lr: float | None = None


class PayloadHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int
    codec: CodecName = Field(min_length=1, max_length=32)
    round: int = Field(ge=0)
    base_version: int = Field(ge=0)
    k: int = Field(default=0, ge=0, le=1 << 20)
    tile: int = Field(default=0, ge=0, le=1 << 10)
    bits: int = Field(default=2, ge=1, le=8, description="sparseloco: bits per value")
    stats: PayloadStats = Field(default_factory=PayloadStats)

    @field_validator("codec")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in CODEC_NAMES:
            raise ValueError(f"unknown codec {name!r}")
        return name


@dataclass(frozen=True)
class Examined:
    """What intake learns from a payload in one decode, so that closing the round need not decode it
    again: its header, the digest of its tensors, its norm and sketch (``protocol.aggregate``), and the form
    the codec's accumulator reads back (``stored``; the payload itself for codecs without another, ``b""``
    where the codec was asked not to make it)."""

    header: PayloadHeader
    content_sha256: str
    norm: float
    sketch: torch.Tensor
    stored: bytes
    kept: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # kept_sample


@dataclass
class SparseTensor:
    """One contributor's update of one parameter: flat indices (None: every element) and their values."""

    indices: torch.Tensor | None
    values: torch.Tensor

    def to_dense(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.indices is None:
            return self.values.reshape(shape).clone()
        out = torch.zeros(math.prod(shape), dtype=self.values.dtype, device=self.values.device)
        out[self.indices] = self.values
        return out.view(shape)


def content_digest(data: bytes) -> str:
    """sha256 of a valid payload's tensors in name order, ignoring its header: two payloads that carry
    the same update have the same digest however their headers differ."""
    h = hashlib.sha256()
    for name, t in sorted(st_load(data).items()):
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def framed_bytes(tensor_bytes: int) -> int:
    """The largest payload that carries ``tensor_bytes`` of tensors: the length prefix, the header at its
    cap, and the tensors."""
    return 8 + MAX_HEADER_BYTES + tensor_bytes


def cat_or_empty(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def frame(tensors: dict[str, torch.Tensor], header: PayloadHeader) -> bytes:
    return st_save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"gradpool": header.model_dump_json()}
    )


def unframe(data: bytes, expected: dict[str, torch.dtype]) -> tuple[PayloadHeader, dict[str, torch.Tensor]]:
    """Parse a payload and check its tensor names and dtypes; every other check is the codec's."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if MAX_HEADER_BYTES < n <= len(data) - 8:
        raise CodecError(f"payload header is {n} bytes; at most {MAX_HEADER_BYTES}", code="bad_header")
    try:
        tensors = st_load(data)
        meta = read_metadata(data)
    except (SafetensorError, ValueError, OverflowError, RuntimeError) as e:
        raise CodecError(f"payload is not a valid safetensors file: {e}") from None
    try:
        header = PayloadHeader.model_validate_json(meta.get("gradpool", ""))
    except ValidationError as e:
        raise CodecError(f"payload header is invalid: {e.errors()[0]['msg']}", code="bad_header") from None
    if header.format_version != PAYLOAD_FORMAT_VERSION:
        raise CodecError(
            f"payload format {header.format_version}, expected {PAYLOAD_FORMAT_VERSION}",
            code="wrong_format_version",
        )
    if set(tensors) != set(expected):
        missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
        raise CodecError(
            f"payload tensors differ: missing {sorted(missing)}, unexpected {sorted(extra)}",
            code="wrong_tensors",
        )
    for name, dtype in expected.items():
        if tensors[name].dtype != dtype:
            raise CodecError(
                f"tensor {name!r} is {tensors[name].dtype}, expected {dtype}", code="wrong_dtype"
            )
    return header, tensors


def read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds the payload")
    top = json.loads(data[8 : 8 + n])
    meta = top.get("__metadata__") if isinstance(top, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def expect_len(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> None:
    if tuple(tensors[name].shape) != shape:
        raise CodecError(
            f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}", code="wrong_shape"
        )
