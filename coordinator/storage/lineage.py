"""A version's parameters where its own checkpoint is not kept (``[publish] checkpoint_every``, or pruned):
the newest checkpoint kept on its line, then the published updates after it, applied exactly as a miner
applies them, and the result checked against the version's parameter hash."""

from __future__ import annotations

from coordinator.storage.base import Store
from coordinator.storage.blobs import BlobCorruptError, BlobNotFoundError, BlobStore, kept_checkpoint
from protocol.codec import ParamSpec
from protocol.errors import CodecError
from protocol.params import Params, apply_update, decode_update, params_hash


class LineageError(ValueError):
    """The version cannot be rebuilt: no checkpoint kept on its line, an update gone, or a hash that does
    not match."""


class Lineage:
    """Versions rebuilt along their line, at most ``steps`` published updates from a kept checkpoint (the
    run's max_catchup_versions: what a miner would apply, and a bound on the walk any request can cause)."""

    def __init__(self, store: Store, blobs: BlobStore, spec: ParamSpec, steps: int) -> None:
        self.store, self.blobs, self.spec, self.steps = store, blobs, spec, steps

    def checkpoint_at_most(self, version: int) -> tuple[int, str] | None:
        """The newest checkpoint kept on ``version``'s line at or before it, near enough to catch up from."""
        line = self.store.line(version, self.steps)
        return None if line is None else (line[-1].version, str(line[-1].checkpoint_sha))

    def params_at(self, version: int) -> Params:
        """``version``'s parameters, from its checkpoint or the newest one before it on its line and the
        published updates since (LineageError when that cannot be done)."""
        line = self.store.line(version, self.steps)
        if line is None:
            raise LineageError(
                f"no checkpoint is kept on version {version}'s line, {self.steps} or fewer back"
            )
        *after, kept = line  # newest first
        try:
            params = kept_checkpoint(self.blobs, str(kept.checkpoint_sha), self.spec)
            for step in reversed(after):
                if step.update_sha is None:
                    raise LineageError(f"version {step.version} has no published update to rebuild it from")
                header, delta = decode_update(self.blobs.get(step.update_sha), self.spec)
                if (header.base_version, header.version) != (step.base_version, step.version):
                    raise LineageError(f"the update kept for version {step.version} is another version's")
                apply_update(params, delta)
        except (BlobNotFoundError, BlobCorruptError, CodecError, OSError) as e:
            raise LineageError(f"version {version} cannot be rebuilt: {e}") from None
        if params_hash(params, self.spec) != line[0].param_hash:
            raise LineageError(f"version {version} rebuilt does not match its parameter hash")
        return params
