"""The real entry point (``python -m gradpool``): a key written and its identity printed, and a one-line
error with a non-zero exit, no traceback (every other command's errors: tests/unit/gradpool/)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.cli import gradpool


def test_keygen_writes_a_private_key_and_prints_its_identity(tmp_path: Path) -> None:
    done = gradpool("keygen", "--out", str(tmp_path / "a.pem"))
    assert done.returncode == 0, done.stderr
    pub, path = done.stdout.split()
    assert len(bytes.fromhex(pub)) == 32 and path == str(tmp_path / "a.pem")
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o600
    again = gradpool("keygen", "--out", str(tmp_path / "a.pem"))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "already exists" in again.stderr
    kept = gradpool("keygen", "--out", str(tmp_path / "a.pem"), "--exist-ok")
    assert kept.returncode == 0 and kept.stdout.split()[0] == pub
