"""The store's reads of closed rounds: the reports, the audit, and the history the closer judges a round
against (recent norms, gains and uploads, the spread of arrivals)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import RowMapping

from coordinator.storage.records import StoredRound, UploadPrint, sketch_of
from coordinator.storage.rows import from_row


class ReportReads:
    """Mixed into ``SqlStore``, which gives ``_all`` and ``_one``."""

    def _all(self, sql: str, *args: Any) -> list[RowMapping]:
        raise NotImplementedError

    def _one(self, sql: str, *args: Any) -> RowMapping | None:
        raise NotImplementedError

    def reports(self, after: int = -1, limit: int = -1) -> list[StoredRound]:
        """Closed rounds after ``after`` in order (at most ``limit``; -1: all), each with the version the
        model was at when it closed (``result_version``; before it was recorded, the next round's base) and
        when the next round opened (``next_opened_at``)."""
        rows = self._all(
            "SELECT r.*, COALESCE(r.result_version, n.version) AS resulting_version, "
            "n.opened_at AS next_opened_at FROM rounds r LEFT JOIN rounds n ON n.round = r.round + 1 "
            "WHERE r.status = 'closed' AND r.round > ? ORDER BY r.round" + (" LIMIT ?" if limit >= 0 else ""),
            after,
            *([limit] if limit >= 0 else []),
        )
        return [from_row(StoredRound, r, result_version=r["resulting_version"]) for r in rows]

    def refusal_counts(self, first: int, last: int) -> dict[int, dict[str, int]]:
        """Per round in [first, last]: refusal reason -> uploads refused."""
        rows = self._all(
            "SELECT round, reason, COUNT(*) AS n FROM submissions WHERE round BETWEEN ? AND ? "
            "AND status = 'rejected' GROUP BY round, reason",
            first,
            last,
        )
        out: dict[int, dict[str, int]] = {}
        for r in rows:
            out.setdefault(int(r["round"]), {})[str(r["reason"])] = int(r["n"])
        return out

    def recent_reports(self, limit: int) -> list[StoredRound]:
        last = self._one("SELECT MAX(round) AS r FROM rounds WHERE status = 'closed'")
        newest = -1 if last is None or last["r"] is None else int(last["r"])
        return self.reports(after=newest - limit, limit=limit)

    def last_closed_round(self) -> int | None:
        row = self._one("SELECT MAX(round) AS r FROM rounds WHERE status = 'closed'")
        return None if row is None or row["r"] is None else int(row["r"])

    def arrival_spreads(self, first_round: int, before_round: int) -> list[float]:
        """Per round with 2+ uploads in [first_round, before_round): last arrival - first arrival."""
        rows = self._all(
            "SELECT MAX(received_at) - MIN(received_at) AS spread FROM submissions WHERE round >= ? "
            "AND round < ? GROUP BY round HAVING COUNT(*) > 1",
            first_round,
            before_round,
        )
        return [float(r["spread"]) for r in rows]

    def audit(self, round_: int) -> list[dict[str, object]]:
        rows = self._all(
            "SELECT miner, sha256, content_sha256, bytes, status, reason, compute_s, received_at "
            "FROM submissions WHERE round = ? ORDER BY received_at",
            round_,
        )
        return [dict(r) for r in rows]

    def accepted_norms(self, first_round: int, before_round: int) -> list[float]:
        """The norms of those rounds' accepted uploads that their evaluation after the version did not
        flag: the trusted norm reference."""
        rows = self._all(
            "SELECT norm FROM submissions WHERE round >= ? AND round < ? AND status = 'accepted' "
            "AND flag IS NULL",
            first_round,
            before_round,
        )
        return [float(r["norm"]) for r in rows]

    def accepted_gains(self, first_round: int, before_round: int, validator: str) -> list[float]:
        """The gains ``validator`` measured for the accepted uploads of those rounds."""
        rows = self._all(
            "SELECT v.own_before - v.own_after AS gain FROM verdicts v JOIN submissions s "
            "ON s.round = v.round AND s.miner = v.miner WHERE v.round >= ? AND v.round < ? "
            "AND s.status = 'accepted' AND v.validator = ?",
            first_round,
            before_round,
            validator,
        )
        return [float(r["gain"]) for r in rows]

    def recent_uploads(self, first_round: int, before_round: int) -> list[UploadPrint]:
        """Every upload of those rounds (accepted or refused): what a replay would copy."""
        rows = self._all(
            "SELECT round, miner, content_sha256, sketch FROM submissions WHERE round >= ? AND round < ?",
            first_round,
            before_round,
        )
        return [
            UploadPrint(r["round"], r["miner"], r["content_sha256"], sketch_of(r["sketch"])) for r in rows
        ]
