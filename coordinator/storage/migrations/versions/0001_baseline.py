"""The schema of protocol version 3, the last one made without migrations: a state directory written before
them holds exactly these tables, and is stamped with this revision (``schema.py``) rather than built.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

HEALTH = ("grad_norm_mean", "grad_norm_max", "clipped_fraction", "lr")


def _real(name: str, nullable: bool = True, default: str | None = None) -> sa.Column[Any]:
    return sa.Column(name, sa.Double(), nullable=nullable, server_default=default)


def _int(name: str, nullable: bool = True, default: str | None = None, big: bool = False) -> sa.Column[Any]:
    kind = sa.BigInteger() if big else sa.Integer()
    return sa.Column(name, kind, nullable=nullable, server_default=default)


def _text(name: str, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, sa.Text(), nullable=nullable)


def upgrade() -> None:
    op.create_table("meta", sa.Column("key", sa.Text(), primary_key=True), _text("value", False))
    op.create_table(
        "miners",
        sa.Column("pubkey", sa.Text(), primary_key=True),
        _real("registered_at", False),
        _int("last_seen_round", False),
    )
    op.create_table(
        "rounds",
        sa.Column("round", sa.Integer(), primary_key=True, autoincrement=False),
        _int("version", False),
        _text("status", False),
        _real("opened_at", False),
        _real("first_upload_at"),
        _real("closed_at"),
        _int("accepted", False, "0"),
        _int("rejected", False, "0"),
        _int("bytes_up", False, "0", big=True),
        _int("bytes_down", False, "0", big=True),
        _real("compute_s", False, "0"),
        _real("eval_loss"),
        _text("close_reason"),
        _real("reference_norm"),
        _int("bytes_down_model", False, "0", big=True),
        _int("bytes_down_data", False, "0", big=True),
        _int("result_version"),
        _int("applied_to"),
        _int("scored", False, "1"),  # 0: its evaluation continues after its version
        *(_real(f) for f in HEALTH),
    )
    op.create_table(
        "submissions",
        _int("round", False),
        _text("miner", False),
        _text("sha256", False),
        _text("content_sha256", False),
        _int("bytes", False, big=True),
        _real("norm", False),
        sa.Column("sketch", sa.LargeBinary(), nullable=False),
        _text("stored_sha256"),
        _text("status", False),
        _text("reason"),
        _real("compute_s", False),
        _real("received_at", False),
        _int("evaluated", False, "0"),
        _real("scale"),
        _text("flag"),  # an accepted upload that its later evaluation would have refused
        sa.Column("kept", sa.LargeBinary()),  # the sample of the coordinates it keeps (near-copies)
        *(_real(f) for f in HEALTH),
        sa.PrimaryKeyConstraint("round", "miner"),
    )
    op.create_table(
        "verdicts",
        _int("round", False),
        _text("miner", False),
        _text("validator", False),
        *(_real(f, False) for f in ("own_before", "own_after", "other_before", "other_after")),
        _real("created_at", False),
        *(_real(f, False, "0") for f in ("margin_se", "paired_margin", "paired_se")),
        sa.PrimaryKeyConstraint("round", "miner", "validator"),
    )
    op.create_table(
        "refusals", _int("round", False), _text("miner", False), _text("code", False), _real("at", False)
    )
    op.create_index("refusals_by_miner", "refusals", ["miner", "round"])
    op.create_table("nonces", sa.Column("nonce", sa.Text(), primary_key=True), _real("expires_at", False))
    op.create_table(
        "versions",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        _int("round"),
        _text("param_hash", False),
        _real("eval_loss"),
        _text("update_sha"),
        _int("update_bytes", False, "0", big=True),
        _text("checkpoint_sha"),
        _int("checkpoint_bytes", False, "0", big=True),
        _real("created_at", False),
        _int("base_version"),
        _text("state_sha"),
        _real("rolled_back_at"),
    )
    op.create_table(
        "history",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        _int("version", False),
        _text("kind", False),
        _text("record", False),
        _text("signature", False),
    )
    op.create_index("history_by_version", "history", ["version", "kind"])


def downgrade() -> None:
    for table in ("history", "versions", "nonces", "refusals", "verdicts", "submissions", "rounds"):
        op.drop_table(table)
    op.drop_table("miners")
    op.drop_table("meta")
