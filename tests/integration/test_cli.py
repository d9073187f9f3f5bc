"""The command line as a person meets it: one-line errors, non-zero exits, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def gradpool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradpool", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert needle in lines[-1]


def test_keygen_writes_a_private_key_and_prints_its_identity(tmp_path: Path) -> None:
    done = gradpool("keygen", "--out", str(tmp_path / "a.pem"))
    assert done.returncode == 0, done.stderr
    pub, path = done.stdout.split()
    assert len(bytes.fromhex(pub)) == 32 and path == str(tmp_path / "a.pem")
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o600
    assert_one_line_error(gradpool("keygen", "--out", str(tmp_path / "a.pem")), "already exists")
    again = gradpool("keygen", "--out", str(tmp_path / "a.pem"), "--exist-ok")
    assert again.returncode == 0 and again.stdout.split()[0] == pub


def test_mine_without_a_key_file(tmp_path: Path) -> None:
    done = gradpool("mine", "--coordinator", "http://127.0.0.1:9", "--key", str(tmp_path / "missing.pem"))
    assert_one_line_error(done, "does not exist")


def test_mine_with_a_key_that_is_not_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert_one_line_error(gradpool("mine", "--key", str(bad)), "cannot read key")


def test_validate_without_a_key_file(tmp_path: Path) -> None:
    done = gradpool("validate", "--key", str(tmp_path / "none.pem"), "--coordinator", "http://127.0.0.1:9")
    assert_one_line_error(done, "does not exist")
    assert done.returncode == 2


@pytest.mark.parametrize("spec", ["bogus:1", "noise", "noise:0", "lazy:x"])
def test_simulate_with_a_bad_adversary(tmp_path: Path, spec: str) -> None:
    done = gradpool("simulate", "--adversary", spec, "--out", str(tmp_path / "run"))
    assert_one_line_error(done, "KIND:COUNT")
    assert done.returncode == 2 and not (tmp_path / "run").exists()


def test_mine_with_an_unknown_adversary(tmp_path: Path) -> None:
    done = gradpool("mine", "--adversary", "sneaky", "--key", str(tmp_path / "k.pem"), "--create-key")
    assert_one_line_error(done, "adversary")
    assert done.returncode == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("port = 'eighty'\n", "invalid setting port"),
        ("[recipe\n", "cannot read config"),
        ("no_such_setting = 1\n", "no_such_setting"),
    ],
)
def test_coordinator_with_a_malformed_config(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert_one_line_error(gradpool("coordinator", "serve", "--config", str(cfg)), needle)


def test_coordinator_with_a_missing_config_or_corpus(tmp_path: Path) -> None:
    assert_one_line_error(
        gradpool("coordinator", "serve", "--config", str(tmp_path / "nope.toml")), "does not exist"
    )
    done = gradpool(
        "coordinator", "serve", "--state-dir", str(tmp_path / "s"), "--corpus", str(tmp_path / "nope")
    )
    assert_one_line_error(done, "corpus path")


def test_environment_overrides_the_config_file_and_flags_override_both(tmp_path: Path) -> None:
    from coordinator.settings import CoordinatorSettings
    from gradpool.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 1111\nseed = 5\n[recipe]\ninner_steps = 7\nbatch_size = 3\n")
    os.environ["GRADPOOL_PORT"] = "2222"
    os.environ["GRADPOOL_RECIPE__INNER_STEPS"] = "9"
    try:
        s = load_settings(CoordinatorSettings, cfg, {"port": 3333})
        assert s.port == 3333 and s.seed == 5
        assert s.recipe.inner_steps == 9 and s.recipe.batch_size == 3
        assert load_settings(CoordinatorSettings, cfg, {}).port == 2222
    finally:
        del os.environ["GRADPOOL_PORT"], os.environ["GRADPOOL_RECIPE__INNER_STEPS"]
