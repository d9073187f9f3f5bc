"""A run's model leaves the coordinator: the exported folder loads offline in Hugging Face transformers, its
logits equal gradpool's own model's, generate() runs, and the tokenizer round-trips text exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from coordinator.api.app import create_app
from coordinator.data.tokenizer import RunTokenizer, train_bpe
from coordinator.settings import CoordinatorSettings
from gradpool.cli import app
from gradpool.export import Run

transformers = pytest.importorskip("transformers")  # a dev dependency: installed with make test
TEXT = "def main():\n    return 42  # héllo, wörld 😀\n\n\tend"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe(iter([corpus_file.read_text(encoding="utf-8")]), 600, out)
    return out


def started(tmp_path: Path, corpus: Path, model: str | dict[str, Any], tokenizer: str) -> Path:
    """A coordinator's state directory for this model and tokenizer (version 0)."""
    settings = CoordinatorSettings(
        state_dir=tmp_path / "state",
        model=model,  # type: ignore[arg-type]
        data={"corpus": corpus, "eval_every": 20, "eval_sequences": 4, "tokenizer": tokenizer},
    )
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/info").json()
        served = client.get("/v1/tokenizer")
    assert info["architecture"]["vocab_size"] == RunTokenizer(tokenizer).vocab_size
    assert (
        info["tokenizer_sha256"]
        == RunTokenizer(tokenizer).sha256
        == hashlib.sha256(served.content).hexdigest()
    )
    return settings.state_dir


@pytest.mark.parametrize(
    ("model", "tokenizer"),
    [
        ("llama-tiny", "bpe"),
        ("tiny", "byte"),
        (
            {
                "family": "gpt",
                "n_layer": 2,
                "n_head": 2,
                "n_embd": 32,
                "block_size": 64,
                "tie_embeddings": True,
            },
            "bpe",
        ),
    ],
    ids=["llama-bpe", "gpt-byte", "gpt-tied-bpe"],
)
def test_an_exported_model_loads_in_transformers_and_computes_the_same_logits(
    tmp_path: Path, corpus_file: Path, bpe: Path, model: str | dict[str, Any], tokenizer: str
) -> None:
    state = started(tmp_path, corpus_file, model, str(bpe) if tokenizer == "bpe" else "byte")
    done = CliRunner().invoke(app, ["export", "--state-dir", str(state), "--out", str(tmp_path / "hf")])
    assert done.exit_code == 0, done.output
    hf = tmp_path / "hf"
    assert {p.name for p in hf.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    with open(hf / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    ours = Run(state, None).model()
    expected = "LlamaForCausalLM" if ours.cfg.family == "llama" else "GPT2LMHeadModel"
    assert type(loaded).__name__ == expected
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == TEXT  # the tokenizer round-trips the text exactly
    assert ids[0].tolist() == Run(state, None).tokenizer.encode(TEXT)
    with torch.no_grad():
        theirs, mine = loaded(ids).logits, ours(ids)
    assert torch.allclose(theirs, mine, rtol=0, atol=1e-4), float((theirs - mine).abs().max())
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def test_generate_prints_a_continuation_and_bad_input_is_one_line(tmp_path: Path, corpus_file: Path) -> None:
    state = started(tmp_path, corpus_file, "tiny", "byte")
    cli = CliRunner()
    done = cli.invoke(
        app,
        [
            "generate",
            "--state-dir",
            str(state),
            "--prompt",
            "import ",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ],
    )
    assert done.exit_code == 0 and done.stdout.startswith("import ") and len(done.stdout) > len("import \n")
    missing = cli.invoke(
        app, ["export", "--state-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    )
    assert (
        missing.exit_code == 1
        and missing.stderr.strip()
        == f"error: {tmp_path / 'nowhere'} holds no coordinator state (no state.db)"
    )
    old = cli.invoke(
        app, ["export", "--state-dir", str(state), "--out", str(tmp_path / "x"), "--version", "5"]
    )
    assert old.exit_code == 1 and "no checkpoint is kept for version 5" in old.stderr
