"""Following the published model: a local copy brought to any version by the published updates, or by
the checkpoint when far behind or when a hash does not match. Miners and validators both follow."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from node.client import CoordinatorClient
from node.errors import Refused
from protocol.errors import CodecError
from protocol.params import UpdateHeader, apply_update, decode_update, params_hash, read_checkpoint
from protocol.payload import ParamSpec
from protocol.wire import RunInfo

log = logging.getLogger(__name__)


class Follower:
    """The local parameters (``params``) at ``version`` (-1: none yet)."""

    client: CoordinatorClient
    info: RunInfo
    spec: ParamSpec
    device: torch.device
    params: dict[str, torch.Tensor]
    version: int
    verified: bool
    partial_dir: Path

    # -- catching up --------------------------------------------------------------------------------------
    def catch_up(self, target: int, target_hash: str) -> None:
        """Bring the local parameters to version ``target``: by the published updates when at most
        max_catchup_versions behind, else (or when a hash does not match) by the checkpoint."""
        if self.version == target and self.verified:
            return
        self.verified = False  # until the target's hash is matched
        start = self.version
        if 0 <= start <= target and target - start <= self.info.max_catchup_versions:
            try:
                self._apply_chain(start, target)
                if params_hash(self.params, self.spec) == target_hash:
                    if target > start:
                        log.info(
                            "version %d: caught up from version %d by %d published updates",
                            target,
                            start,
                            target - start,
                        )
                    self.verified = True
                    return
                log.warning(
                    "version %d: hash mismatch after applying updates; downloading checkpoint", target
                )
            except (CodecError, Refused) as e:
                log.warning(
                    "catching up to version %d by updates failed (%s); downloading checkpoint", target, e
                )
        self._download_checkpoint(target, target_hash)
        self.verified = True

    def _apply_chain(self, start: int, target: int) -> None:
        """The published updates from ``start`` to ``target``: the target's alone when it applies to
        ``start`` (one version behind, or the first version after a rollback to ``start``), else each
        version's on the target's line in turn (``_line``: a rollback's set-aside versions are skipped)."""
        if target == start:
            return
        last = self._published(target)
        if last[0].base_version == start:
            apply_update(self.params, last[1])
            self.version = target
            return
        for v in self._line(start, target):
            header, delta = last if v == target else self._published(v)
            if header.base_version != self.version:
                raise CodecError(f"update for version {v} says {header.base_version} -> {header.version}")
            apply_update(self.params, delta)
            self.version = v

    def _published(self, v: int) -> tuple[UpdateHeader, dict[str, torch.Tensor]]:
        header, delta = decode_update(self.client.update(v), self.spec)
        if header.version != v:
            raise CodecError(f"update for version {v} says it makes version {header.version}")
        return header, delta

    def _line(self, start: int, target: int) -> list[int]:
        """The versions after ``start`` on ``target``'s line, oldest first, found by each one's base (after
        a rollback, versions of another line lie between them); at most max_catchup_versions."""
        line: list[int] = []
        at, most = target, self.info.max_catchup_versions
        while at != start:
            base = self.client.version(at).base_version if at > start and len(line) < most else None
            if base is None:
                raise CodecError(f"version {target} is not {most} published updates or fewer after {start}")
            line.append(at)
            at = base
        return line[::-1]

    def _download_checkpoint(self, target: int, target_hash: str) -> None:
        """The target's checkpoint; or, a checkpoint coming every ``checkpoint_every`` versions, the newest
        at or before it and the published updates from there."""
        partial = self.partial_dir / f"checkpoint-{target}.partial"
        between = self.info.checkpoint_every > 1
        version = self.client.checkpoint_file(target, partial, at_most=between)  # on disk, not in memory
        try:
            size = partial.stat().st_size
            params, _ = read_checkpoint(partial, self.spec)
        finally:
            partial.unlink(missing_ok=True)
        expected = self.client.version(version).param_hash
        if params_hash(params, self.spec) != expected:
            raise CodecError(f"checkpoint of version {version} does not match its published hash")
        self.params = {n: t.to(self.device) for n, t in params.items()}
        self.version = version
        log.info("version %d: loaded checkpoint (%d bytes)", version, size)
        if version < target:  # the checkpoint before it: the rest by published updates, checked at the end
            self._apply_chain(version, target)
            if params_hash(self.params, self.spec) != target_hash:
                raise CodecError(f"version {target} from the checkpoint of {version} does not match its hash")
            log.info("version %d: caught up from the checkpoint of version %d", target, version)
