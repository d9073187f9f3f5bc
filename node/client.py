"""The nodes' HTTP client of the coordinator. Every call has an explicit timeout; the coordinator's
refusals and failures come back as the errors of node/errors.py."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from node.errors import (
    ProtocolMismatch,
    Refused,
    Rejected,
    Unavailable,
    Untrusted,
    certificate_error,
    refusal,
    tls_context,
)
from node.trust import Trust
from protocol.errors import HistoryError
from protocol.history import HEADER_ANSWER_SIGNATURE, HistoryPage
from protocol.params import file_sha256
from protocol.sharing import RoundTasks
from protocol.signing import sign_request
from protocol.wire import (
    HEADER_PROTOCOL,
    PROTOCOL_VERSION,
    Leaderboard,
    Registration,
    RoundInfo,
    RoundRecord,
    RunInfo,
    SubmissionReceipt,
    UploadCommit,
    UploadIntent,
    UploadTicket,
    VerdictReceipt,
    Verdicts,
    VersionInfo,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
REDIRECT_TRIES = 3


@contextlib.contextmanager
def _untrusted() -> Iterator[None]:
    """What the pinned key and the signed history do not back stops the node (not worth retrying)."""
    try:
        yield
    except HistoryError as e:
        raise Untrusted(f"refused the coordinator's answer: {e.message}") from None


class CoordinatorClient:
    def __init__(
        self,
        base_url: str,
        key: Ed25519PrivateKey,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        ca_cert: Path | None = None,
        trust: Trust | None = None,
    ) -> None:
        """``base_url``: the coordinator's, or several comma-separated (replicas of one network: a request
        that finds one unreachable, failing with a 5xx or busy goes to the next). ``trust``: check every
        answer against the coordinator's key and signed history (nodes always do; without it, answers are
        taken as they come: tools and tests)."""
        self.key, self.trust = key, trust
        self.timeout_s = timeout_s
        self.urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no coordinator URL given")
        self.replica = 0  # the one requests go to: the last that answered
        self.http = httpx.Client(
            base_url=self.urls[0],
            verify=tls_context(ca_cert),
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION)},
            transport=transport,
            follow_redirects=True,  # a download may come straight from the object store
        )
        self.direct_uploads = False  # as /v1/info says: uploads go straight to the object store
        self.bytes_down = 0
        self.bytes_up = 0
        self.transfer_s = 0.0  # time in requests, long-polls excepted

    def close(self) -> None:
        self.http.close()

    # -- plumbing -----------------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        signed: bool = False,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
        timed: bool = True,
    ) -> httpx.Response:
        """One request, to each replica in turn (from the one that answered last) until one answers."""
        for _ in self.urls[1:]:
            try:
                return self._send_once(method, path, body, signed, params, timeout_s, timed)
            except Unavailable as e:
                self.replica = (self.replica + 1) % len(self.urls)
                self.http.base_url = httpx.URL(self.urls[self.replica])
                log.warning("%s; trying the replica at %s", e, self.urls[self.replica])
        return self._send_once(method, path, body, signed, params, timeout_s, timed)

    def _send_once(
        self,
        method: str,
        path: str,
        body: bytes | None,
        signed: bool,
        params: dict[str, str] | None,
        timeout_s: float | None,
        timed: bool,
    ) -> httpx.Response:
        t0 = time.perf_counter()
        request = self.http.build_request(
            method, path, content=body, params=params, timeout=timeout_s or self.timeout_s
        )
        if signed:
            target = request.url.raw_path.decode()
            request.headers.update(sign_request(self.key, method, target, body or b""))
        for attempt in range(REDIRECT_TRIES):
            try:
                response = self.http.send(request)
            except httpx.ConnectError as e:
                if (bad := certificate_error(e)) is not None:
                    raise Untrusted(
                        f"the TLS certificate of {request.url.host} does not verify ({bad.verify_message}); "
                        "if your own CA signed it, pass --ca-cert FILE"
                    ) from None
                raise Unavailable(f"cannot reach the coordinator at {self.http.base_url}: {e}") from None
            except httpx.TransportError as e:
                raise Unavailable(f"cannot reach the coordinator at {self.http.base_url}: {e}") from None
            if not (response.history and response.status_code in (400, 403)) or attempt == REDIRECT_TRIES - 1:
                break  # a presigned URL that expired (or was refused): ask the coordinator for a new one
        self.bytes_down += len(response.content)
        self.bytes_up += len(body or b"")
        if timed:
            self.transfer_s += time.perf_counter() - t0
        if response.status_code >= 500:
            raise Unavailable(f"coordinator answered {response.status_code}")
        if response.status_code == 429:  # too many new keys a minute: this one's turn comes later
            wait = response.headers.get("Retry-After", "?")
            raise Unavailable(f"coordinator busy ({refusal(response).message}; retry after {wait} s)")
        if response.status_code >= 400:
            raise refusal(response)
        return response

    def _json(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as e:
            raise ProtocolMismatch(
                f"unexpected answer from {response.request.url}: {e.errors()[0]['msg']}"
            ) from None

    # -- the API ------------------------------------------------------------------------------------------
    def info(self) -> RunInfo:
        try:
            response = self._send("GET", "/v1/info")
        except Refused as e:
            raise ProtocolMismatch(
                f"{self.http.base_url} does not look like a gradpool coordinator ({e})"
            ) from None
        theirs = response.headers.get(HEADER_PROTOCOL)
        if theirs != str(PROTOCOL_VERSION):
            raise ProtocolMismatch(
                f"coordinator speaks protocol {theirs}, this miner speaks {PROTOCOL_VERSION}"
            )
        info = self._json(RunInfo, response)
        if self.trust is not None:
            with _untrusted():
                self.trust.accept_info(info)
        self.direct_uploads = info.direct_uploads
        return info

    def register(self) -> Registration:
        return self._json(Registration, self._send("POST", "/v1/miners", body=b"", signed=True))

    def round(self, after: int = -1, wait_s: float = 0.0, closed: int = -1) -> RoundInfo:
        """The open round; with ``wait_s``, once a round later than ``after`` is open and round ``closed``
        has closed (or wait_s passed)."""
        params = {"after": str(after), "wait_s": str(wait_s), "closed": str(closed)}
        response = self._send(
            "GET", "/v1/round", params=params, timeout_s=self.timeout_s + wait_s, timed=False
        )
        ri = self._json(RoundInfo, response)
        if self.trust is not None:
            with _untrusted():
                self.trust.check_round(ri, self.history)
        return ri

    def history(self, after: int = -1) -> HistoryPage:
        """The signed history's records after seq ``after`` (a page of them)."""
        return self._json(HistoryPage, self._send("GET", "/v1/history", params={"after": str(after)}))

    def version(self, version: int) -> VersionInfo:
        info = self._json(VersionInfo, self._send("GET", f"/v1/versions/{version}"))
        if self.trust is not None:
            with _untrusted():
                self.trust.check_version(version, info.param_hash, self.history)
        return info

    def update(self, version: int) -> bytes:
        data = self._send("GET", f"/v1/versions/{version}/update").content
        if self.trust is not None:
            with _untrusted():
                self.trust.check_blob("update", version, data, self.history)
        return data

    def checkpoint(self, version: int | None = None, partial: Path | None = None) -> tuple[int, bytes]:
        """A checkpoint (the latest, or ``version``'s). With ``partial``, the download is written to that
        file as it arrives and an interrupted one resumes from it (HTTP Range)."""
        params = {} if version is None else {"version": str(version)}
        if partial is None:
            response = self._send("GET", "/v1/checkpoint", params=params)
            found = self._checkpoint_version(response, version)
            return found, self._checked_checkpoint(found, response.content)
        found = self.checkpoint_file(version, partial)
        data = partial.read_bytes()
        partial.unlink()
        return found, data

    def checkpoint_file(self, version: int | None, partial: Path, at_most: bool = False) -> int:
        """A checkpoint (the latest, ``version``'s, or with ``at_most`` the newest kept at or before
        ``version`` on its line) downloaded into the file ``partial`` (an interrupted download resumes from
        it, by HTTP Range) and checked there against the signed history, never held whole in memory; its
        version. The file is the caller's to read and remove."""
        params = {} if version is None else {"at_most" if at_most else "version": str(version)}
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = self.http.build_request("GET", "/v1/checkpoint", params=params, headers=headers)
        try:
            for _ in range(REDIRECT_TRIES):
                response = self.http.send(request, stream=True)
                if not (response.history and response.status_code in (400, 403)):
                    break
                response.close()  # an expired presigned URL: ask the coordinator again
            try:
                if response.status_code == 416:  # the partial file is not a prefix of this checkpoint
                    partial.unlink()
                    raise Unavailable("checkpoint download must restart from the beginning")
                if response.status_code >= 400:
                    response.read()
                    if response.status_code >= 500:
                        raise Unavailable(f"coordinator answered {response.status_code}")
                    raise refusal(response)
                found = self._checkpoint_version(response, version, at_most)
                partial.parent.mkdir(parents=True, exist_ok=True)
                with open(partial, "ab" if response.status_code == 206 else "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
                        self.bytes_down += len(chunk)
            finally:
                response.close()
        except httpx.TransportError as e:
            raise Unavailable(f"checkpoint download interrupted ({e}); it will resume") from None
        if self.trust is None:
            return found
        try:
            with _untrusted():
                self.trust.check_sha256("checkpoint", found, file_sha256(partial), self.history)
        except Untrusted:
            partial.unlink()
            if have:  # resumed from a partial file that was not a prefix of this checkpoint: start afresh
                raise Unavailable("a resumed checkpoint download does not match; it starts again") from None
            raise
        except BaseException:  # the check could not be made (the history unreachable): download afresh
            partial.unlink()
            raise
        return found

    def _checked_checkpoint(self, version: int, data: bytes) -> bytes:
        if self.trust is not None:
            with _untrusted():
                self.trust.check_blob("checkpoint", version, data, self.history)
        return data

    @staticmethod
    def _checkpoint_version(response: httpx.Response, asked: int | None, at_most: bool = False) -> int:
        """The version a checkpoint answer names: the coordinator's (its redirect's, when it sent one,
        before anything the object store adds), and the one ``asked`` for when one was (with ``at_most``,
        one at or before it)."""
        for r in (*response.history, response):
            if "X-Gradpool-Version" in r.headers:
                try:
                    found = int(r.headers["X-Gradpool-Version"])
                except ValueError:
                    break
                if asked is not None and (found > asked if at_most else found != asked):
                    raise Untrusted(f"asked for the checkpoint of version {asked}, answered with {found}'s")
                return found
        raise ProtocolMismatch("checkpoint answer has no version header")

    def sequences(self, ids: list[int]) -> torch.Tensor:
        response = self._send("GET", "/v1/data", params={"ids": ",".join(map(str, ids))})
        if self.trust is not None:
            with _untrusted():
                self.trust.check_data(ids, response.content, response.headers.get(HEADER_ANSWER_SIGNATURE))
        try:
            tokens = st_load(response.content)["tokens"]
        except (SafetensorError, KeyError, ValueError) as e:
            raise ProtocolMismatch(f"data answer is not a token tensor: {e}") from None
        if tokens.dtype not in (torch.uint8, torch.int32) or tokens.dim() != 2 or tokens.shape[0] != len(ids):
            raise ProtocolMismatch(f"data answer has shape {tuple(tokens.shape)} and dtype {tokens.dtype}")
        return tokens.long()

    def round_record(self, round_: int) -> RoundRecord:
        record = self._json(RoundRecord, self._send("GET", f"/v1/rounds/{round_}"))
        if self.trust is not None:
            with _untrusted():
                self.trust.check_uploads(record)
        return record

    def tasks(self, round_: int, validator: str) -> RoundTasks:
        """A closed round's shared evaluation, and ``validator``'s share of it."""
        params = {"validator": validator}
        return self._json(RoundTasks, self._send("GET", f"/v1/rounds/{round_}/tasks", params=params))

    def payload(self, round_: int, miner: str) -> bytes:
        """A miner's upload in a round that has closed."""
        return self._send("GET", f"/v1/rounds/{round_}/payloads/{miner}").content

    def post_verdicts(self, round_: int, verdicts: Verdicts) -> VerdictReceipt:
        body = verdicts.model_dump_json().encode()
        return self._json(
            VerdictReceipt, self._send("POST", f"/v1/rounds/{round_}/verdicts", body=body, signed=True)
        )

    def leaderboard(self, round_: int | None = None) -> Leaderboard:
        params = {} if round_ is None else {"round": str(round_)}
        return self._json(Leaderboard, self._send("GET", "/v1/leaderboard", params=params))

    def submit(self, round_: int, payload: bytes) -> SubmissionReceipt:
        if self.direct_uploads:
            return self._submit_direct(round_, payload)
        response = self._send("POST", f"/v1/rounds/{round_}/submissions", body=payload, signed=True)
        return self._json(SubmissionReceipt, response)

    def _submit_direct(self, round_: int, payload: bytes) -> SubmissionReceipt:
        """Straight to the object store: a presigned form for it, the payload posted with the form, then
        the commit that has the coordinator take it (and check it as any upload)."""
        sha = hashlib.sha256(payload).hexdigest()
        intent = UploadIntent(sha256=sha, bytes=len(payload)).model_dump_json().encode()
        form = self._send("POST", f"/v1/rounds/{round_}/uploads", body=intent, signed=True)
        ticket = self._json(UploadTicket, form)
        t0 = time.perf_counter()
        try:
            stored = self.http.post(
                ticket.url,
                data=ticket.fields,
                files={"file": ("payload", payload, "application/octet-stream")},
                timeout=self.timeout_s,
            )
        except httpx.TransportError as e:
            raise Unavailable(f"cannot reach the object store at {ticket.url}: {e}") from None
        self.bytes_up += len(payload)
        self.transfer_s += time.perf_counter() - t0
        if stored.status_code >= 500:
            raise Unavailable(f"the object store answered {stored.status_code}")
        if stored.status_code >= 400:
            raise Rejected(stored.status_code, "object_store_refused", stored.text[:300])
        commit = UploadCommit(sha256=sha).model_dump_json().encode()
        response = self._send("POST", f"/v1/rounds/{round_}/commits", body=commit, signed=True)
        return self._json(SubmissionReceipt, response)
