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
        return self.store.checkpoint_at_most(version, self.steps)

    def params_at(self, version: int) -> Params:
        """``version``'s parameters, from its checkpoint or the newest one before it on its line and the
        published updates since (LineageError when that cannot be done)."""
        store, blobs, spec = self.store, self.blobs, self.spec
        row = store.version(version)
        if row is None:
            raise LineageError(f"no version {version}")
        found = self.checkpoint_at_most(version)
        if found is None:
            raise LineageError(
                f"no checkpoint is kept on version {version}'s line {self.steps} or fewer back"
            )
        start, sha = found
        chain, at = [], version
        while at != start:  # the versions after the checkpoint, newest first
            step = store.version(at)
            if step is None or step.base_version is None or step.update_sha is None:
                raise LineageError(f"version {at} has no published update to rebuild it from")
            chain.append(step)
            at = step.base_version
        try:
            params = kept_checkpoint(blobs, sha, spec)
            for step in reversed(chain):
                header, delta = decode_update(blobs.get(str(step.update_sha)), spec)
                if (header.base_version, header.version) != (step.base_version, step.version):
                    raise LineageError(f"the update kept for version {step.version} is another version's")
                apply_update(params, delta)
        except (BlobNotFoundError, BlobCorruptError, CodecError, OSError) as e:
            raise LineageError(f"version {version} cannot be rebuilt: {e}") from None
        if params_hash(params, spec) != row.param_hash:
            raise LineageError(f"version {version} rebuilt does not match its parameter hash")
        return params
