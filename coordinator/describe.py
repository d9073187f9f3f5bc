"""The run described: the ``RunInfo`` every node reads from ``/v1/info``, the fingerprint of the settings
a state directory keeps (a run with other settings is refused it), and the model config and tokenizer kept
beside the state for ``gradpool export`` and ``gradpool generate``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from coordinator.data.tokenizer import RunTokenizer
from coordinator.settings import CoordinatorSettings
from coordinator.storage.base import Store
from protocol.data import DatasetMeta
from protocol.model import ModelConfig
from protocol.wire import PROTOCOL_VERSION, EvaluationConfig, RunInfo

FINGERPRINT_FIELDS = {"run_id", "seed", "model", "codec", "recipe"}
# recipe keys added since the first release, with their defaults: a state directory from before resumes
LATER_RECIPE_KEYS = {"schedule": "constant", "planned_rounds": None, "lr_floor": 0.1}


def run_info(
    settings: CoordinatorSettings,
    architecture: ModelConfig,
    tokenizer: RunTokenizer,
    data_meta: DatasetMeta,
    max_payload_bytes: int,
) -> RunInfo:
    """What the run is, as ``/v1/info`` tells every node (unsigned: the history signs it)."""
    return RunInfo(
        protocol_version=PROTOCOL_VERSION,
        run_id=settings.run_id,
        seed=settings.seed,
        model=settings.model_name(),
        architecture=architecture,
        tokenizer_sha256=tokenizer.sha256,
        seq_len=architecture.block_size,
        num_sequences=data_meta.num_sequences,
        eval_every=data_meta.eval_every,
        codec=settings.codec,
        recipe=settings.recipe,
        max_payload_bytes=max_payload_bytes,
        max_catchup_versions=settings.max_catchup_versions,
        checkpoint_every=settings.publish.checkpoint_every,
        evaluation=EvaluationConfig.model_validate(
            {
                "own_sequences": settings.validation.own_sequences,
                "other_sequences": settings.validation.other_sequences,
                "outer_lr": settings.outer_lr(),
                "early_rounds": settings.validation.early_rounds,
                "early_factor": settings.validation.early_factor,
                "assign": settings.validation.assign,
            }
        ),
        overlap=settings.rounds.overlap,
        direct_uploads=settings.blobs.direct_uploads,
    )


def check_fingerprint(store: Store, s: CoordinatorSettings, tokenizer: RunTokenizer) -> None:
    """Refuse, before touching anything, a state directory made by a run with other settings."""
    data = s.data.model_dump(mode="json", include={"corpus", "max_tokens", "eval_every"})
    if not tokenizer.is_byte:  # (byte runs keep the fingerprint of the first releases)
        data["tokenizer_sha256"] = tokenizer.sha256
    run = s.model_dump(mode="json", include=FINGERPRINT_FIELDS)
    for key, default in LATER_RECIPE_KEYS.items():  # at its default, a later key leaves the fingerprint alone
        if run["recipe"].get(key) == default:
            del run["recipe"][key]
    mine = json.dumps({"run": run, "data": data}, sort_keys=True)
    stored = store.get_meta("fingerprint")
    if stored is None:
        store.set_meta("fingerprint", mine)
    elif stored != mine:
        raise ValueError(
            f"state directory {s.state_dir} belongs to a run with other settings "
            "(run_id, model, codec, recipe, seed or data); use a new --state-dir"
        )


def keep_for_export(root: Path, store: Store, architecture: ModelConfig, tokenizer: RunTokenizer) -> None:
    """The model config and the tokenizer in the state directory, so that ``gradpool export`` and
    ``gradpool generate`` need nothing else."""
    store.set_meta("architecture", architecture.model_dump_json())
    path = root / "tokenizer.json"
    if not path.exists() or path.read_bytes() != tokenizer.json:
        tmp = path.with_name("tokenizer.json.tmp")
        tmp.write_bytes(tokenizer.json)
        os.replace(tmp, path)
