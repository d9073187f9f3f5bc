"""What the nodes' client of the coordinator raises (node/client.py), and what HTTPS trusts.

ClientError
├── Unavailable        unreachable, timed out, a 5xx or a 429: worth retrying later
├── Untrusted          the server's TLS certificate, or what it answers, does not verify against the
│                      coordinator's pinned key and signed history (node/trust.py): not worth retrying
├── ProtocolMismatch   the server is not a gradpool coordinator of this protocol version
└── Refused            a 4xx with the coordinator's error code
    ├── RoundClosed        round_closed, round_not_open
    ├── StaleVersion       stale_version
    ├── AlreadySubmitted   already_submitted
    ├── NotAuthorized      401/403 (signature, unknown miner)
    └── Rejected           422 and every other refusal of the payload
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx


class ClientError(Exception):
    pass


class Unavailable(ClientError):
    pass


class Untrusted(ClientError):
    pass


class ProtocolMismatch(ClientError):
    pass


class Refused(ClientError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class RoundClosed(Refused):
    pass


class StaleVersion(Refused):
    pass


class AlreadySubmitted(Refused):
    pass


class NotAuthorized(Refused):
    pass


class Rejected(Refused):
    pass


_BY_CODE: dict[str, type[Refused]] = {
    "round_closed": RoundClosed,
    "round_not_open": RoundClosed,
    "stale_version": StaleVersion,
    "already_submitted": AlreadySubmitted,
}


def tls_context(ca_cert: Path | None = None) -> ssl.SSLContext:
    """What HTTPS trusts: the system's certificate authorities, and ``ca_cert``'s too when given (a
    coordinator with a certificate of its own CA; downloads straight from an object store still verify)."""
    context = ssl.create_default_context()
    if ca_cert is not None:
        context.load_verify_locations(cafile=ca_cert)
    return context


def certificate_error(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed beneath a connection error, if that is what it was."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def refusal(response: httpx.Response) -> Refused:
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        if response.status_code == 404:
            return Refused(404, "not_found", f"{response.request.url} is not a gradpool endpoint")
        return Refused(response.status_code, "http_error", response.text[:200])
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = NotAuthorized if response.status_code in (401, 403) else Rejected
    return cls(response.status_code, code, message)
