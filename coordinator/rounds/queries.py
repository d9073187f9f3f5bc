"""The read side, for the HTTP handlers: the open round from the round state (no SQL, so it may run on the
event loop), everything else from the store (call it off the loop)."""

from __future__ import annotations

from collections.abc import Callable

from coordinator.errors import Conflict, NotFound
from coordinator.publishing.history import History
from coordinator.rounds.stall import Stall, stall_of
from coordinator.rounds.state import RoundCell
from coordinator.storage.base import Store
from coordinator.storage.records import HEALTH_FIELDS, StoredRound
from protocol.history import HistoryPage
from protocol.wire import RoundInfo, RoundRecord, RoundReport, SubmissionRecord, VersionInfo

RECENT_ROUNDS = 100  # rounds in /v1/status; older ones are paged with /v1/reports


class Queries:
    def __init__(self, cell: RoundCell, store: Store, history: History, clock: Callable[[], float]) -> None:
        self.cell, self.store, self.history, self.clock = cell, store, history, clock
        self._stall: tuple[int, Stall] | None = None  # (the newest closed round then, its stall)

    # -- from the round state -----------------------------------------------------------------------------
    def round_info(self) -> RoundInfo:
        s = self.cell.state
        info = RoundInfo(
            round=s.round,
            version=s.version,
            status=s.status,
            param_hash=s.param_hash,
            submissions=len(s.uploaded),
            expected=len(s.expected),
            deadline_s=s.time_left(self.clock()),
            closing=None if s.behind is None else s.behind.round,
            newest=None if s.head == s.version else s.head,
            newest_hash=None if s.head == s.version else s.newest_hash,
        )
        return self.history.signed_round(info)

    def last_closed_round(self) -> int | None:
        last = self.cell.state.last_closed
        return last if last >= 0 else None

    # -- from the store -----------------------------------------------------------------------------------
    def version_info(self, version: int) -> VersionInfo | None:
        row = self.store.version(version)
        if row is None:
            return None
        return VersionInfo(
            version=row.version,
            round=row.round,
            param_hash=row.param_hash,
            eval_loss=row.eval_loss,
            update_bytes=row.update_bytes,
            checkpoint_bytes=row.checkpoint_bytes,
            base_version=row.base_version,
            rolled_back=row.rolled_back,
            record=self.store.version_record(version),
        )

    def history_page(self, after: int, limit: int) -> HistoryPage:
        last = self.store.last_record()
        return HistoryPage(
            records=self.store.records(after, limit), last=-1 if last is None else last.record.seq
        )

    def reports(self, after: int = -1, limit: int | None = None) -> list[RoundReport]:
        """Closed rounds after ``after`` (at most ``limit``); with neither, the most recent ones."""
        store = self.store
        rows = (
            store.recent_reports(RECENT_ROUNDS)
            if after < 0 and limit is None
            else store.reports(after, -1 if limit is None else limit)
        )
        refused = store.refusal_counts(rows[0].round, rows[-1].round) if rows else {}
        return [_report(r, refused.get(r.round, {})) for r in rows]

    def stall(self) -> Stall:
        """The stall as of the newest closed round: read from the store once per closed round, not on every
        status request (the dashboard polls it)."""
        last = self.cell.state.last_closed
        cached = self._stall
        if cached is None or cached[0] != last:
            cached = self._stall = (last, stall_of(self.store))
        return cached[1]

    def initial_eval_loss(self) -> float | None:
        return self.store.eval_loss(0)

    def count_miners(self) -> int:
        return self.store.count_miners()

    def audit(self, round_: int) -> list[dict[str, object]]:
        """Every upload of a round: miner, payload hash, size, and accepted or refused with the reason."""
        if round_ > self.cell.state.round:
            raise NotFound("not_found", f"round {round_} does not exist")
        return self.store.audit(round_)

    def round_record(self, round_: int) -> RoundRecord | None:
        state = self.cell.state
        row = self.store.round(round_)
        if row is None:
            return None
        status = state.status if round_ == state.round else row.status
        if state.behind is not None and round_ == state.behind.round:
            status = state.behind.status
        uploads = self.store.round_uploads(round_)
        record = RoundRecord(
            round=round_,
            version=row.version,
            status=status,
            submissions=[
                SubmissionRecord(
                    miner=u.miner,
                    sha256=u.sha256,
                    bytes=u.size,
                    status=u.status,
                    reason=u.reason,
                    evaluated=u.evaluated,
                    scale=u.scale,
                    flag=u.flag,
                )
                for u in uploads
            ],
            reference_norm=row.reference_norm,
            close_reason=row.close_reason,
            applied_to=row.applied_to,
            scored=bool(row.scored) and row.status == "closed",
        )
        return self.history.signed_uploads(record)

    def payload_sha(self, round_: int, miner: str) -> str | None:
        """A round's upload, once the round no longer takes uploads (so nobody copies an open round's)."""
        state = self.cell.state
        if round_ == state.round and state.status == "open":
            raise Conflict(
                "round_open", f"round {round_} is still open; its uploads are served once it closes"
            )
        upload = self.store.upload(round_, miner)
        return None if upload is None else upload.sha256

    def checkpoint_sha(self, version: int | None = None) -> tuple[int, str] | None:
        return self.store.checkpoint(version)

    def update_sha(self, version: int) -> str | None:
        row = self.store.version(version)
        return None if row is None else row.update_sha


def _report(r: StoredRound, refusals: dict[str, int]) -> RoundReport:
    return RoundReport(
        round=r.round,
        version=r.version if r.result_version is None else r.result_version,
        eval_loss=r.eval_loss,
        accepted=r.accepted,
        rejected=r.rejected,
        bytes_up=r.bytes_up,
        bytes_down=r.bytes_down,
        wall_s=round((r.next_opened_at or r.closed_at or r.opened_at) - r.opened_at, 3),
        compute_s=round(r.compute_s, 3),
        close_reason=r.close_reason,
        bytes_down_model=r.bytes_down_model,
        bytes_down_data=r.bytes_down_data,
        refusals=refusals,
        **{f: getattr(r, f) for f in HEALTH_FIELDS},
    )
