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
"""

from __future__ import annotations

import logging
import random

import torch
from safetensors.torch import load as st_load

from node.client import Refused
from node.miner import Miner
from protocol.codec import PayloadHeader, SparseTensor
from protocol.data import num_eval_total, train_id
from protocol.payload import frame, read_metadata
from protocol.wire import RoundInfo

log = logging.getLogger(__name__)
STALE_LAG = 3
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


@torch.no_grad()
def _noise_like(t: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(t)
    scaled: torch.Tensor = noise * (t.norm() / noise.norm().clamp_min(1e-12))
    return scaled
