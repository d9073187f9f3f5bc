"""The model's commands: ``gradpool tokenizer train``, ``gradpool export`` and ``gradpool generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.settings import BlobSettings
from gradpool.console import ConfigOpt, fail

tokenizer_app = typer.Typer(no_args_is_help=True, help="Make a tokenizer for a run.")
StateDir = Annotated[Path, typer.Option(help="the coordinator's state directory (simulate: OUT/coordinator)")]
Version = Annotated[int | None, typer.Option(min=0, help="a version with a checkpoint (default: the newest)")]


@tokenizer_app.command("train")
def train(
    corpus: Annotated[Path, typer.Option(help="the corpus: a file or folder, as coordinator serve takes it")],
    vocab_size: Annotated[int, typer.Option(min=257, max=1 << 20, help="entries, <|endoftext|> included")],
    out: Annotated[Path, typer.Option(help="where to write the tokenizer.json")],
) -> None:
    """Train a byte-level BPE tokenizer on a corpus, offline (the tokenizers library)."""
    from coordinator.data.corpus import corpus_files, text_batches
    from coordinator.data.tokenizer import train_bpe
    from protocol.errors import DataError

    try:
        files = [p for p in corpus_files(corpus) if p.suffix != ".bin"]
        if not files:
            fail(f"no text under {corpus} to train on (.bin shards are tokenized already)")
        texts = (text for path in files for batch in text_batches(path) for text, _ in batch)
        tok = train_bpe(texts, vocab_size, out)
    except DataError as e:
        fail(e.message)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror}")
    typer.echo(f"{out}: byte-level BPE, {tok.get_vocab_size()} entries")


def export(
    state_dir: StateDir,
    out: Annotated[Path, typer.Option(help="the folder to write")],
    version: Version = None,
    config: ConfigOpt = None,
) -> None:
    """Write a version of the model as a folder that Hugging Face transformers loads (from_pretrained)."""
    from gradpool.export import ExportError, Run
    from gradpool.export import export as write

    try:
        run = Run(state_dir, version, _blob_settings(config))
        written = write(run, out)
    except ExportError as e:
        fail(str(e), 1)
    except OSError as e:
        fail(f"cannot export to {out}: {e.strerror}", 1)
    typer.echo(
        f"version {run.version} ({run.config.family}, {run.config.num_parameters():,} parameters) -> "
        f"{out}: {', '.join(p.name for p in written)}"
    )


def generate(
    state_dir: StateDir,
    prompt: Annotated[str, typer.Option(help="the text to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=100_000)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: the most likely token each time")] = 0.8,
    version: Version = None,
    seed: Annotated[int, typer.Option(help="the sampling seed")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Print a sample from a version of the model: the prompt and what the model writes after it."""
    from gradpool.export import ExportError, Run
    from gradpool.export import generate as sample

    try:
        run = Run(state_dir, version, _blob_settings(config))
        text = sample(run.model(), run.tokenizer, prompt, max_new_tokens, temperature, seed)
    except ExportError as e:
        fail(str(e), 1)
    typer.echo(prompt + text)


def _blob_settings(config: Path | None) -> BlobSettings | None:
    """The blob store of a coordinator settings file (state kept in S3); None: the state directory's."""
    if config is None:
        return None
    from coordinator.settings import CoordinatorSettings
    from gradpool.config import ConfigError, load_settings

    try:
        return load_settings(CoordinatorSettings, config, {}).blobs
    except ConfigError as e:
        fail(str(e))
