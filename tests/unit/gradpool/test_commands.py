"""The command line as a person meets it: one-line errors, non-zero exits, no tracebacks. Run in-process
(typer's runner); tests/integration/test_cli.py runs the real entry point."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from gradpool.cli import app


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """A command configures logging for its process; leave the test session's as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def gradpool(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(done: Result, needle: str, code: int | None = None) -> None:
    assert (done.exit_code != 0 and done.exception is None) or isinstance(done.exception, SystemExit), done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), done.stderr
    assert needle in lines[-1]
    if code is not None:
        assert done.exit_code == code


def test_mine_without_a_key_file(tmp_path: Path) -> None:
    done = gradpool("mine", "--coordinator", "http://127.0.0.1:9", "--key", str(tmp_path / "missing.pem"))
    assert_one_line_error(done, "does not exist")


def test_mine_with_a_key_that_is_not_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert_one_line_error(gradpool("mine", "--key", str(bad)), "cannot read key")


def test_validate_without_a_key_file(tmp_path: Path) -> None:
    done = gradpool("validate", "--key", str(tmp_path / "none.pem"), "--coordinator", "http://127.0.0.1:9")
    assert_one_line_error(done, "does not exist", code=2)


@pytest.mark.parametrize("spec", ["bogus:1", "noise", "noise:0", "lazy:x"])
def test_simulate_with_a_bad_adversary(tmp_path: Path, spec: str) -> None:
    done = gradpool("simulate", "--adversary", spec, "--out", str(tmp_path / "run"))
    assert_one_line_error(done, "KIND:COUNT", code=2)
    assert not (tmp_path / "run").exists()


def test_mine_with_an_unknown_adversary(tmp_path: Path) -> None:
    done = gradpool("mine", "--adversary", "sneaky", "--key", str(tmp_path / "k.pem"), "--create-key")
    assert_one_line_error(done, "adversary", code=2)
    assert not (tmp_path / "k.pem").exists()


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


def test_environment_overrides_the_config_file_and_flags_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator.settings import CoordinatorSettings
    from gradpool.config import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 1111\nseed = 5\n[recipe]\ninner_steps = 7\nbatch_size = 3\n")
    monkeypatch.setenv("GRADPOOL_PORT", "2222")
    monkeypatch.setenv("GRADPOOL_RECIPE__INNER_STEPS", "9")
    s = load_settings(CoordinatorSettings, cfg, {"port": 3333})
    assert s.port == 3333 and s.seed == 5
    assert s.recipe.inner_steps == 9 and s.recipe.batch_size == 3
    assert load_settings(CoordinatorSettings, cfg, {}).port == 2222
    assert "GRADPOOL_PORT" in os.environ


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[model]\nfamily = "llama"\nn_head = 3\n', "must divide n_embd"),
        ("[model]\nn_layer = 0\n", "invalid setting model"),
        ('model = "huge"\n', "unknown model 'huge'"),
    ],
)
def test_a_bad_model_config_is_one_line_at_start_up(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    assert_one_line_error(gradpool("coordinator", "serve", "--config", str(cfg)), needle, code=2)


def test_a_tokenizer_that_is_not_one_is_one_line(tmp_path: Path, corpus_file: Path) -> None:
    (tmp_path / "bad.json").write_text("{}")
    done = gradpool(
        "coordinator",
        "serve",
        "--state-dir",
        str(tmp_path / "s"),
        "--corpus",
        str(corpus_file),
        "--tokenizer",
        str(tmp_path / "bad.json"),
    )
    assert_one_line_error(done, "cannot read tokenizer")


def test_tokenizer_train_writes_a_bpe_that_the_coordinator_takes(tmp_path: Path, corpus_file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coordinator.data.tokenizer import RunTokenizer

    (tmp_path / "c").mkdir()
    text = corpus_file.read_text(encoding="utf-8")
    pq.write_table(
        pa.table({"text": [text[i : i + 5000] for i in range(0, len(text), 5000)]}),
        tmp_path / "c" / "part.parquet",
    )
    out = tmp_path / "tok" / "tokenizer.json"
    done = gradpool(
        "tokenizer", "train", "--corpus", str(tmp_path / "c"), "--vocab-size", "500", "--out", str(out)
    )
    assert done.exit_code == 0, done.output
    tok = RunTokenizer(str(out))
    assert tok.vocab_size == 500 and tok.end_of_text is not None
    assert tok.decode(tok.encode(text[:3000])) == text[:3000]
    assert_one_line_error(
        gradpool(
            "tokenizer", "train", "--corpus", str(tmp_path / "none"), "--vocab-size", "500", "--out", str(out)
        ),
        "does not exist",
    )
