"""Commits checked by the replica they reached (coordinator/rounds/direct.py): what it found of each
payload, for the leader to record the upload without reading the payload again.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checked",
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("miner", sa.Text(), primary_key=True),
        sa.Column("sha256", sa.Text(), primary_key=True),
        sa.Column("checker", sa.Text(), nullable=False),
        sa.Column("found", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("checked")
