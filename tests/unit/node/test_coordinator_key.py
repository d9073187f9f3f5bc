"""A node pins the coordinator's key (given, or on first use) and stops at any other key with an error that
says how to accept it; what the key did not sign is refused and counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings
from node.trust import PIN_FILE, Trust
from protocol.errors import HistoryError
from protocol.history import sign
from protocol.model import get_config
from protocol.signing import generate_key, public_key_hex
from protocol.wire import CodecConfig, RunInfo, TrainingRecipe


def signed_info(key=None) -> RunInfo:  # type: ignore[no-untyped-def]
    key = key or generate_key()
    info = RunInfo(
        run_id="r",
        seed=0,
        model="tiny",
        architecture=get_config("tiny"),
        tokenizer_sha256="0" * 64,
        seq_len=64,
        num_sequences=100,
        eval_every=50,
        codec=CodecConfig(),
        recipe=TrainingRecipe(),
        max_payload_bytes=1 << 20,
        max_catchup_versions=CoordinatorSettings().max_catchup_versions,
        coordinator_key=public_key_hex(key),
    )
    return info.model_copy(update={"signature": sign(key, "info", info.signed_fields())})


def test_the_key_is_pinned_on_first_use_and_a_new_key_stops_the_node(tmp_path: Path) -> None:
    key = generate_key()
    Trust(tmp_path).accept_info(signed_info(key))
    assert (tmp_path / PIN_FILE).read_text().strip() == public_key_hex(key)
    Trust(tmp_path).accept_info(signed_info(key))  # the same coordinator again
    refused: list[str] = []
    trust = Trust(tmp_path)
    trust.on_refusal = refused.append
    other = signed_info()
    with pytest.raises(HistoryError) as e:
        trust.accept_info(other)
    message = str(e.value)
    assert f"changed from {public_key_hex(key)}" in message and f"to {other.coordinator_key}" in message
    assert f"delete {tmp_path / PIN_FILE} or pass --coordinator-key {other.coordinator_key}" in message
    assert refused == ["key"]


def test_a_pinned_key_admits_only_that_coordinator(tmp_path: Path) -> None:
    key = generate_key()
    with pytest.raises(HistoryError, match="not the pinned"):
        Trust(tmp_path, public_key_hex(generate_key())).accept_info(signed_info(key))
    Trust(tmp_path, public_key_hex(key).upper()).accept_info(signed_info(key))
    assert not (tmp_path / PIN_FILE).exists()  # a given key is not written down


def test_an_info_answer_changed_on_the_way_is_refused(tmp_path: Path) -> None:
    info = signed_info()
    changed = info.model_copy(update={"seed": 1})
    with pytest.raises(HistoryError, match="signature of its info answer does not verify"):
        Trust(tmp_path).accept_info(changed)
    unsigned = info.model_copy(update={"coordinator_key": None})
    with pytest.raises(HistoryError, match="does not sign its answers"):
        Trust(tmp_path / "other").accept_info(unsigned)
