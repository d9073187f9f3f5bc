"""Cheating miners, for simulations and tests (``gradpool mine --adversary KIND``): each is an honest
miner that does one step differently, so a run shows what the coordinator's checks and scores make of it.

- ``noise``: a random update with the norm of its honest one.
- ``scaled``: its honest update x100.
- ``signflip``: its honest update negated.
- ``copycat``: re-sends another miner's upload of the previous round, relabelled for this one (an open
  round's uploads are never served, so that is the newest it can copy).
- ``stale``: trains from a version ``STALE_LAG`` behind the current one (or version 0 while there is
  none that old) and claims the current one.
- ``lazy``: trains on random training sequences instead of its assignment.
- ``freerider``: sends its honest update x1e-4 (an all-zero one is refused as empty at once).
- ``nan``: sends an update holding NaN (refused at upload).
- ``lutscale``: sends its honest update with the payload's value tables x1e30 (the values themselves for
  codecs without tables): well formed and finite, so intake takes it.
- ``sybil``: one operator's keys sharing one computation (``adversary_shared``, a folder they all see). The
  first key to claim the folder works as an honest miner and leaves each round's update there; every other
  key uploads that update plus noise (``SYBIL_NOISE`` of its norm, its own), through its own error feedback
  and encoded afresh: near-copies whose bytes and sketches differ from the original. (It still trains on
  its own data, as a cover: what it uploads is the first key's update.)
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from node.errors import Refused
from node.miner import Miner
from protocol.codec import PayloadHeader, SparseTensor
from protocol.data import num_eval_total, train_id
from protocol.payload import frame, read_metadata
from protocol.wire import RoundInfo

log = logging.getLogger(__name__)
STALE_LAG = 3
SYBIL_NOISE = 0.25  # a sybil copy's noise, relative to the update's norm
SYBIL_WAIT_S = 60.0  # how long a copy waits for the first key's update of the round
SCALES = {"scaled": 100.0, "signflip": -1.0, "freerider": 1e-4}
TABLE_SCALE = 1e30
TABLES = ("lut", "scale", "dense")  # what to scale, by codec: sparseloco's value tables, int8's, dense values


class Adversary(Miner):
    @property
    def kind(self) -> str:
        return str(self.settings.adversary)

    def base_for(self, ri: RoundInfo) -> tuple[int, str]:
        if self.kind != "stale" or ri.version == 0:
            return super().base_for(ri)
        old = max(0, ri.version - STALE_LAG)
        return old, self.client.version(old).param_hash

    def training_ids(self, ri: RoundInfo) -> list[int]:
        if self.kind != "lazy":
            return super().training_ids(ri)
        r, info = self.info.recipe, self.info
        num_train = info.num_sequences - num_eval_total(info.num_sequences, info.eval_every)
        rng = random.Random(f"{self.pubkey}:{ri.round}")
        return [
            train_id(rng.randrange(num_train), info.eval_every) for _ in range(r.inner_steps * r.batch_size)
        ]

    def pseudo_gradient(self, ri: RoundInfo, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind != "sybil" or self.settings.adversary_shared is None:
            return delta
        shared = self.settings.adversary_shared
        if _leader(shared, self.pubkey):
            save_file({n: t.cpu().contiguous() for n, t in delta.items()}, shared / f".{ri.round}.tmp")
            os.replace(shared / f".{ri.round}.tmp", shared / f"round-{ri.round}.safetensors")
            return delta
        original = shared / f"round-{ri.round}.safetensors"
        end = time.monotonic() + SYBIL_WAIT_S
        while not original.exists() and time.monotonic() < end and not self.stop.is_set():
            time.sleep(0.1)
        if not original.exists():
            log.warning("round %d: no update of the operator's first key to copy; sending this one", ri.round)
            return delta
        copied = load_file(original, device=str(self.device))
        rng = torch.Generator().manual_seed(int(self.pubkey[:12], 16) + ri.round)
        log.info("round %d: sending the operator's first key's update with noise", ri.round)
        return {n: t + SYBIL_NOISE * _noise_like(t, rng) for n, t in copied.items()}

    def make_payload(
        self, ri: RoundInfo, header: PayloadHeader, vector: dict[str, torch.Tensor]
    ) -> tuple[bytes, dict[str, SparseTensor]] | None:
        if self.kind == "copycat":
            return self._copy(ri, header)
        if self.kind in SCALES:
            vector = {n: t * SCALES[self.kind] for n, t in vector.items()}
        elif self.kind == "noise":
            vector = {n: _noise_like(t) for n, t in vector.items()}
        elif self.kind == "nan":
            vector = {n: t.clone() for n, t in vector.items()}
            vector[self.spec[0][0]].view(-1)[0] = float("nan")
        elif self.kind == "lutscale":
            made = super().make_payload(ri, header, vector)
            return None if made is None else (_scale_tables(made[0]), made[1])
        return super().make_payload(ri, header, vector)

    def _copy(self, ri: RoundInfo, header: PayloadHeader) -> tuple[bytes, dict[str, SparseTensor]] | None:
        if ri.round == 0:
            return None
        try:
            previous = self.client.round_record(ri.round - 1)
            others = [s for s in previous.submissions if s.miner != self.pubkey and s.status == "accepted"]
            if not others:
                return None
            victim = random.Random(f"{self.pubkey}:{ri.round}").choice(others)
            data = self.client.payload(ri.round - 1, victim.miner)
        except Refused as e:
            log.warning("round %d: nothing to copy (%s)", ri.round, e)
            return None
        theirs = PayloadHeader.model_validate_json(read_metadata(data)["gradpool"])
        relabelled = theirs.model_copy(
            update={"round": header.round, "base_version": header.base_version, "stats": header.stats}
        )
        log.info(
            "round %d: re-sending miner %s's upload of round %d", ri.round, victim.miner[:12], ri.round - 1
        )
        return frame(dict(st_load(data)), relabelled), {}


def _scale_tables(payload: bytes) -> bytes:
    tensors = dict(st_load(payload))
    name = next(n for n in TABLES if n in tensors)
    tensors[name] = (tensors[name].double() * TABLE_SCALE).to(tensors[name].dtype)
    header = PayloadHeader.model_validate_json(read_metadata(payload)["gradpool"])
    return frame(tensors, header)


def _leader(shared: Path, pubkey: str) -> bool:
    """Whether ``pubkey`` is the operator's first key: the first to claim the folder (for good)."""
    shared.mkdir(parents=True, exist_ok=True)
    claim = shared / "first-key"
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return claim.read_text().strip() == pubkey
    with os.fdopen(fd, "w") as f:
        f.write(pubkey)
    return True


@torch.no_grad()
def _noise_like(t: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=rng).to(t.device, t.dtype)
    scaled: torch.Tensor = noise * (t.norm() / noise.norm().clamp_min(1e-12))
    return scaled
