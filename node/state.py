"""The miner's local state: error feedback, inner optimizer state, and the version it stands on with its
parameters (so that after a restart it catches up by published updates, not a whole checkpoint).

Written after every round to one safetensors file (temporary name, then rename). A file that does not
load is moved aside and the miner starts clean rather than training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from protocol.codec.feedback import ErrorFeedback

log = logging.getLogger(__name__)
STATE_FILE = "miner-state.safetensors"


@dataclass
class MinerState:
    version: int
    inner_step: int
    rounds_done: int
    params: dict[str, torch.Tensor] | None = None  # theta at ``version``


def save_state(
    state_dir: Path, state: MinerState, ef: ErrorFeedback, optimizer: torch.optim.Optimizer, run_id: str
) -> None:
    tensors = {f"ef/{n}": t for n, t in ef.state_dict().items()}
    for n, t in (state.params or {}).items():
        tensors[f"params/{n}"] = t.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for idx, per_param in opt["state"].items():
        for key, value in per_param.items():
            tensors[f"opt/{idx}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {
        "run_id": run_id,
        "version": str(state.version),
        "inner_step": str(state.inner_step),
        "rounds_done": str(state.rounds_done),
        "ef_beta": str(ef.beta),
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, state_dir / STATE_FILE)


def load_state(
    state_dir: Path, ef: ErrorFeedback, optimizer: torch.optim.Optimizer, run_id: str, device: torch.device
) -> MinerState | None:
    """Restore the saved state into ``ef`` and ``optimizer``; None when there is none (or it was unusable)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        tensors = load_file(path, device="cpu")
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__", {})
        if meta.get("run_id") != run_id:
            log.warning("state in %s belongs to run %r; starting clean", state_dir, meta.get("run_id"))
            _move_aside(path)
            return None
        ef.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ef/")}, device)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt/"):
                _, idx, key = k.split("/", 2)
                opt_state.setdefault(int(idx), {})[key] = v.to(device) if key != "step" else v
        full = optimizer.state_dict()
        full["state"] = opt_state
        optimizer.load_state_dict(full)
        params = {k[7:]: v for k, v in tensors.items() if k.startswith("params/")} or None
        return MinerState(int(meta["version"]), int(meta["inner_step"]), int(meta["rounds_done"]), params)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        log.warning("state file %s is unreadable (%s); moved aside, starting clean", path, e)
        _move_aside(path)
        ef.buffers = {}
        return None


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short sha256 of named tensors (name order), to tell in a log line that two states are identical."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _move_aside(path: Path) -> None:
    os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))
