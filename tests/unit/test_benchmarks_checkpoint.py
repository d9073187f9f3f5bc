"""benchmarks.checkpoint on the small preset: a streamed checkpoint never holds the file whole in memory.
Both writes are measured in this process (the benchmark starts a fresh one for each, for figures no earlier
allocation can hide; the high-water mark is reset before each write either way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.checkpoint import main, write_once


@pytest.mark.timeout(120)
def test_the_streamed_write_holds_no_copy_of_the_checkpoint(tmp_path: Path) -> None:
    streamed = write_once("small", "streamed", tmp_path)
    in_memory = write_once("small", "in_memory", tmp_path)
    assert streamed["content"] == in_memory["content"] and streamed["bytes"] == in_memory["bytes"]
    assert streamed["bytes"] > 4 * streamed["params"]  # fp32, and a header
    # built in memory, the file is held whole at least once; streamed, far from it
    assert in_memory["peak_increase_bytes"] >= in_memory["bytes"]
    assert streamed["peak_increase_bytes"] < streamed["bytes"] / 4
    assert streamed["seconds"] > 0 and in_memory["seconds"] > 0
    # read back and hashed: from the file, the parameters' pages alone; from the bytes, the file beside them
    fp32 = 4 * streamed["params"]
    assert streamed["read_peak_increase_bytes"] < 1.25 * fp32
    assert in_memory["read_peak_increase_bytes"] >= fp32 + 0.9 * in_memory["bytes"]  # freed heap reused


def test_an_unknown_model_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--models", "gpt5", "--json"])
    assert e.value.code == 2 and "unknown model 'gpt5'" in capsys.readouterr().err
