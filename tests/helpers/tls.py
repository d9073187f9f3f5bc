"""Certificates made on the fly for HTTPS tests (gradpool/tls.py): a certificate authority of the test's
own and a server certificate it signs for 127.0.0.1. Nothing is checked in; every key is new."""

from __future__ import annotations

from pathlib import Path

from gradpool.tls import Tls
from gradpool.tls import make_tls as make


def make_tls(root: Path, name: str = "test") -> Tls:
    """A new CA and a server certificate it signs for 127.0.0.1, as PEM files under ``root``."""
    return make(root, ["127.0.0.1"], prefix=f"{name}-", days=1)
