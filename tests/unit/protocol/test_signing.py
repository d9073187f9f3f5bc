"""Ed25519 identities and request signatures."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.errors import SignatureError
from protocol.signing import (
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    generate_key,
    load_key,
    public_key_hex,
    save_key,
    sign_request,
    verify_request,
)

NOW = 1_700_000_000.0
KEY = generate_key()
BODY = b'{"round": 3}'


def signed(**overrides: str) -> dict[str, str]:
    return {**sign_request(KEY, "POST", "/v1/rounds/3/submit?x=1", BODY, now=NOW), **overrides}


def verify(
    headers: dict[str, str],
    method: str = "POST",
    path: str = "/v1/rounds/3/submit?x=1",
    body: bytes = BODY,
    now: float = NOW,
) -> tuple[str, str]:
    return verify_request(headers, method, path, body, now=now)


def test_sign_verify_round_trip() -> None:
    headers = signed()
    pub, nonce = verify(headers)
    assert pub == public_key_hex(KEY) and len(pub) == 64
    assert nonce == headers[HEADER_NONCE] and len(nonce) == 32
    assert headers[HEADER_TIMESTAMP] == f"{NOW:.3f}"
    # Header names are case-insensitive, the method's case does not matter, a clock within the window is fine.
    assert verify({k.lower(): v for k, v in headers.items()}, method="post", now=NOW + 119.0)[0] == pub


def test_every_request_gets_a_fresh_nonce() -> None:
    assert signed()[HEADER_NONCE] != signed()[HEADER_NONCE]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"body": b'{"round": 4}'}, "bad_signature"),
        ({"path": "/v1/rounds/4/submit?x=1"}, "bad_signature"),
        ({"path": "/v1/rounds/3/submit?x=2"}, "bad_signature"),
        ({"method": "PUT"}, "bad_signature"),
        ({"now": NOW + 121.0}, "expired_timestamp"),
        ({"now": NOW - 121.0}, "expired_timestamp"),
    ],
)
def test_tampered_requests_are_refused(change: dict[str, object], code: str) -> None:
    with pytest.raises(SignatureError) as e:
        verify(signed(), **change)  # type: ignore[arg-type]
    assert e.value.code == code


@pytest.mark.parametrize(
    ("header", "value", "code"),
    [
        (HEADER_TIMESTAMP, f"{NOW + 1:.3f}", "bad_signature"),  # signed over the timestamp
        (HEADER_TIMESTAMP, "nan", "expired_timestamp"),
        (HEADER_TIMESTAMP, "inf", "expired_timestamp"),
        (HEADER_TIMESTAMP, "yesterday", "bad_signature"),
        (HEADER_NONCE, "f" * 32, "bad_signature"),
        (HEADER_NONCE, "short", "bad_signature"),
        (HEADER_NONCE, "n" * 65, "bad_signature"),
        (HEADER_KEY, public_key_hex(Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)), "bad_signature"),
        (HEADER_KEY, "zz" * 32, "bad_signature"),
        (HEADER_KEY, "ab" * 31, "bad_signature"),
        (HEADER_SIGNATURE, "00" * 64, "bad_signature"),
        (HEADER_SIGNATURE, "00", "bad_signature"),
        (HEADER_SIGNATURE, "not hex", "bad_signature"),
    ],
)
def test_tampered_headers_are_refused(header: str, value: str, code: str) -> None:
    with pytest.raises(SignatureError) as e:
        verify(signed(**{header: value}))
    assert e.value.code == code


@pytest.mark.parametrize("missing", [HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE])
def test_missing_headers_are_refused(missing: str) -> None:
    headers = signed()
    del headers[missing]
    with pytest.raises(SignatureError) as e:
        verify(headers)
    assert e.value.code == "missing_signature"
    with pytest.raises(SignatureError) as e:
        verify({})
    assert e.value.code == "missing_signature"


def test_save_and_load_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "miner.pem"
    save_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_hex(load_key(path)) == public_key_hex(KEY)
    assert [p.name for p in path.parent.iterdir()] == ["miner.pem"]  # no temporary file left behind
    other = generate_key()
    save_key(other, path)  # replaces the old key
    assert public_key_hex(load_key(path)) == public_key_hex(other)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_key_refuses_garbage_and_other_key_types(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError):
        load_key(garbage)
    (tmp_path / "random.pem").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError):
        load_key(tmp_path / "random.pem")
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(ec_key)
    with pytest.raises(ValueError, match="not Ed25519"):
        load_key(tmp_path / "ec.pem")
    with pytest.raises(FileNotFoundError):
        load_key(tmp_path / "absent.pem")
