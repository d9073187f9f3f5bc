"""Settings files outlive renames: an old key still loads, with a warning that names its new place."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import CoordinatorSettings, PublishSettings
from gradpool.config import load_settings


def test_the_downlinks_old_key_codec_is_its_format() -> None:
    renamed = r"\[publish\] codec is deprecated; it is now \[publish\] format"
    with pytest.warns(DeprecationWarning, match=renamed):
        old = PublishSettings.model_validate({"codec": "exact"})
    assert old.format == "exact"
    assert PublishSettings.model_validate({"format": "sparseloco"}).format == "sparseloco"


def test_a_settings_file_with_the_retired_faults_section_loads(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[faults]\npublish_delay_s = 0.0\n\n[publish]\ncodec = "exact"\n')
    with pytest.warns(DeprecationWarning):
        settings = load_settings(CoordinatorSettings, path, {"state_dir": tmp_path / "state"})
    assert settings.publish.format == "exact"
    assert "faults" not in CoordinatorSettings.model_fields


def test_an_unknown_key_is_still_refused() -> None:
    with pytest.raises(ValueError, match="extra"):
        PublishSettings.model_validate({"formatt": "exact"})
