"""The protocol's exception tree. Each error carries a stable machine-readable code.

ProtocolError            code: str, message: str
├── CodecError           a payload or update that does not decode (code "malformed_payload")
├── SignatureError       a request whose signature does not verify (codes below)
├── HistoryError         an answer of the coordinator that its signed history does not back
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


class HistoryError(ProtocolError):
    """A coordinator's answer, record or blob that does not verify against its key and signed history
    (a man in the middle, a tampered store, or another coordinator answering at the address)."""

    code = "untrusted_coordinator"


class DataError(ProtocolError):
    code = "bad_data"
