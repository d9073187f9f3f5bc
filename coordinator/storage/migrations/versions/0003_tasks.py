"""Evaluation shared among validators (``[validation] assign``): which validator each sampled upload of a
round was assigned to, until when, and what became of it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("miner", sa.Text(), primary_key=True),
        sa.Column("validator", sa.Text(), primary_key=True),
        sa.Column("deadline", sa.Double(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=True),
    )
    op.create_index("tasks_by_validator", "tasks", ["validator", "round"])


def downgrade() -> None:
    op.drop_index("tasks_by_validator", table_name="tasks")
    op.drop_table("tasks")
