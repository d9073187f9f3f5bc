"""Ed25519 identities and request signing.

A signed request carries five headers. The signature covers the method, the path (with its query), the
sha256 of the body, the timestamp and a random nonce, one per line. The body's sha256 travels in a header
too, so that a server can check the signature (and the signer) before it reads a large body, then check
the body against the signed digest.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import SignatureError

HEADER_KEY = "X-Gradpool-Key"
HEADER_TIMESTAMP = "X-Gradpool-Timestamp"
HEADER_NONCE = "X-Gradpool-Nonce"
HEADER_SIGNATURE = "X-Gradpool-Signature"
HEADER_CONTENT = "X-Gradpool-Content-Sha256"


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the private key as PEM, readable by its owner only, atomically."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)


def load_key(path: Path) -> Ed25519PrivateKey:
    """Raises FileNotFoundError, PermissionError or ValueError with a message fit for a person."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a key that is not Ed25519")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _message(method: str, path: str, digest: str, timestamp: str, nonce: str) -> bytes:
    return "\n".join([method.upper(), path, digest, timestamp, nonce]).encode()


def sign_request(
    key: Ed25519PrivateKey, method: str, path: str, body: bytes = b"", now: float | None = None
) -> dict[str, str]:
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    digest = body_digest(body)
    sig = key.sign(_message(method, path, digest, ts, nonce))
    return {
        HEADER_KEY: public_key_hex(key),
        HEADER_TIMESTAMP: ts,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: sig.hex(),
        HEADER_CONTENT: digest,
    }


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    *,
    window_s: float = 120.0,
    now: float | None = None,
) -> tuple[str, str]:
    """Check a signed request; return (public key hex, nonce). The caller refuses nonces seen before."""
    digest = body_digest(body)
    declared = {k.lower(): v for k, v in headers.items()}.get(HEADER_CONTENT.lower())
    if declared is not None and declared.lower() != digest:
        raise SignatureError("the body does not match its declared sha256", code="bad_signature")
    return _verify(headers, method, path, digest, window_s, now)


def verify_declared(
    headers: Mapping[str, str],
    method: str,
    path: str,
    *,
    window_s: float = 120.0,
    now: float | None = None,
) -> tuple[str, str, str]:
    """Check a signed request before its body is read, over the body digest it declares; return (public
    key hex, nonce, digest). The caller then checks the body against the digest (``body_digest``)."""
    declared = {k.lower(): v for k, v in headers.items()}.get(HEADER_CONTENT.lower())
    if declared is None or len(declared) != 64:
        raise SignatureError(
            f"request does not declare its body's sha256 ({HEADER_CONTENT})", code="missing_signature"
        )
    digest = declared.lower()
    pub, nonce = _verify(headers, method, path, digest, window_s, now)
    return pub, nonce, digest


def _verify(
    headers: Mapping[str, str], method: str, path: str, digest: str, window_s: float, now: float | None
) -> tuple[str, str]:
    lower = {k.lower(): v for k, v in headers.items()}
    values = [lower.get(h.lower()) for h in (HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)]
    if any(v is None for v in values):
        raise SignatureError("request is not signed", code="missing_signature")
    pub_hex, ts, nonce, sig_hex = (str(v) for v in values)
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub_hex))
        sig = bytes.fromhex(sig_hex)
        stamp = float(ts)
    except ValueError:
        raise SignatureError("signature headers are malformed", code="bad_signature") from None
    if not 8 <= len(nonce) <= 64:
        raise SignatureError("nonce must be 8 to 64 characters", code="bad_signature")
    current = time.time() if now is None else now
    if not abs(current - stamp) <= window_s:
        raise SignatureError(
            f"timestamp is more than {window_s:.0f} s from the coordinator's clock", code="expired_timestamp"
        )
    try:
        pub.verify(sig, _message(method, path, digest, ts, nonce))
    except InvalidSignature:
        raise SignatureError("signature does not verify", code="bad_signature") from None
    return pub_hex.lower(), nonce
