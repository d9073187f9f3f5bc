"""The protocol's exception tree. Each error carries a stable machine-readable code.

ProtocolError            code: str, message: str
├── CodecError           a payload or update that does not decode (code "malformed_payload")
├── SignatureError       a request whose signature does not verify (codes below)
└── DataError            a corpus or dataset that cannot be built or read
"""

from __future__ import annotations


class ProtocolError(Exception):
    code = "protocol_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class CodecError(ProtocolError):
    code = "malformed_payload"


class SignatureError(ProtocolError):
    """Codes: missing_signature, bad_signature, expired_timestamp, replayed_nonce."""

    code = "bad_signature"


class DataError(ProtocolError):
    code = "bad_data"
