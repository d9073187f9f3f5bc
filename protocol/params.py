"""Parameters on the wire: the canonical order, the parameter hash, checkpoints and published updates.

A published update is what the coordinator subtracted from version v to make v+1, in one of two formats:

- ``exact``: a bitmap of the touched coordinates and their fp32 values;
- ``sparseloco``: a SparseLoCo payload (top-k per chunk, quantised values, Elias-Fano indices) of the
  aggregate plus the coordinator's own error feedback, so that it is about the size of one upload however
  many miners there are; the coordinator applies exactly what it decodes to;
- ``sparseloco_counted``: the same in the same bytes, with a count per chunk (``protocol/codec/counted.py``).

Applying either is one elementwise subtraction of decoded fp32 values, exactly rounded on every IEEE
device, so a miner at v reaches the coordinator's v+1 bit for bit and checks it by hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from protocol.codec.bits import pack_bits, unpack_bits
from protocol.codec.counted import CountedCodec
from protocol.codec.sparseloco import SparseLoCoCodec
from protocol.errors import CodecError
from protocol.model import ModelConfig, build_model
from protocol.payload import PAYLOAD_FORMAT_VERSION, ParamSpec, PayloadHeader, read_metadata

Params = dict[str, torch.Tensor]


def param_spec(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def model_spec(architecture: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters' names and shapes, without allocating them."""
    with torch.device("meta"):
        return param_spec(build_model(architecture))


def get_params(model: torch.nn.Module) -> Params:
    """A detached fp32 copy of the parameters, on the model's device."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def set_params(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.copy_(params[n])


def params_hash(params: Mapping[str, torch.Tensor], spec: ParamSpec) -> str:
    """sha256 over every parameter's name, shape and fp32 little-endian bytes, in spec order."""
    h = hashlib.sha256()
    for name, shape in spec:
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{list(shape)};".encode())
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


# -- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(params: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bytes:
    return st_save(_fp32_cpu(params), metadata=dict(meta))


def write_checkpoint(params: Mapping[str, torch.Tensor], meta: Mapping[str, str], path: Path) -> None:
    """The file ``save_checkpoint`` builds (the same tensors and metadata; safetensors may order the
    metadata's keys differently from one process to the next), written to ``path`` tensor by tensor:
    parameters already fp32 on the CPU straight from their own memory, others converted first."""
    st_save_file(_fp32_cpu(params), path, metadata=dict(meta))


def _fp32_cpu(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in params.items()}


def load_checkpoint(data: bytes, spec: ParamSpec) -> tuple[Params, dict[str, str]]:
    try:
        tensors = st_load(data)
        meta = read_metadata(data)
    except (SafetensorError, ValueError, OverflowError, RuntimeError) as e:
        raise CodecError(f"checkpoint is not a valid safetensors file: {e}") from None
    _check_layout({n: (str(t.dtype), tuple(t.shape)) for n, t in tensors.items()}, spec, "torch.float32")
    return dict(tensors), meta


def read_checkpoint(path: Path, spec: ParamSpec) -> tuple[Params, dict[str, str]]:
    """What ``load_checkpoint`` returns, read from a file (``read_safetensors``: never held whole)."""
    return read_safetensors(path, spec)


def read_safetensors(path: Path, spec: ParamSpec | None = None) -> tuple[Params, dict[str, str]]:
    """The fp32 tensors of a safetensors file (exactly ``spec``'s when given) and its metadata.
    safetensors checks the header (offsets, lengths) and the names, dtypes and shapes are checked before
    any tensor is read; then each tensor is read straight into its own memory, so the file is never held
    beside the tensors (nor mapped: nothing done to the file later can reach them). CodecError for any
    file that is not that."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = f.keys()  # a list: the file's handle is not a mapping
            slices = {n: f.get_slice(n) for n in names}
            layout = {n: (t.get_dtype(), tuple(t.get_shape())) for n, t in slices.items()}
        expected = spec if spec is not None else [(n, shape) for n, (_, shape) in layout.items()]
        _check_layout(layout, expected, "F32")
        tensors = {}
        with open(path, "rb") as file:
            n = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(n))
            for name, shape in expected:
                begin, end = header[name]["data_offsets"]
                t = torch.empty(shape, dtype=torch.float32)
                if int(end) - int(begin) != 4 * t.numel():
                    raise ValueError(f"tensor {name!r} does not fill its bytes")
                if t.numel():  # an empty one has no bytes to read (nor a view to read them into)
                    view = t.numpy().data.cast("B")
                    file.seek(8 + n + int(begin))
                    if file.readinto(view) != len(view):
                        raise ValueError(f"tensor {name!r} is cut short")
                tensors[name] = t
    except (SafetensorError, ValueError, OverflowError, RuntimeError, KeyError, TypeError) as e:
        raise CodecError(f"checkpoint is not a valid safetensors file: {e}") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 (hex) of a file, read a chunk at a time (a checkpoint is checked on disk, not in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _check_layout(layout: Mapping[str, tuple[str, tuple[int, ...]]], spec: ParamSpec, fp32: str) -> None:
    """A checkpoint holds exactly the model's parameters, each fp32 (named ``fp32`` in ``layout``) in its
    shape."""
    if set(layout) != {n for n, _ in spec}:
        raise CodecError("checkpoint parameters differ from the model's", code="wrong_tensors")
    for name, shape in spec:
        dtype, found = layout[name]
        if dtype != fp32 or tuple(found) != tuple(shape):
            raise CodecError(f"checkpoint tensor {name!r} is {dtype} {tuple(found)}", code="wrong_shape")


# -- published updates ------------------------------------------------------------------------------------
class UpdateHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_version: int = Field(ge=0)
    version: int = Field(ge=1)
    param_hash: str = Field(min_length=64, max_length=64)
    codec: Literal["exact", "sparseloco", "sparseloco_counted"] = "exact"
    k: int = Field(default=0, ge=0, le=1 << 20)
    tile: int = Field(default=0, ge=0, le=1 << 10)
    bits: int = Field(default=0, ge=0, le=8)


def compress_update(codec: SparseLoCoCodec, u: Mapping[str, torch.Tensor], spec: ParamSpec) -> bytes:
    """``u`` compressed for publishing, without its update header yet (``frame_update`` adds it)."""
    header = PayloadHeader(format_version=PAYLOAD_FORMAT_VERSION, codec=codec.name, round=0, base_version=0)
    return codec.encode(u, spec, header)[0]


def frame_update(compressed: bytes, header: UpdateHeader) -> bytes:
    """A compressed update with its header: the published bytes."""
    meta = read_metadata(compressed)
    return st_save(dict(st_load(compressed)), metadata={**meta, "gradpool_update": header.model_dump_json()})


def _decode_compressed(
    data: bytes, tensors: Mapping[str, torch.Tensor], header: UpdateHeader, spec: ParamSpec
) -> Params:
    try:
        codec = SparseLoCoCodec(k=header.k, tile=header.tile, bits=header.bits)
    except ValueError as e:
        raise CodecError(f"update codec settings are invalid: {e}", code="bad_header") from None
    if header.codec == "sparseloco_counted":
        flat = CountedCodec(codec).decode_flat(tensors, spec)
    else:
        _, flat = codec.decode_flat(data, spec)
    out: Params = {}
    o = 0
    for name, shape in spec:
        n = math.prod(shape)
        out[name] = flat[o : o + n].view(shape)
        o += n
    return out


def encode_update(delta: Mapping[str, torch.Tensor], spec: ParamSpec, header: UpdateHeader) -> bytes:
    masks, values = [], []
    for name, _ in spec:
        d = delta[name].detach().to("cpu", torch.float32).reshape(-1)
        nz = d.view(torch.int32) != 0  # bitwise: -0.0 is published too, so both sides stay bit-equal
        masks.append(pack_bits(nz.unsqueeze(0)).reshape(-1))
        values.append(d[nz])
    return st_save(
        {"mask": torch.cat(masks), "values": torch.cat(values)},
        metadata={"gradpool_update": header.model_dump_json()},
    )


def decode_update(data: bytes, spec: ParamSpec) -> tuple[UpdateHeader, Params]:
    """A published update -> its header and the dense delta per parameter (checked before use)."""
    try:
        tensors = st_load(data)
        header = UpdateHeader.model_validate_json(read_metadata(data).get("gradpool_update", ""))
    except (SafetensorError, ValueError, OverflowError, RuntimeError, ValidationError) as e:
        raise CodecError(f"update is not valid: {e}") from None
    if header.codec != "exact":
        return header, _decode_compressed(data, tensors, header, spec)
    if set(tensors) != {"mask", "values"}:
        raise CodecError("update tensors must be exactly 'mask' and 'values'", code="wrong_tensors")
    mask, values = tensors["mask"], tensors["values"]
    if mask.dtype != torch.uint8 or values.dtype != torch.float32 or mask.dim() != 1 or values.dim() != 1:
        raise CodecError("update tensors have the wrong dtype or rank", code="wrong_dtype")
    sizes = [-(-math.prod(s) // 8) for _, s in spec]
    if mask.numel() != sum(sizes):
        raise CodecError(f"update mask has {mask.numel()} bytes, expected {sum(sizes)}", code="wrong_shape")
    if not torch.isfinite(values).all():
        raise CodecError("update values hold NaN or Inf", code="non_finite")
    out: Params = {}
    mo = vo = 0
    for (name, shape), nbytes in zip(spec, sizes, strict=True):
        n = math.prod(shape)
        bits = unpack_bits(mask[mo : mo + nbytes].unsqueeze(0), n).reshape(-1)
        if bool(unpack_bits(mask[mo : mo + nbytes].unsqueeze(0), nbytes * 8)[0, n:].any()):
            raise CodecError(f"{name}: mask bits set beyond the tensor", code="index_out_of_range")
        count = int(bits.sum())
        if vo + count > values.numel():
            raise CodecError("update has fewer values than its mask selects", code="wrong_shape")
        d = torch.zeros(n, dtype=torch.float32)
        d[bits] = values[vo : vo + count]
        out[name] = d.view(shape)
        mo, vo = mo + nbytes, vo + count
    if vo != values.numel():
        raise CodecError("update has more values than its mask selects", code="wrong_shape")
    return header, out


@torch.no_grad()
def apply_update(params: Params, delta: Mapping[str, torch.Tensor]) -> None:
    """theta <- theta - delta, in place; the one operation both sides use to make the next version."""
    for name, p in params.items():
        p.sub_(delta[name].to(p.device))
