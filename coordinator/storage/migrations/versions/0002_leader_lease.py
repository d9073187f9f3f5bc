"""The leader lease: one row that says which coordinator process may change the run (its holder, until
when) and the fencing token every change it commits is checked against.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    lease = op.create_table(
        "lease",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.bulk_insert(lease, [{"name": "leader", "holder": "", "token": 0, "expires_at": 0.0}])


def downgrade() -> None:
    op.drop_table("lease")
